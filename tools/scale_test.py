"""Scale test: a random-init Llama-style decoder of about 2.7 GB (weights as external data) analysed and
pruned by graphprune, with wall time and peak memory per step, next to onnxsim's structured pruner on the
same file. Results: docs/scale.md.

The generator writes one weight at a time straight to the data file (never all weights in memory). Each
step then runs as its own process, so its peak resident set is its own (os.wait4's ru_maxrss, which
counts memory-mapped weight pages that were read as well as allocated memory); a sampler reads the
process's /proc status meanwhile to tell allocated (anonymous) memory from mapped file pages.

Usage: .venv/bin/python tools/scale_test.py [--dir /tmp/scale] [--layers 12] [--markdown PATH] [--keep]
(6 to 13 minutes on 2 busy cores; --skip-onnxsim, --no-latency and --rounds 1 shorten it)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ALIGNMENT = 1 << 16  # weight offsets in the data file, as exporters that align for memory mapping write them


# ---------- the model ----------


@dataclass(frozen=True)
class DecoderSpec:
    """A Llama-style decoder: RMSNorm, multi-head attention with rotary embeddings, SwiGLU MLP, untied LM head."""

    layers: int = 12
    hidden: int = 2048
    heads: int = 16
    intermediate: int = 5632
    vocab: int = 16000
    seq: int = 32  # static sequence length of input_ids [1, seq]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every initializer of the weights, in file order (one layer's weights stay adjacent)."""
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"layers.{n}"
            shapes.update({f"{p}.attn_norm.weight": (h,), f"{p}.attn.q.weight": (h, h), f"{p}.attn.k.weight": (h, h),
                           f"{p}.attn.v.weight": (h, h), f"{p}.attn.o.weight": (h, h),
                           f"{p}.mlp_norm.weight": (h,), f"{p}.mlp.gate.weight": (h, i),
                           f"{p}.mlp.up.weight": (h, i), f"{p}.mlp.down.weight": (i, h)})
        shapes.update({"norm.weight": (h,), "lm_head.weight": (h, self.vocab)})
        return shapes

    def weight_bytes(self) -> int:
        return sum(4 * int(np.prod(s)) for s in self.weight_shapes().values())


class _Graph:
    """Nodes, small inline constants and external weights of the model being written."""

    def __init__(self, data: Path, rng: np.random.Generator) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.rng = data, rng
        self._file = open(data, "wb")  # noqa: SIM115 -- closed by close(), after the last weight
        self._count = 0

    def close(self) -> None:
        self._file.close()

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None) -> str:
        """A float32 weight written to the data file now (normal * scale, or ones if scale is None)."""
        array = (np.ones(shape, np.float32) if scale is None
                 else self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
        offset = -self._file.tell() % ALIGNMENT + self._file.tell()
        self._file.seek(offset)
        array.tofile(self._file)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name


def _rms_norm(g: _Graph, x: str, weight: str, p: str) -> str:
    squared = g.op("Mul", [x, x], f"{p}/sq")
    mean = g.op("ReduceMean", [squared], f"{p}/mean", axes=[-1], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean, "eps"], f"{p}/add_eps")], f"{p}/sqrt")
    normed = g.op("Div", [x, root], f"{p}/div")
    return g.op("Mul", [normed, weight], f"{p}/scale")


def _heads(g: _Graph, x: str, p: str) -> str:
    """[1, S, H*D] -> [1, H, S, D]."""
    split = g.op("Reshape", [x, "heads_shape"], f"{p}/split_heads")
    return g.op("Transpose", [split], f"{p}/to_heads", perm=[0, 2, 1, 3])


def _rotary(g: _Graph, x: str, p: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half = concat(-x2, x1) over the halves of head_dim."""
    first = g.op("Slice", [x, "zero", "half", "minus_one"], f"{p}/x1")
    second = g.op("Slice", [x, "half", "big", "minus_one"], f"{p}/x2")
    rotated = g.op("Concat", [g.op("Neg", [second], f"{p}/neg"), first], f"{p}/rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, "cos"], f"{p}/xcos"), g.op("Mul", [rotated, "sin"], f"{p}/xsin")],
                f"{p}/rope")


def _layer(g: _Graph, x: str, spec: DecoderSpec, n: int) -> str:
    p, h, i = f"layers.{n}", spec.hidden, spec.intermediate
    std = 0.02
    normed = _rms_norm(g, x, g.weight(f"{p}.attn_norm.weight", (h,), None), f"{p}/attn_norm")
    q = _rotary(g, _heads(g, g.op("MatMul", [normed, g.weight(f"{p}.attn.q.weight", (h, h), std)], f"{p}/q_proj"),
                          f"{p}/q"), f"{p}/q")
    k = _rotary(g, _heads(g, g.op("MatMul", [normed, g.weight(f"{p}.attn.k.weight", (h, h), std)], f"{p}/k_proj"),
                          f"{p}/k"), f"{p}/k")
    v = _heads(g, g.op("MatMul", [normed, g.weight(f"{p}.attn.v.weight", (h, h), std)], f"{p}/v_proj"), f"{p}/v")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], f"{p}/kT", perm=[0, 1, 3, 2])], f"{p}/scores")
    masked = g.op("Add", [g.op("Mul", [scores, "attn_scale"], f"{p}/scaled"), "causal_mask"], f"{p}/masked")
    probs = g.op("Softmax", [masked], f"{p}/softmax", axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, v], f"{p}/context")], f"{p}/merge", perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [context, "hidden_shape"], f"{p}/merge_heads")
    attn = g.op("MatMul", [merged, g.weight(f"{p}.attn.o.weight", (h, h), std)], f"{p}/o_proj")
    x = g.op("Add", [x, attn], f"{p}/attn_residual")
    normed = _rms_norm(g, x, g.weight(f"{p}.mlp_norm.weight", (h,), None), f"{p}/mlp_norm")
    gate = g.op("MatMul", [normed, g.weight(f"{p}.mlp.gate.weight", (h, i), std)], f"{p}/gate_proj")
    up = g.op("MatMul", [normed, g.weight(f"{p}.mlp.up.weight", (h, i), std)], f"{p}/up_proj")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
    down = g.op("MatMul", [g.op("Mul", [silu, up], f"{p}/gated"), g.weight(f"{p}.mlp.down.weight", (i, h), std)],
                f"{p}/down_proj")
    return g.op("Add", [x, down], f"{p}/mlp_residual")


def _shared_constants(g: _Graph, spec: DecoderSpec) -> None:
    s, d = spec.seq, spec.head_dim
    g.const("eps", np.array(1e-5, np.float32))
    g.const("heads_shape", np.array([1, s, spec.heads, d], np.int64))
    g.const("hidden_shape", np.array([1, s, spec.hidden], np.int64))
    g.const("attn_scale", np.array(d ** -0.5, np.float32))
    g.const("causal_mask", np.triu(np.full((s, s), -1e9, np.float32), k=1))
    inv_freq = 1.0 / 10000 ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(s), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    g.const("cos", np.cos(angles).astype(np.float32))
    g.const("sin", np.sin(angles).astype(np.float32))
    for name, value in (("zero", 0), ("half", d // 2), ("big", 1 << 62), ("minus_one", -1)):
        g.const(name, np.array([value], np.int64))


def write_decoder(path: Path, spec: DecoderSpec = DecoderSpec(), seed: int = 0) -> int:
    """Write ``path`` and ``<path>.data`` (weights, random normal with a fixed seed); returns the bytes of both."""
    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    g = _Graph(data, np.random.default_rng(seed))
    try:
        _shared_constants(g, spec)
        x = g.op("Gather", [g.weight("embed.weight", (spec.vocab, spec.hidden), 1.0), "input_ids"], "embed", axis=0)
        for n in range(spec.layers):
            x = _layer(g, x, spec, n)
        x = _rms_norm(g, x, g.weight("norm.weight", (spec.hidden,), None), "final_norm")
        g.op("MatMul", [x, g.weight("lm_head.weight", (spec.hidden, spec.vocab), 0.02)], "logits")
    finally:
        g.close()
    graph = helper.make_graph(
        g.nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, spec.seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, spec.seq, spec.vocab])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="scale_test")
    model.ir_version = 8
    onnx.save(model, path)
    return path.stat().st_size + data.stat().st_size


# ---------- measuring ----------


GB = 1e9


def _status_kib(pid: int | str) -> dict[str, int]:
    """VmRSS, RssAnon (allocated memory) and RssFile (mapped file pages) of a process, in KiB."""
    found = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(rest.split()[0])
    return found


class Sampler:
    """Polls a process's memory every ``period`` seconds; peaks overall and per named phase."""

    def __init__(self, pid: int | str = "self", period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.phase = ""
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        now = _status_kib(self.pid)
        for phase in ("", self.phase):
            peak = self.peaks.setdefault(phase, {})
            for key, value in now.items():
                peak[key] = max(peak.get(key, 0), value)

    def __enter__(self) -> Sampler:  # noqa: PYI034 -- not subclassed
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Step:
    name: str
    command: list[str]
    wall_s: float = 0.0
    max_rss: int = 0  # bytes, ru_maxrss of the process
    peak_anon: int = 0  # bytes, sampled
    peak_file: int = 0  # bytes, sampled
    output: Path | None = None  # the model it writes
    returncode: int = 0
    output_bytes: int = 0
    shares_input_data: bool = False  # the output reads some weights from the input's data file
    params: int | None = None  # of the output
    log: str = ""
    phases: list[dict] = field(default_factory=list)  # from the step's own --json


def run_step(step: Step, log: Path) -> Step:
    """Run one step as its own process: wall time, ru_maxrss (os.wait4) and sampled anonymous/file memory."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(step.command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "COLUMNS": "160"})
        with Sampler(proc.pid) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    step.wall_s = time.perf_counter() - start
    step.returncode = proc.returncode
    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    step.max_rss = usage.ru_maxrss * kib
    peak = sampler.peaks.get("", {})
    step.peak_anon, step.peak_file = peak.get("RssAnon", 0) * 1024, peak.get("RssFile", 0) * 1024
    step.log = log.read_text(errors="replace")
    return step


def model_bytes(path: Path, skip: Path | None = None) -> tuple[int, bool]:
    """The .onnx file plus every data file it names except ``skip`` (another model's data), and whether
    it names ``skip``."""
    structure = onnx.load(path, load_external_data=False)
    files = {path.parent / e.value for t in structure.graph.initializer for e in t.external_data
             if e.key == "location"}
    shared = skip is not None and any(f.resolve() == skip.resolve() for f in files)
    own = [f for f in files if not shared or f.resolve() != skip.resolve()]
    return path.stat().st_size + sum(f.stat().st_size for f in own if f.exists()), shared


# ---------- steps run as their own processes ----------


@click.group()
def main() -> None:
    """Scale test of graphprune on a large decoder (see the module docstring)."""


SIZES = ("layers", "hidden", "heads", "intermediate", "vocab")


def size_options(command):
    """--layers, --hidden, --heads, --intermediate, --vocab: the decoder's sizes."""
    for name in reversed(SIZES):
        command = click.option(f"--{name}", type=int, default=getattr(DecoderSpec, name), show_default=True)(command)
    return command


def size_arguments(spec: DecoderSpec) -> list[str]:
    return [part for name in SIZES for part in (f"--{name}", str(getattr(spec, name)))]


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@size_options
@click.option("--seed", type=int, default=0, show_default=True)
def generate(path: Path, seed: int, **sizes: int) -> None:
    """Write the random-init decoder to PATH and PATH.data."""
    size = write_decoder(path, DecoderSpec(**sizes), seed)
    click.echo(f"wrote {path} and {path.name}.data: {size / GB:.3f} GB")


@main.command("onnxsim-prune")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--ratio", type=float, default=0.3, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the phases here.")
def onnxsim_prune(model: Path, output: Path, ratio: float, json_path: Path | None) -> None:
    """onnxsim's structured pruner (L2, the same share of MLP channels) on MODEL, saved with external data.

    Its Python entry point: the C++ port (apply_structured_pruning_cpp) returns this model unchanged, by
    path (it does not read external data) and as a loaded proto alike.
    """
    model, output = model.resolve(), output.resolve()
    with Sampler() as sampler:
        phase = Phases(sampler)
        with phase("import onnxsim"):
            import onnxsim
        # It reads external data relative to the working folder, not to the model's.
        os.chdir(model.parent)
        with phase(f"apply_structured_pruning (onnxsim {onnxsim.__version__})"):
            pruned = onnxsim.apply_structured_pruning(model.name, sparsity=ratio, importance_norm="l2")
        with phase("onnx.save_model with external data"):
            onnx.save_model(pruned, str(output), save_as_external_data=True, location=f"{output.name}.data")
    phase.report(json_path)


class Phases:
    """Wall time and memory peaks of named phases in this process (``with phases(name): ...``)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.rows = sampler, []

    @contextlib.contextmanager
    def __call__(self, text: str) -> Iterator[None]:
        self.sampler.phase, start = text, time.perf_counter()
        try:
            yield
        finally:
            self.sampler.sample()
            peak = self.sampler.peaks.get(text, {})
            self.rows.append({"phase": text, "wall_s": time.perf_counter() - start,
                              "peak_rss": peak.get("VmRSS", 0) * 1024, "peak_anon": peak.get("RssAnon", 0) * 1024,
                              "peak_file": peak.get("RssFile", 0) * 1024})
            self.sampler.phase = "(between phases)"

    def report(self, json_path: Path | None) -> None:
        for row in self.rows:
            click.echo(f"{row['phase']:<50} {row['wall_s']:8.1f} s  RSS {row['peak_rss'] / GB:6.2f} GB  "
                       f"anon {row['peak_anon'] / GB:6.2f} GB  file {row['peak_file'] / GB:6.2f} GB")
        if json_path is not None:
            json_path.write_text(json.dumps(self.rows, indent=2))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--ratio", type=float, default=0.3, show_default=True)
@click.option("--units", default="head,channel", show_default=True, help="Unit kinds, as for optimize.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the phases here.")
def phases(model: Path, output: Path, ratio: float, units: str, json_path: Path | None) -> None:
    """graphprune's optimize (API, as the CLI calls it without latency) with memory peaks per phase."""
    from graphprune import api

    with Sampler() as sampler:
        phase = Phases(sampler)
        api.optimize(model, output, ratio=ratio, units=tuple(units.split(",")), progress=phase)
    phase.report(json_path)


# ---------- the whole test ----------


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    disk = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", "/tmp"], capture_output=True,
                          text=True, check=False).stdout.strip().splitlines()
    versions = {}
    for package in ("onnx", "onnxruntime", "onnx_ir", "onnxscript", "onnxsim", "numpy"):
        with contextlib.suppress(ImportError):
            versions[package] = getattr(__import__(package), "__version__", "?")
    return {"cpus": str(os.cpu_count()), "cpu": first("/proc/cpuinfo", "model name"),
            "ram": first("/proc/meminfo", "MemTotal"), "disk": disk[-1] if disk else "?",
            "load": " ".join(os.getloadavg().__repr__().strip("()").split(", ")),
            "python": platform.python_version(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}


def _params(path: Path) -> int | None:
    from graphprune.metrics import count_params

    return count_params(path) if path.exists() else None


def table(steps: list[Step], size: int, dense_params: int) -> str:
    rows = [("| step | wall time | peak RSS | peak RSS / model size | peak allocated (anon) | output size "
             "| params removed | exit |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for step in steps:
        removed = f"{1 - step.params / dense_params:.1%}" if step.params else "–"
        out = f"{step.output_bytes / GB:.2f} GB" if step.output_bytes else "–"
        out += " + the input's data file" if step.shares_input_data else ""
        rows.append(f"| {step.name} | {step.wall_s:.1f} s | {step.max_rss / GB:.2f} GB | {step.max_rss / size:.2f} "
                    f"| {step.peak_anon / GB:.2f} GB | {out} | {removed} | {step.returncode} |")
    return "\n".join(rows)


def phase_table(steps: list[Step], size: int) -> str:
    lines = ["| step | phase | wall time | peak RSS | / model size | peak anon | peak mapped file |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for step in steps:
        for row in step.phases:
            lines.append(f"| {step.name} | {row['phase']} | {row['wall_s']:.1f} s | {row['peak_rss'] / GB:.2f} GB | "
                         f"{row['peak_rss'] / size:.2f} | {row['peak_anon'] / GB:.2f} GB | "
                         f"{row['peak_file'] / GB:.2f} GB |")
    return "\n".join(lines)


@main.command()
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=Path("/tmp/scale"), show_default=True,
              help="Where the model and outputs go (needs about 3x the model size free).")
@size_options
@click.option("--ratio", type=float, default=0.3, show_default=True)
@click.option("--onnxsim/--skip-onnxsim", "with_onnxsim", default=True, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True,
              help="Runs of the graphprune / onnxsim comparison, alternating which goes first.")
@click.option("--latency/--no-latency", "with_latency", default=True, show_default=True,
              help="Also run optimize with its default latency timing (both models loaded at once).")
@click.option("--markdown", type=click.Path(path_type=Path), help="Write the tables here.")
@click.option("--keep", is_flag=True, help="Keep the model and outputs in --dir.")
def run(folder: Path, ratio: float, with_onnxsim: bool, rounds: int, with_latency: bool, markdown: Path | None,
        keep: bool, **sizes: int) -> None:
    """Generate the decoder, then analyse, prune and compare, one process per step."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "decoder.onnx"
    tool = [sys.executable, os.path.abspath(__file__)]
    script = Path(sys.executable).with_name("graphprune")  # the command users run, beside this interpreter
    cli = [str(script)] if script.exists() else [sys.executable, "-c", "from graphprune.cli import main; main()"]
    spec = DecoderSpec(**sizes)
    out = {name: folder / f"{name}.onnx" for name in ("pruned", "pruned_latency", "mlp", "onnxsim")}
    steps = [Step("generate (tools/scale_test.py generate)", [*tool, "generate", str(model), *size_arguments(spec)],
                  output=model),
             Step("graphprune analyze", [*cli, "analyze", str(model)]),
             Step(f"graphprune optimize --ratio {ratio} --no-latency",
                  [*cli, "optimize", str(model), "-o", str(out["pruned"]), "--ratio", str(ratio), "--no-latency",
                   "--report", str(folder / "report.json")], output=out["pruned"])]
    if with_latency:
        steps.append(Step(f"graphprune optimize --ratio {ratio} (default: with latency)",
                          [*cli, "optimize", str(model), "-o", str(out["pruned_latency"]), "--ratio", str(ratio)],
                          output=out["pruned_latency"]))
    # The comparison on MLP channels (all onnxsim's pruner finds here), alternating which goes first.
    pair = [Step(f"graphprune optimize --ratio {ratio} --units channel (API, per phase)",
                 [*tool, "phases", str(model), str(out["mlp"]), "--ratio", str(ratio), "--units", "channel"],
                 output=out["mlp"])]
    if with_onnxsim:
        pair.append(Step(f"onnxsim apply_structured_pruning(sparsity={ratio}, l2) + save",
                         [*tool, "onnxsim-prune", str(model), str(out["onnxsim"]), "--ratio", str(ratio)],
                         output=out["onnxsim"]))
    for round_index in range(rounds):
        for step in pair[::-1] if round_index % 2 else pair:
            steps.append(Step(f"{step.name}, round {round_index + 1}", [*step.command], output=step.output))
    for index, step in enumerate(steps):
        if step.command[2:3] in (["phases"], ["onnxsim-prune"]):
            step.command += ["--json", str(folder / f"step{index}.json")]
        if step.output is not None and step.output != model:  # an earlier round's (onnx.save will not overwrite)
            for file in (step.output, step.output.with_name(f"{step.output.name}.data")):
                file.unlink(missing_ok=True)
        click.echo(f"== {step.name}: {' '.join(step.command)}", err=True)
        run_step(step, folder / f"step{index}.log")
        if step.output is not None and step.output.exists() and step.returncode == 0:
            skip = None if step.output == model else model.with_name(f"{model.name}.data")
            step.output_bytes, step.shares_input_data = model_bytes(step.output, skip)
            step.params = _params(step.output)
        phases_json = folder / f"step{index}.json"
        step.phases = json.loads(phases_json.read_text()) if phases_json.exists() else []
        tail = "\n".join(step.log.strip().splitlines()[-6:])
        click.echo(f"   {step.wall_s:.1f} s, peak RSS {step.max_rss / GB:.2f} GB, exit {step.returncode}\n{tail}",
                   err=True)
    size, dense_params = steps[0].output_bytes, steps[0].params or 1
    report_json = folder / "report.json"
    report = json.loads(report_json.read_text()) if report_json.exists() else {}
    info = machine()
    lines = [(f"Model: {spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads, MLP {spec.intermediate}, "
              f"vocab {spec.vocab}, seq {spec.seq}; {dense_params:,} params; {size / GB:.3f} GB on disk "
              f"({size / 2**30:.2f} GiB)."), "",
             (f"Machine: {info['cpus']} CPUs ({info['cpu']}), RAM {info['ram']}, disk {info['disk']}, "
              f"load {info['load']} at the end; Python {info['python']}, {info['versions']}."), "",
             table(steps, size, dense_params), ""]
    if any(step.phases for step in steps):
        lines += ["Phases, in the step's own process (memory sampled every 50 ms):", "",
                  phase_table(steps, size), ""]
    if report.get("fidelity"):
        fid = report["fidelity"]
        lines.append(f"graphprune's verification: {fid['samples']} random inputs, min cosine {fid['min_cosine']:.4f}, "
                     f"worst relative L2 {fid['worst_relative_l2']:.3f}.")
    text = "\n".join(lines)
    click.echo(text)
    if markdown is not None:
        markdown.write_text(text + "\n")
    if not keep:
        for path in [model, *out.values()]:
            for file in (path, path.with_name(f"{path.name}.data")):
                file.unlink(missing_ok=True)

if __name__ == "__main__":
    main()
