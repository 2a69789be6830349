"""Check a pruned model: ONNX checker, ONNX Runtime, output shapes, numeric fidelity against the original."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from graphprune.errors import GraphpruneError, VerificationError
from graphprune.inputs import make_inputs
from graphprune.runtime import (
    ModelLike,
    first_line,
    is_oversized,
    load_structure,
    make_session,
    model_label,
    model_path,
    run_session,
    saved_copy,
)

Feeds = Mapping[str, np.ndarray]


# Ops ONNX Runtime registers in the standard domain although ONNX does not define them (its
# transformer optimizer writes them): the checker judges them as the contrib ops they are.
ORT_STANDARD_DOMAIN_OPS = ("SimplifiedLayerNormalization",)
MICROSOFT = "com.microsoft"


def check_model(model: ModelLike, what: str = "the pruned model") -> None:
    """onnx.checker with full_check; by path when there is one or the proto is too big to serialise."""
    path = model_path(model)
    if path is not None and not path.is_file():
        raise GraphpruneError(f"model file '{path}' does not exist.")
    try:
        if path is not None:
            onnx.checker.check_model(os.fspath(path), full_check=True)
        elif is_oversized(model):  # type: ignore[arg-type]
            with saved_copy(model) as tmp:  # type: ignore[arg-type]
                onnx.checker.check_model(os.fspath(tmp), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)  # type: ignore[arg-type]
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if not any(f"No Op registered for {op} " in str(exc) for op in ORT_STANDARD_DOMAIN_OPS):
            raise VerificationError(f"{what} fails the ONNX checker: {first_line(exc)}") from exc
        proto = onnx.load(os.fspath(path), load_external_data=False) if path is not None else model
        try:
            onnx.checker.check_model(as_contrib_ops(proto), full_check=True)  # type: ignore[arg-type]
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as again:
            raise VerificationError(f"{what} fails the ONNX checker: {first_line(again)}") from again


def as_contrib_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose ORT-only standard-domain nodes are labelled com.microsoft, for the checker."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type in ORT_STANDARD_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
            node.domain = MICROSOFT
    if all(o.domain != MICROSOFT for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(MICROSOFT, 1))
    return copy


def run_model(
    model: ModelLike, inputs: Feeds, providers: Sequence[Any] | None = None
) -> dict[str, np.ndarray]:
    label = model_label(model)
    return run_session(make_session(model, providers=providers, label=label), inputs, label)


@dataclass
class OutputFidelity:
    max_abs_error: float
    relative_l2: float
    cosine: float
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def fidelity(reference: Feeds, candidate: Feeds) -> dict[str, OutputFidelity]:
    result = {}
    for index, (name, ref) in enumerate(reference.items()):
        if name not in candidate:
            raise VerificationError(f"the pruned model has no output '{name}'.")
        cand = np.asarray(candidate[name])
        ref = np.asarray(ref)
        if cand.shape != ref.shape:
            raise VerificationError(_shape_message(name, cand.shape, ref.shape))
        result[name] = _output_fidelity(ref, cand, first=index == 0)
    return result


def _output_fidelity(ref: np.ndarray, cand: np.ndarray, first: bool) -> OutputFidelity:
    a = ref.astype(np.float64).ravel()
    b = cand.astype(np.float64).ravel()
    diff = a - b
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm_a, norm_b, norm_d = (float(np.linalg.norm(v)) for v in (a, b, diff))
    # A zero reference makes relative error meaningless: 0 if the candidate is zero too, else inf.
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else float("inf"))
    if norm_a > 0 and norm_b > 0:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    top1 = _top1(ref, cand) if _looks_like_logits(ref, first) else None
    return OutputFidelity(max_abs, rel, cosine, top1)


def _looks_like_logits(ref: np.ndarray, first: bool) -> bool:
    # Logits: float, class axis last with size >= 2, and either rank 2 or the first output of higher rank.
    if ref.dtype.kind != "f" or ref.ndim < 2 or ref.shape[-1] < 2:
        return False
    return ref.ndim == 2 or first


def _top1(ref: np.ndarray, cand: np.ndarray) -> float:
    if ref.size == 0:
        return 1.0
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))


def _shape_message(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    return f"output '{name}' of the pruned model has shape {tuple(got)}, but the original's is {tuple(want)}."


@dataclass
class VerifyReport:
    samples: int
    # Per output, over all samples: worst max_abs_error, mean relative_l2, cosine and top1_agreement.
    outputs: dict[str, OutputFidelity] = field(default_factory=dict)

    @property
    def worst_max_abs_error(self) -> float:
        return max((f.max_abs_error for f in self.outputs.values()), default=0.0)

    @property
    def worst_relative_l2(self) -> float:
        return max((f.relative_l2 for f in self.outputs.values()), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((f.cosine for f in self.outputs.values()), default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "worst_max_abs_error": self.worst_max_abs_error,
            "worst_relative_l2": self.worst_relative_l2,
            "min_cosine": self.min_cosine,
            "outputs": {name: f.to_dict() for name, f in self.outputs.items()},
        }


def verify(
    original: ModelLike,
    pruned: ModelLike,
    inputs: Feeds | Sequence[Feeds] | None = None,
    samples: int = 4,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    providers: Sequence[Any] | None = None,
    resized: Sequence[Mapping[str, Any]] = (),
) -> VerifyReport:
    """Run both models on the same inputs and measure how far the pruned outputs drift.

    ``resized``: graph inputs and outputs that pruning shrank on purpose (KV caches), each
    ``{"value", "axis", "kept"}``: the pruned model is fed the kept slice of such an input, and such an
    output is compared on its kept positions.
    """
    check_model(pruned)
    ref_label, new_label = _label("original", original), _label("pruned", pruned)
    input_sets = _input_sets(original, inputs, samples, overrides)
    # One session at a time: each holds all of its model's weights, which for a large model is most of
    # the memory verification needs.
    ref_session = make_session(original, providers=providers, label=ref_label)
    ref_names = [o.name for o in ref_session.get_outputs()]
    references = [_run_original(ref_session, feeds, ref_label) for feeds in input_sets]
    del ref_session
    new_session = make_session(pruned, providers=providers, label=new_label)
    _check_output_names(ref_names, new_session)
    per_sample = []
    for feeds, ref in zip(input_sets, references, strict=True):
        new = run_session(new_session, take_kept(feeds, resized), new_label)
        ref = take_kept(ref, resized)
        _check_shapes(ref, new)
        per_sample.append(fidelity(ref, new))
    return VerifyReport(samples=len(per_sample), outputs=_aggregate(per_sample))


def _run_original(session: Any, feeds: Feeds, label: str) -> dict[str, np.ndarray]:
    try:
        return run_session(session, feeds, label)
    except VerificationError as err:
        # The original itself cannot run: the generated inputs do not suit it, nothing was pruned wrong.
        shapes = ", ".join(f"{name}:{'x'.join(map(str, a.shape))}" for name, a in feeds.items())
        raise GraphpruneError(f"{str(err).rstrip('.')}. The generated inputs ({shapes}) may not suit this model: give its "
                              "input shapes with --input-shape NAME:DIMS.") from err


def take_kept(arrays: Feeds, resized: Sequence[Mapping[str, Any]]) -> Feeds:
    """The kept slices of the arrays named by ``resized`` (KV caches that pruning shrank); the rest as is."""
    out = dict(arrays)
    for change in resized:
        name = change["value"]
        if name in out:
            out[name] = np.take(out[name], np.asarray(change["kept"], dtype=np.int64), axis=change["axis"])
    return out


def _label(role: str, model: ModelLike) -> str:
    path = model_path(model)
    return f"the {role} model ({path})" if path is not None else f"the {role} model"


def _input_sets(
    original: ModelLike,
    inputs: Feeds | Sequence[Feeds] | None,
    samples: int,
    overrides: Mapping[str, tuple[int, ...]] | None,
) -> list[Feeds]:
    if inputs is None:
        structure = load_structure(original)  # load a file once, not once per sample
        return [make_inputs(structure, overrides=overrides, seed=seed) for seed in range(max(samples, 1))]
    sets = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not sets:
        raise GraphpruneError("verification needs at least one set of input data; none was given.")
    return sets


def _check_output_names(ref: list[str], new_session: Any) -> None:
    new = [o.name for o in new_session.get_outputs()]
    if sorted(ref) != sorted(new):
        raise VerificationError(
            f"the pruned model's outputs ({', '.join(new)}) differ from the original's ({', '.join(ref)})."
        )


def _check_shapes(ref: Feeds, new: Feeds) -> None:
    for name, value in ref.items():
        got = new[name]
        if got.shape != value.shape:
            raise VerificationError(_shape_message(name, got.shape, value.shape))
        if got.dtype != value.dtype:
            raise VerificationError(
                f"output '{name}' of the pruned model has type {got.dtype}, "
                f"but the original's is {value.dtype}."
            )


def _aggregate(per_sample: list[dict[str, OutputFidelity]]) -> dict[str, OutputFidelity]:
    result = {}
    for name in per_sample[0] if per_sample else []:
        rows = [sample[name] for sample in per_sample]
        top1 = [r.top1_agreement for r in rows if r.top1_agreement is not None]
        result[name] = OutputFidelity(
            max_abs_error=max(r.max_abs_error for r in rows),
            relative_l2=float(np.mean([r.relative_l2 for r in rows])),
            cosine=float(np.mean([r.cosine for r in rows])),
            top1_agreement=float(np.mean(top1)) if top1 else None,
        )
    return result
