"""Budgets (--target-flops/--target-params), global and sensitivity allocation, per-group bounds."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import load, prune

from graphprune.allocation import CostModel, allocate, blocks
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


def _two_costs():
    """Two independent hidden layers summed at the output, with units of very different cost.

    A (fa -> ga): 8 units of 128 + 4 = 132 MACs, 1056 in all; B (fb -> gb): 64 units of 16 + 4 = 20 MACs,
    1280 in all (A's units cost 6.6x B's, like heads against MLP neurons). Total 2336 MACs.
    """
    rng = np.random.default_rng(0)
    weights = {"wa": rng.normal(size=(8, 128)), "va": rng.normal(size=(4, 8)),
               "wb": rng.normal(size=(64, 16)), "vb": rng.normal(size=(4, 64))}
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    nodes = [helper.make_node("Gemm", ["xa", "wa"], ["ha"], transB=1, name="fa"),
             helper.make_node("Relu", ["ha"], ["ra"]),
             helper.make_node("Gemm", ["ra", "va"], ["ya"], transB=1, name="ga"),
             helper.make_node("Gemm", ["xb", "wb"], ["hb"], transB=1, name="fb"),
             helper.make_node("Relu", ["hb"], ["rb"]),
             helper.make_node("Gemm", ["rb", "vb"], ["yb"], transB=1, name="gb"),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", k]) for n, k in (("xa", 128), ("xb", 16))]
    graph = helper.make_graph(nodes, "costs", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _allocate(scores: dict, sensitivity: dict | None = None, **config):
    """allocate() on _two_costs with the given scores per group ("fa", "fb"): counts per group, record."""
    g = build_dim_graph(load(_two_costs()))
    groups = [group for group in find_groups(g) if group.prunable]
    names = [group.nodes[0].name for group in groups]
    assert sorted(zip(names, (group.size for group in groups))) == [("fa", 8), ("fb", 64)]
    assert list(CostModel(g, groups).unit_macs) == [{"fa": 132, "fb": 20}[n] for n in names]
    sens = None if sensitivity is None else {group.root: sensitivity[n] for group, n in zip(groups, names)}
    counts, record = allocate(g, groups, [np.asarray(scores[n], dtype=np.float64) for n in names],
                              [1] * len(groups), PlanConfig(**config), sens)
    return dict(zip(names, counts)), record


# Same standardised score distribution in both groups, on scales 1000x apart.
SAME = {"fa": 1000 * np.linspace(1, 2, 8), "fb": np.linspace(1, 2, 64)}


def test_global_target_does_not_spend_the_budget_on_costly_units_first():
    """Scores that rank A and B alike: global allocation takes the same share of both, as uniform does.

    -35% of 2336 MACs is 818: A loses 3 of 8 (396 MACs), B 22 of 64 (440), 35.8% in all. Ranking on
    standardised score / unit cost (the old key) put every A unit 6.6x ahead of B's equal: A went to
    its cap (7 of 8, 39.6%) and B lost nothing.
    """
    counts, record = _allocate(SAME, target_flops=0.35, allocation="global")
    assert counts == {"fa": 3, "fb": 22}
    assert record.reached and 0.35 <= record.estimated_flops < 0.36
    uniform, _ = _allocate(SAME, target_flops=0.35, allocation="uniform")
    assert uniform == counts


def test_global_target_follows_the_scores_within_groups():
    """A with 4 near-dead units (0.01 of the others) loses those first, then the budget goes to B: 4 + 15."""
    counts, record = _allocate({"fa": 1000 * np.array([0.01] * 4 + [1.0] * 4), "fb": SAME["fb"]},
                               target_flops=0.35, allocation="global")
    assert counts == {"fa": 4, "fb": 15} and record.reached


def test_global_finishes_with_small_blocks_rather_than_overshoot():
    """-5% (117 MACs): the next block in order after B's first unit is A's first (132 MACs, -6.5% in all);
    six B units (120 MACs, -5.1%) remove less importance. The old key took one A unit (-5.7%)."""
    counts, record = _allocate(SAME, target_flops=0.05, allocation="global")
    assert counts == {"fa": 0, "fb": 6}
    assert record.reached and record.estimated_flops < 0.05 + 20 / 2336


def test_sensitivity_target_equal_sensitivities_is_global_and_shifts_with_them():
    equal, _ = _allocate(SAME, {"fa": 0.1, "fb": 0.1}, target_flops=0.35, allocation="sensitivity")
    assert equal == {"fa": 3, "fb": 22}  # the old key: {"fa": 7, "fb": 0}
    a_sensitive, record = _allocate(SAME, {"fa": 1.0, "fb": 0.1}, target_flops=0.35, allocation="sensitivity")
    b_sensitive, _ = _allocate(SAME, {"fa": 0.1, "fb": 1.0}, target_flops=0.35, allocation="sensitivity")
    assert a_sensitive["fa"] < 3 and a_sensitive["fb"] > 22 and record.reached
    assert b_sensitive == {"fa": 7, "fb": 0}  # A to its cap (0.9 x 8 -> 7): 39.6%, nothing of B needed


def test_global_target_on_a_transformer_keeps_heads(tmp_path):
    """Tiny BERT (2 layers of 4 heads x 16 dims, 128 MLP neurons, hidden 64): a head owns 4*64*16 MACs, a
    neuron 2*64 (32x). The old key took 3 + 2 of the 8 heads and no neuron (estimate -31.2%); now neurons
    carry the budget (1 head, 61 + 61 neurons: -30.08%)."""
    from graphprune import api
    from graphprune.models.transformer_zoo import export as export_transformer

    bert = export_transformer("bert", "legacy", cache_dir=tmp_path)
    result = api.optimize(bert, target_flops=0.3, allocation="global", round_to=1, check=False)
    heads = [len(s.removed) for s in result.groups if s.kind == "head"]
    neurons = [len(s.removed) for s in result.groups if s.kind == "channel" and s.size == 128]
    assert len(heads) == len(neurons) == 2
    assert max(heads) <= 1 and min(neurons) >= 32, (heads, neurons)
    assert result.allocation["target_reached"]
    assert 0.3 <= result.allocation["estimated_flops_reduction"] < 0.305


def _strided_dynamic(seed=0) -> onnx.ModelProto:
    """conv0 (full resolution) -> relu -> conv1 (stride 4: 1/16 of the pixels) -> relu -> conv2 -> pool ->
    linear head, with the input's height and width dynamic, so the model itself knows no conv's spatial
    extents."""
    rng = np.random.default_rng(seed)
    shapes = {"w0": (16, 3, 3, 3), "w1": (16, 16, 3, 3), "w2": (8, 16, 1, 1), "w3": (8, 4)}
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    # The head's MACs do not grow with the picture, the convs' do: shares depend on the input size.
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[4, 4]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "strided", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5])
def test_budget_counts_the_given_input_shapes_when_height_and_width_are_dynamic(tmp_path, target):
    """The estimate must count each conv at its own resolution (from --input-shapes), as the reported
    count does; counting one pixel per conv once made it miss by several points (PaddleOCR's classifier:
    -35.1% planned, -32.3% counted)."""
    from graphprune import api

    path = tmp_path / "m.onnx"
    onnx.save(_strided_dynamic(), path)
    shapes = {"x": (1, 3, 32, 32)}
    result = api.optimize(path, tmp_path / "out.onnx", target_flops=target, round_to=1, input_shapes=shapes,
                          check=False)
    achieved = 1 - result.after.macs / result.before.macs
    assert result.allocation["estimated_flops_reduction"] == pytest.approx(achieved, abs=1e-9)
    assert achieved >= target - 1e-9


def test_group_shares_of_a_dynamic_model_match_the_same_model_with_static_shapes():
    """Oracle: with --input-shapes given, the MACs shares reported per group equal those of the same
    model declared with those shapes (40 x 72: not what the defaults would bind)."""
    dynamic = _strided_dynamic()
    static = _strided_dynamic()
    dims = static.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, 40, 72)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    shares = []
    for proto, shapes in ((dynamic, {"x": (1, 3, 40, 72)}), (static, None)):
        pruning = PruneChannelsPass(PruneChannelsConfig(ratio=0.25, round_to=1, input_shapes=shapes))
        pruning(load(proto))
        shares.append([round(s.macs_share, 12) for s in pruning.summaries])
    assert shares[0] == shares[1] and any(s > 0 for s in shares[0])
