"""SparseMLP speed at decode (batch 1): dense MatMul model vs standard-ops form vs row-reading kernel.

One MLP, up D -> H and down H -> D (default 2048 x 8192), relu and SwiGLU, random weights. Both matmuls
are sparsified: a TEAL threshold on the input and on the hidden activation, each set to the quantile
of a pool of inputs that keeps the given share (``--select topk`` keeps exactly k instead). Every call
takes the next input of the pool, so the kept rows change from call to call as in real decoding.

Variants, timed interleaved (the order flips every round), medians:
- dense: plain MatMul/activation/MatMul graph in ONNX Runtime (CPU);
- std-ops: the SparseMLP function body (Gather the kept rows, then MatMul) in ONNX Runtime;
- kernel: kernels/sparse_mlp.c through ctypes, reading kept rows in place (not inside ONNX Runtime).

Usage: .venv/bin/python tools/bench_sparse_mlp.py [--d-model 2048] [--hidden 8192] [--keep 0.5,0.25,0.1]
       [--activations relu,swiglu] [--select threshold|topk] [--rounds 40] [--threads 1] [--markdown PATH]
(about 2 minutes at the defaults on 2 cores)
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from graphprune.bench import cpu_name
from graphprune.runtime_ops.sparse_mlp import MLPWeights, Selection, SparseMLPConfig, sparse_mlp_model
from graphprune.runtime_ops.sparse_mlp_kernel import SparseMLPKernel, available

OPSET = 17
POOL = 32


def mlp_weights(d_model: int, hidden: int, gated: bool, seed: int) -> MLPWeights[np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    return MLPWeights(w(d_model, hidden), w(hidden, d_model), w(d_model, hidden) if gated else None)


def dense_model(weights: MLPWeights[np.ndarray]) -> onnx.ModelProto:
    """The MLP as an exporter writes it: MatMul, activation (SiLU as Sigmoid*Mul), MatMul."""
    inits = [numpy_helper.from_array(a, n) for n, a in (("w_up", weights.w_up), ("w_down", weights.w_down))]
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["up"])]
    if weights.w_gate is not None:
        inits.append(numpy_helper.from_array(weights.w_gate, "w_gate"))
        nodes += [helper.make_node("MatMul", ["x", "w_gate"], ["gate"]),
                  helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["gate", "sig"], ["act"]),
                  helper.make_node("Mul", ["act", "up"], ["hidden"])]
    else:
        nodes.append(helper.make_node("Relu", ["up"], ["hidden"]))
    nodes.append(helper.make_node("MatMul", ["hidden", "w_down"], ["y"]))
    d_model = weights.w_up.shape[0]
    graph = helper.make_graph(nodes, "dense_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d_model])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d_model])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def hidden_of(x: np.ndarray, weights: MLPWeights[np.ndarray]) -> np.ndarray:
    up = x @ weights.w_up
    if weights.w_gate is None:
        return np.maximum(up, 0)
    gate = x @ weights.w_gate
    return gate / (1 + np.exp(-gate)) * up


def config_for(keep: float, pool: np.ndarray, weights: MLPWeights[np.ndarray], select: str) -> SparseMLPConfig:
    gated = weights.w_gate is not None
    activation = "silu" if gated else "relu"
    if select == "topk":
        return SparseMLPConfig(activation, gated, Selection(k=round(keep * pool.shape[1])),
                               Selection(k=round(keep * weights.w_up.shape[1])))
    # TEAL calibration: one threshold per tensor, the magnitude quantile that keeps `keep` on the pool.
    t_in = float(np.quantile(np.abs(pool), 1 - keep))
    t_hidden = float(np.quantile(np.abs(hidden_of(pool, weights)), 1 - keep))
    return SparseMLPConfig(activation, gated, Selection(threshold=t_in), Selection(threshold=t_hidden))


def session(model: onnx.ModelProto, threads: int) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})


def interleaved(runs: dict[str, Callable[[np.ndarray], object]], pool: np.ndarray, rounds: int,
                flush: np.ndarray | None, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Milliseconds per variant and round; every round runs each variant once on the round's input."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-3, rounds):  # three warm-up rounds
        x = pool[r % len(pool)][None, :]
        for name in names if r % 2 == 0 else reversed(names):
            if flush is not None:
                flush.sum()  # evict the caches: in decoding, every other layer's weights pass through them
            start = clock()
            runs[name](x)
            if r >= 0:
                samples[name].append((clock() - start) * 1e3)
    return samples


def machine() -> str:
    cpu = cpu_name(platform.processor())
    load = os.getloadavg()
    return (f"{cpu}, nproc {os.cpu_count()}, onnxruntime {ort.__version__}, numpy {np.__version__}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


@click.command()
@click.option("--d-model", default=2048, show_default=True)
@click.option("--hidden", default=8192, show_default=True)
@click.option("--keep", default="0.5,0.25,0.1", show_default=True, help="kept shares, comma-separated")
@click.option("--activations", default="relu,swiglu", show_default=True)
@click.option("--select", type=click.Choice(["threshold", "topk"]), default="threshold", show_default=True)
@click.option("--rounds", default=40, show_default=True)
@click.option("--threads", default=1, show_default=True, help="ORT intra-op threads and kernel threads")
@click.option("--flush-mb", default=1024, show_default=True,
              help="read this much memory before every timed call (cold caches); 0 keeps them warm")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default="cpu", show_default=True,
              help="cpu: the calling thread's CPU time (needs --threads 1), which time spent waiting for a core "
                   "on a shared machine does not inflate; wall: elapsed time")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="also write the table here")
def main(d_model: int, hidden: int, keep: str, activations: str, select: str, rounds: int, threads: int,
         flush_mb: int, clock: str, markdown: Path | None) -> None:
    console = Console()
    if clock == "cpu" and threads != 1:
        raise click.UsageError("--clock cpu measures one thread: use it with --threads 1, or use --clock wall.")
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    flush = np.ones(flush_mb << 18, dtype=np.float32) if flush_mb else None
    ok, reason = available()
    if not ok:
        console.print(f"[yellow]kernel column skipped: {reason}[/yellow]")
    shares = [float(k) for k in keep.split(",")]
    rows = []
    for seed, kind in enumerate(activations.split(",")):
        weights = mlp_weights(d_model, hidden, kind == "swiglu", seed)
        pool = np.random.default_rng(100 + seed).standard_normal((POOL, d_model)).astype(np.float32)
        runs: dict[str, Callable[[np.ndarray], object]] = {"dense": session(dense_model(weights), threads)}
        if ok:
            runs["kernel 100%"] = SparseMLPKernel(weights, SparseMLPConfig("silu" if kind == "swiglu" else "relu",
                                                                          kind == "swiglu"), threads)
        for share in shares:
            config = config_for(share, pool, weights, select)
            runs[f"std-ops {share:.0%}"] = session(sparse_mlp_model(weights, config, leading=(1,), opset=OPSET),
                                                   threads)
            if ok:
                runs[f"kernel {share:.0%}"] = SparseMLPKernel(weights, config, threads)
        console.print(f"timing {kind} ({len(runs)} variants x {rounds} rounds) ...")
        samples = interleaved(runs, pool, rounds, flush, timer)
        dense = samples["dense"]
        if ok:
            rows.append((kind, "100%", dense, None, samples["kernel 100%"], None))
        for share in shares:
            rows.append((kind, f"{share:.0%}", dense, samples[f"std-ops {share:.0%}"],
                         samples.get(f"kernel {share:.0%}"), samples.get("kernel 100%")))
        del runs
    caches = f"caches flushed ({flush_mb} MB read) before each call" if flush_mb else "warm caches"
    title = (f"SparseMLP {d_model}x{hidden}, batch 1, {select} on both matmuls, {threads} thread(s), {caches}; "
             f"median {clock}-clock ms (median speedup vs dense in the same round)")
    table = Table(title=title)
    columns = ("MLP", "kept", "dense ORT", "std-ops ORT", "kernel (ctypes)", "kernel vs kernel 100%")
    for column in columns:
        table.add_column(column, justify="right")
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|---|---|---|---|---|---|"]
    for kind, share, dense, std, kern, kern_all in rows:
        own = "-" if kern is None or kern_all is None else f"{_ratio(kern, kern_all):.2f}x"
        cells = [kind, share, f"{statistics.median(dense):.2f}", _cell(std, dense), _cell(kern, dense), own]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    info = machine()
    console.print(info)
    if markdown:
        markdown.write_text("\n".join([*lines, "", info, ""]))


def _ratio(ms: list[float], base: list[float]) -> float:
    """Median speedup over base, paired by round so that load drifting over the run cancels out."""
    return statistics.median(b / m for b, m in zip(base, ms, strict=True))


def _cell(ms: list[float] | None, dense: list[float]) -> str:
    return "-" if ms is None else f"{statistics.median(ms):.2f} ({_ratio(ms, dense):.2f}x)"


if __name__ == "__main__":
    main()
