"""Exports with symbolic batch and sequence axes, as deployment pipelines write them.

Run-time shape arithmetic (mask Expand guards, x.size()[:-1] reads, GQA repeat Expands) must not
hide heads and neurons: every form finds the same unit kinds as its static export.
"""

import onnx
import pytest
from oracle import check_model

from graphprune.api import analyze
from graphprune.models.transformer_zoo import export, sample_inputs

FORMS = ["bert", "gpt2", "llama_gqa", "llama_kv", "gpt2_kv"]


@pytest.mark.parametrize("name", FORMS)
def test_dynamic_exports_expose_heads_and_neurons(name, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tf"
    dynamic = analyze(export(name, "legacy-dynamic", cache_dir=cache))
    static = analyze(export(name, "legacy", cache_dir=cache))
    kinds = {s.kind for s in dynamic.prunable}
    assert {"head", "channel"} <= kinds, [(s.size, s.kind, s.reason) for s in dynamic.groups]
    assert kinds == {s.kind for s in static.prunable}


@pytest.mark.parametrize("name", FORMS)
def test_dynamic_exports_satisfy_the_oracle(name, tmp_path_factory):
    proto = onnx.load(export(name, "legacy-dynamic", cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    result = check_model(proto, sample_inputs(name), ratio=0.5)
    assert "head" in result["kinds"]
