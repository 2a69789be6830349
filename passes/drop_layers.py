"""drop-layers: remove whole residual sub-blocks, FinerCut-style.

Candidates are the residual blocks ``y = x + f(x)`` of graphprune.blocks (transformer attention and MLP
sublayers, CNN blocks with identity shortcuts). Greedy, re-scored after every removal (FinerCut): each
round, every remaining block is bypassed in turn on top of the blocks already gone, and the one whose
bypass changes the model's outputs least, measured against the *dense* outputs, goes. Rounds stop when
``drop`` blocks are gone or the removed MACs reach ``target_flops`` of the dense MACs.

The change is the relative L2 distance of all float outputs over the scoring batches,
``sqrt(sum ||y - y_dense||^2 / sum ||y_dense||^2)``.

Cost: one ONNX Runtime session for all scoring. Each block's branch output ``b`` is multiplied by a
scalar gate input (``Add(x, b)`` becomes ``Add(x, Mul(b, g_i))``): gate 1 keeps the block, 0 bypasses
it, so a candidate is one run per batch with its gate at 0, never a new model.

Without calibration data, blocks are scored on random inputs (graphprune.inputs.random_feeds: standard
normal floats, random token ids below 100, all-ones masks); the report says so.

Rewrite: the Add's output is replaced by x everywhere (an Identity of x where it is a graph output), then
dead nodes and initializers are removed (rewrite.cleanup): the whole branch goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.blocks import ResidualBlock, find_residual_blocks, node_macs
from graphprune.calibration import _fixed_batch, _split
from graphprune.errors import GraphpruneError
from graphprune.inputs import random_feeds
from graphprune.rewrite import cleanup
from graphprune.runtime import first_line, make_session

GATE_PREFIX = "graphprune_gate_"
# Random scoring inputs use seeds from seed + this: verification draws seeds seed, seed + 1, ..., so its
# fidelity numbers stay measured on inputs the choice was not made on.
SCORING_SEED_OFFSET = 1000


@dataclass
class DropLayersConfig:
    """``drop``: how many blocks to remove; or ``target_flops``: the share of the dense MACs to remove
    (0.3 = -30%), blocks going until it is reached. Exactly one of the two.

    ``calibration``: re-iterable feed dicts (calibration.load_calibration); at most ``max_batches`` are
    used. Without it, ``samples`` random input sets (seeds from ``seed + SCORING_SEED_OFFSET``) at
    ``input_shapes`` score the blocks. ``progress`` is called with the number of model runs done.
    """

    drop: int | None = None
    target_flops: float | None = None
    calibration: Iterable | None = None
    max_batches: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    samples: int = 4
    seed: int = 0
    progress: Callable[[int], None] | None = None


@dataclass
class DroppedBlock:
    name: str
    kind: str
    add: str  # the bypassed Add node
    macs: int  # the block's MACs in the dense model
    score: float  # relative L2 change of the outputs vs dense, with this and all earlier blocks gone

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "add": self.add, "macs": self.macs, "score": self.score}


@dataclass
class DropReport:
    blocks: list[dict] = field(default_factory=list)  # every candidate found (ResidualBlock.to_dict)
    dropped: list[DroppedBlock] = field(default_factory=list)
    data: str = ""  # what the scores were measured on
    dense_macs: int = 0  # per metrics' count at the resolved input shapes
    removed_macs: int = 0  # estimated: the MACs of the removed branches
    target_reached: bool = True

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "dropped": [d.to_dict() for d in self.dropped], "data": self.data,
                "dense_macs": self.dense_macs, "estimated_removed_macs": self.removed_macs,
                "target_reached": self.target_reached}


class DropLayersPass(ir.passes.InPlacePass):
    name = "drop-layers"

    def __init__(self, config: DropLayersConfig | None = None) -> None:
        super().__init__()
        self.config = config or DropLayersConfig(drop=1)
        self.report = DropReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        _check_budget(config)
        macs = node_macs(ir.to_proto(model), config.input_shapes)
        blocks = find_residual_blocks(model, config.input_shapes, macs=macs)
        self.report = DropReport(blocks=[b.to_dict() for b in blocks], dense_macs=sum(macs.values()))
        if not blocks:
            raise GraphpruneError("the model has no residual block (y = x + f(x) with a branch f that reads only "
                                  "x and has a Conv, Gemm or MatMul): there is nothing to drop.")
        if config.drop is not None and config.drop > len(blocks):
            raise GraphpruneError(f"--drop {config.drop} is more than the {len(blocks)} residual blocks the model "
                                  f"has; give --drop {len(blocks)} or less.")
        budget = None if config.target_flops is None else config.target_flops * self.report.dense_macs
        if config.drop == 0 or budget == 0:
            return ir.passes.PassResult(model, modified=False)
        batches, self.report.data = _scoring_batches(model, config)
        scorer = GateScorer(model, blocks, batches, config.progress)
        chosen = self._greedy(blocks, scorer, macs, budget)
        bypass(model, [block for block, _ in chosen])
        cleanup(model)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _greedy(self, blocks: list[ResidualBlock], scorer: GateScorer, macs: Mapping[str, int],
                budget: float | None) -> list[tuple[ResidualBlock, float]]:
        """FinerCut: drop the block whose bypass (with those already gone) moves the outputs least."""
        chosen: list[tuple[ResidualBlock, float]] = []
        alive = list(blocks)
        while alive and not self._done(chosen, macs, budget):
            gone = [block for block, _ in chosen]
            scores = [scorer.change([*gone, block]) for block in alive]
            best = int(np.argmin(scores))  # ties: the earliest block in graph order
            block = alive.pop(best)
            chosen.append((block, scores[best]))
            # A block inside the removed branch is gone with it.
            inside = set(block.nodes)
            alive = [b for b in alive if b.add not in inside]
            self.report.dropped.append(DroppedBlock(block.name, block.kind, block.add.name, block.macs,
                                                    scores[best]))
        self.report.removed_macs = _removed_macs([b for b, _ in chosen], macs)
        # Short of the budget only when nested blocks went with their outer block and nothing is left.
        self.report.target_reached = (len(chosen) >= (self.config.drop or 0) if budget is None
                                      else self.report.removed_macs >= budget)
        return chosen

    def _done(self, chosen: list, macs: Mapping[str, int], budget: float | None) -> bool:
        if budget is None:
            return len(chosen) >= (self.config.drop or 0)
        return _removed_macs([b for b, _ in chosen], macs) >= budget


def _check_budget(config: DropLayersConfig) -> None:
    if (config.drop is None) == (config.target_flops is None):
        raise GraphpruneError("give how much to drop: --drop N (blocks) or --target-flops SHARE, one of them.")
    if config.drop is not None and config.drop < 0:
        raise GraphpruneError(f"--drop must be 0 or more: got {config.drop}.")
    if config.target_flops is not None and not 0.0 <= config.target_flops < 1.0:
        raise GraphpruneError(f"--target-flops must be in [0, 1): got {config.target_flops:g}.")


def _removed_macs(blocks: Sequence[ResidualBlock], macs: Mapping[str, int]) -> int:
    """MACs of the union of the removed branches (a nested block counts once)."""
    names = {node.name for block in blocks for node in block.nodes}
    return sum(macs.get(name, 0) for name in names)


def _scoring_batches(model: ir.Model, config: DropLayersConfig) -> tuple[list[dict], str]:
    """The feeds the blocks are scored on, and a sentence saying what they are."""
    if config.calibration is not None:
        batches = []
        for count, feeds in enumerate(config.calibration):
            if config.max_batches is not None and count >= config.max_batches:
                break
            batches.append(feeds)
        if not batches:
            raise GraphpruneError("the calibration data holds no samples to score the blocks on.")
        samples = sum(max((a.shape[0] for a in b.values() if np.ndim(a)), default=1) for b in batches)
        return batches, f"calibration data: {len(batches)} batch(es), {samples} sample(s)"
    batches, described = random_feeds(ir.to_proto(model), config.samples, config.input_shapes,
                                      config.seed + SCORING_SEED_OFFSET)
    return batches, described + "; give --calib for scores on real data"


class GateScorer:
    """One ORT session of the model with a scalar gate on every block's branch; dense outputs stored."""

    def __init__(self, model: ir.Model, blocks: Sequence[ResidualBlock], batches: Sequence[Mapping],
                 progress: Callable[[int], None] | None = None) -> None:
        self.gates = {id(block): f"{GATE_PREFIX}{i}" for i, block in enumerate(blocks)}
        self.dtypes = {name: _numpy_dtype(block.branch) for block, name in zip(blocks, self.gates.values(),
                                                                                  strict=True)}
        self.session = make_session(gated_proto(model, blocks), label="the model gated for layer scores")
        self.wanted = [i.name for i in self.session.get_inputs() if not i.name.startswith(GATE_PREFIX)]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.progress = progress
        self.runs = 0
        fixed = _fixed_batch(self.session)
        self.chunks = [chunk for feeds in batches for chunk in _split(feeds, fixed)]
        if not self.chunks:
            raise GraphpruneError("no scoring batch fits the model's fixed batch size.")
        self.dense = [self._run(chunk, ()) for chunk in self.chunks]
        self.reference = sum(float(np.sum(np.square(o))) for out in self.dense for o in out)

    def change(self, gone: Sequence[ResidualBlock]) -> float:
        """Relative L2 change of all float outputs, over the batches, with ``gone`` bypassed."""
        closed = [self.gates[id(block)] for block in gone]
        total = 0.0
        for chunk, dense in zip(self.chunks, self.dense, strict=True):
            outputs = self._run(chunk, closed)
            total += sum(float(np.sum(np.square(o - d))) for o, d in zip(outputs, dense, strict=True))
        self._tick()
        return float(np.sqrt(total / max(self.reference, 1e-30)))

    def _run(self, chunk: Mapping[str, np.ndarray], closed: Sequence[str]) -> list[np.ndarray]:
        missing = [name for name in self.wanted if name not in chunk]
        if missing:
            raise GraphpruneError(f"the scoring data has no input {', '.join(missing)}; give every model input.")
        gates = {name: np.asarray(0 if name in closed else 1, dtype=dtype) for name, dtype in self.dtypes.items()}
        try:
            values = self.session.run(self.outputs, {**{n: chunk[n] for n in self.wanted}, **gates})
        except Exception as exc:
            raise GraphpruneError(f"ONNX Runtime failed to run the model on the scoring data: {first_line(exc)}") from exc
        return [np.asarray(v, dtype=np.float64) for v in values if np.issubdtype(np.asarray(v).dtype, np.floating)]

    def _tick(self) -> None:
        self.runs += 1
        if self.progress is not None:
            self.progress(self.runs)


def _numpy_dtype(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)


def gated_proto(model: ir.Model, blocks: Sequence[ResidualBlock]) -> onnx.ModelProto:
    """A copy of the model where block i's Add reads Mul(b, graphprune_gate_i), the gate a scalar input."""
    proto = ir.to_proto(model)
    position = {node: k for k, node in enumerate(model.graph)}
    gated = {position[block.add]: (i, block) for i, block in enumerate(blocks)}
    nodes = []
    for k, node in enumerate(proto.graph.node):
        if k in gated:
            i, block = gated[k]
            gate, slot = f"{GATE_PREFIX}{i}", 1 - block.x_index
            branch = node.input[slot]
            nodes.append(onnx.helper.make_node("Mul", [branch, gate], [f"{branch}__gated{i}"],
                                               name=f"{GATE_PREFIX}mul_{i}"))
            node.input[slot] = f"{branch}__gated{i}"
            proto.graph.input.append(onnx.helper.make_tensor_value_info(gate, block.branch.dtype.value, []))
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def bypass(model: ir.Model, blocks: Sequence[ResidualBlock]) -> None:
    """Make each block's Add output x itself; the branch is left dead for cleanup to remove."""
    graph = model.graph
    for block in blocks:
        x, out = block.x, block.add.outputs[0]
        if out.is_graph_output():
            # The graph output keeps its name, now computed by an Identity of x.
            name, out.name = out.name, f"{out.name}__bypassed"
            identity = ir.node("Identity", [x], name=f"{block.add.name}__bypass")
            identity.outputs[0].name = name
            identity.outputs[0].dtype, identity.outputs[0].shape = out.dtype, out.shape
            graph.insert_before(block.add, identity)
            out.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
        else:
            out.replace_all_uses_with(x)
