"""Sensitivity: how much the model's outputs move when one group alone loses its weakest units.

Per candidate group, the ``probe_ratio`` share of its units that the criterion scores lowest (what a plan
would remove first) is masked: their slices in every consumer weight ("in" role) are zeroed, which is
what pruning them does to the rest of the model (tests/oracle.py checks pruning against this masking).
The sensitivity is the relative L2 change of all model outputs over a few calibration batches:
sqrt(sum ||y_masked - y||^2 / sum ||y||^2).

Cost is bounded: one ONNX Runtime session, in which every masked weight is an overridable initializer
(declared as a graph input too), so a group's probe is a feed of its masked weights, not a new model; one
run per group per calibration batch (models with a fixed batch size run it in chunks of that size), plus
one dense run per batch. Bias compensation is not applied in the probe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.calibration import _fixed_batch, _split
from graphprune.criteria import score_group
from graphprune.errors import GraphpruneError
from graphprune.runtime import first_line, make_session, run_session


def probe_masks(g: DimGraph, group: Group, units: np.ndarray) -> dict[str, tuple[ir.Value, np.ndarray]]:
    """Consumer weights of ``group`` with the slices of ``units`` zeroed: value name -> (value, array)."""
    masked: dict[str, tuple[ir.Value, np.ndarray]] = {}
    for use, axis in group.params:
        if use.roles[axis] != "in" or (use.node.op_type in ("Div", "Pow") and use.index == 1):
            continue
        positions = np.isin(g.space.unit_map(use.axes[axis], group.root), units)
        if not positions.any():
            continue
        name = use.value.name
        array = masked[name][1] if name in masked else np.array(use.array)
        index = [slice(None)] * array.ndim
        index[axis] = positions
        array[tuple(index)] = 0
        masked[name] = (use.value, array)
    return masked


def measure_sensitivity(model: ir.Model, g: DimGraph, groups: Sequence[Group], batches: Iterable, *,
                        criterion: str = "l2", stats: Mapping | None = None, grams: Mapping | None = None,
                        probe_ratio: float = 0.5, max_batches: int = 4, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> dict[int, float]:
    """Group root -> relative L2 change of the outputs when the group alone is probed (see module doc).

    ``stats`` / ``grams``: calibration statistics for the criterion (criteria.score_group). ``progress`` is
    called with the number of model runs done (dense runs included).
    """
    rng = np.random.default_rng(seed)
    probes: list[tuple[Group, np.ndarray]] = []
    for group in groups:
        scores, _ = score_group(g, group, criterion, rng, stats, grams)
        count = min(group.size - 1, max(1, round(probe_ratio * group.size)))
        probes.append((group, np.sort(np.argsort(scores, kind="stable")[:count])))
    overridden: dict[str, ir.Value] = {}
    for group, units in probes:
        for name, (value, _array) in probe_masks(g, group, units).items():
            overridden[name] = value
    proto = ir.to_proto(model)
    inputs = {i.name for i in proto.graph.input}
    for name, value in overridden.items():
        if name not in inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(
                name, value.dtype.value, list(value.const_value.shape)))
    session = make_session(proto, optimization="basic", label="the model for sensitivity probes")
    fixed = _fixed_batch(session)
    stored: list[tuple[dict, dict]] = []  # (feeds, dense outputs) per chunk
    runs = 0
    for count, feeds in enumerate(batches):
        if count >= max_batches:
            break
        for chunk in _split(feeds, fixed):
            stored.append((chunk, run_session(session, chunk, "the model on calibration data")))
        runs += 1
        if progress is not None:
            progress(runs)
    if not stored:
        raise GraphpruneError("the calibration data holds no samples for the sensitivity probes.")
    reference = sum(float(np.sum(np.square(o, dtype=np.float64))) for _, out in stored for o in out.values())
    result: dict[int, float] = {}
    for group, units in probes:
        masks = {name: array for name, (_value, array) in probe_masks(g, group, units).items()}
        change = 0.0
        for chunk, dense in stored:
            outputs = _run_overriding(session, chunk, masks)
            change += sum(float(np.sum(np.square(outputs[k].astype(np.float64) - v))) for k, v in dense.items())
        result[group.root] = float(np.sqrt(change / max(reference, 1e-30)))
        runs += 1
        if progress is not None:
            progress(runs)
    return result


def _run_overriding(session, feeds: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> dict:
    """Run with the model inputs and overriding initializer values (ORT lists those apart from inputs)."""
    wanted = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {**{n: feeds[n] for n in wanted}, **weights})
    except Exception as exc:
        raise GraphpruneError(f"ONNX Runtime failed to run a sensitivity probe: {first_line(exc)}") from exc
    return dict(zip(names, values, strict=True))
