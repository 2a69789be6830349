"""Self-tests for the random ONNX CNN generator used by the pruning property tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphgen import (
    ALL_BLOCK_KINDS,
    BLOCK_KINDS,
    DISABLED_BLOCKS,
    GROUP_NORM_OPSET,
    HEAD_KINDS,
    IR_VERSIONS,
    OPSET,
    block_kinds,
    head_kind,
    random_cnn,
)
from hypothesis import HealthCheck, Phase, event, given, settings

ACTIVATION_OPS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish"}
# Ops that only the non-PyTorch-style blocks write (one or more per block kind).
EXPORTER_OPS = {
    "ConvTranspose",
    "Pad",
    "Resize",
    "PRelu",
    "InstanceNormalization",
    "MatMul",
    "Transpose",
    "Constant",
    "SpaceToDepth",
    "DepthToSpace",
    "ReduceMean",
    "HardSigmoid",
}
# The op each block kind is there for, where it has one of its own.
KIND_OPS = {
    "conv_transpose": "ConvTranspose",
    "pad_conv": "Pad",
    "resize": "Resize",
    "prelu": "PRelu",
    "instance_norm": "InstanceNormalization",
    "group_norm": "GroupNormalization",
    "channels_last_mlp": "MatMul",
    "bn_constants": "Constant",
    "space_to_depth": "DepthToSpace",
}


def declared_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value_info.type.tensor_type.shape.dim)


def run_model(model: onnx.ModelProto) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    # One thread: the graphs are tiny and per-session thread-pool start-up would dominate.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(declared_shape(model.graph.input[0])).astype(np.float32)
    return session.run(None, {"input": x})


@settings(max_examples=60, deadline=None)
@given(random_cnn())
def test_random_cnn_is_valid_and_runs(model: onnx.ModelProto) -> None:
    check_valid_and_runs(model)

    # Shown with `pytest --hypothesis-show-statistics`.
    for kind in set(block_kinds(model)):
        event(f"block:{kind}")
    event(f"head:{head_kind(model)}")
    event(f"outputs:{len(model.graph.output)}")


def check_valid_and_runs(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    opset = model.opset_import[0].version
    assert model.ir_version == IR_VERSIONS[opset]

    outputs = run_model(model)

    assert model.graph.output[0].name == "output"
    for value_info, array in zip(model.graph.output, outputs, strict=True):
        assert array.shape == declared_shape(value_info), value_info.name
        assert np.isfinite(array).all(), value_info.name


@pytest.mark.parametrize("kind", ALL_BLOCK_KINDS)
def test_each_block_kind_is_valid_and_runs(kind: str) -> None:
    """Graphs of one block kind (disabled kinds too: asking by name draws them), checked and run."""

    @settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(random_cnn(min_blocks=2, max_blocks=5, kinds=[kind]))
    def check(model: onnx.ModelProto) -> None:
        check_valid_and_runs(model)
        if kind in KIND_OPS and kind in block_kinds(model):
            assert KIND_OPS[kind] in {n.op_type for n in model.graph.node}

    check()


def test_disabled_kinds_stay_out_by_default() -> None:
    assert set(BLOCK_KINDS) | DISABLED_BLOCKS == set(ALL_BLOCK_KINDS)
    assert not set(BLOCK_KINDS) & DISABLED_BLOCKS

    @settings(max_examples=50, deadline=None, database=None, phases=[Phase.generate])
    @given(random_cnn())
    def check(model: onnx.ModelProto) -> None:
        assert not set(block_kinds(model)) & DISABLED_BLOCKS
        if "group_norm" not in BLOCK_KINDS:
            assert model.opset_import[0].version == OPSET

    check()


def test_group_norm_draws_opset_21() -> None:
    opsets: Counter[int] = Counter()

    @settings(max_examples=30, deadline=None, database=None, phases=[Phase.generate])
    @given(random_cnn(kinds=["group_norm", "se"]))
    def collect(model: onnx.ModelProto) -> None:
        opset = model.opset_import[0].version
        opsets[opset] += 1
        if "group_norm" in block_kinds(model):
            assert opset == GROUP_NORM_OPSET
        for node in model.graph.node:
            if node.op_type == "ReduceMean":  # axes moved from attribute to input in opset 18
                assert (len(node.input) == 2) == (opset >= 18)

    collect()
    assert set(opsets) == {OPSET, GROUP_NORM_OPSET}


@settings(max_examples=30, deadline=None)
@given(random_cnn())
def test_names_are_unique_and_readable(model: onnx.ModelProto) -> None:
    node_names = [n.name for n in model.graph.node]
    init_names = [i.name for i in model.graph.initializer]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    assert len(set(init_names)) == len(init_names)
    # Initializers are named after the node that owns them: "conv3.weight" belongs to node "conv3".
    owners = {name.split(".")[0] for name in init_names}
    assert owners <= {name.split(".")[0] for name in node_names}


def test_generated_graphs_are_diverse() -> None:
    """Generation only (no onnxruntime): every block kind, head kind and output count shows up."""
    blocks: Counter[str] = Counter()
    heads: Counter[str] = Counter()
    n_outputs: Counter[int] = Counter()
    ops: Counter[str] = Counter()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(random_cnn())
    def collect(model: onnx.ModelProto) -> None:
        blocks.update(block_kinds(model))
        heads[head_kind(model)] += 1
        n_outputs[len(model.graph.output)] += 1
        ops.update(n.op_type for n in model.graph.node)

    collect()
    print(f"\nblocks: {dict(blocks.most_common())}\nheads: {dict(heads)}\noutputs: {dict(n_outputs)}")
    print(f"ops: {dict(ops.most_common())}")

    assert set(blocks) == set(BLOCK_KINDS)
    assert set(heads) == set(HEAD_KINDS)
    assert set(n_outputs) == {1, 2}
    assert ACTIVATION_OPS | {"BatchNormalization", "Split", "Slice", "Concat"} <= set(ops)
    assert EXPORTER_OPS <= set(ops), EXPORTER_OPS - set(ops)
