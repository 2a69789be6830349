"""Run a model stage by stage over the calibration set, each stage from the values the last one left.

Statistics matching (stat_match.py) corrects a model one layer (stage) at a time and needs each stage's
outputs on the model as corrected so far. Re-running the model from its inputs for every stage costs
(stages x half a model) per calibration batch: 53 stages on MobileNetV2, ten times one-shot
reconstruction. Here each stage runs only the nodes between what earlier stages computed and its own
outputs, fed from a cache of the values that cross that border (a residual branch, the last block's
output); the corrections the caller makes to a stage's outputs (a per-channel affine map, the same one it
writes into the layer's weights) go into the cache with ``update``. Over all stages every node runs once
per batch.

The cache holds those crossing values for the whole calibration set; past ``budget`` bytes (or with a
control-flow subgraph, whose reads of outer values its node does not list) the runner drops it and runs
each later stage from the model's inputs, as far as that stage's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration import _run_with_outputs, _split, declared_fixed_batch
from graphprune.errors import GraphpruneError
from graphprune.runtime import make_session, run_session

CACHE_BYTES = 2 << 30


class StagedRunner:
    """One model's stages in topological order; make one per model (the pruned and the dense one)."""

    def __init__(self, batches: Iterable, budget: int = CACHE_BYTES) -> None:
        self.batches = batches
        self.budget = budget
        self.chunks: list[dict[str, np.ndarray]] | None = None
        self.cache: dict[str, list[np.ndarray]] = {}
        self.done: set[int] = set()  # node positions already run
        self.failed = budget <= 0

    def run(self, model: ir.Model, names: Sequence[str],
            progress: Callable[[int], None] | None = None) -> Iterable[dict[str, np.ndarray]]:
        """Per calibration chunk, the arrays of ``names`` on the model as it is now: from the cache where
        it can be used, else from the model's inputs, as far as ``names``."""
        found = None if self.failed else self._from_cache(model, names, progress)
        if found is None:
            self.failed, self.cache = True, {}
            return _run_with_outputs(model, names, self.batches, progress, truncate=True)
        return found

    def _from_cache(self, model: ir.Model, names: Sequence[str],
                    progress: Callable[[int], None] | None) -> list[dict[str, np.ndarray]] | None:
        proto = ir.to_proto(model)
        graph = proto.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for a in node.attribute):
            return None
        if self.chunks is None:
            self.chunks = [chunk for feeds in self.batches for chunk in _split(feeds, declared_fixed_batch(model))]
            if not self.chunks:
                raise GraphpruneError("the calibration data holds no samples.")
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        constants = {t.name for t in graph.initializer}
        fed = {v.name for v in graph.input} - constants
        segment: set[int] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if not name or name in self.cache or name in fed or name in constants:
                continue
            i = producer.get(name)
            if i is None:
                raise GraphpruneError(f"no value named '{name}' in the model to collect statistics on.")
            if i in segment:
                continue
            if i in self.done:  # computed before and not kept: the cache lost track of a value
                return None
            segment.add(i)
            stack.extend(graph.node[i].input)
        self.done |= segment
        # Values the nodes still to run read: what this segment must hand on, and what the cache keeps.
        later = {v for i, node in enumerate(graph.node) if i not in self.done for v in node.input if v}
        outputs = [v for v in dict.fromkeys([*names, *sorted(later)]) if producer.get(v) in segment]
        results = self._run_segment(proto, segment, outputs, progress) if outputs else [{} for _ in self.chunks]
        for name in outputs:
            if name in later:
                self.cache[name] = [r[name] for r in results]
        self.cache = {name: arrays for name, arrays in self.cache.items() if name in later}
        found = [{name: result[name] if name in result else self.cache[name][k] if name in self.cache else chunk[name]
                  for name in names} for k, (chunk, result) in enumerate(zip(self.chunks, results))]
        if sum(a.nbytes for arrays in self.cache.values() for a in arrays) > self.budget:
            self.failed, self.cache = True, {}
        return found

    def update(self, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
        """Apply ``change`` to a cached value (the caller changed the weights that produce it)."""
        if name in self.cache:
            self.cache[name] = [change(a) for a in self.cache[name]]

    def _run_segment(self, proto: onnx.ModelProto, segment: set[int], outputs: list[str],
                     progress: Callable[[int], None] | None) -> list[dict[str, np.ndarray]]:
        graph = proto.graph
        nodes = [node for i, node in enumerate(graph.node) if i in segment]
        read = {v for node in nodes for v in node.input if v}
        made = {v for node in nodes for v in node.output if v}
        constants = [t for t in graph.initializer if t.name in read]
        constant_names = {t.name for t in constants}
        inputs = [v for v in graph.input if v.name in read and v.name not in constant_names]
        declared = {v.name for v in inputs}
        for name in sorted(read - made - constant_names - declared):
            if name not in self.cache:
                raise GraphpruneError(f"the value '{name}' is neither computed nor cached; cannot run the stage.")
            dtype = onnx.helper.np_dtype_to_tensor_dtype(self.cache[name][0].dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        # Outputs go untyped: ONNX Runtime infers them, and a crossing value may be a shape (int64).
        sub = onnx.helper.make_graph(nodes, "stage", inputs, [onnx.ValueInfoProto(name=v) for v in outputs],
                                     constants)
        model = onnx.helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        model.functions.extend(proto.functions)
        session = make_session(model, optimization="basic", label="one stage of the model")
        wanted = [i.name for i in session.get_inputs()]
        results = []
        for k, chunk in enumerate(self.chunks):
            feeds = {name: self.cache[name][k] if name in self.cache else chunk[name] for name in wanted}
            results.append(run_session(session, feeds, "one stage of the model on calibration data"))
            if progress is not None:
                progress(k + 1)
        return results
