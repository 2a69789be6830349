"""Every zoo model exports with both torch exporters, passes the ONNX checker and matches torch."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphprune.models import zoo
from graphprune.models.zoo import EXPORTERS, ZOO, export, names, sample_input


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_cache")


@functools.cache
def _torch_model(name: str) -> nn.Module:
    return ZOO[name].builder()


def _torch_out(name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _torch_model(name)(torch.from_numpy(x)).numpy()


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # tiny models: one thread avoids oversubscription under pytest-xdist
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", names())
def test_export_matches_torch(name, exporter, zoo_cache):
    path = export(name, exporter, cache_dir=zoo_cache)
    assert path.suffix == ".onnx" and path.exists()

    model = onnx.load(str(path), load_external_data=False)
    # weights must live inside the single .onnx file
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)

    sess = _session(path)
    (inp,) = sess.get_inputs()
    assert inp.name == "input"
    assert [o.name for o in sess.get_outputs()] == ["output"]

    # the legacy export has a dynamic batch axis, so also run it with batch != 1
    batches = (1, 3) if exporter == "legacy" else (1,)
    for batch in batches:
        x = sample_input(name, batch=batch)
        ref = _torch_out(name, x)
        (got,) = sess.run(None, {"input": x})
        assert got.shape == ref.shape
        scale = float(np.abs(ref).max()) or 1.0
        np.testing.assert_allclose(
            got, ref, rtol=0, atol=1e-4 * scale, err_msg=f"{name}/{exporter} batch={batch}"
        )


def test_legacy_batch_axis_is_symbolic(zoo_cache):
    model = onnx.load(str(export("resnet_basic", "legacy", cache_dir=zoo_cache)))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {zoo.LEGACY_OPSET}


def test_export_is_cached(zoo_cache, monkeypatch):
    first = export("flatten_gemm", "legacy", cache_dir=zoo_cache)
    mtime = first.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: model was exported again")

    monkeypatch.setattr(zoo, "_export_to", boom)
    again = export("flatten_gemm", "legacy", cache_dir=zoo_cache)
    assert again == first and again.stat().st_mtime_ns == mtime
    # the exporter choice is part of the key
    with pytest.raises(AssertionError, match="cache miss"):
        export("flatten_gemm", "dynamo", cache_dir=zoo_cache / "other")
    # a failed export leaves no temp files behind
    assert not [p for p in (zoo_cache / "other" / "zoo").iterdir()]


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / "zoo"


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown zoo model"):
        export("no_such_model")
    with pytest.raises(ValueError, match="exporter"):
        export("resnet_basic", exporter="tflite")


@pytest.mark.parametrize("name", names())
def test_builder_deterministic_eval_and_bn_nontrivial(name):
    a, b = ZOO[name].builder(), ZOO[name].builder()
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    bns = [m for m in a.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    assert sample_input(name).shape == ZOO[name].input_shape
    np.testing.assert_array_equal(sample_input(name, seed=3), sample_input(name, seed=3))
    assert sample_input(name, batch=2).dtype == np.float32


def test_zoo_registry():
    assert set(names()) == {
        "resnet_basic",
        "resnet_bottleneck",
        "mobilenet_v2",
        "mobilenet_v3",
        "densenet_block",
        "resnext",
        "shufflenet_v2",
        "efficientnet",
        "convnext",
        "unet",
        "inception",
        "yolov8_c2f",
        "conv1d_audio",
        "flatten_gemm",
    }
    for name, entry in ZOO.items():
        assert entry.name == name and callable(entry.builder) and entry.description
