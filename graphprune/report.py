"""What analyze and optimize tell the user: groups, shares of weights and MACs, decisions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.metrics import value_shapes
from graphprune.plan import PrunePlan

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers whose weights carry the MACs


def node_macs(node: ir.Node, weight: ir.Value, shape_of: Callable[[str], tuple | None] | None = None) -> float:
    """Multiply-accumulates of a linear node per batch item, from its weight and output shapes.

    ``shape_of`` (metrics.value_shapes): static shapes by value name, used where the model's own shape of
    a conv's output or input is not static; unknown extents count as 1 otherwise.
    """
    numel = float(np.prod(weight.const_value.shape, dtype=np.float64))

    def extents(value: ir.Value | None) -> list[int] | None:
        shape = None if value is None else value.shape
        if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
            return list(shape)
        known = shape_of(value.name) if shape_of is not None and value is not None and value.name else None
        if known is not None:
            return list(known)
        return None if shape is None else [d if isinstance(d, int) and d > 0 else 1 for d in shape]

    dims = extents(node.outputs[0])
    if dims is None:
        return 0.0
    if node.op_type == "Conv":
        return numel * float(np.prod(dims[2:]))
    if node.op_type == "ConvTranspose":
        x = extents(node.inputs[0])
        return numel * float(np.prod(x[2:])) if x else 0.0
    if node.op_type in ("Gemm", "MatMul"):
        return numel * float(np.prod(dims[1:-1] if len(dims) > 2 else [1]))
    return 0.0


@dataclass
class GroupSummary:
    id: int
    size: int
    kind: str
    prunable: bool
    reason: str
    members: list[str]
    params_share: float
    macs_share: float
    criterion: str = ""
    kept: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    ratio: float = 0.0  # share of the units removed
    sensitivity: float | None = None  # measured output change (allocation "sensitivity")

    def to_dict(self) -> dict:
        return asdict(self)


def conv_shapes(g: DimGraph, input_shapes: Mapping[str, tuple] | None = None):
    """Static value shapes (for node_macs) as metrics counts them, when a conv's spatial extents are not static in the
    model itself (dynamic height and width): without them every conv would count one pixel, and the
    budget would favour the layers with the most weights instead of the most MACs. None otherwise
    (transformers' MatMuls share one unknown sequence length, which scales every share alike)."""
    def static(value) -> bool:
        return value is not None and value.shape is not None and all(isinstance(d, int) and d > 0
                                                                      for d in list(value.shape)[2:])
    convs = [node for node in g.graph if node.op_type in ("Conv", "ConvTranspose")]
    if all(static(node.outputs[0]) and (node.op_type == "Conv" or static(node.inputs[0])) for node in convs):
        return None
    return value_shapes(ir.to_proto(g.model), input_shapes)


def summarise_groups(g: DimGraph, groups: list[Group], plan: PrunePlan | None = None,
                     input_shapes: Mapping[str, tuple] | None = None) -> list[GroupSummary]:
    """Per group: members, shares of the dense params and MACs (MACs at ``input_shapes``, as counted),
    and the plan's decision."""
    total_params = sum(float(np.prod(v.const_value.shape, dtype=np.float64))
                       for v in g.graph.initializers.values() if v.const_value is not None
                       and v.const_value.dtype.is_floating_point())
    shape_of = conv_shapes(g, input_shapes)
    weights = {(use.node, use.index): node_macs(use.node, use.value, shape_of) for use in g.params.values()
               if use.index == 1 and use.node.op_type in LINEAR_OPS}
    total_macs = sum(weights.values()) or 1.0
    decisions = {d.group.root: d for d in plan.decisions} if plan else {}
    allocation = getattr(plan, "allocation", None)
    sensitivity = getattr(allocation, "sensitivity", None) or {}
    out = []
    for group in groups:
        macs = 0.0
        for use, axis in group.params:
            node_total = weights.get((use.node, use.index))
            if node_total and use.roles[axis] in ("in", "out"):
                share = (g.space.unit_map(use.axes[axis], group.root) >= 0).mean()
                macs = max(macs, 0.0) + node_total * share
        decision = decisions.get(group.root)
        summary = GroupSummary(
            id=group.id, size=group.size, kind=group.kind, prunable=group.prunable, reason=group.why_not,
            members=[f"{use.value.name}[{axis}] ({use.node.op_type} '{use.node.name}')"
                     for use, axis in group.params],
            params_share=group.weights_per_unit(g) * group.size / max(total_params, 1.0),
            macs_share=min(1.0, macs / total_macs),
        )
        if decision is not None:
            summary.criterion = decision.criterion
            summary.removed = decision.removed.tolist()
            summary.kept = decision.kept.tolist()
            summary.ratio = len(decision.removed) / max(group.size, 1)
            summary.sensitivity = sensitivity.get(group.root)
            if decision.skipped and summary.prunable:
                summary.reason = decision.skipped
        out.append(summary)
    return out


@dataclass
class AnalysisReport:
    model: str
    groups: list[GroupSummary]
    declined: list[dict]

    @property
    def prunable(self) -> list[GroupSummary]:
        return [s for s in self.groups if s.prunable]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "groups": [s.to_dict() for s in self.groups],
            "declined_nodes": self.declined,
            "totals": {
                "groups": len(self.groups),
                "prunable_groups": len(self.prunable),
                "prunable_units": sum(s.size for s in self.prunable),
                "prunable_params_share": min(1.0, sum(s.params_share for s in self.prunable)),
            },
        }


def declined_nodes(g: DimGraph) -> list[dict]:
    return [{"node": node.name, "op": node.op_type, "reason": reason} for node, reason in g.declined]
