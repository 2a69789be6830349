"""The zoo transformers as ONNX Runtime's transformer optimizer leaves them: fused ops have rules, heads
are still found, and the oracle holds."""

import onnx
import pytest
from oracle import check_model

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


@pytest.mark.parametrize(("name", "attention"), [("bert", "eager"), ("llama_gqa", "sdpa")])
def test_pruned_fused_model_verifies_and_can_be_pruned_again(name, attention, tmp_path_factory, tmp_path):
    """Through the API as users run it: ORT's standard-domain SimplifiedLayerNormalization passes
    verification, and the pruned file (shapes after contrib ops re-inferred) analyses cleanly."""
    from graphprune import api

    source = optimized(name, attention=attention, cache_dir=tmp_path_factory.getbasetemp() / "tf")
    out = tmp_path / "pruned.onnx"
    result = api.optimize(source, out, ratio=0.5, round_to=1)
    assert result.plan.units_removed > 0 and result.verification.min_cosine > 0.5
    again = analyze(out)
    assert not again.declined, again.declined
    assert {"head", "channel"} <= {s.kind for s in again.prunable}
