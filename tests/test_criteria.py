"""Magnitude criteria find units that are dead on one side only (never produced, or never read)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from oracle import assert_equivalent, edit_slices, load, planted_units, prunable_groups, prune

from graphprune.models.zoo import export, sample_input
from graphprune.plan import PlanConfig


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "densenet_block"])
@pytest.mark.parametrize("role", ["in", "out"])
def test_units_dead_on_one_side_are_removed_first(name, role):
    proto = ir.to_proto(load(onnx.load(export(name, "legacy"))))
    config = PlanConfig(ratio=0.25, round_to=1)
    chosen = planted_units(prunable_groups(proto, config), 0.25, np.random.default_rng(1))
    planted = edit_slices(proto, chosen, roles=(role,))
    pruned, plan = prune(planted, PlanConfig(ratio=0.25, criterion="l2", round_to=1))
    assert {root: list(units) for root, units in plan.removed.items()} == \
        {root: list(units) for root, units in chosen.items()}
    if role == "in":  # nothing reads them: removing them changes nothing at all
        assert_equivalent(planted, pruned, {"input": sample_input(name)})
