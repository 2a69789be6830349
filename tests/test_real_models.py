"""Real pretrained models from the wheels fetched by tools/fetch_models.py; skipped when not fetched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphprune.errors import GraphpruneError
from graphprune.models import real
from graphprune.models.imagenet_eval import CAT_CLASSES, topk_agreement

ort = pytest.importorskip("onnxruntime")

# name -> (helper, input shape); det needs H, W multiples of 32, rec height 48, cls 48x192.
PPOCR = {
    "ppocr_det": (real.ppocr_det_path, (1, 3, 320, 320)),
    "ppocr_rec": (real.ppocr_rec_path, (1, 3, 48, 320)),
    "ppocr_cls": (real.ppocr_cls_path, (1, 3, 48, 192)),
}
PPOCR_OUTPUT = {"ppocr_det": (1, 1, 320, 320), "ppocr_rec": (1, 40, 6625), "ppocr_cls": (1, 2)}


def need(name: str) -> None:
    if not real.available(name):
        pytest.skip(f"{name} not fetched: run `python tools/fetch_models.py`")


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_missing_wheel_names_the_fetch_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    assert not real.available("magika")
    with pytest.raises(GraphpruneError, match="tools/fetch_models.py"):
        real.magika_path()


def test_topk_agreement():
    dense = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    pruned = np.array([[2.0, 3.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_agreement(dense, pruned, k=(1, 2)) == {"top1": 0.5, "top2": 1.0}


@pytest.mark.real
@pytest.mark.parametrize("name", list(PPOCR))
def test_ppocr_runs(name):
    need(name)
    helper, shape = PPOCR[name]
    model = onnx.load(helper())
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    (out,) = session(helper()).run(None, {"x": x})
    assert out.shape == PPOCR_OUTPUT[name]
    assert np.isfinite(out).all()


@pytest.mark.real
@pytest.mark.parametrize("name", list(PPOCR))
def test_ppocr_weights_are_constant_nodes(name):
    # paddle2onnx writes every weight as a Constant node; passes must not assume initializers.
    need(name)
    graph = onnx.load(PPOCR[name][0]()).graph
    assert len(graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in graph.node) > 300


@pytest.mark.real
def test_magika_classifies_real_files():
    need("magika")
    sess = session(real.magika_path())
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("bytes", "tensor(int32)", 2048)
    labels = real.magika_labels()
    files = {Path(__file__): "python", Path(__file__).parents[1] / "pyproject.toml": "toml"}
    batch = np.array([real.magika_features(f.read_bytes()) for f in files], dtype=np.int32)
    (probs,) = sess.run(None, {"bytes": batch})
    assert probs.shape == (len(files), len(labels)) == (2, 214)
    assert [labels[i] for i in probs.argmax(1)] == list(files.values())


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    from graphprune.models.photos import batch_names, imagenet_batch

    return imagenet_batch(), batch_names()


@pytest.mark.real
@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_mobilenet_v2_export_matches_torch(exporter, photos):
    need("mobilenet_v2_weights")
    import torch

    from graphprune.models.mobilenet_v2 import export_mobilenet_v2, mobilenet_v2

    batch = photos[0][::8]
    with torch.no_grad():
        expected = mobilenet_v2()(torch.from_numpy(batch)).numpy()
    (got,) = session(export_mobilenet_v2(exporter)).run(None, {"input": batch})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.real
def test_mobilenet_v2_sees_a_cat_in_chelsea(photos):
    need("mobilenet_v2_weights")
    from graphprune.models.imagenet_eval import run_onnx
    from graphprune.models.mobilenet_v2 import export_mobilenet_v2

    batch, names = photos
    logits = run_onnx(export_mobilenet_v2("legacy"), batch)
    top1 = int(logits[names.index("chelsea/center")].argmax())
    assert top1 in CAT_CLASSES, f"chelsea predicted as ImageNet class {top1}, expected a cat (281-285)"


def test_magika_prunes_with_default_settings(tmp_path):
    """Magika (a TF export) builds shapes from int32 pieces: rewritten pieces must stay int32."""
    need("magika")
    from graphprune import api

    result = api.optimize(real.magika_path(), tmp_path / "magika.onnx", ratio=0.3)
    assert result.plan.units_removed > 0 and result.verification.min_cosine > 0.9
