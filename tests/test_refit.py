"""api.refit: least-squares refit of a modified model's linear layers towards the dense model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import api
from graphprune.errors import GraphpruneError

pytest.importorskip("onnxruntime")


def _chain(w1: np.ndarray, w2: np.ndarray, names=("conv1", "conv2")) -> onnx.ModelProto:
    """x -> Conv 1x1 (w1) -> Relu -> Conv 1x1 (w2) -> output; values named after the nodes."""
    h, y = f"{names[0]}_out", f"{names[1]}_out"
    nodes = [helper.make_node("Conv", ["x", "w1"], [h], name=names[0]),
             helper.make_node("Relu", [h], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], [y], name=names[1])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, w2.shape[0], 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def dense_and_calib(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((3, 6, 1, 1)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 4, 6, 6)).astype(np.float32))
    return w1, w2, calib


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_refit_undoes_a_perturbation_the_data_determines(tmp_path, dense_and_calib):
    w1, w2, calib = dense_and_calib
    dense = _chain(w1, w2)
    scale = np.linspace(0.3, 2.0, 6, dtype=np.float32)[:, None, None, None]
    noisy = _chain(w1 * scale, w2 + 0.3)  # any pass that kept the names but changed the weights
    result = api.refit(noisy, dense, tmp_path / "refit.onnx", calib=calib, damp=1e-9)
    assert result.reconstruction["reconstructed"] == 2 and result.reconstruction["mode"] == "refit"
    x = np.random.default_rng(5).standard_normal((3, 4, 6, 6)).astype(np.float32)
    refitted = onnx.load(tmp_path / "refit.onnx")
    np.testing.assert_allclose(_run(refitted, x), _run(dense, x), rtol=1e-3, atol=1e-3)
    assert np.abs(_run(noisy, x) - _run(dense, x)).max() > 0.1  # the oracle can fail
    assert result.after.worst_relative_l2 < 1e-3 < result.before.worst_relative_l2


def test_refit_skips_layers_whose_width_changed(tmp_path, dense_and_calib):
    w1, w2, calib = dense_and_calib
    narrower = _chain(w1[:4], w2[:, :4])  # conv1 lost two output channels: only its pass knows which
    result = api.refit(narrower, _chain(w1, w2), calib=calib, check=False)
    assert result.reconstruction["reconstructed"] == 1
    assert any(s["node"] == "conv1" and "channels" in s["reason"] for s in result.reconstruction["skipped"])


def test_refit_needs_matching_value_names(dense_and_calib):
    w1, w2, calib = dense_and_calib
    with pytest.raises(GraphpruneError, match="no linear layer matches the dense model"):
        api.refit(_chain(w1, w2, names=("a", "b")), _chain(w1, w2), calib=calib)


def test_refit_cli(tmp_path, dense_and_calib):
    from click.testing import CliRunner

    from graphprune.cli import main

    w1, w2, calib = dense_and_calib
    onnx.save(_chain(w1, w2), tmp_path / "dense.onnx")
    onnx.save(_chain(w1 * 1.5, w2), tmp_path / "changed.onnx")
    args = ["refit", str(tmp_path / "changed.onnx"), "--dense", str(tmp_path / "dense.onnx"), "--calib", str(calib),
            "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Refitted 2 linear layer(s)" in result.output and (tmp_path / "out.onnx").exists()
    bad = CliRunner().invoke(main, [*args[:5], "--calib", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "o2.onnx")])
    assert bad.exit_code == 2 and "missing.npz" in bad.output and not (tmp_path / "o2.onnx").exists()
