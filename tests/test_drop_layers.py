"""drop-layers: residual blocks are found where y = x + f(x), bypassing a zero branch changes nothing,
and the greedy choice, the rewrite, the API and the command line hold on hand-built and zoo models."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune import api
from graphprune.blocks import find_residual_blocks
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.io import prepare
from graphprune.models import transformer_zoo, zoo

WIDTH, HIDDEN = 8, 16


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _mlp_block(nodes, inits, x, k, rng, zero=False, reads=None):
    """y = x + Relu(reads @ W1) @ W2 (reads defaults to x); returns y's name."""
    w1 = np.zeros((WIDTH, HIDDEN)) if zero else rng.standard_normal((WIDTH, HIDDEN)) * 0.5
    w2 = np.zeros((HIDDEN, WIDTH)) if zero else rng.standard_normal((HIDDEN, WIDTH)) * 0.5
    inits += [_init(f"w1_{k}", w1), _init(f"w2_{k}", w2)]
    nodes += [helper.make_node("MatMul", [reads or x, f"w1_{k}"], [f"h_{k}"], name=f"block{k}/fc1/MatMul"),
              helper.make_node("Relu", [f"h_{k}"], [f"r_{k}"], name=f"block{k}/Relu"),
              helper.make_node("MatMul", [f"r_{k}", f"w2_{k}"], [f"b_{k}"], name=f"block{k}/fc2/MatMul"),
              helper.make_node("Add", [x, f"b_{k}"], [f"y_{k}"], name=f"block{k}/Add")]
    return f"y_{k}"


def _model(nodes, inits, inputs, output, extra_outputs=()):
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width])
               for name, width in ((output, WIDTH), *extra_outputs)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _float_inputs(*names):
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", WIDTH]) for name in names]


def residual_stack(zero_block=1, blocks=3):
    """``blocks`` MLP residual blocks in a row; the one at ``zero_block`` has all-zero weights."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(blocks):
        x = _mlp_block(nodes, inits, x, k, rng, zero=k == zero_block)
    return _model(nodes, inits, _float_inputs("x"), x)


def prepared(proto):
    model = ir.from_proto(proto)
    prepare(model)
    return model


def run(model, feeds):
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((32, WIDTH)).astype(np.float32))
    return path


# ---------- the oracle: a zero branch is what goes, and the outputs do not move ----------


@pytest.mark.parametrize("zero_block", [0, 1, 2])
def test_zero_branch_is_dropped_and_nothing_changes(zero_block, calib, tmp_path):
    proto = residual_stack(zero_block)
    assert len(find_residual_blocks(prepared(proto))) == 3
    out = tmp_path / "dropped.onnx"
    result = api.drop_layers(proto, out, drop=1, calib=calib)
    assert [d.add for d in result.dropped] == [f"block{zero_block}/Add"]
    assert result.dropped[0].score == 0.0
    assert result.after.macs == pytest.approx(result.before.macs * 2 / 3)
    x = np.random.default_rng(2).standard_normal((5, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(run(str(out), {"x": x}), run(proto, {"x": x}), rtol=1e-6, atol=1e-7)
    # The branch is gone, not merely unused: two MatMuls per kept block remain.
    assert sum(n.op_type == "MatMul" for n in onnx.load(out).graph.node) == 4


@pytest.mark.parametrize("budget", [{"drop": 0}, {"target_flops": 0.0}])
def test_dropping_nothing_changes_nothing(budget, tmp_path):
    proto = residual_stack(zero_block=None)
    out = tmp_path / "same.onnx"
    result = api.drop_layers(proto, out, **budget)
    assert result.dropped == [] and result.after.macs == result.before.macs
    x = np.random.default_rng(3).standard_normal((4, WIDTH)).astype(np.float32)
    np.testing.assert_array_equal(run(str(out), {"x": x}), run(proto, {"x": x}))


def test_target_flops_drops_until_the_share_is_reached(calib):
    result = api.drop_layers(residual_stack(zero_block=None), drop=None, target_flops=0.5, calib=calib)
    assert len(result.dropped) == 2
    assert result.scoring["achieved_flops_reduction"] == pytest.approx(2 / 3)
    assert result.dropped[0].score <= result.dropped[1].score  # re-scored against dense: the change grows


def test_random_inputs_are_stated_without_calibration():
    result = api.drop_layers(residual_stack(zero_block=2), drop=1)
    assert result.dropped[0].add == "block2/Add"
    assert result.scoring["data"].startswith("random inputs")


# ---------- what is and is not a residual block ----------


def test_branch_reading_a_second_activation_is_not_a_block():
    """y = x + f(x + z) with z a float input is no block (the same graph with f(x) is one); nor is a
    projection-style sum h + f(x) with h = x @ W0: f reads x, which is not the shortcut h."""
    rng = np.random.default_rng(0)
    for reads, expected in (("xz", 0), ("x", 1)):
        nodes, inits = [helper.make_node("Add", ["x", "z"], ["xz"], name="mix")], []
        y = _mlp_block(nodes, inits, "x", 0, rng, reads=reads)
        blocks = find_residual_blocks(prepared(_model(nodes, inits, _float_inputs("x", "z"), y)))
        assert len(blocks) == expected, (reads, [b.name for b in blocks])
    nodes, inits = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="proj")], [_init("w0", np.eye(WIDTH))]
    y = _mlp_block(nodes, inits, "h", 0, rng, reads="x")
    assert find_residual_blocks(prepared(_model(nodes, inits, _float_inputs("x"), y))) == []


def test_side_values_from_integer_inputs_are_allowed():
    """A branch may read a mask computed from an int64 input (as attention reads attention_mask)."""
    rng = np.random.default_rng(0)
    nodes, inits = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="cast")], []
    nodes.append(helper.make_node("Mul", ["x", "maskf"], ["xm"], name="masked"))
    y = _mlp_block(nodes, inits, "x", 0, rng, reads="xm")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", WIDTH])]
    blocks = find_residual_blocks(prepared(_model(nodes, inits, inputs, y)))
    assert [b.add.name for b in blocks] == ["block0/Add"]
    assert {n.name for n in blocks[0].nodes} == {"masked", "block0/fc1/MatMul", "block0/Relu",
                                                 "block0/fc2/MatMul"}


def test_branch_read_elsewhere_is_not_a_block():
    """A hidden value of the branch is also a graph output: bypassing would not remove the branch."""
    rng = np.random.default_rng(0)
    for extra in ((), (("h_0", HIDDEN),)):
        nodes, inits = [], []
        y = _mlp_block(nodes, inits, "x", 0, rng)
        blocks = find_residual_blocks(prepared(_model(nodes, inits, _float_inputs("x"), y, extra)))
        assert len(blocks) == (0 if extra else 1)


def test_nested_block_is_listed_and_goes_with_its_outer_block(calib):
    """outer: y = x + g(x) where g contains an inner block h + f(h)."""
    rng = np.random.default_rng(0)
    nodes = []
    inits = [_init("wa", rng.standard_normal((WIDTH, WIDTH))), _init("wc", rng.standard_normal((WIDTH, WIDTH)))]
    nodes.append(helper.make_node("MatMul", ["x", "wa"], ["h"], name="outer/in/MatMul"))
    inner = _mlp_block(nodes, inits, "h", 0, rng)
    nodes.append(helper.make_node("MatMul", [inner, "wc"], ["g"], name="outer/out/MatMul"))
    nodes.append(helper.make_node("Add", ["x", "g"], ["y"], name="outer/Add"))
    proto = _model(nodes, inits, _float_inputs("x"), "y")
    blocks = find_residual_blocks(prepared(proto))
    assert [b.add.name for b in blocks] == ["block0/Add", "outer/Add"]
    assert blocks[0].add in blocks[1].nodes
    result = api.drop_layers(proto, target_flops=0.99, calib=calib)
    names = [d.add for d in result.dropped]
    assert "outer/Add" in names and result.after.macs == 0


# ---------- zoo models ----------


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformer_sublayers_are_blocks(name):
    path = transformer_zoo.export(name, "legacy")
    blocks = find_residual_blocks(prepared(onnx.load(path)))
    assert [b.kind for b in blocks] == ["attention", "mlp"] * transformer_zoo.LAYERS
    assert len({b.add.name for b in blocks}) == len(blocks)
    result = api.drop_layers(path, drop=2)
    assert result.verification is not None and len(result.dropped) == 2
    assert result.before.macs - result.after.macs == sum(d.macs for d in result.dropped)
    proto = ir.to_proto(result.model)
    feeds = transformer_zoo.sample_inputs(name)
    out = run(proto, {i.name: feeds[i.name] for i in proto.graph.input})
    assert np.isfinite(out).all() and result.verification.min_cosine < 1.0


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_resnet_identity_shortcuts_are_blocks_projection_ones_are_not(exporter):
    blocks = find_residual_blocks(prepared(onnx.load(zoo.export("resnet_basic", exporter))))
    assert len(blocks) == 3 and all(b.kind == "conv" for b in blocks)
    if exporter == "legacy":  # its node names say which block: layers.2 has the stride-2 projection
        assert [b.add.name for b in blocks] == [f"/layers/layers.{i}/Add" for i in (0, 1, 3)]
    assert all(sum(n.op_type == "Conv" for n in b.nodes) == 2 for b in blocks)


def test_resnet_bottleneck_blocks():
    blocks = find_residual_blocks(prepared(onnx.load(zoo.export("resnet_bottleneck", "legacy"))))
    assert [b.add.name for b in blocks] == ["/layers/layers.1/Add", "/layers/layers.3/Add"]


# ---------- errors and the command line ----------


def test_errors_are_one_sentence():
    proto = residual_stack()
    with pytest.raises(GraphpruneError, match="more than the 3 residual blocks"):
        api.drop_layers(proto, drop=4)
    with pytest.raises(GraphpruneError, match="one of them"):
        api.drop_layers(proto)
    with pytest.raises(GraphpruneError, match="one of them"):
        api.drop_layers(proto, drop=1, target_flops=0.3)
    no_blocks = _model([helper.make_node("Relu", ["x"], ["y"])], [], _float_inputs("x"), "y")
    with pytest.raises(GraphpruneError, match="no residual block"):
        api.drop_layers(no_blocks, drop=1)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_end_to_end(tmp_path, calib):
    model = tmp_path / "stack.onnx"
    onnx.save(residual_stack(zero_block=1), model)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("drop-layers", model, "-o", out, "--drop", 1, "--calib", calib, "--report", report,
                    "--no-latency")
    assert result.exit_code == 0, result.output
    assert "block1" in result.stdout and "Dropped 1 of 3 residual blocks" in result.stdout
    data = json.loads(report.read_text())
    assert [d["add"] for d in data["dropped"]] == ["block1/Add"]
    assert data["fidelity"]["worst_max_abs_error"] < 1e-6


def test_cli_drop_too_many_fails_cleanly(tmp_path):
    model = tmp_path / "stack.onnx"
    onnx.save(residual_stack(), model)
    out = tmp_path / "out.onnx"
    result = invoke("drop-layers", model, "-o", out, "--drop", 99, "--no-latency")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --drop 99") and len(result.stderr.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stack.onnx"]
