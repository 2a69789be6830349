"""prune-experts: remove whole experts of mixture-of-experts layers.

First form: ONNX Runtime's ``com.microsoft`` **MoE** and **QMoE** ops, whose expert weights are stacked
on axis 0 ([E, ...]: fc1/fc2/fc3 weights, biases, and for QMoE scales, zero points and per-expert global
scales) and whose ``router_probs`` input [T, E] comes from a router ``MatMul(x, W_r [D, E])`` (optionally
``+ b_r [E]``) or ``Gemm`` with a constant weight. The router's output axis *is* the expert axis: removing
expert e slices column e of W_r (and b_r) and index e of every stacked expert tensor, so the router has
K = E - removed outputs and a removed expert can never be routed to again.

Second form: a router written out as ops, as transformers' Mixtral exports with
``experts_implementation='batched_mm'``: ``MatMul(x, W_r) -> Cast -> Softmax -> TopK(k)``, the top-k values
divided by their ReduceSum, and the expert ids (through Reshape and the like) gathering stacked constants
``gate_up_proj [E, 2I, D]`` / ``down_proj [E, D, I]`` on axis 0. The same slicing applies: router columns and
the gathered stacks (``_written_out_layer``).

Routing semantics (ONNX Runtime 1.32, CPU kernel, checked numerically in tests/test_prune_experts.py):
``router_probs`` are logits; the op takes ``p = softmax(logits)`` over all experts, routes each token to
its top ``k`` and weighs expert outputs by ``p`` at those k, divided by their sum when
``normalize_routing_weights=1``. Consequences for removing experts that the router never selects on some
data:

- the top-k choice on that data is unchanged (the remaining logits keep their order), so ``K >= k`` keeps
  top-k valid (the pass refuses K < k);
- with ``normalize_routing_weights=1`` the gate weights are ``softmax`` over the k chosen logits only: the
  outputs are unchanged exactly;
- with ``normalize_routing_weights=0`` each token's weights grow by ``1 / (1 - m_t)``, ``m_t`` the softmax
  mass the removed experts had on that token: unchanged only where ``m_t = 0`` (in float32: logits far
  below the others). The report gives the mean and max of ``m_t`` over the calibration tokens.

Importance of an expert (per layer), from the router logits on calibration data: how often it is in a
token's top k (``frequency``) and its summed gate weight (the weight it gets in the output, normalised
as the op normalises it). Score = summed gate weight; ties (experts never selected) are broken by the
data-free score. Data-free fallback (no calibration): the L2 norm of the expert's stacked weights (fc1,
fc2, fc3 together; for QMoE, whose weights are packed integers, the norm of its dequantisation scales, a
rough magnitude), which the report states. Budget per MoE layer: keep ``experts_keep`` experts, or remove
``floor(ratio * E)`` of them.

Declined (left as they are, with the reason): a router that is not a MatMul/Gemm(+Add) with constant
weights read only by the op, QMoE with ``router_weights`` (a second [T, E] activation) or prepacked
weights, ``use_sparse_mixer=1`` (its top-2 masking depends on all experts' logits).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.blocks import _common_path
from graphprune.calibration import _run_with_outputs
from graphprune.errors import GraphpruneError
from graphprune.rewrite import cleanup

MOE_OPS = ("MoE", "QMoE")
ROUTER_INPUT = 1
QMOE_ROUTER_WEIGHTS = 14  # QMoE's optional second [T, E] input: aggregation weights
# Inputs holding float expert weights, for the data-free norm; QMoE: its scales (fc1/fc2/fc3_scales).
FLOAT_WEIGHTS = {"MoE": (2, 4, 6), "QMoE": (3, 6, 9)}


@dataclass
class PruneExpertsConfig:
    """``experts_keep``: experts to keep in every MoE layer; or ``ratio``: the share of each layer's experts
    to remove (``floor(ratio * E)``). Exactly one.

    ``calibration``: re-iterable feed dicts (calibration.load_calibration); at most ``max_batches`` are
    used. Without it, experts are scored data-free (weight norms).
    """

    experts_keep: int | None = None
    ratio: float | None = None
    calibration: Iterable | None = None
    max_batches: int | None = None


@dataclass
class MoELayer:
    node: ir.Node  # the MoE / QMoE node, or the TopK of a written-out router
    op: str  # "MoE", "QMoE" or "written-out"
    experts: int
    k: int
    normalize: bool  # gate weights divided by their sum over the top k
    logits: ir.Value  # the router's output [T, E] (before any softmax)
    router: list[tuple[ir.Node, int, int]]  # (node, input index, expert axis) of each router constant
    stacks: list[tuple[ir.Node, int]]  # (node, input index) of the constants stacked on axis 0 over experts
    float_stacks: list[tuple[ir.Node, int]]  # the float expert weights among them, for the data-free norm
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.node.name or self.node.op_type


@dataclass
class ExpertChoice:
    layer: str
    op: str
    experts: int
    k: int
    normalize: bool
    kept: list[int]
    removed: list[int]
    scores: list[float]  # the score each expert was ranked by
    weight_norms: list[float]  # data-free score
    frequency: list[float] | None = None  # share of calibration tokens that route to the expert
    gate_weight: list[float] | None = None  # summed gate weight over calibration tokens
    tokens: int = 0
    removed_routes: int = 0  # top-k slots of calibration tokens that went to removed experts
    removed_mass_mean: float | None = None  # softmax mass of the removed experts per token
    removed_mass_max: float | None = None

    @property
    def exact(self) -> bool | None:
        """Whether the calibration outputs are unchanged: no removed expert was selected, and the gate
        weights are normalised over the top k (or the removed experts had no softmax mass)."""
        if self.frequency is None:
            return None
        return self.removed_routes == 0 and (self.normalize or not self.removed_mass_max)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "experts": self.experts, "k": self.k,
                "normalize_routing_weights": self.normalize, "kept": self.kept, "removed": self.removed,
                "scores": self.scores, "weight_norms": self.weight_norms, "frequency": self.frequency,
                "gate_weight": self.gate_weight, "tokens": self.tokens, "removed_routes": self.removed_routes,
                "removed_mass_mean": self.removed_mass_mean, "removed_mass_max": self.removed_mass_max,
                "exact_on_calibration": self.exact}


@dataclass
class PruneExpertsReport:
    layers: list[ExpertChoice] = field(default_factory=list)
    declined: list[dict] = field(default_factory=list)  # {"node", "reason"}
    data: str = ""  # what the scores were measured on

    def to_dict(self) -> dict:
        return {"layers": [c.to_dict() for c in self.layers], "declined": self.declined, "data": self.data}


class PruneExpertsPass(ir.passes.InPlacePass):
    name = "prune-experts"

    def __init__(self, config: PruneExpertsConfig | None = None) -> None:
        super().__init__()
        self.config = config or PruneExpertsConfig(ratio=0.25)
        self.report = PruneExpertsReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        _check_budget(config)
        layers, declined = find_moe_layers(model)
        self.report = PruneExpertsReport(declined=declined)
        if not layers:
            reasons = "; ".join(f"{d['node']}: {d['reason']}" for d in declined)
            raise GraphpruneError("the model has no MoE layer to prune (a com.microsoft MoE or QMoE fed by a "
                                  "MatMul/Gemm router with constant weights)" + (f": {reasons}." if reasons else "."))
        keeps = [_keep_count(layer, config) for layer in layers]
        norms = [weight_norms(layer) for layer in layers]
        stats: list[dict | None] = [None] * len(layers)
        if config.calibration is not None:
            stats, self.report.data = routing_stats(model, layers, config.calibration, config.max_batches)
        else:
            self.report.data = ("data-free: no calibration data, experts ranked by the L2 norm of their weights "
                                "(QMoE: of their scales); give --calib to rank them by routing")
        modified = False
        for layer, keep, norm, stat in zip(layers, keeps, norms, stats, strict=True):
            choice = _choose(layer, keep, norm, stat)
            self.report.layers.append(choice)
            if choice.removed:
                remove_experts(model.graph, layer, choice.kept)
                modified = True
        if modified:
            cleanup(model)
        return ir.passes.PassResult(model, modified=modified)


def _check_budget(config: PruneExpertsConfig) -> None:
    if (config.experts_keep is None) == (config.ratio is None):
        raise GraphpruneError("give how many experts to keep: --experts-keep N or --ratio SHARE (to remove), "
                              "one of them.")
    if config.experts_keep is not None and config.experts_keep < 1:
        raise GraphpruneError(f"--experts-keep must be 1 or more: got {config.experts_keep}.")
    if config.ratio is not None and not 0.0 <= config.ratio < 1.0:
        raise GraphpruneError(f"--ratio must be in [0, 1): got {config.ratio:g}.")


def _keep_count(layer: MoELayer, config: PruneExpertsConfig) -> int:
    if config.experts_keep is not None:
        keep = config.experts_keep
        if keep > layer.experts:
            raise GraphpruneError(f"--experts-keep {keep} is more than the {layer.experts} experts of "
                                  f"{layer.name}; give {layer.experts} or less.")
    else:
        keep = layer.experts - int(np.floor(config.ratio * layer.experts + 1e-9))
    if keep < layer.k:
        raise GraphpruneError(f"keeping {keep} of the {layer.experts} experts of {layer.name} leaves fewer than "
                              f"its top-k (k={layer.k}): the router could not pick k experts; keep {layer.k} "
                              "or more.")
    return keep


# ---------- finding MoE layers ----------


def find_moe_layers(model: ir.Model) -> tuple[list[MoELayer], list[dict]]:
    """The prunable MoE / QMoE nodes of the top-level graph, and the declined ones with the reason."""
    layers, declined = [], []
    for node in model.graph:
        if node.domain == "com.microsoft" and node.op_type in MOE_OPS:
            build = _layer
        elif node.domain in ("", "ai.onnx") and node.op_type == "TopK" and _routes_experts(node):
            build = _written_out_layer
        else:
            continue
        try:
            layers.append(build(node))
        except _Decline as why:
            declined.append({"node": node.name, "reason": str(why)})
    return layers, declined


class _Decline(Exception):
    pass


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _layer(node: ir.Node) -> MoELayer:
    if _attr(node, "use_sparse_mixer", 0):
        raise _Decline("use_sparse_mixer=1: the sparse mixer's top-2 masking reads every expert's logit")
    if node.op_type == "QMoE":
        if _attr(node, "weights_prepacked", 0):
            raise _Decline("prepacked QMoE weights: their layout is the runtime's")
        if len(node.inputs) > QMOE_ROUTER_WEIGHTS and node.inputs[QMOE_ROUTER_WEIGHTS] is not None:
            raise _Decline("QMoE with router_weights: a second [T, E] input the pass does not trace")
    weights = _const(node.inputs[2])
    if weights is None:
        raise _Decline("fc1_experts_weights is not a constant")
    experts, k = int(weights.shape[0]), int(_attr(node, "k", 1))
    expert_inputs = []
    for index, value in enumerate(node.inputs):
        if index <= ROUTER_INPUT or value is None or (node.op_type == "QMoE" and index == QMOE_ROUTER_WEIGHTS):
            continue
        array = _const(value)
        if array is None:
            raise _Decline(f"input {index} ({value.name}) is not a constant")
        if array.ndim and array.shape[0] == experts and not (array.ndim == 1 and array.size == 1):
            expert_inputs.append(index)
        elif array.size != 1:
            raise _Decline(f"input {index} ({value.name}) of shape {list(array.shape)} is not stacked over the "
                           f"{experts} experts")
    router = _router(node.inputs[ROUTER_INPUT], node, experts)
    stacks = [(node, index) for index in expert_inputs]
    floats = [(node, index) for index in FLOAT_WEIGHTS[node.op_type] if index in expert_inputs]
    return MoELayer(node, node.op_type, experts, k, bool(_attr(node, "normalize_routing_weights", 0)),
                    node.inputs[ROUTER_INPUT], router, stacks, floats)


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def _router(logits: ir.Value, moe: ir.Node, experts: int) -> list[tuple[ir.Node, int, int]]:
    """The router constants to slice: (node, input index, expert axis), from the logits back to a MatMul."""
    found, value, reader = [], logits, moe
    while True:
        producer = value.producer()
        if producer is None:
            raise _Decline(f"router_probs ({value.name}) is a graph input: the router is outside the model")
        if not _only_use(value, reader):
            raise _Decline(f"the router output {value.name} is read elsewhere or is a graph output")
        op = producer.op_type if producer.domain in ("", "ai.onnx") else None
        if op == "Add":
            slot = next((i for i in (0, 1) if _const(producer.inputs[i]) is not None), None)
            bias = None if slot is None else _const(producer.inputs[slot])
            if bias is None or bias.ndim < 1 or bias.shape[-1] != experts or bias.size != experts:
                raise _Decline(f"{producer.name}: the router's Add is not a bias of {experts} values")
            found.append((producer, slot, bias.ndim - 1))
            value, reader = producer.inputs[1 - slot], producer
            continue
        if op == "MatMul":
            weight = _const(producer.inputs[1])
            if weight is None or weight.ndim != 2 or weight.shape[1] != experts:
                raise _Decline(f"{producer.name}: the router MatMul has no constant [D, {experts}] weight")
            found.append((producer, 1, 1))
            return found
        if op == "Gemm":
            weight = _const(producer.inputs[1])
            trans = int(_attr(producer, "transB", 0))
            if weight is None or weight.shape[1 - trans] != experts:
                raise _Decline(f"{producer.name}: the router Gemm has no constant weight over {experts} experts")
            found.append((producer, 1, 1 - trans))
            if len(producer.inputs) > 2 and producer.inputs[2] is not None:
                bias = _const(producer.inputs[2])
                if bias is None or bias.size != experts:
                    raise _Decline(f"{producer.name}: the router Gemm's C is not a bias of {experts} values")
                found.append((producer, 2, bias.ndim - 1))
            return found
        raise _Decline(f"router_probs comes from {producer.op_type} ({producer.name}), not a MatMul/Gemm router "
                       "with constant weights")


# ---------- the written-out form (transformers' Mixtral exported with experts_implementation='batched_mm') ----------

# Ops the expert ids of a written-out router pass through with their values unchanged.
ID_PASSTHROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand", "Tile",
                            "Transpose"})
ROUTER_CHAIN = frozenset({"Softmax", "Cast", "Identity"})


def _router_top(topk: ir.Node) -> tuple[list[ir.Node], ir.Value] | None:
    """From a TopK back through Softmax/Cast/Identity: those nodes (nearest first) and the value before them,
    when a Softmax is among them and that value comes from a MatMul/Gemm (or its bias Add); else None."""
    chain, value = [], topk.inputs[0]
    while value is not None and value.producer() is not None:
        producer = value.producer()
        if producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type in ROUTER_CHAIN:
            chain.append(producer)
            value = producer.inputs[0]
            continue
        if not any(n.op_type == "Softmax" for n in chain):
            return None
        linear = producer
        if producer.op_type == "Add":
            linear = next((v.producer() for v in producer.inputs if v is not None and v.producer() is not None), None)
        return (chain, value) if linear is not None and linear.op_type in ("MatMul", "Gemm") else None
    return None


def _routes_experts(topk: ir.Node) -> bool:
    return _router_top(topk) is not None


def _written_out_layer(topk: ir.Node) -> MoELayer:
    """A router MatMul -> Softmax -> TopK whose expert ids gather stacked [E, ...] expert weights."""
    chain, logits = _router_top(topk)
    rank = len(logits.shape) if logits.shape is not None else None
    experts = logits.shape[-1] if rank else None
    if not isinstance(experts, int):
        raise _Decline("the router's number of experts (its output's last extent) is not static")
    softmax = next(n for n in chain if n.op_type == "Softmax")
    if int(_attr(softmax, "axis", -1)) not in (-1, rank - 1):
        raise _Decline(f"{softmax.name}: the softmax is not over the expert axis")
    if int(_attr(topk, "axis", -1)) not in (-1, rank - 1) or not int(_attr(topk, "largest", 1)):
        raise _Decline(f"{topk.name}: not a top-k over the expert axis")
    k_array = _const(topk.inputs[1])
    if k_array is None:
        raise _Decline(f"{topk.name}: k is not a constant")
    for value, reader in zip([topk.inputs[0], *(n.inputs[0] for n in chain[:-1])], [topk, *chain[:-1]],
                             strict=True):
        if not _only_use(value, reader):
            raise _Decline(f"the router's {value.name} is read elsewhere or is a graph output")
    router = _router(logits, chain[-1], experts)
    stacks = _gathered_stacks(topk.outputs[1], experts)
    values = topk.outputs[0]
    normalize = any(use.node.op_type == "Div" and use.idx == 0 and use.node.inputs[1] is not None
                    and use.node.inputs[1].producer() is not None
                    and use.node.inputs[1].producer().op_type == "ReduceSum"
                    and use.node.inputs[1].producer().inputs[0] is values for use in values.uses())
    floats = [(n, i) for n, i in stacks if n.inputs[i].dtype is not None and n.inputs[i].dtype.is_floating_point()]
    path = _common_path([topk.name or "", *(n.name or "" for n, _ in stacks)])
    return MoELayer(topk, "written-out", experts, int(k_array.reshape(-1)[0]), normalize, logits, router, stacks,
                    floats, label=path)


def _gathered_stacks(ids: ir.Value, experts: int) -> list[tuple[ir.Node, int]]:
    """The Gathers on axis 0 of constant [E, ...] tensors that the expert ids index, through reshapes."""
    stacks, pending, seen = [], [ids], set()
    while pending:
        value = pending.pop()
        if value in seen:
            continue
        seen.add(value)
        if value.is_graph_output():
            raise _Decline(f"the expert ids {value.name} are a graph output")
        for use in value.uses():
            node = use.node
            if node.op_type == "Shape":
                continue
            data = _const(node.inputs[0]) if node.op_type == "Gather" else None
            if (data is not None and use.idx == 1 and int(_attr(node, "axis", 0)) == 0 and data.ndim
                    and data.shape[0] == experts):
                stacks.append((node, 0))
            elif node.op_type in ID_PASSTHROUGH and use.idx == 0:
                pending.append(node.outputs[0])
            else:
                raise _Decline(f"the expert ids reach {node.op_type} ({node.name}), which the pass cannot renumber")
    if not stacks:
        raise _Decline("the router's expert ids gather no stacked [E, ...] expert weights")
    return stacks



# ---------- importance ----------


def weight_norms(layer: MoELayer) -> list[float]:
    """Data-free score: the L2 norm of each expert's float weights (QMoE: of its scales)."""
    total = np.zeros(layer.experts)
    for node, index in layer.float_stacks:
        array = _const(node.inputs[index]).astype(np.float64)
        total += np.square(array.reshape(layer.experts, -1)).sum(axis=1)
    return [float(v) for v in np.sqrt(total)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest probabilities (ties: the lower expert index first)."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def routing_stats(model: ir.Model, layers: list[MoELayer], batches: Iterable,
                  max_batches: int | None = None) -> tuple[list[dict], str]:
    """Per layer: the softmax of every calibration token's router logits, top-k counts and gate sums."""
    names = [layer.logits.name for layer in layers]
    limited = _first(batches, max_batches)
    probs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    count = 0
    for arrays in _run_with_outputs(model, names, limited, None):
        count += 1
        for layer in layers:
            logits = np.asarray(arrays[layer.logits.name], dtype=np.float64).reshape(-1, layer.experts)
            probs[layer.logits.name].append(_softmax(logits))
    stats = []
    for layer in layers:
        p = np.concatenate(probs[layer.logits.name]) if probs[layer.logits.name] else np.zeros((0, layer.experts))
        chosen = top_k(p, layer.k)
        gates = np.take_along_axis(p, chosen, axis=1)
        if layer.normalize:
            gates = gates / np.maximum(gates.sum(axis=1, keepdims=True), 1e-30)
        frequency = np.bincount(chosen.ravel(), minlength=layer.experts)
        gate_weight = np.bincount(chosen.ravel(), weights=gates.ravel(), minlength=layer.experts)
        stats.append({"probs": p, "chosen": chosen, "frequency": frequency, "gate_weight": gate_weight})
    tokens = stats[0]["probs"].shape[0] if stats else 0
    if not tokens:
        raise GraphpruneError("the calibration data holds no tokens to route.")
    return stats, f"calibration data: {count} batch(es), {tokens} token(s) per MoE layer"


def _first(batches: Iterable, limit: int | None):
    for count, feeds in enumerate(batches):
        if limit is not None and count >= limit:
            return
        yield feeds


def _choose(layer: MoELayer, keep: int, norms: list[float], stat: dict | None) -> ExpertChoice:
    scores = norms if stat is None else [float(v) for v in stat["gate_weight"]]
    # Highest score first; ties broken by the weight norm, then by the lower index.
    order = sorted(range(layer.experts), key=lambda e: (-scores[e], -norms[e], e))
    kept, removed = sorted(order[:keep]), sorted(order[keep:])
    choice = ExpertChoice(layer.name, layer.op, layer.experts, layer.k, layer.normalize, kept, removed,
                          scores, norms)
    if stat is not None:
        tokens = stat["probs"].shape[0]
        choice.tokens = tokens
        choice.frequency = [float(v) / tokens for v in stat["frequency"]]
        choice.gate_weight = [float(v) for v in stat["gate_weight"]]
        choice.removed_routes = int(np.isin(stat["chosen"], removed).sum())
        mass = stat["probs"][:, removed].sum(axis=1) if removed else np.zeros(tokens)
        choice.removed_mass_mean, choice.removed_mass_max = float(mass.mean()), float(mass.max())
    return choice


# ---------- rewrite ----------


def remove_experts(graph: ir.Graph, layer: MoELayer, kept: list[int]) -> None:
    """Slice the router's expert axis and every stacked expert tensor to ``kept`` (ascending)."""
    index = np.asarray(kept, dtype=np.int64)
    for node, slot, axis in layer.router:
        _replace(graph, node, slot, np.take(_const(node.inputs[slot]), index, axis=axis))
    for node, slot in layer.stacks:
        _replace(graph, node, slot, np.take(_const(node.inputs[slot]), index, axis=0))
    # The router's values now have len(kept) columns: shapes are re-inferred by cleanup.


def _replace(graph: ir.Graph, node: ir.Node, slot: int, array: np.ndarray) -> None:
    """Give ``node`` input ``slot`` the new constant: in place when only this node reads it, else a copy."""
    value = node.inputs[slot]
    array = np.ascontiguousarray(array)
    if all(use.node is node for use in value.uses()) and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    name = f"{value.name}__experts"
    copy = ir.Value(name=name, shape=ir.Shape(array.shape), type=value.type, const_value=ir.tensor(array, name=name))
    graph.register_initializer(copy)
    node.replace_input_with(slot, copy)
