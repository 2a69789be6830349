"""graphprune bench: per-provider latency/throughput, interleaved runs, batch/seq filling, one-line errors."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune.bench import bench, bench_shapes
from graphprune.cli import main


def _chain(path: Path, width: int, depth: int = 2) -> Path:
    """x[batch, seq, 8] -> MatMul chain -> y[batch, seq, 8]."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, dims = [], [], "x", [8] + [width] * (depth - 1) + [8]
    for i in range(depth):
        w = numpy_helper.from_array(rng.standard_normal((dims[i], dims[i + 1])).astype(np.float32), f"w{i}")
        inits.append(w)
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bench")
    return _chain(folder / "a.onnx", 32), _chain(folder / "b.onnx", 16)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bench_one_model_positive_medians(models):
    result = bench([models[0]], rounds=5, warmup=1)
    (entry,) = result["providers"]
    assert entry["provider"] == "cpu"
    (row,) = entry["models"]
    assert row["median_ms"] > 0 and row["min_ms"] > 0 and row["rounds"] == 5
    assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert row["throughput"] == pytest.approx(1 / (row["median_ms"] / 1000))
    assert entry["speedup"] == []
    json.dumps(result)  # plain data


def test_batch_and_seq_fill_symbolic_dims(models):
    result = bench([models[0]], batch=4, seq=7, rounds=2, warmup=0)
    assert result["inputs"][str(models[0])] == {"x": [4, 7, 8]}
    assert result["batch"] == 4
    row = result["providers"][0]["models"][0]
    assert row["items"] == 4
    assert row["throughput"] == pytest.approx(4 / (row["median_ms"] / 1000))


def test_input_shape_override_wins(models):
    assert bench_shapes(models[0], batch=4, seq=7, overrides={"x": (2, 3, 8)}) == {"x": (2, 3, 8)}
    assert bench_shapes(models[0]) == {"x": (1, 16, 8)}  # default rules: batch 1, 'seq' 16


def test_two_models_interleave(models):
    result = bench(list(models), rounds=6, warmup=1)
    entry = result["providers"][0]
    assert [row["rounds"] for row in entry["models"]] == [6, 6]
    order = entry["order"]
    assert len(order) == 12 and order.count(0) == 6 and order.count(1) == 6
    # Each round runs both models once (starting model rotates): never two runs of one model apart from a round.
    for r in range(6):
        assert sorted(order[2 * r: 2 * r + 2]) == [0, 1]
    assert order[:2] == [0, 1] and order[2:4] == [1, 0]
    (speedup,) = entry["speedup"]
    assert speedup == pytest.approx(entry["models"][0]["median_ms"] / entry["models"][1]["median_ms"])


def test_cli_table_and_ratio(models):
    result = invoke("bench", *models, "--rounds", "3", "--warmup", "0", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "median ms" in result.stdout and "items/s" in result.stdout and "speedup" in result.stdout
    assert "x=2x16x8" in result.stdout


def test_cli_json_parses(models):
    result = invoke("bench", models[0], "--rounds", "3", "--batch", "3", "--seq", "5", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"][str(models[0])] == {"x": [3, 5, 8]}
    assert data["threads"] == 1
    assert data["providers"][0]["models"][0]["median_ms"] > 0


def test_cli_unknown_provider_one_line(models):
    result = invoke("bench", models[0], "--providers", "cpu,warp9")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "warp9" in lines[0] and "cuda" in lines[0]


def test_cli_unavailable_provider_one_line(models):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = invoke("bench", models[0], "--providers", "cuda")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "cuda" in lines[0] and "CUDAExecutionProvider" in lines[0] and "graphprune[gpu]" in lines[0]


def test_cli_bad_counts(models):
    result = invoke("bench", models[0], "--rounds", "0")
    assert result.exit_code == 2 and "--rounds" in result.output
    result = invoke("bench", models[0], "--input-shape", "nope:1x2")
    assert result.exit_code == 2 and "nope" in result.output
