"""The oracle over hypothesis-generated CNN graphs (residual adds, concats, splits, reshapes, groups)."""

import numpy as np
import onnx_ir as ir
from graphgen import random_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import check_model, load


def feeds_for(proto):
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"input": np.random.default_rng(0).standard_normal(dims).astype(np.float32)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_cnn(), ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_generated_graphs_satisfy_the_oracle(proto, ratio, seed):
    check_model(proto, feeds_for(proto), ratio, seed)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_cnn())
def test_preparing_twice_changes_nothing(proto):
    """Plans of different analyses are compared by group; that needs preparation to be a fixed point."""
    once = ir.to_proto(load(proto))
    twice = ir.to_proto(load(once))
    assert [n.op_type for n in once.graph.node] == [n.op_type for n in twice.graph.node]
    assert {v.name: str(v.type) for v in once.graph.value_info} == {v.name: str(v.type) for v in twice.graph.value_info}
