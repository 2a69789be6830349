"""foolbox's 20 labelled ImageNet photos: extraction, preprocessing, the named set and the evaluator.

The real tests skip when the foolbox wheel is not in the cache (``python tools/fetch_models.py``).
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from graphprune.calibration import DATASETS, load_calibration
from graphprune.errors import GraphpruneError
from graphprune.models import evaluators as ev
from graphprune.models import real

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def need_samples() -> None:
    pytest.importorskip("skimage")
    if not real.available("foolbox"):
        pytest.skip("foolbox wheel not fetched, run `python tools/fetch_models.py`")


def test_extract_folder_takes_only_the_named_members(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("a.jpg", "b.jpg", "c.png"):
            zf.writestr(f"pkg/data/{name}", name)
    real._extract_folder(wheel, "pkg/data/", tmp_path / "out", ("a.jpg", "c.png"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg", "c.png"]
    assert (tmp_path / "out" / "c.png").read_text() == "c.png"
    with pytest.raises(GraphpruneError, match="no member 'pkg/data/d.jpg'"):
        real._extract_folder(wheel, "pkg/data/", tmp_path / "other", ("a.jpg", "d.jpg"))
    assert not (tmp_path / "other").exists()


def test_the_evaluator_is_registered_beside_the_per_model_ones():
    assert "mobilenet_v2_imagenet" not in ev.EVALUATORS  # EVALUATORS: one per real model
    evaluator = ev.get_evaluator("mobilenet_v2_imagenet")
    assert evaluator is ev.SECOND_EVALUATORS["mobilenet_v2_imagenet"]
    assert evaluator.primary == "top1" and evaluator.higher_is_better
    assert "imagenet-samples" in DATASETS


@pytest.mark.real
def test_files_and_labels_load():
    need_samples()
    samples = real.imagenet_samples()
    assert len(samples) == 20
    for path, label in samples:
        assert path.is_file() and path.read_bytes()[:2] == b"\xff\xd8"  # JPEG
        assert path.name.startswith("imagenet_") and path.stem.endswith(f"_{label}")
        assert 0 <= label < 1000
    images, labels = real.imagenet_samples_batch()
    assert images.shape == (20, 3, 224, 224) and images.dtype == np.float32
    assert labels.tolist() == [label for _, label in samples]


@pytest.mark.real
def test_preprocessing_matches_a_pil_reference():
    """Short side to 256, center crop 224, ImageNet normalisation, done independently with PIL."""
    need_samples()
    from PIL import Image

    reference = []
    for path, _label in real.imagenet_samples():
        img = Image.open(path).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
        left, top = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
        pixels = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float64) / 255
        reference.append(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    images, _labels = real.imagenet_samples_batch()
    # The resamplers differ a little (measured mean 0.027); swapped channels would be ~0.35.
    assert np.abs(np.stack(reference) - images).mean() < 0.06


@pytest.mark.real
def test_named_set_feeds_the_input_layout_and_size():
    need_samples()
    nchw = [b["img"] for b in load_calibration("imagenet-samples", ["img"], 8, shapes={"img": (1, 3, 224, 224)})]
    assert [len(b) for b in nchw] == [8, 8, 4]
    images, _labels = real.imagenet_samples_batch()
    np.testing.assert_array_equal(np.concatenate(nchw), images)
    nhwc = next(iter(load_calibration("imagenet-samples", ["img"], 4, shapes={"img": (None, 160, 192, 3)})))
    assert nhwc["img"].shape == (4, 160, 192, 3)
    with pytest.raises(GraphpruneError, match="'imagenet-samples'.*rank 4"):
        next(iter(load_calibration("imagenet-samples", ["ids"], 2, shapes={"ids": (1, 128)})))


@pytest.mark.real
def test_dense_mobilenet_v2_is_accurate_and_agrees_with_itself():
    evaluator = ev.get_evaluator("mobilenet_v2_imagenet")
    if not evaluator.available():
        pytest.skip("foolbox or MobileNetV2 weights not fetched, run `python tools/fetch_models.py`")
    need_samples()
    result = evaluator.compare(evaluator.dense_model(), evaluator.dense_model())
    # torchvision's MobileNetV2 is ~72% top-1 on ImageNet; it gets 18 of these 20 right (measured), so
    # 14 is a floor that wrong preprocessing (channel order, scale, normalisation) would fall below.
    assert result["dense"]["top1"] >= 14 / 20
    assert result["dense"]["top5"] >= result["dense"]["top1"]
    assert result["dense"]["images"] == 20
    assert result["dense"] == result["pruned"]
    assert result["agreement"] == pytest.approx({"top1": 1.0, "top5": 1.0})
