"""prune-tokens: the keep-1 oracle, planted attention, exact selection, both exporters, CLI."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from graphprune import api
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.passes.prune_tokens import (
    PruneTokensConfig,
    PruneTokensPass,
    TokenStage,
    compare_outputs,
    find_layers,
    kept_count,
    parse_stage,
)
from models.transformer_zoo import export, sample_inputs

STANDARD = {"Add", "Concat", "Conv", "Div", "Erf", "Gather", "GatherND", "Gelu", "IsNaN", "LayerNormalization",
            "MatMul", "Mul", "ReduceSum", "Reshape", "Slice", "Softmax", "TopK", "Transpose", "Unsqueeze", "Where"}
TOKENS = 17  # the zoo ViT: 32x32 image, patch 8 -> 16 patches + CLS


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def vit(request, tmp_path_factory):
    return onnx.load(export("vit", request.param, cache_dir=tmp_path_factory.getbasetemp() / "tf"))


def run(proto: onnx.ModelProto, outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, sample_inputs("vit"))


def pruned(proto: onnx.ModelProto, *stages: TokenStage, cls: bool = True) -> tuple[onnx.ModelProto, PruneTokensPass]:
    model = ir.from_proto(proto)
    from graphprune.io import prepare

    prepare(model)
    tokens = PruneTokensPass(PruneTokensConfig(stages=stages, cls=cls))
    tokens(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out, tokens


def test_kept_count():
    assert kept_count(197, 0.7, cls=True) == 1 + math.ceil(0.7 * 196) == 139
    assert kept_count(197, 0.5, cls=True) == 99
    assert kept_count(11, 0.7, cls=True) == 8  # 0.7 * 10 is 7.000000000000001 in floats: still 7
    assert kept_count(197, 1.0, cls=True) == 197
    assert kept_count(16, 0.5, cls=False) == 8
    assert parse_stage("0.7@3") == TokenStage(layer=3, keep=0.7)
    with pytest.raises(GraphpruneError, match="KEEP@LAYER"):
        parse_stage("0.7")


@pytest.mark.parametrize("layer", [0, 1])
def test_keep_one_changes_nothing(vit, layer):
    """The oracle: at keep 1 every token is kept in order, so the outputs are the dense ones (to float
    rounding: with the cut after the last layer the gather sits between the residual Add and the final
    LayerNorm, which ONNX Runtime then no longer fuses; measured 1 ulp)."""
    out, tokens = pruned(vit, TokenStage(layer, 1.0))
    assert tokens.report.stages[0].tokens_after == TOKENS
    assert {n.op_type for n in out.graph.node} >= {"TopK", "GatherND"}
    (dense,), (new,) = run(vit), run(out)
    assert dense.shape == new.shape
    np.testing.assert_allclose(new, dense, rtol=1e-6, atol=1e-6)


def test_two_encoder_layers_found(vit):
    model = ir.from_proto(vit)
    from graphprune.io import prepare

    prepare(model)
    assert len(find_layers(model)) == 2


def _dense_cls_scores(vit: onnx.ModelProto, layer: int) -> np.ndarray:
    """The CLS row of layer ``layer``'s attention probabilities, summed over heads, from the dense model."""
    model = load_model_proto(vit)
    softmax = find_layers(model)[layer].softmax.outputs[0]
    proto = onnx.ModelProto()
    proto.CopyFrom(vit)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(softmax.name, onnx.TensorProto.FLOAT, None))
    probs = run(proto, [softmax.name])[0]
    return probs[:, :, 0, :].sum(axis=1)[0]


def load_model_proto(proto: onnx.ModelProto) -> ir.Model:
    from graphprune.io import prepare

    model = ir.from_proto(proto)
    prepare(model)
    return model


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.25])
def test_selection_after_the_last_layer_is_exact(vit, keep):
    """Cut after the last layer: the output is the final LayerNorm of the kept rows, so it must equal the
    dense output at CLS plus the top-k tokens by the dense CLS attention, in positional order."""
    scores = _dense_cls_scores(vit, 1)
    k = kept_count(TOKENS, keep, cls=True) - 1
    expected = [0, *sorted((np.argsort(-scores[1:], kind="stable")[:k] + 1).tolist())]
    out, _ = pruned(vit, TokenStage(1, keep))
    (dense,), (new,) = run(vit), run(out)
    assert new.shape == (1, len(expected), dense.shape[2])
    np.testing.assert_allclose(new, dense[:, expected], rtol=1e-5, atol=1e-5)


def _planted(vit: onnx.ModelProto, subset: list[int]) -> onnx.ModelProto:
    """The dynamo export with the last layer's additive attention bias planted: the CLS query sees only
    ``subset`` (-1e4 on every other key), the other queries are left as they were."""
    proto = onnx.ModelProto()
    proto.CopyFrom(vit)
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    bias_add = next(n for n in proto.graph.node if n.output[0] == softmaxes[-1].input[0])
    assert bias_add.op_type == "Add"
    bias = np.zeros((1, 1, TOKENS, TOKENS), dtype=np.float32)
    bias[0, 0, 0, :] = -1e4
    bias[0, 0, 0, subset] = 0.0
    proto.graph.initializer.append(onnx.numpy_helper.from_array(bias, "planted_cls_bias"))
    bias_add.input[1] = "planted_cls_bias"
    return proto


def test_planted_attention_keeps_exactly_the_subset(tmp_path_factory):
    vit = onnx.load(export("vit", "dynamo", cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    subset = [3, 5, 11, 16]
    planted = _planted(vit, subset)
    out, _ = pruned(planted, TokenStage(1, len(subset) / (TOKENS - 1)))
    (dense,), (new,) = run(planted), run(out)
    np.testing.assert_allclose(new, dense[:, [0, *subset]], rtol=1e-5, atol=1e-5)


def test_cut_in_the_middle_rewrites_baked_lengths_and_runs(vit):
    out, tokens = pruned(vit, TokenStage(0, 0.5))
    stage = tokens.report.stages[0]
    assert (stage.tokens_before, stage.tokens_after) == (TOKENS, 9)
    assert stage.reshapes_rewritten  # both exporters bake 17 into layer 1's Reshapes
    assert {n.op_type for n in out.graph.node} <= STANDARD
    (dense,), (new,) = run(vit), run(out)
    assert new.shape == (1, 9, dense.shape[2])
    ref, cand = compare_outputs({"y": dense}, {"y": new})
    assert list(ref) == ["y[token 0]"]
    cosine = float(ref["y[token 0]"].ravel() @ cand["y[token 0]"].ravel()
                   / np.linalg.norm(ref["y[token 0]"]) / np.linalg.norm(cand["y[token 0]"]))
    assert 0.5 < cosine < 1.0  # comparable, and something changed


def test_two_stages_and_no_cls(vit):
    out, tokens = pruned(vit, TokenStage(1, 0.5), TokenStage(0, 0.7))  # given out of order
    assert [(s.layer, s.tokens_before, s.tokens_after) for s in tokens.report.stages] == [(0, 17, 13), (1, 13, 7)]
    assert run(out)[0].shape == (1, 7, 64)
    out, tokens = pruned(vit, TokenStage(0, 0.5), cls=False)
    assert tokens.report.stages[0].tokens_after == 9  # ceil(0.5 * 17): every token is a candidate
    assert run(out)[0].shape == (1, 9, 64)


def test_errors(vit):
    with pytest.raises(GraphpruneError, match="2 encoder layers"):
        pruned(vit, TokenStage(2, 0.5))
    with pytest.raises(GraphpruneError, match=r"in \(0, 1\]"):
        pruned(vit, TokenStage(0, 0.0))
    with pytest.raises(GraphpruneError, match="same layer"):
        pruned(vit, TokenStage(0, 0.5), TokenStage(0, 0.7))


def test_non_uniform_table_after_the_cut_is_declined(tmp_path_factory):
    """A [1, 1, T, T] bias that is not one value, read after the cut, cannot follow the kept tokens."""
    vit = onnx.load(export("vit", "dynamo", cache_dir=tmp_path_factory.getbasetemp() / "tf"))
    with pytest.raises(GraphpruneError, match="sized for 17 tokens"):
        pruned(_planted(vit, [1, 2]), TokenStage(0, 0.5))


def test_api_and_cli(tmp_path_factory, tmp_path):
    path = export("vit", "legacy", cache_dir=tmp_path_factory.getbasetemp() / "tf")
    result = api.prune_tokens(path, tmp_path / "api.onnx", keep=["1.0@0"], samples=2)
    assert result.verification.outputs["last_hidden_state"].max_abs_error == 0.0
    result = api.prune_tokens(path, None, keep=[(0, 0.5)], samples=2)
    assert list(result.verification.outputs) == ["last_hidden_state[token 0]"]
    assert result.after.macs < result.before.macs

    out = tmp_path / "cli.onnx"
    ran = CliRunner().invoke(main, ["prune-tokens", str(path), "-o", str(out), "--keep", "0.5@0", "--keep",
                                    "0.5@1", "--no-latency", "--samples", "1"])
    assert ran.exit_code == 0, ran.output
    assert out.exists() and "17 → 9" in ran.output
    bad = tmp_path / "bad.onnx"
    ran = CliRunner().invoke(main, ["prune-tokens", str(path), "-o", str(bad), "--keep", "0.5@7", "--no-latency"])
    assert ran.exit_code == 2 and "encoder layers (0 to 1)" in ran.output
    assert not bad.exists()
