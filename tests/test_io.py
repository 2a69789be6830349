"""Loading and saving: Constant-node weights, external data, bad files."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.api import analyze, optimize
from graphprune.errors import GraphpruneError
from graphprune.io import load_model
from graphprune.models.zoo import export, sample_input


def constant_weight_model() -> onnx.ModelProto:
    """Two convs whose weights are Constant nodes, as paddle2onnx and tf2onnx write them."""
    rng = np.random.default_rng(0)
    nodes = []
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1))):
        tensor = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        nodes.append(helper.make_node("Constant", [], [name], value=tensor))
    nodes += [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_constant_node_weights_are_lifted_and_pruned(tmp_path):
    path = tmp_path / "constants.onnx"
    onnx.save(constant_weight_model(), path)
    model = load_model(path)
    assert {"w1", "w2"} <= set(model.graph.initializers)
    report = analyze(path)
    assert [s.size for s in report.prunable] == [8]
    result = optimize(path, tmp_path / "out.onnx", ratio=0.5, round_to=1)
    assert result.after.params < result.before.params


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_external_data_in_and_out(tmp_path):
    proto = onnx.load(export("resnet_basic", "legacy"))
    source = tmp_path / "model.onnx"
    onnx.save(proto, source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    before = sha(tmp_path / "model.onnx.data")
    out = tmp_path / "pruned.onnx"
    optimize(source, out, ratio=0.5, external_data=True)
    assert (tmp_path / "pruned.onnx.data").exists()
    assert sha(tmp_path / "model.onnx.data") == before
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": sample_input("resnet_basic")})
    assert y.shape == (1, 10)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(GraphpruneError, match="not a readable ONNX model"):
        load_model(junk)
    with pytest.raises(GraphpruneError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    proto = onnx.load(export("resnet_basic", "legacy"))
    source = tmp_path / "ext.onnx"
    onnx.save(proto, source, save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(GraphpruneError, match="ext.data"):
        load_model(source)


def test_exclude_matches_the_names_in_the_users_file(tmp_path):
    """Preparation folds constants but keeps the user's node names, which --exclude refers to."""
    path = export("resnet_basic", "legacy")
    names = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    result = optimize(path, ratio=0.5, exclude=(names[0],), check=False)
    touching = [g for g in result.groups if any(f"'{names[0]}'" in m for m in g.members)]
    assert touching and all(not g.removed for g in touching)
    assert any(g.removed for g in result.groups)
