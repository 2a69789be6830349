"""--protect residual: groups that pass through a sum of activations stay whole; the rest is pruned."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphprune import api
from graphprune.errors import GraphpruneError


def _residual_block(path) -> str:
    """x -> ConvA(8) -> Relu = a; a -> ConvB(16) -> Relu -> ConvC(8) = b; Add(a, b) -> ConvD(4) -> y."""
    rng = np.random.default_rng(0)

    def weight(name, out, inp):
        return helper.make_tensor(name, TensorProto.FLOAT, [out, inp, 1, 1],
                                  rng.standard_normal((out, inp, 1, 1)).astype(np.float32).ravel())

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="conv_a"),
        helper.make_node("Relu", ["ca"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["a", "wb"], ["cb"], name="conv_b"),
        helper.make_node("Relu", ["cb"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc"], ["b"], name="conv_c"),
        helper.make_node("Add", ["a", "b"], ["s"], name="residual_add"),
        helper.make_node("Conv", ["s", "wd"], ["y"], name="conv_d"),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight("wa", 8, 3), weight("wb", 16, 8), weight("wc", 8, 16), weight("wd", 4, 8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = str(path / "residual.onnx")
    onnx.save(model, out)
    return out


def _removed_by_size(result) -> dict[int, int]:
    return {d.group.size: len(d.removed) for d in result.plan.decisions if d.group.prunable}


def test_protect_residual_leaves_the_stream_whole(tmp_path):
    model = _residual_block(tmp_path)
    plain = api.optimize(model, ratio=0.5, round_to=1)
    assert _removed_by_size(plain) == {8: 4, 16: 8}
    protected = api.optimize(model, tmp_path / "out.onnx", ratio=0.5, round_to=1, protect=("residual",))
    assert _removed_by_size(protected) == {8: 0, 16: 8}
    stream = next(d for d in protected.plan.decisions if d.group.size == 8)
    assert stream.skipped == "residual stream (--protect residual)"
    assert protected.verification is not None and "y" in protected.verification.outputs
    assert protected.settings["protect"] == ["residual"]


def test_protect_unknown_role_is_a_clear_error(tmp_path):
    with pytest.raises(GraphpruneError, match="--protect: unknown role 'bottleneck'"):
        api.optimize(_residual_block(tmp_path), ratio=0.5, protect=("bottleneck",))


def test_protect_residual_keeps_attention_heads_prunable(tmp_path):
    """The mask added to the attention scores is broadcast over the heads: not a residual stream."""
    pytest.importorskip("torch")
    from graphprune.models.transformer_zoo import export

    bert = export("bert", "legacy", cache_dir=tmp_path)
    result = api.optimize(str(bert), ratio=0.5, protect=("residual",), check=False)
    heads = [d for d in result.plan.decisions if d.group.prunable and d.group.kind == "head"]
    assert heads and all(not d.skipped and len(d.removed) for d in heads)
