"""Transformers that no CNN rule was tuned for: whatever is pruned must satisfy the oracle."""

import onnx
import pytest
from oracle import check_model

from graphprune.models.transformer_zoo import NAMES, export, sample_inputs


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_transformer_oracle(name, exporter, tmp_path_factory):
    proto = onnx.load(export(name, exporter, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    feeds = {i.name: v for i, v in ((i, sample_inputs(name).get(i.name)) for i in proto.graph.input) if v is not None}
    result = check_model(proto, feeds, ratio=0.5)
    assert result["removed"] > 0, "at least the MLP neurons are prunable"
