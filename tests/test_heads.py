"""Heads as units: found through the dimension graph, pruned whole, never rounded, one always kept."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphprune import api
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.models.transformer_zoo import export, sample_inputs


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return export("bert", "legacy", cache_dir=tmp_path_factory.getbasetemp() / "tf")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return export("llama_gqa", "legacy", cache_dir=tmp_path_factory.getbasetemp() / "tf")


def kinds(report):
    return sorted((s.kind, s.size) for s in report.prunable)


def test_bert_heads_value_width_and_neurons(bert):
    # 2 layers: 4 heads, 16 value dims per head, 128 MLP neurons each.
    assert kinds(api.analyze(bert)) == [("channel", 128)] * 2 + [("head", 4)] * 2 + [("head-dim", 16)] * 2


def test_gqa_kv_groups_are_heads_and_the_repeat_is_its_own_kind(llama):
    # 4 query heads over 2 KV heads: KV groups of 2 are "head", the 2 query heads per group "head-repeat".
    found = kinds(api.analyze(llama))
    assert found.count(("head", 2)) == 2 and found.count(("head-repeat", 2)) == 2, found


def test_heads_are_not_rounded_and_only_heads_go(bert):
    result = api.optimize(bert, ratio=0.5, units=("head",), round_to=16)
    removed = {(s.kind, len(s.removed)) for s in result.groups if s.removed}
    assert removed == {("head", 2)}, removed
    assert result.plan.units_removed == 4
    assert result.verification.min_cosine > 0.9


def test_at_least_one_head_per_layer(bert):
    result = api.optimize(bert, ratio=0.99, units=("head",))
    assert [len(s.kept) for s in result.groups if s.kind == "head"] == [1, 1]


def test_default_units_prune_heads_and_neurons(llama):
    result = api.optimize(llama, ratio=0.5, round_to=1)
    pruned = {s.kind for s in result.groups if s.removed}
    assert pruned == {"head", "channel"}, pruned


def test_unknown_unit_kind_is_a_clear_error(bert, tmp_path):
    with pytest.raises(GraphpruneError, match="--units"):
        api.optimize(bert, ratio=0.3, units=("heads",))
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(main, ["optimize", str(bert), "-o", str(out), "--ratio", "0.3",
                                       "--units", "neurons"])
    assert result.exit_code == 2 and "--units" in result.output and not out.exists()


def test_cli_prunes_heads_only(bert, tmp_path):
    out = tmp_path / "heads.onnx"
    result = CliRunner().invoke(main, ["optimize", str(bert), "-o", str(out), "--ratio", "0.5", "--units", "head",
                                       "--no-latency"])
    assert result.exit_code == 0, result.output
    pruned = onnx.load(out)
    import onnxruntime as ort

    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, sample_inputs("bert"))
    assert hidden.shape == (1, 16, 64) and np.isfinite(hidden).all()


def test_rounding_never_removes_more_than_the_ratio():
    from graphprune.plan import round_kept

    for size in (17, 24, 100, 1536, 3072):
        for ratio in (0.1, 0.25, 0.3, 0.5, 0.9):
            kept = size - round(ratio * size)
            rounded = round_kept(kept, size, 16)
            assert kept <= rounded <= size and (rounded % 16 == 0 or rounded == size)


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_planted_dead_heads_and_neurons_survive_default_optimize(name, tmp_path_factory):
    """What a user checks first: plant dead units at the ratio, optimize with defaults, outputs hold."""
    import onnx_ir as ir
    from oracle import edit_slices, load, planted_units, prunable_groups, run

    from graphprune.plan import PlanConfig

    proto = ir.to_proto(load(onnx.load(export(name, "legacy", cache_dir=tmp_path_factory.getbasetemp() / "tf"))))
    groups = prunable_groups(proto, PlanConfig(ratio=0.3, round_to=1))
    assert {g.kind for g in groups} == {"head", "channel"}
    chosen = planted_units(groups, 0.3, np.random.default_rng(1))
    planted = edit_slices(proto, chosen, roles=("in",))  # heads: output-projection rows; neurons: fc2 rows
    result = api.optimize(planted, ratio=0.3)
    assert result.plan.units_removed > 0
    feeds = sample_inputs(name)
    for want, got in zip(run(planted, feeds), run(ir.to_proto(result.model), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_constant_gather_pins_the_picked_positions_only():
    """Falcon-style multi-query split: K and V picked by constant Gather from a fused [H + 2] axis."""
    from onnx import TensorProto, helper, numpy_helper
    from oracle import check_model

    rng = np.random.default_rng(0)
    h, d, width = 4, 8, 32
    inits = [numpy_helper.from_array(rng.standard_normal((width, (h + 2) * d)).astype(np.float32), "wqkv"),
             numpy_helper.from_array(rng.standard_normal((h * d, width)).astype(np.float32), "wo"),
             numpy_helper.from_array(np.array([1, 6, h + 2, d], dtype=np.int64), "split_shape"),
             numpy_helper.from_array(np.array([1, 6, h * d], dtype=np.int64), "merge_shape"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([h], dtype=np.int64), "h"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
             numpy_helper.from_array(np.array([-2], dtype=np.int64), "k_at"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "v_at")]
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv_proj"),
        helper.make_node("Reshape", ["qkv", "split_shape"], ["qkv4"], name="split_heads"),
        helper.make_node("Slice", ["qkv4", "zero", "h", "axis2"], ["q"], name="q_slice"),
        helper.make_node("Gather", ["qkv4", "k_at"], ["k"], name="k_pick", axis=2),
        helper.make_node("Gather", ["qkv4", "v_at"], ["v"], name="v_pick", axis=2),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["ctx"], name="mix"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge_heads"),
        helper.make_node("MatMul", ["merged", "wo"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(nodes, "mqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, width])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    heads = [s for s in api.analyze(proto).prunable if s.kind == "head"]
    assert [s.size for s in heads] == [h]
    result = check_model(proto, {"x": rng.standard_normal((1, 6, width)).astype(np.float32)}, ratio=0.5)
    assert result["removed"] >= 2


def test_gather_nd_picks_like_a_gather_along_the_first_axis():
    """Falcon's multi-query split as the dynamo exporter writes it: GatherND with indices [[-2]]."""
    from onnx import TensorProto, helper, numpy_helper
    from oracle import check_model

    rng = np.random.default_rng(1)
    h, d, width, seq = 4, 8, 32, 6
    ints = {"split_shape": [seq, h + 2, d], "merge_shape": [1, seq, h * d], "zero": [0], "h": [h]}
    inits = [numpy_helper.from_array(rng.standard_normal((width, (h + 2) * d)).astype(np.float32), "wqkv"),
             numpy_helper.from_array(rng.standard_normal((h * d, width)).astype(np.float32), "wo"),
             numpy_helper.from_array(np.array([[-2]], dtype=np.int64), "k_at"),
             numpy_helper.from_array(np.array([[-1]], dtype=np.int64), "v_at")]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in ints.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "split_shape"], ["qkv3"]),
        helper.make_node("Transpose", ["qkv3"], ["heads_first"], perm=[1, 0, 2]),  # [h + 2, seq, d]
        helper.make_node("Slice", ["heads_first", "zero", "h", "zero"], ["q"]),
        helper.make_node("GatherND", ["heads_first", "k_at"], ["k"], name="k_pick"),
        helper.make_node("GatherND", ["heads_first", "v_at"], ["v"], name="v_pick"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "mqa_nd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, width])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert [s.size for s in api.analyze(proto).prunable if s.kind == "head"] == [h]
    result = check_model(proto, {"x": rng.standard_normal((1, seq, width)).astype(np.float32)}, ratio=0.5)
    assert result["removed"] >= 2
