"""Deployment (deploy.py, cli_deploy.py): ORT-format export with the mobile usability check, int8 quantization
(dynamic and static QDQ) as a pass and a recipe step, `--target mobile`."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune import deploy
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.metrics import _BOOKKEEPING, count_params
from graphprune.recipe import PASSES_API, parse_recipe, run_recipe

WEIGHTS = 32 * 3 * 9 + 64 * 32 * 9 + 64 * 64 * 9 + 10 * 64  # conv and fc weight elements of small_cnn


def small_cnn(batch: int | str = "N") -> onnx.ModelProto:
    """Conv-ReLU x3 with a residual Add, global pooling and a Gemm head; He-initialised random weights."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        scale = np.sqrt(2 / np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def bias(name, n):
        return numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name)

    inits = [weight("c1.w", 32, 3, 3, 3), bias("c1.b", 32), weight("c2.w", 64, 32, 3, 3), bias("c2.b", 64),
             weight("c3.w", 64, 64, 3, 3), bias("c3.b", 64), weight("fc.w", 10, 64), bias("fc.b", 10)]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "c1.w", "c1.b"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
        node("Relu", ["h1"], ["a1"], name="r1"),
        node("Conv", ["a1", "c2.w", "c2.b"], ["h2"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["h2"], ["a2"], name="r2"),
        node("Conv", ["a2", "c3.w", "c3.b"], ["h3"], name="c3", pads=[1, 1, 1, 1]),
        node("Relu", ["h3"], ["a3"], name="r3"),
        node("Add", ["a2", "a3"], ["s"], name="res"),
        node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        node("Flatten", ["p"], ["f"], name="flat"),
        node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    graph = helper.make_graph(nodes, "small_cnn", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    return path


def images(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def run(path: Path, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:  # the plain graph, as the reference of the float model
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------- ORT format ----------


def test_ort_file_loads_and_matches_the_onnx_model(model, tmp_path):
    before = digest(model)
    out = tmp_path / "cnn.ort"
    result = deploy.export_ort(model, out)
    assert digest(model) == before
    x = images(3)
    # Read back by ONNX Runtime as its own format, against the unoptimised ONNX graph.
    np.testing.assert_allclose(run(out, x), run(model, x, optimize=False), rtol=1e-4, atol=1e-5)
    assert out.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier: not an ONNX protobuf
    assert result.verification is not None and result.verification.min_cosine > 0.99999
    assert result.ort_bytes == out.stat().st_size and result.onnx_bytes == model.stat().st_size
    assert any("Conv" in line for line in result.required_operators)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_dynamic_shapes_stay_dynamic_unless_fixed(model, tmp_path):
    dynamic = deploy.export_ort(model, tmp_path / "dynamic.ort")
    session = ort.InferenceSession(str(tmp_path / "dynamic.ort"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert session.run(None, {"x": images(5)})[0].shape == (5, 10)
    assert dynamic.input_shapes == {"x": ["N", 3, 16, 16]}
    # The usability check sees the dynamic batch: NNAPI can take no node as it is, all with shapes fixed.
    nnapi = dynamic.mobile["execution_providers"]["NNAPI"]
    assert dynamic.mobile["dynamic_inputs"] == ["x"]
    assert nnapi["suitability"] == "NO" and nnapi["with_fixed_shapes"] == "YES"
    assert nnapi["nodes_unsupported_due_to_dynamic_shapes"] == nnapi["nodes"] == len(small_cnn().graph.node)
    assert dynamic.mobile["fixed_shapes_would_help"]

    by_dim = deploy.export_ort(model, tmp_path / "by_dim.ort", fix_dim={"N": 1})
    by_shape = deploy.export_ort(model, tmp_path / "by_shape.ort", fix_shape={"x": (2, 3, 16, 16)})
    assert by_dim.input_shapes == {"x": [1, 3, 16, 16]} and by_shape.input_shapes == {"x": [2, 3, 16, 16]}
    fixed = ort.InferenceSession(str(tmp_path / "by_shape.ort"), providers=["CPUExecutionProvider"])
    assert fixed.get_inputs()[0].shape == [2, 3, 16, 16]
    assert fixed.get_outputs()[0].shape == [2, 10]  # output shapes follow the fixed input
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        fixed.run(None, {"x": images(3)})
    nnapi = by_dim.mobile["execution_providers"]["NNAPI"]
    assert by_dim.mobile["dynamic_inputs"] == [] and nnapi["suitability"] == "YES"
    assert nnapi["supported_nodes"] == nnapi["nodes"] and "with_fixed_shapes" not in nnapi
    # The source model keeps its dynamic batch.
    assert onnx.load(model).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("fix_shape, fix_dim, message", [
    ({"y": (1, 3, 16, 16)}, None, "Input y was not found"),
    ({"x": (1, 3, 8, 8)}, None, "Can't replace existing fixed size"),
    ({"x": (1, 3, 16)}, None, "Rank mismatch"),
    ({"x": (0, 3, 16, 16)}, None, "1 or more"),
    (None, {"batch": 1}, "no input has a symbolic dim 'batch'"),
])
def test_bad_fixed_shapes_are_one_clear_error(model, tmp_path, fix_shape, fix_dim, message):
    with pytest.raises(GraphpruneError, match=message):
        deploy.export_ort(model, tmp_path / "out.ort", fix_shape=fix_shape, fix_dim=fix_dim)
    assert not (tmp_path / "out.ort").exists()


def test_runtime_style_and_amd64_target_also_match(model, tmp_path):
    x = images(2)
    for name, options in (("runtime.ort", {"style": "runtime"}), ("amd64.ort", {"target_platform": "amd64"}),
                          ("basic.ort", {"optimization": "basic"})):
        deploy.export_ort(model, tmp_path / name, mobile_check=False, **options)
        np.testing.assert_allclose(run(tmp_path / name, x), run(model, x, optimize=False), rtol=1e-4, atol=1e-5)


# ---------- quantization ----------


@pytest.mark.parametrize("mode, ops", [("dynamic", {"ConvInteger", "DynamicQuantizeLinear", "MatMulInteger"}),
                                       ("qdq", {"QuantizeLinear", "DequantizeLinear"})])
def test_quantized_model_runs_is_smaller_and_stays_close(model, calib, tmp_path, mode, ops):
    before = digest(model)
    out = tmp_path / f"{mode}.onnx"
    result = deploy.quantize(model, out, mode=mode, calib=calib if mode == "qdq" else None)
    assert digest(model) == before
    quantized = onnx.load(out)
    assert ops <= {n.op_type for n in quantized.graph.node}
    assert set(result.nodes) == ops
    # Every conv and fc weight is stored in 8 bits: the file is about a quarter of the float one.
    int8 = sum(int(np.prod(t.dims)) for t in quantized.graph.initializer
               if t.data_type in (TensorProto.INT8, TensorProto.UINT8))
    assert int8 >= WEIGHTS and result.weights["int8"] == int8
    assert out.stat().st_size < 0.35 * model.stat().st_size
    assert result.after.file_bytes == out.stat().st_size and result.before.file_bytes == model.stat().st_size
    x = images(16)
    reference, got = run(model, x, optimize=False), run(out, x)
    assert not np.array_equal(reference, got)  # really quantized
    assert cosine(reference, got) > 0.999
    assert np.mean(reference.argmax(1) == got.argmax(1)) >= 0.85
    assert result.verification is not None and result.verification.min_cosine > 0.999
    if mode == "qdq":
        assert result.calib_verification is not None and result.calib_verification.samples == 4
        assert result.settings["calibration_samples"] == 32 and result.settings["calibration_runs"] == 4
    assert result.settings["preprocess"] == "full"
    json.dumps(result.to_dict())


def test_qdq_calibrates_a_fixed_batch_model_one_sample_at_a_time(calib, tmp_path):
    path = tmp_path / "batch1.onnx"
    onnx.save(small_cnn(batch=1), path)
    result = deploy.quantize(path, tmp_path / "q.onnx", mode="qdq", calib=calib, calib_batch_size=8,
                             calib_batches=2)
    # Two batches of 8, split into runs of the model's batch of 1.
    assert result.settings["calibration_samples"] == 16 and result.settings["calibration_runs"] == 16
    x = images(1)
    assert cosine(run(path, x), run(tmp_path / "q.onnx", x)) > 0.999


@pytest.mark.parametrize("method, runs", [("minmax", 2), ("entropy", 12), ("percentile", 12)])
def test_every_calibration_method_takes_a_short_last_batch(model, tmp_path, method, runs):
    calib = tmp_path / "twelve.npz"
    np.savez(calib, x=images(12, seed=3))  # batches of 8 and 4
    result = deploy.quantize(model, tmp_path / "q.onnx", mode="qdq", calib=calib, calibrate_method=method)
    # The histogram methods stack every run's tensors, so they are fed one sample at a time.
    assert result.settings["calibration_samples"] == 12 and result.settings["calibration_runs"] == runs
    x = images(8)
    assert cosine(run(model, x, optimize=False), run(tmp_path / "q.onnx", x)) > 0.99


def test_per_channel_int8_activations_and_excluded_nodes(model, calib, tmp_path):
    out = tmp_path / "q.onnx"
    result = deploy.quantize(model, out, mode="qdq", calib=calib, per_channel=True, activation_type="int8",
                             exclude=("fc",))
    proto = onnx.load(out)
    scales = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv_weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in scales
                      and scales[n.input[0]].ndim == 4]
    assert conv_weight_dq and all(scales[n.input[1]].shape == (scales[n.input[0]].shape[0],)
                                  for n in conv_weight_dq)  # one scale per output channel
    fc = next(n for n in proto.graph.node if n.op_type == "Gemm")
    assert scales[fc.input[1]].dtype == np.float32  # the excluded head keeps its float weight
    activations = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(scales[n.input[2]].dtype == np.int8 for n in activations)
    assert result.verification.min_cosine > 0.999


@pytest.mark.parametrize("mode, per_channel", [("dynamic", False), ("dynamic", True), ("qdq", True)])
def test_quantizing_keeps_the_parameter_count_and_shrinks_the_file(model, calib, tmp_path, mode, per_channel):
    # An int8 weight is as many parameters as the float one it replaces; the scales and zero points the
    # quantizer adds (per tensor or per channel, and for dynamic mode multiplied into the activations'
    # run-time scales) are bookkeeping. Every initializer of small_cnn is a float weight or bias.
    elements = sum(int(np.prod(t.dims)) for t in small_cnn().graph.initializer)
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    result = deploy.quantize(model, out, mode=mode, per_channel=per_channel,
                             calib=calib if mode == "qdq" else None)
    quantized = onnx.load(out)
    scales = [t for t in quantized.graph.initializer if t.name.endswith(("_scale", "_zero_point"))]
    assert scales  # there is bookkeeping to leave out
    assert result.before.params == result.after.params == elements
    assert result.after.file_bytes < 0.35 * result.before.file_bytes  # the size is what falls
    cli = invoke("quantize", model, "-o", tmp_path / "cli.onnx", "--mode", mode, "--no-latency",
                 "--report", report, *(["--per-channel"] if per_channel else []),
                 *(["--calib", calib] if mode == "qdq" else []))
    assert cli.exit_code == 0, cli.output
    data = json.loads(report.read_text())
    assert data["before"]["params"] == data["after"]["params"] == elements
    assert f"params: {elements:,} → {elements:,}" in report.with_suffix(".html").read_text()


def test_a_float_weight_beside_a_dynamic_quantized_matmul_stays_a_parameter():
    # ONNX Runtime's dynamic form: the weight's scale multiplies the activation's run-time scale, and
    # that product rescales the integer product; a float weight applied afterwards is a parameter.
    node = helper.make_node
    nodes = [node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             node("Mul", ["xs", "ws"], ["s"]),
             node("Mul", ["accf", "s"], ["y0"]),
             node("Mul", ["y0", "gamma"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((4, 3), np.int8), "w"),
             numpy_helper.from_array(np.ones(3, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
             numpy_helper.from_array(np.ones(3, np.float32), "gamma")]
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert count_params(model) == 4 * 3 + 3  # w and gamma; not ws, wz


def test_the_bookkeeping_inputs_are_the_scales_and_zero_points_of_the_ops_schemas():
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    schemas = {}
    for schema in get_all_operator_schema():
        if schema.domain in ("", "com.microsoft"):
            schemas.setdefault(schema.name, schema)
    for op, positions in _BOOKKEEPING.items():
        names = [i.name for i in schemas[op].inputs]
        assert positions == {k for k, n in enumerate(names) if "scale" in n or "zero_point" in n}, op


def test_qdq_needs_calibration_data(model, tmp_path):
    with pytest.raises(GraphpruneError, match="--mode qdq .* give --calib"):
        deploy.quantize(model, tmp_path / "q.onnx", mode="qdq")
    result = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--mode", "qdq")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("error: --mode qdq") and "Traceback" not in result.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("options, message", [
    ({"mode": "int4"}, "--mode 'int4'"),
    ({"weight_type": "int4"}, "--weight-type 'int4'"),
    ({"mode": "qdq", "calib": "nowhere.npz"}, "--calib nowhere.npz: no such file"),
])
def test_bad_quantize_options_fail_before_writing(model, tmp_path, options, message):
    with pytest.raises(GraphpruneError, match=message):
        deploy.quantize(model, tmp_path / "q.onnx", **options)
    assert not (tmp_path / "q.onnx").exists()


def test_recipe_prunes_then_quantizes(model, calib, tmp_path):
    assert "quantize" in PASSES_API
    recipe = parse_recipe({"calib": str(calib), "steps": [{"prune-channels": {"ratio": 0.5, "round-to": 8}},
                                                          {"quantize": {"mode": "qdq"}}]})
    assert recipe.steps[1].options["calib"] == str(calib)  # the recipe-level calib reaches the step
    out = tmp_path / "out.onnx"
    result = run_recipe(model, recipe, out)
    proto = onnx.load(out)
    weights = {t.name: t for t in proto.graph.initializer}
    conv_weights = [weights[n.input[0]] for n in proto.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in weights and len(weights[n.input[0]].dims) == 4]
    # Pruned (each conv keeps half its filters; c2 and c3 share theirs through the residual Add) and
    # quantized (their weights int8).
    assert sorted(w.dims[0] for w in conv_weights) == [16, 32, 32]
    assert all(w.data_type == TensorProto.INT8 for w in conv_weights)
    assert [s["step"] for s in result.steps] == ["prune-channels", "quantize"]
    x = images(16)
    assert cosine(run(model, x, optimize=False), run(out, x)) > 0.9
    assert result.verification is not None


# ---------- the command line ----------


def test_cli_export_ort_prints_the_check_and_writes_the_report(model, tmp_path):
    out, report = tmp_path / "m.ort", tmp_path / "r.json"
    result = invoke("export-ort", model, "-o", out, "--fix-dim", "N=1", "--report", report)
    assert result.exit_code == 0, result.output
    assert "mobile usability" in result.output and "NNAPI" in result.output
    data = json.loads(report.read_text())
    assert data["input_shapes"] == {"x": [1, 3, 16, 16]}
    assert data["mobile"]["execution_providers"]["NNAPI"]["suitability"] == "YES"
    as_json = invoke("export-ort", model, "-o", tmp_path / "j.ort", "--json", "--no-mobile-check")
    assert as_json.exit_code == 0 and json.loads(as_json.output)["mobile"] == {}


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}/m.onnx"], "must end in .ort"),
    (["-o", "{tmp}/m.ort", "--fix-dim", "N"], "--fix-dim 'N': write it as NAME=VALUE"),
    (["-o", "{tmp}/m.ort", "--fix-shape", "x:1x3"], "Rank mismatch"),
    (["-o", "{tmp}/missing/m.ort"], "does not exist"),
])
def test_cli_export_ort_errors_are_one_line_exit_2(model, tmp_path, args, message):
    result = invoke("export-ort", model, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert not any(p.suffix == ".ort" for p in tmp_path.iterdir())


def test_cli_quantize_with_target_mobile(model, calib, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    result = invoke("quantize", model, "-o", out, "--mode", "qdq", "--calib", calib, "--no-latency",
                    "--target", "mobile", "--fix-shapes", "--input-shape", "x:1x3x16x16", "--report", report)
    assert result.exit_code == 0, result.output
    assert "Float vs quantized" in result.output and "calibration batch" in result.output
    ort_file = tmp_path / "q.ort"
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 16, 16]
    x = images(1)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], run(out, x), rtol=1e-3, atol=1e-3)
    data = json.loads(report.read_text())
    assert data["mobile_export"]["mobile"]["dynamic_inputs"] == []
    assert data["quantization_nodes"]["QuantizeLinear"] > 0 and data["fidelity_calib"]["samples"] == 4


def test_cli_optimize_target_mobile_writes_the_ort_file_beside(model, tmp_path):
    out = tmp_path / "pruned.onnx"
    result = invoke("optimize", model, "-o", out, "--ratio", "0.5", "--round-to", "8", "--no-latency",
                    "--target", "mobile", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    x = images(2)
    np.testing.assert_allclose(run(tmp_path / "pruned.ort", x), run(out, x, optimize=False), rtol=1e-4, atol=1e-5)
    mobile = json.loads((tmp_path / "r.json").read_text())["mobile_export"]["mobile"]
    assert mobile["dynamic_inputs"] == ["x"]  # not fixed unless asked


@pytest.mark.parametrize("args, message", [
    (["--fix-shapes"], "--fix-shapes fixes the .ort file's input shapes: give --target mobile"),
    (["--target", "mobile", "--fix-shapes"], "give --input-shape"),
    (["--target", "desktop"], "Invalid value for '--target'"),
])
def test_cli_target_option_errors(model, tmp_path, args, message):
    result = invoke("optimize", model, "-o", tmp_path / "p.onnx", "--ratio", "0.5", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "p.onnx").exists()
