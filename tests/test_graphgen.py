"""Self-tests for the random ONNX CNN generator used by the pruning property tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from graphgen import BLOCK_KINDS, HEAD_KINDS, block_kinds, head_kind, random_cnn
from hypothesis import HealthCheck, Phase, event, given, settings

ACTIVATION_OPS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish"}


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
    onnx.checker.check_model(model, full_check=True)

    outputs = run_model(model)

    assert model.graph.output[0].name == "output"
    for value_info, array in zip(model.graph.output, outputs, strict=True):
        assert array.shape == declared_shape(value_info), value_info.name
        assert np.isfinite(array).all(), value_info.name

    # Shown with `pytest --hypothesis-show-statistics`.
    for kind in set(block_kinds(model)):
        event(f"block:{kind}")
    event(f"head:{head_kind(model)}")
    event(f"outputs:{len(outputs)}")


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
