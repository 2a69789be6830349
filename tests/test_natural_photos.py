"""The natural photos: GCompris's photographs read out of Qt resource files, and the natural-* sets."""

from __future__ import annotations

import io

import numpy as np
import pytest

from graphprune.calibration import DATASETS, load_calibration, photo_rows
from graphprune.errors import GraphpruneError
from graphprune.models import real

Image = pytest.importorskip("PIL.Image")


def _webp(size: tuple[int, int], mode: str = "RGB", colour: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (colour,) * len(mode)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def test_rcc_webp_images_finds_each_webp_and_skips_other_riff_chunks():
    first, second = _webp((4, 3)), _webp((5, 5), colour=200)
    wave = b"RIFF" + (8).to_bytes(4, "little") + b"WAVEdata"  # a RIFF chunk that is not WebP
    truncated = b"RIFF" + (10_000).to_bytes(4, "little") + b"WEBP"  # claims more bytes than the file has
    blob = b"qres\x00\x00\x00\x03junk" + first + wave + b"RIFF" + second + b"tail" + truncated
    assert list(real.rcc_webp_images(blob)) == [first, second]


def test_select_gcompris_photos_keeps_large_colour_photos_once(tmp_path, monkeypatch):
    monkeypatch.setattr(real, "GCOMPRIS_ACTIVITIES", ("animals", "places"))
    photo, other = _webp((160, 130)), _webp((200, 140), colour=30)
    icon, cutout = _webp((64, 64), colour=10), _webp((300, 200), mode="RGBA")  # cut-outs have alpha
    (tmp_path / "animals.rcc").write_bytes(b"qres" + photo + icon + cutout)
    (tmp_path / "places.rcc").write_bytes(b"qres" + photo + other)  # photo again: kept once
    assert real.select_gcompris_photos(tmp_path) == {"animals_001.webp": photo, "places_001.webp": other}


def _natural_or_skip() -> np.ndarray:
    pytest.importorskip("skimage")
    if not real.available("gcompris-photos"):
        pytest.skip("GCompris photos not fetched: run `python tools/fetch_models.py`")
    from graphprune.models.photos import NATURAL_VIEWS, natural_batch

    return natural_batch(224, NATURAL_VIEWS)


def test_natural_sets_split_by_photo_and_calib_adds_photos_calib():
    natural = _natural_or_skip()
    from graphprune.models.photos import NATURAL_VIEWS, VIEWS, imagenet_batch

    calib = np.concatenate([f["input"] for f in load_calibration("natural-calib", ["input"], 64)])
    held_out = np.concatenate([f["input"] for f in load_calibration("natural-eval", ["input"], 64)])
    photos_calib = imagenet_batch(224, VIEWS)[photo_rows("calib", len(VIEWS))]
    photo = np.repeat(np.arange(len(natural) // len(NATURAL_VIEWS)), len(NATURAL_VIEWS))
    np.testing.assert_array_equal(calib, np.concatenate([photos_calib, natural[photo % 2 == 0]]))
    np.testing.assert_array_equal(held_out, natural[photo % 2 == 1])
    # No held-out crop is a calibration crop (views of one photo stay on one side).
    calib_keys = {row.tobytes() for row in calib[:, :, ::16, ::16]}
    assert not any(row.tobytes() in calib_keys for row in held_out[:, :, ::16, ::16])


def test_natural_sets_need_the_fetched_photos(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    from graphprune.models import photos

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    photos._natural.cache_clear()
    photos._natural_batch.cache_clear()
    try:
        assert not real.available("gcompris-photos")
        with pytest.raises(GraphpruneError, match="natural-eval.*tools/fetch_models.py"):
            next(iter(DATASETS["natural-eval"](["input"], 4)))
    finally:
        photos._natural.cache_clear()
        photos._natural_batch.cache_clear()


def test_mobilenet_v2_natural_scores_the_held_out_half():
    _natural_or_skip()
    from graphprune.models import evaluators as ev

    evaluator = ev.get_evaluator("mobilenet_v2_natural")
    assert "mobilenet_v2_natural" not in ev.EVALUATORS  # EVALUATORS: one per real model
    if not evaluator.available():
        pytest.skip("MobileNetV2 weights not fetched: run `python tools/fetch_models.py`")
    held_out = sum(len(f["input"]) for f in DATASETS["natural-eval"](["input"], 64))
    assert evaluator.evaluate(evaluator.dense_model()) == {"top1": 1.0, "top5": 1.0, "images": float(held_out)}
