"""Latency-aware planning (--target-speedup): table, greedy order, whole-model checks, errors.

Timing is faked (a deterministic cost model of the ONNX graph), so no test depends on timing noise;
one real-clock test checks only that a several-fold difference in work shows.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_equivalent, edit_slices, load

from graphprune import api, latency_plan
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.latency_plan import (
    GroupWidths,
    SpeedupPass,
    SpeedupTarget,
    candidate_widths,
    greedy_order,
    next_step,
)
from graphprune.passes.prune_channels import PruneChannelsConfig

SIDE = 8  # spatial side of every feature map of the test model


def _cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> conv 3->64 -> 2 x (conv 64->64) -> conv1x1 64->16 (each + relu) -> GAP -> Gemm 16->10.

    Filters get distinct scales so L2 ranks units unambiguously.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, cin, cout, k):
        w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        w *= rng.uniform(0.2, 2.0, size=(cout, 1, 1, 1)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"),
                      numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    h = conv("conv_a", "x", 3, 64, 3)
    h = conv("conv_b", h, 64, 64, 3)
    h = conv("conv_c", h, 64, 64, 3)
    h = conv("conv_d", h, 64, 16, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.extend([numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc.w"),
                  numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fake_ms(model) -> float:
    """A CPU-like cost model read off the graph: output channels padded to 16 (NCHWc blocks), a fixed
    cost per run. Savings do not add up: a conv between two pruned groups loses C_out x C_in."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    work = 0.0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            cout, cin, kh, kw = shapes[node.input[1]]
            work += math.ceil(cout / 16) * 16 * cin * kh * kw * SIDE * SIDE
        elif node.op_type == "Gemm":
            work += float(np.prod(shapes[node.input[1]]))
    return 0.05 + work / 1e6


def fake_timer():
    def timer(models, feeds, rounds):
        return [[fake_ms(m)] * rounds for m in models]

    return timer


def _run_pass(proto, speedup, **config):
    model = load(proto)
    target = SpeedupTarget(speedup, timer=fake_timer(), input_shapes={"x": (2, 3, 8, 8)})
    pruning = SpeedupPass(PruneChannelsConfig(**config), target)
    pruning(model)
    return model, pruning


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return ir.to_proto(load(_cnn()))  # prepared, so that plans and the oracle see the same graph


def test_candidate_widths_follow_the_provider_multiple():
    assert candidate_widths(64, 16, 4) == [48, 32, 16]
    assert candidate_widths(128, 16, 4) == [112, 96, 80, 64, 48, 32]
    assert candidate_widths(16, 16, 4) == [12, 8, 4]  # no larger than the multiple: the fine grid
    assert candidate_widths(4, 16, 4) == []
    assert candidate_widths(64, 16, 4, min_kept=30) == [48, 32]  # --max-ratio caps
    assert latency_plan.provider_multiples("cpu") == (16, 4)


def _assert_stopped_at_target(search, speedup, margin=0.02, tolerance=0.05):
    """Reached with the margin; every shorter plan checked fell short of it; and the plan is one step
    past one that did, or within the tolerance above the margin."""
    goal = speedup * (1 + margin)
    assert search.reached and search.measured >= goal
    by_steps = {c["steps"]: c["measured_speedup"] for c in search.checks}
    assert by_steps[search.steps] == search.measured
    assert all(m < goal for k, m in by_steps.items() if k < search.steps)
    assert by_steps.get(search.steps - 1, 0.0) < goal
    assert search.steps - 1 in by_steps or search.measured <= goal * (1 + tolerance)


@pytest.mark.parametrize("speedup", [1.3, 1.8, 2.5])
def test_stops_when_measured_speedup_reaches_target(cnn, speedup):
    model, pruning = _run_pass(cnn, speedup)
    _assert_stopped_at_target(pruning.search, speedup)
    # The speedup recorded is that of the model the pass wrote, by the same (fake) clock.
    assert pruning.search.measured == pytest.approx(fake_ms(cnn) / fake_ms(ir.to_proto(model)))
    assert any(len(d.kept) > d.group.size // 4 for d in pruning.plan.decisions if d.criterion)


def _scaled_table_timer(scale):
    """The fake clock, except that table chunks (dense first, then variants) see ``scale`` x each saving."""
    def timer(models, feeds, rounds):
        ms = [fake_ms(m) for m in models]
        if len(models) > 2:
            ms = [ms[0], *[ms[0] - scale * (ms[0] - v) for v in ms[1:]]]
        return [[v] * rounds for v in ms]

    return timer


def _run_with(proto, speedup, timer, **target):
    model = load(proto)
    pruning = SpeedupPass(PruneChannelsConfig(), SpeedupTarget(speedup, timer=timer, input_shapes={"x": (2, 3, 8, 8)},
                                                               **target))
    pruning(model)
    pruning.search.model = ir.to_proto(model)
    return pruning.search


def test_overshoot_is_bisected_back(cnn):
    # A table that sees only half of each saving: the first check removes far more than 1.5x needs.
    search = _run_with(cnn, 1.5, _scaled_table_timer(0.5))
    first = search.checks[0]
    assert first["measured_speedup"] > 1.5 * 1.05 and len(search.checks) >= 2
    _assert_stopped_at_target(search, 1.5)
    assert search.steps < first["steps"]


def test_shortfall_is_corrected_by_the_measured_ratio(cnn):
    # A table that promises three times each saving: the first check falls far short, and the next
    # skips ahead by measured / predicted instead of one step at a time.
    search = _run_with(cnn, 2.0, _scaled_table_timer(3.0), max_checks=4)
    checks = search.checks
    assert checks[0]["measured_speedup"] < 2.0
    assert checks[1]["steps"] > checks[0]["steps"] + 1
    _assert_stopped_at_target(search, 2.0)


def test_a_lucky_check_is_not_trusted(cnn):
    # Every pruned plan measures 30% faster than it is the first time it is timed (a quiet moment on a
    # shared machine); the confirming check sees its real speed, and the search goes on from there.
    seen = set()

    def timer(models, feeds, rounds):
        ms = [fake_ms(m) for m in models]
        if len(models) == 2:
            key = onnx.load(models[1]).SerializeToString() if not isinstance(models[1], onnx.ModelProto) else b""
            if key not in seen:
                seen.add(key)
                ms[1] *= 0.7
        return [[v] * rounds for v in ms]

    search = _run_with(cnn, 1.8, timer)
    assert any(c["confirmation"] for c in search.checks)
    assert search.reached and search.measured >= 1.8 * 1.02
    written = [c for c in search.checks if c["steps"] == search.steps]
    assert len(written) == 2 and written[1]["confirmation"]
    assert search.measured == pytest.approx(fake_ms(cnn) / fake_ms(search.model))  # the real one


def test_table_is_measured_against_dense(cnn):
    _, pruning = _run_pass(cnn, 1.3)
    table = {row["group"]: row for row in pruning.search.table}
    dense = fake_ms(cnn)
    for d in pruning.plan.decisions:
        if d.criterion:
            row = table[d.group.id]
            assert [w["kept"] for w in row["widths"]] == candidate_widths(d.group.size, 16, 4)
            for w in row["widths"]:
                assert w["saved_ms"] == pytest.approx(dense - w["ms"])
    # The 16-channel conv_c group keeps 12/8/4 and gains nothing: conv_c pads its outputs to 16.
    small = [row for row in table.values() if row["size"] == 16]
    assert small and all(abs(w["saved_ms"]) < 1e-3 for w in small[0]["widths"])


def test_non_additive_savings_take_more_checks(cnn):
    # Two groups that both shrink conv_c save less together than apart (its work is C_out x C_in), so
    # the table's prediction overshoots what the first check measures; the search goes on to reach 2.5x.
    _, pruning = _run_pass(cnn, 2.5)
    checks = pruning.search.checks
    assert checks[0]["predicted_speedup"] > checks[0]["measured_speedup"] + 0.2
    assert len(checks) >= 2
    _assert_stopped_at_target(pruning.search, 2.5)


def test_unreachable_target_keeps_best_and_says_so(cnn):
    _, pruning = _run_pass(cnn, 50.0)
    search = pruning.search
    assert not search.reached
    assert "nothing left to remove" in search.stop
    assert search.measured == max(c["measured_speedup"] for c in search.checks)
    for d in pruning.plan.decisions:  # everything the caps and the grid allow is measured at the end
        if d.criterion and d.group.size > 16:
            assert len(d.kept) >= 0.1 * d.group.size


def test_max_ratio_caps_the_widths(cnn):
    _, pruning = _run_pass(cnn, 50.0, max_group_ratio=0.5)
    for d in pruning.plan.decisions:
        assert len(d.removed) <= 0.5 * d.group.size


def _groups(tables):
    """GroupWidths from (widths, saved_ms, importance) triples, with stand-in decisions."""
    return [GroupWidths(SimpleNamespace(group=SimpleNamespace(id=n, size=w[0])), np.arange(w[0]), list(w), list(s),
                        list(i)) for n, (w, s, i) in enumerate(tables)]


def _brute_force_key(groups):
    keys = [(g.importance[j] - g.importance[g.at]) / (g.saved_ms[j] - g.saved_ms[g.at])
            for g in groups for j in range(g.at + 1, len(g.widths)) if g.saved_ms[j] - g.saved_ms[g.at] > 1e-9]
    return min(keys) if keys else None


def test_greedy_order_follows_importance_per_ms():
    rng = np.random.default_rng(3)
    for _ in range(20):
        tables = []
        for _ in range(5):
            n = int(rng.integers(2, 6))
            tables.append(([64 - 8 * k for k in range(n)], [0.0, *rng.uniform(-0.2, 1.0, n - 1)],
                           [0.0, *np.cumsum(rng.uniform(0.0, 1.0, n - 1))]))
        groups = _groups(tables)
        while (step := next_step(groups)) is not None:
            i, j, key = step
            assert key == pytest.approx(_brute_force_key(groups))
            assert groups[i].saved_ms[j] > groups[i].saved_ms[groups[i].at]  # never a step that saves nothing
            groups[i].at = j
        assert _brute_force_key(groups) is None


def test_greedy_prefers_time_per_importance_and_jumps_over_useless_widths():
    cheap = ([64, 56, 48], [0.0, 0.0, 2.0], [0.0, 1.0, 2.0])  # 56 saves nothing (padding): jump to 48
    costly = ([64, 48], [0.0, 1.0], [0.0, 2.0])  # same importance, half the time
    groups = _groups([costly, cheap])
    assert next_step(groups) == (1, 2, pytest.approx(1.0))


def test_order_puts_steps_the_table_gives_nothing_for_last():
    a = ([64, 48, 32], [0.0, 1.0, 0.5], [0.0, 0.5, 1.0])  # 48 -> 32 is slower by the table
    b = ([64, 48], [0.0, 0.5], [0.0, 1.0])
    groups = _groups([a, b])
    order = greedy_order(groups)
    assert [(i, j) for i, j, _ in order] == [(0, 1), (1, 1), (0, 2)]
    assert [key for _, _, key in order] == [pytest.approx(0.5), pytest.approx(2.0), math.inf]
    assert [g.at for g in groups] == [0, 0]  # left as found
    # A jump (56 saves nothing, 48 much) is spelt out one width at a time, with the jump's key.
    jump = _groups([([64, 56, 48], [0.0, 0.0, 2.0], [0.0, 1.0, 2.0])])
    assert greedy_order(jump) == [(0, 1, pytest.approx(1.0)), (0, 2, pytest.approx(1.0))]


def test_pruned_model_equals_masking(cnn):
    model, pruning = _run_pass(cnn, 1.5)
    pruned = ir.to_proto(model)
    assert pruning.plan.units_removed
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert_equivalent(edit_slices(cnn, pruning.plan.removed, roles=("in",)), pruned, feeds)


def test_weakest_units_go_first(cnn):
    # Plant 48 dead units in each 64-unit group: whatever width the timing picks (48, 32 or 16 kept), the
    # units removed must all be planted ones.
    rng = np.random.default_rng(2)
    _, probe = _run_pass(cnn, 1.01)
    chosen = {d.group.root: np.sort(rng.choice(64, size=48, replace=False))
              for d in probe.plan.decisions if d.criterion and d.group.size == 64}
    planted = ir.to_proto(load(edit_slices(cnn, chosen, roles=("in", "out", "param"))))
    _, pruning = _run_pass(planted, 1.5)
    removed = pruning.plan.removed
    assert any(root in removed for root in chosen)
    for root, units in removed.items():
        if root in chosen:
            assert set(units.tolist()) <= set(chosen[root].tolist())


@pytest.fixture()
def faked(monkeypatch):
    monkeypatch.setattr(latency_plan, "ort_timer", lambda providers=None, threads=None, clock="wall": fake_timer())


def test_api_reports_requested_measured_table_and_iterations(tmp_path, faked):
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), src)
    result = api.optimize(src, tmp_path / "out.onnx", target_speedup=1.5, input_shapes={"x": (2, 3, 8, 8)})
    record = json.loads(json.dumps(result.to_dict()))["settings"]["latency_plan"]
    assert record["target_speedup"] == 1.5 and record["target_reached"]
    assert record["measured_speedup"] >= 1.5
    assert record["measured_speedup"] == pytest.approx(fake_ms(src) / fake_ms(tmp_path / "out.onnx"))
    assert record["table"] and record["iterations"] and record["provider"] == "cpu"
    assert result.verification is not None  # the written model was verified against the original


def test_cli_prints_requested_and_measured(tmp_path, faked):
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), src)
    report = tmp_path / "report.json"
    run = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--target-speedup",
                                    "1.5", "--input-shape", "x:2x3x8x8", "--report", str(report),
                                    "--no-latency"])
    assert run.exit_code == 0, run.output
    assert "1.50x requested" in run.output and "measured on cpu" in run.output
    assert json.loads(report.read_text())["settings"]["latency_plan"]["target_reached"]


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "0.3"], "--target-speedup and --ratio"),
    (["--target-flops", "0.3"], "--target-speedup and --target-flops"),
    (["--target-params", "0.3"], "--target-speedup and --target-params"),
    (["--allocation", "global"], "leave out --allocation"),
    (["--provider", "nonsense"], "unknown provider 'nonsense'"),
    (["--calib", "photos", "--reconstruct"], "does not combine with --reconstruct"),
    (["--threads", "0"], "--threads must be 1 or more"),
])
def test_cli_exclusive_options_one_line(tmp_path, extra, message):
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), src)
    run = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "out.onnx"),
                                    "--target-speedup", "1.5", *extra])
    assert run.exit_code == 2, run.output
    assert message in run.output and "Traceback" not in run.output
    assert not (tmp_path / "out.onnx").exists()


def test_target_below_one_and_missing_provider(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), src)
    with pytest.raises(GraphpruneError, match="more than 1"):
        api.optimize(src, target_speedup=1.0)
    with pytest.raises(GraphpruneError, match="--target-speedup and --target-flops"):
        api.optimize(src, target_speedup=1.5, target_flops=0.2)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(GraphpruneError, match="provider 'cuda'.*not available"):
            api.optimize(src, target_speedup=1.5, provider="cuda")


def test_no_width_below_the_grid_is_reported(faked, tmp_path):
    # Every group of a 4-channel model is no larger than CPU's finest multiple: nothing to measure.
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1] * 4), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "tiny.onnx"
    onnx.save(model, src)
    result = api.optimize(src, tmp_path / "out.onnx", target_speedup=1.5)
    record = result.settings["latency_plan"]
    assert not record["target_reached"] and "no group has a kept width" in record["stop"]
    assert result.plan.units_removed == 0



def test_thread_cpu_clock_times_real_sessions(cnn):
    # ONNX Runtime with one intra-op thread runs on the caller's thread, so that thread's CPU time sees
    # the work: the dense model costs clearly more than the same model pruned as far as the caps allow.
    timer = latency_plan.ort_timer(["CPUExecutionProvider"], threads=1, clock="thread-cpu")
    feeds = {"x": np.zeros((8, 3, 8, 8), np.float32)}
    pruned, _ = _run_pass(cnn, 50.0)
    times = timer([cnn, ir.to_proto(pruned)], [feeds, feeds], 20)
    assert [len(t) for t in times] == [20, 20] and min(min(t) for t in times) > 0
    assert np.median(times[0]) > 1.5 * np.median(times[1])
    with pytest.raises(GraphpruneError, match="unknown clock"):
        latency_plan.ort_timer(clock="sundial")
