"""Budgets (--target-flops/--target-params), global and sensitivity allocation, per-group bounds."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import load, prune

from graphprune.allocation import blocks
from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.metrics import count_macs, count_params
from graphprune.models.zoo import export
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass
from graphprune.plan import PlanConfig, make_plan, round_kept


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    return {name: onnx.load(export(name, "legacy", cache_dir=cache)) for name in ("resnet_basic", "mobilenet_v2")}


def _reduction(before, after):
    return 1 - count_macs(after).total / count_macs(before).total, 1 - count_params(after) / count_params(before)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("round_to", [1, 8])
def test_flops_target_reached_within_rounding(zoo, name, allocation, round_to):
    proto = zoo[name]
    config = PlanConfig(target_flops=0.3, allocation=allocation, round_to=round_to, max_group_ratio=0.7)
    pruned, plan = prune(proto, config)
    flops, params = _reduction(proto, pruned)
    assert plan.allocation.reached
    assert flops >= 0.3 - 1e-9, flops
    assert abs(flops - plan.allocation.estimated_flops) < 1e-6  # the estimate is the count
    assert abs(params - plan.allocation.estimated_params) < 1e-6
    # Greedy blocks overshoot by at most one block. A uniform share with coarse rounding jumps in steps
    # (16-wide groups lose 0 or 8 of 16), so only its unrounded form is bounded.
    if round_to == 1 or allocation == "global":
        assert flops < 0.36, flops
    for d in plan.decisions:
        if d.group.size:
            assert len(d.removed) <= 0.7 * d.group.size + 1e-9, (d.group.id, len(d.removed), d.group.size)
            assert len(d.removed) < d.group.size
            kept = d.group.size - len(d.removed)
            multiple = 1 if d.group.kind in ("head", "head-repeat") else round_to
            assert round_kept(kept, d.group.size, multiple) == kept


def test_params_target_and_min_ratio(zoo):
    proto = zoo["resnet_basic"]
    pruned, plan = prune(proto, PlanConfig(target_params=0.4, allocation="global", round_to=1, min_ratio=0.1))
    _, params = _reduction(proto, pruned)
    assert 0.4 <= params < 0.45
    for d in plan.decisions:
        if not d.skipped or len(d.removed):
            assert len(d.removed) >= round(0.1 * d.group.size), (d.group.id, len(d.removed))


def test_unreachable_target_is_reported(zoo):
    _pruned, plan = prune(zoo["resnet_basic"], PlanConfig(target_flops=0.9, round_to=1, max_group_ratio=0.2))
    assert not plan.allocation.reached
    assert all(len(d.removed) <= 0.2 * d.group.size for d in plan.decisions)


def test_plain_ratio_unchanged(zoo):
    """Without a target, --ratio and --global plan exactly as before (allocation leaves them alone)."""
    model = load(zoo["mobilenet_v2"])
    g = build_dim_graph(model)
    groups = find_groups(g)
    for config in (PlanConfig(ratio=0.3), PlanConfig(ratio=0.3, global_rank=True)):
        plan = make_plan(g, groups, config)
        assert plan.allocation is None
        for d in plan.decisions:
            if config.global_rank or d.skipped:
                continue
            expected = d.group.size - round_kept(d.group.size - round(0.3 * d.group.size), d.group.size, 16)
            assert len(d.removed) == expected


def test_blocks_follow_round_to():
    assert blocks(40, 16) == [8, 16]
    assert blocks(16, 16) == []
    assert blocks(5, 1) == [1, 1, 1, 1]
    for size in range(1, 70):
        kept = size
        for step in blocks(size, 16):
            kept -= step
            assert round_kept(kept, size, 16) == kept


def _two_layers(seed=0):
    """x -> fc1 (A: 16 units) -> Relu -> fc2 (B: 16 units) -> Relu -> fc3 -> + fc4(A) -> y.

    B reaches the output only through fc3, whose weights are 1e-4 times smaller than fc4's (A's direct
    path): pruning B barely moves the output, though B's own weights (what per-group standardised
    magnitude sees) look like A's.
    """
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(size=(16, 8)), "w2": rng.normal(size=(16, 16)),
               "w3": rng.normal(size=(4, 16)) * 1e-4, "w4": rng.normal(size=(4, 16))}
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2"], ["h2"], transB=1, name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3"], ["y3"], transB=1, name="fc3"),
             helper.make_node("Gemm", ["r1", "w4"], ["y4"], transB=1, name="fc4"),
             helper.make_node("Add", ["y3", "y4"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_pass(proto, **options):
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(2)]
    done = []
    pruning = PruneChannelsPass(PruneChannelsConfig(round_to=1, calibration=batches, progress=done.append,
                                                    **options))
    pruning(load(proto))
    return pruning, done


def test_sensitivity_prunes_the_insensitive_group_most():
    proto = _two_layers()
    pruning, done = _run_pass(proto, ratio=0.4, allocation="sensitivity", max_group_ratio=0.9)
    removed = {d.group.nodes[0].name: len(d.removed) for d in pruning.plan.decisions if d.criterion}
    sens = pruning.plan.allocation.sensitivity
    a, b = (next(d.group.root for d in pruning.plan.decisions if d.group.nodes[0].name == n)
            for n in ("fc1", "fc2"))
    assert sens[b] < 1e-2 * sens[a]
    assert removed == {"fc1": 0, "fc2": round(0.4 * 32)}  # the whole unit budget goes to the insensitive one
    assert done == list(range(1, len(done) + 1)) and len(done) == 2 + 2  # 2 dense batches + 2 groups
    rows = {s.id: s for s in pruning.summaries if s.sensitivity is not None}
    assert len(rows) == 2 and all(0 <= s.ratio <= 0.9 for s in rows.values())
    # Uniform allocation at the same ratio takes the same share of both.
    uniform, _ = _run_pass(proto, ratio=0.4)
    assert {len(d.removed) for d in uniform.plan.decisions if not d.skipped} == {6}


def test_sensitivity_with_flops_target():
    proto = _two_layers()
    pruning, _ = _run_pass(proto, target_flops=0.3, allocation="sensitivity")
    assert pruning.plan.allocation.reached
    assert pruning.plan.allocation.estimated_flops >= 0.3


def test_cli_budget_and_sensitivity_table(tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from graphprune.cli import main
    from graphprune.models.zoo import sample_input

    model = tmp_path / "resnet_basic.onnx"
    shutil.copy(export("resnet_basic", "legacy"), model)
    sample = sample_input("resnet_basic")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([sample, -sample]))
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ["optimize", str(model), "-o", str(out), "--no-latency", "--round-to", "1", "--target-flops", "0.3",
            "--allocation", "sensitivity", "--max-ratio", "0.6", "--calib", str(tmp_path / "calib.npz"),
            "--report", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Sensitivity" in result.stdout and "MACs -30.0% requested" in result.stdout
    budget = json.loads(report.read_text())["allocation"]
    assert budget["mode"] == "sensitivity" and budget["target_reached"]
    assert budget["achieved_flops_reduction"] >= 0.3
    assert budget["sensitivity"] and all(r["ratio"] <= 0.6 for r in budget["sensitivity"])
    for bad, named in ((["--ratio", "0.3", "--target-flops", "0.3"], "give one of them"),
                       ([], "give --ratio"), (["--target-flops", "1.5"], "--target-flops"),
                       (["--target-flops", "0.3", "--allocation", "sensitivity"], "--calib")):
        result = CliRunner().invoke(main, ["optimize", str(model), "-o", str(out), *bad])
        assert result.exit_code == 2 and named in result.output, result.output
