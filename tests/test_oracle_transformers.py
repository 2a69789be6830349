"""Transformers that no CNN rule was tuned for: whatever is pruned must satisfy the oracle."""

import onnx
import pytest
from oracle import check_model

from graphprune.api import analyze
from graphprune.models.transformer_zoo import NAMES, export, sample_inputs


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_transformer_oracle(name, exporter, tmp_path_factory):
    proto = onnx.load(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    feeds = {i.name: v for i, v in ((i, sample_inputs(name).get(i.name)) for i in proto.graph.input) if v is not None}
    result = check_model(proto, feeds, ratio=0.5)
    assert result["removed"] > 0, "at least the MLP neurons are prunable"


HEAD_UNITS = {"bert": 4, "gpt2": 4, "vit": 4, "llama_gqa": 2}  # heads, or KV groups under GQA


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_heads_are_seen_through_the_reshapes(name, exporter, tmp_path_factory):
    """A head is a factor of the reshaped projection axis: one prunable group of that size per layer."""
    report = analyze(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    heads = [s for s in report.prunable if s.size == HEAD_UNITS[name]]
    assert len(heads) >= 2, [(s.size, s.reason) for s in report.groups]
