"""The oracle over every CNN zoo model and both exporters, and pruning depth at ratio 0.5."""

import onnx
import pytest
from oracle import check_model, prune

from graphprune.metrics import count_params
from graphprune.models.zoo import EXPORTERS, export, names, sample_input
from graphprune.plan import PlanConfig

CASES = [(name, exporter) for name in names() for exporter in EXPORTERS]


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def load(name, exporter, cache):
    proto = onnx.load(export(name, exporter, cache_dir=cache))
    return proto, {proto.graph.input[0].name: sample_input(name)}


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_oracle_holds(name, exporter, zoo_cache):
    proto, feeds = load(name, exporter, zoo_cache)
    result = check_model(proto, feeds, ratio=0.5)
    assert result["groups"] > 0, f"{name}: no prunable group found"


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_half_ratio_removes_most_prunable_weights(name, exporter, zoo_cache):
    proto, _ = load(name, exporter, zoo_cache)
    pruned, _plan = prune(proto, PlanConfig(ratio=0.5))
    before, after = count_params(proto), count_params(pruned)
    assert after < 0.75 * before, f"{name}: {before} -> {after} params"
