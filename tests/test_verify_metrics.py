"""Runtime, inputs, verify, metrics and latency on tiny hand-built models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import latency, metrics, runtime, verify
from graphprune.errors import GraphpruneError, VerificationError
from graphprune.inputs import input_specs, make_inputs, parse_shape_overrides
from graphprune.latency import compare_latency, measure_latency
from graphprune.metrics import count_macs, count_params, file_size, model_stats
from graphprune.verify import check_model, fidelity, run_model

OPSET = [helper.make_opsetid("", 17)]


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> TensorProto:
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(data, name)


def _model(nodes, inputs, outputs, inits=(), opsets=OPSET, name="g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=opsets)


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_relu(out_channels: int = 4, batch="N") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["Y"]),
    ]
    inits = [_weight("W", (out_channels, 3, 3, 3)), _weight("B", (out_channels,), 1)]
    return _model(nodes, [_f32("X", [batch, 3, 8, 8])], [_f32("Y", [batch, out_channels, 8, 8])], inits)


# ---------- MACs and params ----------


def test_conv_relu_macs_and_params():
    # Y (1,4,8,8) = 256 elements, each C_in/group * 3*3 = 27 MACs.
    assert count_macs(conv_relu()).total == 256 * 27
    assert count_macs(conv_relu(), {"X": (2, 3, 8, 8)}).total == 2 * 256 * 27
    assert count_params(conv_relu()) == 4 * 27 + 4


def test_gemm_macs_with_transpose():
    node = helper.make_node("Gemm", ["A", "B", "C"], ["Y"], transB=1)
    model = _model(
        [node], [_f32("A", [2, 5])], [_f32("Y", [2, 7])], [_weight("B", (7, 5)), _weight("C", (7,))]
    )
    assert count_macs(model).total == 2 * 7 * 5
    assert count_params(model) == 35 + 7


def test_matmul_batch_broadcast_macs():
    node = helper.make_node("MatMul", ["A", "B"], ["Y"])
    model = _model([node], [_f32("A", [2, 1, 4, 6])], [_f32("Y", [2, 3, 4, 5])], [_weight("B", (3, 6, 5))])
    # Output (2,3,4,5) = 120 elements, K = 6.
    assert count_macs(model).total == 120 * 6


def test_conv_transpose_macs_use_input_shape():
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 2])
    model = _model(
        [node], [_f32("X", [1, 4, 5, 5])], [_f32("Y", [1, 2, 11, 11])], [_weight("W", (4, 2, 3, 3))]
    )
    # Input 100 elements, each scattered to C_out/group * 9 = 18 outputs.
    assert count_macs(model).total == 100 * 18


@pytest.mark.parametrize(
    ("group", "w_shape", "expected"), [(2, (8, 2, 3, 3), 128 * 2 * 9), (4, (4, 1, 3, 3), 64 * 9)]
)
def test_grouped_and_depthwise_conv_macs(group, w_shape, expected):
    node = helper.make_node("Conv", ["X", "W"], ["Y"], group=group)
    model = _model([node], [_f32("X", [1, 4, 6, 6])], [_f32("Y", None)], [_weight("W", w_shape)])
    result = count_macs(model)
    assert (result.total, result.skipped_nodes) == (expected, 0)
    assert result.by_op_type == {"Conv": expected}


def test_unknown_shapes_are_skipped_not_guessed():
    nodes = [
        helper.make_node("Mystery", ["X"], ["h"], domain="com.example"),
        helper.make_node("MatMul", ["h", "B"], ["Y"]),
        helper.make_node("MatMul", ["X", "B"], ["Z"]),
    ]
    opsets = [*OPSET, helper.make_opsetid("com.example", 1)]
    model = _model(
        nodes, [_f32("X", [2, 6])], [_f32("Y", None), _f32("Z", None)], [_weight("B", (6, 5))], opsets
    )
    result = count_macs(model)
    assert (result.total, result.skipped_nodes) == (2 * 5 * 6, 1)


def test_fused_matmul_and_unknown_rank_input():
    node = helper.make_node("FusedMatMul", ["A", "B"], ["Y"], domain="com.microsoft", transB=1)
    opsets = [*OPSET, helper.make_opsetid("com.microsoft", 1)]
    model = _model([node], [_f32("A", [2, 4, 6])], [_f32("Y", None)], [_weight("B", (5, 6))], opsets)
    assert count_macs(model).total == 2 * 4 * 5 * 6
    unranked = _model(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        [_f32("A", None)],
        [_f32("Y", None)],
        [_weight("B", (6, 5))],
    )
    assert (count_macs(unranked).total, count_macs(unranked).skipped_nodes) == (0, 1)
    assert count_macs(unranked, {"A": (3, 6)}).total == 3 * 5 * 6


def test_params_skip_int_constants_and_count_float_constants():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones((2, 3), np.float32))),
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([3, 2], np.int64))),
        helper.make_node("Reshape", ["X", "shape"], ["r"]),
        helper.make_node("Add", ["r", "k"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]
    model = _model(nodes, [_f32("X", [6])], [_f32("Y", [2, 3])], inits)
    assert count_params(model) == 6


def test_external_data_model_by_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_relu(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert file_size(path) == path.stat().st_size + (tmp_path / "m.data").stat().st_size
    stats = model_stats(path)
    assert (stats.params, stats.macs, stats.file_bytes) == (112, 256 * 27, file_size(path))
    report = verify.verify(path, path, samples=2)
    assert report.outputs["Y"].max_abs_error == 0.0


def test_oversized_proto_goes_through_a_file(monkeypatch):
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", 64)
    model = conv_relu()
    check_model(model)
    out = run_model(model, make_inputs(model))
    assert out["Y"].shape == (1, 4, 8, 8)


# ---------- fidelity ----------


def test_fidelity_identical_and_known_perturbation():
    a = np.array([[3.0, 4.0]], np.float32)
    same = fidelity({"y": a}, {"y": a.copy()})["y"]
    assert (same.max_abs_error, same.relative_l2, same.cosine, same.top1_agreement) == (0.0, 0.0, 1.0, 1.0)
    moved = fidelity({"y": a}, {"y": a + np.array([[0.0, 0.5]], np.float32)})["y"]
    assert moved.max_abs_error == pytest.approx(0.5)
    assert moved.relative_l2 == pytest.approx(0.1)  # 0.5 / 5


def test_fidelity_top1_and_non_logit_outputs():
    ref = {"logits": np.array([[1.0, 2.0], [3.0, 1.0]]), "boxes": np.ones((2, 3, 4)), "ids": np.arange(4)}
    cand = {"logits": np.array([[2.0, 1.0], [3.0, 1.0]]), "boxes": np.ones((2, 3, 4)), "ids": np.arange(4)}
    result = fidelity(ref, cand)
    assert result["logits"].top1_agreement == 0.5
    assert result["boxes"].top1_agreement is None  # rank 3 and not the first output
    assert result["ids"].top1_agreement is None
    assert result["logits"].to_dict()["top1_agreement"] == 0.5


def test_fidelity_zero_reference():
    zero = np.zeros(3, np.float32)
    assert fidelity({"y": zero}, {"y": zero})["y"].relative_l2 == 0.0
    assert fidelity({"y": zero}, {"y": zero + 1})["y"].relative_l2 == float("inf")


# ---------- verify ----------


def test_verify_identical_models_report():
    report = verify.verify(conv_relu(), conv_relu(), samples=3)
    assert report.samples == 3
    assert report.to_dict()["outputs"]["Y"]["cosine"] == pytest.approx(1.0)
    assert report.worst_max_abs_error == 0.0


def test_verify_rejects_changed_output_shape():
    with pytest.raises(VerificationError, match=r"output 'Y'.*\(1, 2, 8, 8\).*\(1, 4, 8, 8\)"):
        verify.verify(conv_relu(4), conv_relu(2), samples=1)


def test_verify_rejects_checker_failure():
    broken = _model([helper.make_node("Relu", ["missing"], ["Y"])], [_f32("X", [2])], [_f32("Y", [2])])
    with pytest.raises(VerificationError, match="fails the ONNX checker"):
        verify.verify(conv_relu(), broken)


def test_verify_rejects_model_ort_cannot_load():
    node = helper.make_node("Mystery", ["X"], ["Y"], domain="com.example")
    opsets = [*OPSET, helper.make_opsetid("com.example", 1)]
    custom = _model([node], [_f32("X", ["N", 3, 8, 8])], [_f32("Y", ["N", 4, 8, 8])], opsets=opsets)
    with pytest.raises(VerificationError, match="ONNX Runtime cannot load the pruned model"):
        verify.verify(conv_relu(), custom)


def test_verify_rejects_model_ort_cannot_run():
    shape = numpy_helper.from_array(np.array([5], np.int64), "shape")
    node = helper.make_node("Reshape", ["X", "shape"], ["Y"])
    bad = _model([node], [_f32("X", ["N", 4])], [_f32("Y", [5])], [shape])
    good = _model([helper.make_node("Relu", ["X"], ["Y"])], [_f32("X", ["N", 4])], [_f32("Y", ["N", 4])])
    with pytest.raises(VerificationError, match="ONNX Runtime failed to run the pruned model"):
        verify.verify(good, bad, samples=1)


# ---------- inputs ----------


def _nlp_model() -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("feat", TensorProto.FLOAT16, ["batch", "foo", None, 3]),
        _f32("W", [2]),  # an initializer listed as an input is not a model input
    ]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs[:6]]
    outputs = [
        helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None) for i in inputs[:6]
    ]
    return _model(nodes, inputs, outputs, [_weight("W", (2,))])


def test_make_inputs_dims_and_dtypes():
    model = _nlp_model()
    assert [s.name for s in input_specs(model)] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "flag",
        "token_type_ids",
        "feat",
    ]
    feeds = make_inputs(model, batch=2)
    assert feeds["input_ids"].shape == (2, 16) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].shape == (2, 16)
    assert feeds["position_ids"].dtype == np.int32
    np.testing.assert_array_equal(feeds["position_ids"][1], np.arange(16))
    assert feeds["flag"].shape == () and feeds["flag"].dtype == np.bool_ and bool(feeds["flag"])
    assert feeds["feat"].shape == (2, 1, 1, 3) and feeds["feat"].dtype == np.float16
    assert (feeds["token_type_ids"] == 0).all()  # random ids would overflow a 2-row type embedding


def test_make_inputs_overrides_defaults_and_seed():
    model = _nlp_model()
    feeds = make_inputs(model, overrides={"feat": (1, 5, 6, 3)}, dim_defaults={"seq": 7})
    assert feeds["feat"].shape == (1, 5, 6, 3)
    assert feeds["input_ids"].shape == (1, 7) and feeds["attention_mask"].shape == (1, 16)
    np.testing.assert_array_equal(make_inputs(model, seed=3)["feat"], make_inputs(model, seed=3)["feat"])
    assert not np.array_equal(make_inputs(model, seed=3)["feat"], make_inputs(model, seed=4)["feat"])
    with pytest.raises(GraphpruneError, match="no input named 'nope'"):
        make_inputs(model, overrides={"nope": (1,)})
    with pytest.raises(GraphpruneError, match="rank"):
        make_inputs(model, overrides={"feat": (1, 3)})
    with pytest.raises(GraphpruneError, match="fixed shape"):
        make_inputs(model, overrides={"feat": (1, 1, 1, 4)})


def test_parse_shape_overrides():
    assert parse_shape_overrides(["input:1x3x224x224", "x:0:2X4"]) == {
        "input": (1, 3, 224, 224),
        "x:0": (2, 4),
    }
    for bad in ["input", ":1x2", "input:", "input:1x3xa", "input:1x-3", "input:1,3"]:
        with pytest.raises(GraphpruneError, match="bad shape"):
            parse_shape_overrides([bad])
    with pytest.raises(GraphpruneError, match="twice"):
        parse_shape_overrides(["a:1", "a:2"])


# ---------- runtime and latency ----------


def test_make_session_errors():
    with pytest.raises(GraphpruneError, match="optimisation level"):
        runtime.make_session(conv_relu(), optimization="fastest")
    with pytest.raises(GraphpruneError, match="does not exist"):
        metrics.count_params("/nonexistent/model.onnx")


def test_latency_runs_round_robin(monkeypatch):
    order = []
    monkeypatch.setattr(latency, "_timed_run", lambda session, feeds, label: order.append(label) or 1.0)
    results = compare_latency([conv_relu(4), conv_relu(2)], make_inputs(conv_relu()), rounds=2, warmup=0)
    first, second = (r.model for r in results)
    assert order == [first, second, second, first]  # each round runs each model once, start rotates
    assert results[0].median_ms == results[0].p90_ms == 1.0


def test_ort_messages_lose_source_noise():
    raw = (
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
        "Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:83 virtual OrtValue* "
        "onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) "
        "status.IsOK() was false."
    )
    assert runtime.first_line(RuntimeError(raw)) == (
        "Non-zero status code returned while running Conv node. Status Message: status.IsOK() was false."
    )


def test_latency_interleaved():
    models = [conv_relu(4), conv_relu(2)]
    results = compare_latency(models, make_inputs(models[0]), rounds=3, warmup=1, threads=1)
    assert len(results) == 2 and all(r.rounds == 3 and r.p90_ms >= r.min_ms > 0 for r in results)
    assert results[0].model != results[1].model
    single = measure_latency(models[0], make_inputs(models[0]), rounds=2, warmup=0)
    assert "samples_ms" not in single.to_dict()
