"""Generators for the bad-input corpus (tests/test_bad_inputs.py): every case is built on the fly in a
temporary folder, so the repository holds no binary fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 8


def _weights(seed: int = 0) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array(rng.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((4, CHANNELS, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B2"),
    ]


def _conv_nodes(x: str = "x", y: str = "y", prefix: str = "") -> list[onnx.NodeProto]:
    """conv1 -> Relu -> conv2: the 8 channels between the convs are one prunable group."""
    return [
        helper.make_node("Conv", [x, "W1", "B1"], [f"{prefix}h"], name=f"{prefix}conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"{prefix}h"], [f"{prefix}r"], name=f"{prefix}relu"),
        helper.make_node("Conv", [f"{prefix}r", "W2", "B2"], [y], name=f"{prefix}conv2", pads=[1, 1, 1, 1]),
    ]


def two_conv(path: Path, opset: int = 17, dims: tuple = (1, 3, 16, 16), ir_version: int | None = None,
             extra_nodes: list[onnx.NodeProto] | None = None, extra_opsets: dict[str, int] | None = None,
             output: str = "y") -> Path:
    """A small valid model with one prunable channel group."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    out_dims = [dims[0], 4, *dims[2:]]
    nodes = _conv_nodes()
    if extra_nodes:
        nodes += extra_nodes
    y = helper.make_tensor_value_info(output, TensorProto.FLOAT, out_dims)
    inputs = [x]
    if ir_version is not None and ir_version < 4:  # IR 3: every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in _weights()]
    graph = helper.make_graph(nodes, "two_conv", inputs, [y], _weights())
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(domain, v) for domain, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version if ir_version is not None else min(model.ir_version, 8 if opset <= 17 else 10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def random_bytes(path: Path, size: int = 4096, seed: int = 7) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def text_file(path: Path) -> Path:
    path.write_text("name: resnet18\nlayers:\n  - conv 3x3 64\n  - relu\n")
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def external_data_missing(path: Path) -> Path:
    tmp = path.with_name("staging.onnx")
    two_conv(tmp)
    onnx.save(onnx.load(tmp), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)
    tmp.unlink()
    path.with_name(f"{path.name}.data").unlink()
    return path


def control_flow(path: Path, kind: str) -> Path:
    """The prunable convs sit inside an If's branches or a Loop's body; the top level has no conv."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])
    if kind == "if":
        then_out = helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [1, 4, 16, 16])
        else_out = helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [1, 4, 16, 16])
        then_g = helper.make_graph(_conv_nodes("x", "then_y", "then_"), "then", [], [then_out])
        else_g = helper.make_graph(_conv_nodes("x", "else_y", "else_"), "else", [], [else_out])
        # The condition is a graph input: a constant one would be folded away, branch and all.
        nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
        inits = _weights()
    else:
        # Loop: 2 iterations, the body runs the conv pair on the outer x and carries it out.
        it = helper.make_tensor_value_info("i", TensorProto.INT64, [])
        c_in = helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])
        c_out = helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])
        v_in = helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4, 16, 16])
        v_out = helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4, 16, 16])
        body_nodes = [*_conv_nodes("x", "body_y", "body_"),
                      helper.make_node("Add", ["v_in", "body_y"], ["v_out"], name="body_add"),
                      helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond")]
        body = helper.make_graph(body_nodes, "body", [it, c_in, v_in], [c_out, v_out])
        inits = [*_weights(), numpy_helper.from_array(np.array(2, np.int64), "trips"),
                 numpy_helper.from_array(np.array(True), "keep_going"),
                 numpy_helper.from_array(np.zeros((1, 4, 16, 16), np.float32), "v0")]
        nodes = [helper.make_node("Loop", ["trips", "keep_going", "v0"], ["y"], name="loop", body=body)]
    inputs = [x, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])] if kind == "if" else [x]
    graph = helper.make_graph(nodes, f"{kind}_model", inputs, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def convs_then_if(path: Path) -> Path:
    """A prunable conv pair at the top level whose output feeds an If with a conv in each branch."""
    rng = np.random.default_rng(1)
    w3 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "W3")
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 16, 16])
    then_out = helper.make_tensor_value_info("then_z", TensorProto.FLOAT, [1, 4, 16, 16])
    else_out = helper.make_tensor_value_info("else_z", TensorProto.FLOAT, [1, 4, 16, 16])
    then_g = helper.make_graph([helper.make_node("Conv", ["y", "W3"], ["then_z"], name="then_conv")],
                               "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("Relu", ["y"], ["else_z"], name="else_relu")],
                               "else", [], [else_out])
    nodes = [*_conv_nodes(), helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g,
                                               else_branch=else_g)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    graph = helper.make_graph(nodes, "convs_then_if", [x, cond], [out], [*_weights(), w3])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def custom_domain(path: Path) -> Path:
    """conv pair followed by an op from a domain nobody knows (ONNX Runtime cannot run it either)."""
    node = helper.make_node("Frobnicate", ["y"], ["z"], name="frob", domain="com.example.unknown")
    return two_conv(path, extra_nodes=[node], extra_opsets={"com.example.unknown": 1}, output="z")


def empty_graph(path: Path) -> Path:
    """A valid ModelProto whose graph has no nodes: the input passes straight to the output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([], "empty", [x], [x])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
