"""Transformers that no CNN rule was tuned for: whatever is pruned must satisfy the oracle."""

import onnx
import pytest
from oracle import check_model, load

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.api import analyze
from graphprune.models.transformer_zoo import KV_HEADS, KV_NAMES, LAYERS, NAMES, export, sample_inputs

EXPORTERS = ["legacy", "dynamo"]


def zoo_model(name, exporter, tmp_path_factory):
    proto = onnx.load(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    inputs = sample_inputs(name)
    return proto, {i.name: inputs[i.name] for i in proto.graph.input if i.name in inputs}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_transformer_oracle(name, exporter, tmp_path_factory):
    proto, feeds = zoo_model(name, exporter, tmp_path_factory)
    result = check_model(proto, feeds, ratio=0.5)
    assert result["removed"] > 0, "at least the MLP neurons are prunable"


@pytest.mark.parametrize("kind", ["head", "channel"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_one_unit_kind_at_a_time(name, exporter, kind, tmp_path_factory):
    """Pruning heads only equals zeroing their rows of the output projection; pruning MLP neurons only
    equals zeroing their rows of fc2 (down_proj): the masking the oracle compares with edits exactly
    the weight uses that read the unit (see test_each_unit_is_read_by_one_projection)."""
    proto, feeds = zoo_model(name, exporter, tmp_path_factory)
    result = check_model(proto, feeds, ratio=0.5, kinds=(kind,), zero=False)
    assert result["kinds"] == [kind], result


HEAD_UNITS = {"bert": 4, "gpt2": 4, "vit": 4, "llama_gqa": 2, "mistral": 2, "qwen2": 2}  # heads, or KV groups


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_heads_are_seen_through_the_reshapes(name, exporter, tmp_path_factory):
    """A head is a factor of the reshaped projection axis: one prunable group of that size per layer."""
    report = analyze(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    heads = [s for s in report.prunable if s.size == HEAD_UNITS[name]]
    assert len(heads) >= 2, [(s.size, s.reason) for s in report.groups]
    assert [s.kind for s in report.prunable if s.kind == "head"] == ["head"] * LAYERS
    assert all(s.size == HEAD_UNITS[name] for s in report.prunable if s.kind == "head")


def prunable_groups_of(proto):
    g = build_dim_graph(load(proto))
    return g, [group for group in find_groups(g) if group.prunable]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES + KV_NAMES)
def test_each_unit_is_read_by_one_projection(name, exporter, tmp_path_factory):
    """Every head and every MLP neuron is read (contracted) by exactly one weight: the attention output
    projection, or fc2/down_proj. Zeroing that slice is what pruning the unit must equal."""
    proto, _ = zoo_model(name, exporter, tmp_path_factory)
    _, groups = prunable_groups_of(proto)
    units = [group for group in groups if group.kind in ("head", "channel")]
    assert len(units) == 2 * LAYERS, [(group.kind, group.size) for group in groups]
    for group in units:
        readers = [use.node.op_type for use, axis in group.params if use.roles[axis] == "in"]
        assert len(readers) == 1 and readers[0] in ("MatMul", "Gemm"), (group.kind, readers)


GATED = ("llama_gqa", "mistral", "qwen2", "llama_kv", "mistral_kv", "qwen2_kv")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", GATED)
def test_gated_mlp_neurons_are_one_group_per_layer(name, exporter, tmp_path_factory):
    """SwiGLU: gate and up projections meet in a Mul, down_proj reads it; one neuron is one index of all
    three, so each layer has one channel group of the intermediate size, and heads are KV groups."""
    proto, _ = zoo_model(name, exporter, tmp_path_factory)
    _, groups = prunable_groups_of(proto)
    neurons = [group for group in groups if group.kind == "channel"]
    assert [group.size for group in neurons] == [128] * LAYERS
    for group in neurons:
        roles = sorted((use.node.op_type, use.roles[axis]) for use, axis in group.params)
        assert roles == [("MatMul", "in"), ("MatMul", "out"), ("MatMul", "out")], roles
        gate, up = [use.node for use, axis in group.params if use.roles[axis] == "out"]
        assert muls_downstream(gate) & muls_downstream(up), "gate and up do not meet in a Mul"
    heads = [group.size for group in groups if group.kind == "head"]
    assert heads == [KV_HEADS.get(name, 2)] * LAYERS


def muls_downstream(node, depth: int = 3) -> set:
    """Mul nodes reachable from a node's output within a few ops (the activation sits in between)."""
    found, frontier = set(), [node]
    for _ in range(depth):
        frontier = [use.node for n in frontier for out in n.outputs for use in out.uses()]
        found |= {n for n in frontier if n.op_type == "Mul"}
    return found
