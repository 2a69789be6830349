"""Real photos available offline, preprocessed as ImageNet classifiers expect.

The set: every real photograph bundled inside scikit-image (no pooch download), namely astronaut,
chelsea (a cat), coffee, rocket, the two stereo motorcycle views, hubble_deep_field, retina,
immunohistochemistry, and the grayscale camera, coins, moon, clock, page, text, brick, grass, gravel, cell,
microaneurysms (grayscale is replicated to 3 channels) -- 20 photos -- plus scikit-learn's china.jpg and
flower.jpg when scikit-learn happens to be installed, plus the 29 photographs of Debian's opencv-doc
samples (models.real.OPENCV_PHOTOS: fruit, animals, buildings, street and aerial views, objects) when
tools/fetch_models.py has put them in the cache. Synthetic images (logo, colorwheel, horse
silhouette, checkerboard, phantom) and the 25x25 lfw faces are left out.

Each photo gives several views (center crop, its mirror, two off-center crops), 80 images by default, so
top-1 agreement between a dense and a pruned model is measured in steps of ~1.3% rather than 5%.
There are no ImageNet labels here: use these for agreement with the dense model, never for accuracy.

A second, larger set, the *natural* photos: the 253 colour photographs inside Debian's gcompris-qt-data
(tools, objects, animals, fish, monuments, landscapes, musicians), available once tools/fetch_models.py
has extracted them. Unlike the set above, which mixes in microscopy, text pages, textures and the night
sky, every one of them shows what an ImageNet classifier is built for; they give two views each (center
crop and its mirror).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "camera",
    "coins",
    "moon",
    "clock",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "cell",
    "microaneurysms",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# center: the standard eval crop; flip: its mirror; first/last: crops at the top-left / bottom-right ends.
VIEWS = ("center", "flip", "first", "last")


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _skimage_photos() -> dict[str, np.ndarray]:
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    left, right, _disparity = skimage.data.stereo_motorcycle()
    photos["motorcycle_left"], photos["motorcycle_right"] = left, right
    return photos


def _sklearn_photos() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:  # optional: scikit-learn is not a dependency
        return {}
    return {name.removesuffix(".jpg"): load_sample_image(name) for name in SKLEARN_PHOTOS}


def _opencv_photos() -> dict[str, np.ndarray]:
    import skimage.io

    from graphprune.models.real import OPENCV_PHOTOS, opencv_photos_dir

    folder = opencv_photos_dir()
    if not all((folder / name).exists() for name in OPENCV_PHOTOS):
        return {}  # not fetched: the set is scikit-image's (and scikit-learn's) photos only
    return {"opencv_" + name.rsplit(".", 1)[0]: skimage.io.imread(folder / name) for name in OPENCV_PHOTOS}


@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    photos = {**_skimage_photos(), **_sklearn_photos(), **_opencv_photos()}
    return tuple((name, _to_rgb(img)) for name, img in sorted(photos.items()))


def load_photos() -> dict[str, np.ndarray]:
    """All photos as HxWx3 uint8 arrays, keyed by name, in a stable (sorted) order."""
    return {name: img.copy() for name, img in _photos()}


def _resize_cover(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scaled (aspect kept) so that it covers height x width enlarged by 256/224, the usual eval resize."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    scale = max(height * 256 / 224 / h, width * 256 / 224 / w)
    shape = (max(height, round(h * scale)), max(width, round(w * scale)))
    # resize returns float64 in [0, 1] for uint8 input; anti-aliasing matters when shrinking big photos.
    return resize(img, shape, order=1, anti_aliasing=scale < 1).astype(np.float32)


def _crop(img: np.ndarray, height: int, width: int, view: str) -> np.ndarray:
    h, w = img.shape[:2]
    if view in ("center", "flip"):
        top, left = (h - height) // 2, (w - width) // 2
    elif view == "first":
        top, left = 0, 0
    elif view == "last":
        top, left = h - height, w - width
    else:
        raise ValueError(f"unknown view {view!r}; use {VIEWS}")
    out = img[top : top + height, left : left + width]
    return out[:, ::-1] if view == "flip" else out


def _crops(photos: tuple[tuple[str, np.ndarray], ...], height: int, width: int,
           views: tuple[str, ...]) -> np.ndarray:
    crops = []
    for _name, img in photos:
        resized = _resize_cover(img, height, width)
        crops += [_crop(resized, height, width, view) for view in views]
    batch = (np.stack(crops) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


@lru_cache(maxsize=8)
def _batch(height: int, width: int, views: tuple[str, ...]) -> np.ndarray:
    return _crops(_photos(), height, width, views)


def imagenet_batch(size: int | tuple[int, int] = 224, views: tuple[str, ...] = VIEWS) -> np.ndarray:
    """[N, 3, H, W] float32, ImageNet-normalised; row order matches batch_names(views). ``size``: H = W,
    or (H, W)."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return _batch(height, width, tuple(views)).copy()


def batch_names(views: tuple[str, ...] = VIEWS) -> list[str]:
    """Row labels of imagenet_batch, e.g. 'chelsea/center'."""
    return [f"{name}/{view}" for name, _img in _photos() for view in views]


# ---------- the natural photos (GCompris) ----------------------------------------------------------------

NATURAL_VIEWS = ("center", "flip")


@lru_cache(maxsize=1)
def _natural() -> tuple[tuple[str, np.ndarray], ...]:
    from PIL import Image

    from graphprune.models.real import gcompris_photos_dir

    photos = []
    for path in sorted(gcompris_photos_dir().glob("*.webp")):
        with Image.open(path) as img:
            photos.append(("gcompris_" + path.stem, np.asarray(img.convert("RGB"))))
    return tuple(photos)


@lru_cache(maxsize=4)
def _natural_batch(height: int, width: int, views: tuple[str, ...]) -> np.ndarray:
    return _crops(_natural(), height, width, views)


def natural_batch(size: int | tuple[int, int] = 224, views: tuple[str, ...] = NATURAL_VIEWS) -> np.ndarray:
    """[N, 3, H, W] float32 crops of the natural photos, as imagenet_batch; [0, 3, H, W] until fetched."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not _natural():
        return np.zeros((0, 3, height, width), dtype=np.float32)
    return _natural_batch(height, width, tuple(views)).copy()
