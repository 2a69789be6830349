"""Decoders with a KV cache: the head axis of past/present tensors shrinks with the heads.

The caller allocates the cache, so pruning heads changes the model's interface: the pruned model takes
and returns past/present tensors with fewer heads. The oracle feeds it the kept heads of each past
tensor and compares its presents with the kept heads of the masked model's.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from oracle import check_model, load, prune, run

from graphprune.analysis import build_dim_graph
from graphprune.models.transformer_zoo import (
    HEAD_DIM,
    KV_HEADS,
    KV_NAMES,
    LAYERS,
    PAST,
    SEQ,
    cache_names,
    export,
    sample_inputs,
)
from graphprune.plan import PlanConfig
from graphprune.rewrite import interface_changes

EXPORTERS = ["legacy", "dynamo"]
KINDS = {"default": ("channel", "head"), "heads": ("head",), "channels": ("channel",)}


def zoo_model(name, exporter, tmp_path_factory):
    proto = onnx.load(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    inputs = sample_inputs(name)
    return proto, {i.name: inputs[i.name] for i in proto.graph.input if i.name in inputs}


def declared(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kinds", list(KINDS))
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", KV_NAMES)
def test_kv_oracle(name, exporter, kinds, tmp_path_factory):
    proto, feeds = zoo_model(name, exporter, tmp_path_factory)
    assert set(cache_names(name)[0]) <= set(feeds), "the past tensors are graph inputs"
    result = check_model(proto, feeds, ratio=0.5, kinds=KINDS[kinds], zero=kinds == "default")
    past, present = cache_names(name)
    assert result["resized"] == (sorted(past + present) if "head" in KINDS[kinds] else []), result


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["llama_kv", "qwen2_kv"])
def test_kv_oracle_query_heads_of_a_group(name, exporter, tmp_path_factory):
    """GQA: removing query heads within a KV group (head-repeat) leaves the cache as it is."""
    proto, feeds = zoo_model(name, exporter, tmp_path_factory)
    result = check_model(proto, feeds, ratio=0.5, kinds=("head-repeat",), zero=False)
    assert result["kinds"] == ["head-repeat"] and result["resized"] == []
    result = check_model(proto, feeds, ratio=0.5, kinds=("head", "head-repeat"), zero=False)
    assert result["kinds"] == ["head", "head-repeat"] and len(result["resized"]) == 4 * LAYERS


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", KV_NAMES)
def test_cache_head_axis_is_the_only_interface_axis(name, exporter, tmp_path_factory):
    proto, _ = zoo_model(name, exporter, tmp_path_factory)
    g = build_dim_graph(load(proto))
    past, present = cache_names(name)
    assert sorted((v.name, axis) for v, axis in g.interface_axes) == sorted((n, 1) for n in past + present)
    for value, axis in g.interface_axes:
        assert g.space.size(g.axes_of[value][axis]) == KV_HEADS[name]
        assert all(g.space.vars[a].kind == "head" for a in g.space.atoms(g.axes_of[value][axis]))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", KV_NAMES)
def test_pruned_cache_runs_with_fewer_heads(name, exporter, tmp_path_factory):
    """Half the KV heads go: past and present are declared with the new head count, ORT runs it."""
    proto, feeds = zoo_model(name, exporter, tmp_path_factory)
    proto = ir.to_proto(load(proto))
    config = PlanConfig(ratio=0.5, kinds=("head",))
    pruned, plan = prune(proto, config)
    heads = KV_HEADS[name] // 2
    past, present = cache_names(name)
    g = build_dim_graph(load(proto))
    changes = interface_changes(g, plan.removed)
    assert sorted(c["value"] for c in changes) == sorted(past + present)
    assert {(c["axis"], c["before"], c["after"]) for c in changes} == {(1, KV_HEADS[name], heads)}
    inputs = {v.name: declared(v) for v in pruned.graph.input}
    outputs = {v.name: declared(v) for v in pruned.graph.output}
    assert all(inputs[n] == [1, heads, PAST, HEAD_DIM] for n in past), inputs
    assert all(outputs[n] == [1, heads, PAST + SEQ, HEAD_DIM] for n in present), outputs
    rng = np.random.default_rng(1)
    small = {**feeds, **{n: rng.standard_normal((1, heads, PAST, HEAD_DIM)).astype(np.float32) for n in past}}
    for optimize in (False, True):  # ORT's attention fusions must take the thinner heads too
        got = dict(zip([o.name for o in pruned.graph.output], run(pruned, small, optimize=optimize)))
        assert got["logits"].shape == (1, SEQ, 100) and np.isfinite(got["logits"]).all()
        for n in present:
            assert got[n].shape == (1, heads, PAST + SEQ, HEAD_DIM)
            # The cache passes through: the first PAST positions of present are the past fed in.
            np.testing.assert_array_equal(got[n][:, :, :PAST], small[n.replace("present", "past_key_values")])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run(pruned, feeds)  # the full-width cache is refused
