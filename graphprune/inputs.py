"""Input signatures and deterministic synthetic input data for a model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from graphprune.errors import GraphpruneError
from graphprune.runtime import ModelLike, load_structure

Dim = int | str | None

SEQ_DEFAULT = 16
_INT_HIGH = 100  # random token ids stay below any realistic vocabulary size
_SHAPE_ITEM = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None  # None when the rank itself is unknown


def input_specs(model: ModelLike) -> list[InputSpec]:
    graph = load_structure(model).graph
    initializers = {t.name for t in graph.initializer}
    return [_spec(vi) for vi in graph.input if vi.name not in initializers]


def _spec(vi: onnx.ValueInfoProto) -> InputSpec:
    if not vi.type.HasField("tensor_type"):
        raise GraphpruneError(f"input '{vi.name}' is not a tensor; graphprune only handles tensor inputs.")
    tensor = vi.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError) as exc:
        raise GraphpruneError(f"input '{vi.name}' has no usable element type ({tensor.elem_type}).") from exc
    if not tensor.HasField("shape"):
        return InputSpec(vi.name, dtype, None)
    return InputSpec(vi.name, dtype, tuple(_dim(d) for d in tensor.shape.dim))


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value") and dim.dim_value > 0:  # paddle2onnx writes -1 for dynamic
        return dim.dim_value
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


def default_dim(symbol: str | None, batch: int = 1, dim_defaults: Mapping[str, int] | None = None) -> int:
    if symbol is None:
        return 1
    if dim_defaults and symbol in dim_defaults:
        return int(dim_defaults[symbol])
    low = symbol.lower()
    if "batch" in low or low in {"n", "b", "bs"}:
        return batch
    if any(word in low for word in ("seq", "length", "time")):
        return SEQ_DEFAULT
    return 1


def resolve_shape(
    spec: InputSpec,
    override: tuple[int, ...] | None = None,
    batch: int = 1,
    dim_defaults: Mapping[str, int] | None = None,
) -> tuple[int, ...]:
    if override is not None:
        _check_override(spec, tuple(int(d) for d in override))
        return tuple(int(d) for d in override)
    if spec.shape is None:
        raise GraphpruneError(
            f"input '{spec.name}' has no declared shape: give one, for example {spec.name}:1x3x224x224."
        )
    dims = [d if isinstance(d, int) else default_dim(d, batch, dim_defaults) for d in spec.shape]
    if _looks_like_image(spec):
        # An image with run-time height and width: 1x1 breaks strided convs, 224 is the common size.
        for axis in (2, 3):
            if not isinstance(spec.shape[axis], int) and (dim_defaults is None or spec.shape[axis] not in dim_defaults):
                dims[axis] = IMAGE_DEFAULT
    return tuple(dims)


IMAGE_DEFAULT = 224


def _looks_like_image(spec: InputSpec) -> bool:
    return (spec.shape is not None and len(spec.shape) == 4 and spec.shape[1] in (1, 3, 4)
            and spec.dtype.kind == "f")


def _check_override(spec: InputSpec, shape: tuple[int, ...]) -> None:
    if spec.shape is None:
        return
    declared = "x".join(str(d) if d is not None else "?" for d in spec.shape)
    given = "x".join(map(str, shape))
    if len(shape) != len(spec.shape):
        raise GraphpruneError(
            f"the shape {given} given for input '{spec.name}' has rank {len(shape)}, "
            f"but the model declares rank {len(spec.shape)} ({declared})."
        )
    for want, got in zip(spec.shape, shape, strict=True):
        if isinstance(want, int) and want != got:
            raise GraphpruneError(
                f"the shape {given} given for input '{spec.name}' does not fit its fixed shape {declared}."
            )


def resolve_shapes(
    model: ModelLike,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    batch: int = 1,
    dim_defaults: Mapping[str, int] | None = None,
    strict: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input: overrides first, then the default dim rules.

    With strict=False, inputs of unknown rank and no override are left out instead of raising.
    """
    specs = input_specs(model)
    if not strict:
        specs = [s for s in specs if s.shape is not None or s.name in (overrides or {})]
    return _resolve_all(specs, overrides, batch, dim_defaults)


def _resolve_all(
    specs: list[InputSpec],
    overrides: Mapping[str, tuple[int, ...]] | None,
    batch: int,
    dim_defaults: Mapping[str, int] | None,
) -> dict[str, tuple[int, ...]]:
    overrides = overrides or {}
    _check_override_names(specs, overrides)
    return {s.name: resolve_shape(s, overrides.get(s.name), batch, dim_defaults) for s in specs}


def _check_override_names(specs: list[InputSpec], overrides: Mapping[str, object]) -> None:
    names = {s.name for s in specs}
    unknown = [name for name in overrides if name not in names]
    if unknown:
        known = ", ".join(s.name for s in specs) or "none"
        raise GraphpruneError(
            f"the model has no input named {', '.join(repr(n) for n in unknown)} (its inputs: {known})."
        )


def make_inputs(
    model: ModelLike,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    batch: int = 1,
    seed: int = 0,
    dim_defaults: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    specs = input_specs(model)
    shapes = _resolve_all(specs, overrides, batch, dim_defaults)
    rng = np.random.default_rng(seed)
    return {spec.name: _fill(spec, shapes[spec.name], rng) for spec in specs}


def random_feeds(model: ModelLike, count: int, overrides: Mapping[str, tuple[int, ...]] | None,
                 seed: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """``count`` random input sets (seeds ``seed``, ``seed + 1``, ...) for passes that measure the model
    without calibration data, and a description of them for the user."""
    count = max(count, 1)
    feeds = [make_inputs(model, overrides=overrides, seed=seed + k) for k in range(count)]
    return feeds, (f"random inputs, no calibration data: {count} set(s) of standard normal floats, token ids "
                   "below 100 and all-ones masks")


def _fill(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype, name = spec.dtype, spec.name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if dtype in (np.float16, np.float32, np.float64):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype=dtype)
        if "position" in name:
            last = shape[-1] if shape else 1
            return np.broadcast_to(np.arange(last, dtype=dtype), shape).copy()
        if "type" in name:
            # token_type_ids index a tiny embedding table (often 2 rows): random ids would be out of range.
            return np.zeros(shape, dtype=dtype)
        return rng.integers(0, _INT_HIGH, size=shape).astype(dtype)
    raise GraphpruneError(
        f"cannot generate data for input '{spec.name}' of type {dtype}: pass the input data explicitly."
    )


def parse_shape_overrides(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ["input:1x3x224x224", ...]; the last ':' splits, so names like 'x:0' work."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, text = item.strip().rpartition(":")
        text = text.strip().lower()
        if not sep or not name:
            raise GraphpruneError(
                f"bad shape '{item}': write it as NAME:DIMS, for example input:1x3x224x224."
            )
        if not _SHAPE_ITEM.match(text):
            raise GraphpruneError(
                f"bad shape '{item}': dims must be non-negative integers joined by 'x', "
                "for example input:1x3x224x224."
            )
        if name in shapes:
            raise GraphpruneError(f"input '{name}' is given a shape twice.")
        shapes[name] = tuple(int(d) for d in text.split("x"))
    return shapes
