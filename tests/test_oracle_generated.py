"""The oracle over hypothesis-generated CNN graphs (residual adds, concats, splits, reshapes, groups)."""

import numpy as np
from graphgen import random_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import check_model


def feeds_for(proto):
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"input": np.random.default_rng(0).standard_normal(dims).astype(np.float32)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_cnn(), ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_generated_graphs_satisfy_the_oracle(proto, ratio, seed):
    check_model(proto, feeds_for(proto), ratio, seed)
