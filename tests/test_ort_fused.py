"""The zoo transformers as ONNX Runtime's transformer optimizer leaves them: fused ops have rules, heads
are still found, and the oracle holds."""

import onnx
import pytest
from oracle import check_model
from test_rules_attention import check

from graphprune.api import analyze
from graphprune.models.ort_fused import FUSED, optimized
from graphprune.models.transformer_zoo import sample_inputs

STANDARD = ("", "ai.onnx")
# Per layer: heads (or KV groups under GQA) and the MLP neurons; 2 layers each.
PRUNABLE = {
    "bert": [("channel", 128), ("head", 4), ("head-dim", 16)],
    "gpt2": [("channel", 256), ("head", 4), ("head-dim", 16)],
    "vit": [("channel", 128), ("head", 4), ("head-dim", 16)],
    "llama_gqa": [("channel", 128), ("head", 2), ("head-dim", 16), ("head-repeat", 2)],
}


@pytest.fixture(autouse=True)
def _checker_knows_ort_ops(monkeypatch):
    """ORT writes SimplifiedLayerNormalization in the standard domain, which ONNX does not define."""
    monkeypatch.setattr(onnx.checker, "check_model", check)


@pytest.mark.parametrize(("name", "attention"), sorted(FUSED))
def test_ort_optimized_transformer(name, attention, tmp_path_factory):
    proto = onnx.load(optimized(name, attention=attention, cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    fused = {n.op_type for n in proto.graph.node
             if n.domain not in STANDARD or n.op_type == "SimplifiedLayerNormalization"}
    assert fused == set(FUSED[name, attention])
    report = analyze(proto)
    assert not report.declined, report.declined
    assert sorted((s.kind, s.size) for s in report.prunable) == sorted(PRUNABLE[name] * 2)
    feeds = {i.name: v for i, v in ((i, sample_inputs(name).get(i.name)) for i in proto.graph.input) if v is not None}
    result = check_model(proto, feeds, ratio=0.5)
    assert result["kinds"] == ["channel", "head"], result
