"""Recipes: several passes in a row from one YAML file, verified once against the original model.

A recipe file::

    calib: photos-calib            # optional: given to every step that reads calibration data
    input-shapes: {x: [1, 8]}      # optional: concrete input shapes, for every step and the verification
    samples: 4                     # optional: random input sets for the final verification
    steps:
      - prune-channels: {target-flops: 0.35, criterion: wanda-sp, reconstruct: true}
      - drop-layers: {drop: 1}

Each step is one API function (``PASSES_API``); its options are that function's keyword parameters,
introspected from its signature, spelt with dashes or underscores. Steps run in order, each on the
previous step's in-memory model, without verification or timing; the final model is written atomically
after it has been verified against the original (see ``run_recipe``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
import yaml

from graphprune import api, deploy
from graphprune.allocation import ALLOCATIONS
from graphprune.analysis.groups import PROTECTABLE
from graphprune.calibration import load_calibration
from graphprune.criteria import CRITERIA
from graphprune.errors import GraphpruneError
from graphprune.metrics import ModelStats
from graphprune.verify import VerifyReport, verify

# Parameters the runner sets itself: never a step option.
RUNNER_PARAMS = frozenset({"model", "dense", "output", "progress", "check", "latency_rounds", "external_data",
                           "input_shapes"})
# Recipe-level keys (normalised spelling) and what they are.
RECIPE_KEYS = {"calib": "default calibration data for the steps that take `calib`",
               "input_shapes": "concrete input shapes {NAME: [dims]} for every step and the verification",
               "samples": "random input sets for the final verification (default 4)",
               "steps": "the passes, in order"}
# Per-step report keys left out of the recipe report (large, or empty because steps are not verified).
BULKY = frozenset({"groups", "blocks", "fidelity", "latency", "fidelity_before", "fidelity_after"})
REQUIRED = "<required>"
# The CLI's spellings of API options (normalised), accepted in recipes too.
ALIASES = {"global": "global_rank", "max_ratio": "max_group_ratio"}


@dataclass(frozen=True)
class StepSpec:
    """One recipe step: the API function it calls and the options it fixes itself."""

    name: str
    function: Callable[..., Any]
    summary: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Every option a recipe may give, with its default (``REQUIRED`` when there is none)."""
        return {name: REQUIRED if p.default is inspect.Parameter.empty else p.default
                for name, p in inspect.signature(self.function).parameters.items()
                if name not in RUNNER_PARAMS and name not in self.fixed}

    def annotations(self) -> dict[str, str]:
        return {name: str(p.annotation) for name, p in inspect.signature(self.function).parameters.items()}


PASSES_API: dict[str, StepSpec] = {spec.name: spec for spec in (
    StepSpec("prune-channels", api.optimize, "structured pruning of channels (and any unit kind in `units`)"),
    StepSpec("prune-heads", api.optimize, "structured pruning of attention heads (optimize, units: head)",
             fixed={"units": ("head",)}),
    StepSpec("drop-layers", api.drop_layers, "remove whole residual sub-blocks (FinerCut)"),
    StepSpec("prune-experts", api.prune_experts, "remove whole experts of every MoE layer"),
    StepSpec("prune-tokens", api.prune_tokens, "keep the top tokens by attention after chosen layers (ViT)"),
    StepSpec("sparsify-activations", api.sparsify_activations,
             "TEAL/WINA activation sparsity: MLP blocks become SparseMLP nodes with calibrated thresholds"),
    StepSpec("refit", api.refit, "least-squares refit of linear layers towards the recipe's original model"),
    StepSpec("quantize", deploy.quantize, "int8 through ONNX Runtime: dynamic, or static QDQ on `calib` (mode: qdq)"),
)}


def _norm(key: Any) -> str:
    return str(key).strip().lower().replace("-", "_")


def _dash(key: str) -> str:
    return key.replace("_", "-")


@dataclass
class Step:
    name: str
    options: dict[str, Any]  # as given (normalised names), recipe-level calib applied

    def resolved(self) -> dict[str, Any]:
        """Every option of the step: the given ones over the signature's defaults, fixed ones included."""
        spec = PASSES_API[self.name]
        return {**spec.options(), **spec.fixed, **self.options}


@dataclass
class Recipe:
    steps: list[Step]
    source: str = "<recipe>"
    calib: str | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    samples: int = 4

    def resolved(self) -> list[dict[str, Any]]:
        """The steps with every option filled in from the API defaults, as ``{step: {option: value}}``."""
        return [{step.name: {_dash(k): _plain(v) for k, v in step.resolved().items()}} for step in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.source, "calib": self.calib,
                "input-shapes": {k: list(v) for k, v in (self.input_shapes or {}).items()} or None,
                "samples": self.samples, "steps": self.resolved()}

    def to_yaml(self) -> str:
        """The resolved recipe as a file `graphprune run --recipe` reads back (its source as a comment)."""
        body = {k: v for k, v in self.to_dict().items() if k != "recipe"}
        return f"# resolved from {self.source}\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    """YAML-safe: tuples as lists, paths as strings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------- loading and validation ----------


def _fail(where: str, message: str) -> GraphpruneError:
    return GraphpruneError(f"{where}: {message}")


def _check_value(where: str, option: str, value: Any, default: Any, annotation: str) -> Any:
    """Light type checks from the signature (the API checks ranges); lists become tuples where the API
    takes tuples."""
    if value is None:
        if "None" in annotation:
            return None
        raise _fail(where, f"option '{_dash(option)}' cannot be empty (null).")
    kinds = {part.strip() for part in annotation.replace("[", "|").replace("]", "|").replace(",", "|").split("|")}
    if isinstance(default, tuple) or "tuple" in annotation.split("[")[0] and "list" not in annotation:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(where, f"option '{_dash(option)}' takes a list of names, e.g. [a, b]: got {value!r}.")
        return tuple(value)
    if annotation.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise _fail(where, f"option '{_dash(option)}' takes a list: got {value!r}.")
        return value
    accepted = []
    if "bool" in kinds:
        accepted.append(bool)
    if "int" in kinds:
        accepted.append(int)
    if "float" in kinds:
        accepted += [float, int]
    if "str" in kinds or "os.PathLike" in kinds:
        accepted.append(str)
    if not accepted:
        return value
    is_bool = isinstance(value, bool)
    if is_bool and bool not in accepted or not is_bool and not isinstance(value, tuple(t for t in accepted
                                                                                        if t is not bool)):
        names = " or ".join(sorted({t.__name__ for t in accepted}))
        raise _fail(where, f"option '{_dash(option)}' takes {names}: got {value!r}.")
    return value


def _parse_shapes(where: str, value: Any) -> dict[str, tuple[int, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
            for dims in value.values()):
        raise _fail(where, "'input-shapes' must map each input name to a list of dims, e.g. {x: [1, 3, 224, 224]}.")
    return {str(name): tuple(dims) for name, dims in value.items()}


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """A Recipe from parsed YAML; every structural problem is one GraphpruneError naming ``source``."""
    if not isinstance(data, dict):
        raise _fail(source, "a recipe is a mapping with a 'steps' list, e.g. 'steps: [{drop-layers: {drop: 1}}]'.")
    top = {_norm(k): v for k, v in data.items()}
    unknown = sorted(set(top) - set(RECIPE_KEYS))
    if unknown:
        raise _fail(source, f"unknown key '{_dash(unknown[0])}'; a recipe has {', '.join(map(_dash, RECIPE_KEYS))}.")
    calib = top.get("calib")
    if calib is not None and not isinstance(calib, str):
        raise _fail(source, f"'calib' must be a calibration spec (a path or a set name): got {calib!r}.")
    samples = top.get("samples", 4)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise _fail(source, f"'samples' must be 1 or more: got {samples!r}.")
    shapes = _parse_shapes(source, top.get("input_shapes"))
    raw = top.get("steps")
    if not isinstance(raw, list) or not raw:
        raise _fail(source, "the recipe has no steps; give 'steps:' as a non-empty list, e.g. "
                            "'steps: [{drop-layers: {drop: 1}}]'.")
    steps = []
    for k, item in enumerate(raw, 1):
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise _fail(f"{source}, step {k}", "each step is one mapping '- STEP: {option: value, ...}'; "
                                               f"got {item!r}.")
        (key, options), = item.items()
        name = str(key).strip().lower().replace("_", "-")
        where = f"{source}, step {k} ({name})"
        if name not in PASSES_API:
            raise _fail(f"{source}, step {k}", f"unknown step '{key}'; choose from {', '.join(PASSES_API)}.")
        spec = PASSES_API[name]
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise _fail(where, f"options are a mapping '{{option: value, ...}}': got {options!r}.")
        valid, annotations = spec.options(), spec.annotations()
        given: dict[str, Any] = {}
        for raw_option, value in options.items():
            option = _norm(raw_option)
            option = ALIASES.get(option, option) if option not in valid else option
            if option not in valid:
                raise _fail(where, f"unknown option '{raw_option}'; valid options: "
                                   f"{', '.join(_dash(o) for o in valid)}.")
            given[option] = _check_value(where, option, value, valid[option], annotations[option])
        if calib is not None and "calib" in valid and "calib" not in given:
            given["calib"] = calib
        missing = [o for o, default in valid.items() if default == REQUIRED and o not in given]
        if missing:
            raise _fail(where, f"option '{_dash(missing[0])}' is required"
                        + (" (or a recipe-level 'calib')." if missing[0] == "calib" else "."))
        steps.append(Step(name, given))
    return Recipe(steps, source, calib, shapes, samples)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file (see the module docstring for the format)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise GraphpruneError(f"{source}: no such recipe file; give the path of a .yaml recipe.") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
        raise GraphpruneError(f"{source}: cannot read the recipe ({type(err).__name__}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise GraphpruneError(f"{source}: is not valid YAML{at} ({problem}).") from None
    return parse_recipe(data, source)


# ---------- checking without running ----------


class _WorkBegins(Exception):
    """Raised by check_step's progress: the step's function has passed its own checks."""


def _stop_at_work(text: str) -> AbstractContextManager[Any]:
    raise _WorkBegins(text)


# Choices of api.optimize's options that a real run rejects only once the work has begun (scoring,
# allocating, planning), with the sentences it rejects them with.
_CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "criterion": (CRITERIA, "unknown criterion '{}': choose one of {}."),
    "allocation": (ALLOCATIONS, "unknown allocation '{}': choose one of {}."),
    "protect": (PROTECTABLE, "--protect: unknown role '{}'; choose from {}."),
}


def check_step(step: Step, model: api.ModelInput,
               input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """The checks a real run of ``step`` makes, without its work: the values of its choice options, its API
    function's own checks, which every pass function makes before its first progress step ("Loading") and
    is stopped at, and that its calibration data exists (load_calibration, contents unread). Raises the
    GraphpruneError the run would."""
    spec, options = PASSES_API[step.name], step.resolved()
    if spec.function is api.optimize:
        for option, (choices, sentence) in _CHOICES.items():
            values = options[option] if isinstance(options[option], tuple) else (options[option],)
            for value in values:
                if value not in choices:
                    raise GraphpruneError(sentence.format(value, ", ".join(choices)))
    args: tuple[Any, ...] = (model, model) if step.name == "refit" else (model,)
    kwargs = {**options, "input_shapes": input_shapes, "check": False, "progress": _stop_at_work}
    if step.name != "refit":
        kwargs["latency_rounds"] = 0
    try:
        spec.function(*args, **kwargs)
        raise AssertionError(f"{step.name}: its API function ran without a progress step")  # each has one
    except _WorkBegins:
        pass
    if options.get("calib") is not None:
        load_calibration(options["calib"], (), options.get("calib_batch_size", 8),
                         max_batches=options.get("calib_batches"))


def check_recipe(recipe: Recipe, model: api.ModelInput) -> None:
    """check_step for every step, its errors naming the recipe and the step as run_recipe's do."""
    for k, item in enumerate(recipe.steps, 1):
        try:
            check_step(item, model, recipe.input_shapes)
        except GraphpruneError as err:
            raise GraphpruneError(f"{recipe.source}, step {k} ({item.name}): {err}") from None


# ---------- running ----------

Progress = Callable[[str], AbstractContextManager[Any]]


@dataclass
class RecipeResult:
    model: ir.Model
    steps: list[dict[str, Any]]  # {"step", "options", "summary"}, in order
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None
    recipe: dict[str, Any] = field(default_factory=dict)
    verified_with: str = "verify"  # or "verify_tokens" when a step cut tokens

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "steps": self.steps, "before": self.before.to_dict(),
                "after": self.after.to_dict(),
                "fidelity": self.verification.to_dict() if self.verification else None,
                "verified_with": self.verified_with}


def _compose_resized(changes: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Interface resizes of several steps as one change against the original: kept positions of a later
    step index into the earlier step's kept positions."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for step_changes in changes:
        for change in step_changes:
            key = (change["value"], change["axis"])
            if key in merged:
                first = merged[key]
                kept = [first["kept"][i] for i in change["kept"]]
                merged[key] = {**change, "before": first["before"], "kept": kept}
            else:
                merged[key] = dict(change)
    return list(merged.values())


def _summary(result: Any) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k not in BULKY}


def run_recipe(model: api.ModelInput, recipe: Recipe, output: str | os.PathLike | None = None,
               progress: Progress | None = None) -> RecipeResult:
    """Run ``recipe``'s steps in order, each on the previous step's model (steps unverified, untimed),
    then verify the final model against ``model`` and (if ``output`` is given) write it atomically.

    Verification uses verify.verify with the composed interface resizes of the steps (KV caches), or
    api.verify_tokens (comparable outputs only) when a prune-tokens step is in the recipe. A step's
    GraphpruneError is re-raised naming the recipe and the step; every step's options are checked
    (check_recipe) before the first step runs.
    """
    api._check_output(model, output)
    check_recipe(recipe, model)
    step = progress or (lambda _: nullcontext())
    shapes = recipe.input_shapes
    current: api.ModelInput = model
    summaries: list[dict[str, Any]] = []
    resized: list[list[dict[str, Any]]] = []
    before: ModelStats | None = None
    tokens_cls: bool | None = None
    n = len(recipe.steps)
    for k, item in enumerate(recipe.steps, 1):
        spec = PASSES_API[item.name]
        options = item.resolved()
        label = f"[{k}/{n} {item.name}] "

        def sub(text: str, label: str = label) -> AbstractContextManager[Any]:
            return step(label + text)

        sub.count = getattr(step, "count", None)  # type: ignore[attr-defined]  # batch counts pass through

        kwargs = {**options, "input_shapes": shapes, "check": False, "progress": sub}
        if item.name != "refit":
            kwargs["latency_rounds"] = 0
            args: tuple[Any, ...] = (current,)
        else:
            args = (current, model)
        try:
            result = spec.function(*args, **kwargs)
        except GraphpruneError as err:
            raise GraphpruneError(f"{recipe.source}, step {k} ({item.name}): {err}") from None
        if before is None and hasattr(result, "before") and isinstance(result.before, ModelStats):
            before = result.before
        if getattr(result, "resized", None):
            resized.append(result.resized)
        if item.name == "prune-tokens":
            tokens_cls = options.get("cls", True) if tokens_cls is None else tokens_cls and options.get("cls", True)
        summaries.append({"step": item.name, "options": {_dash(o): _plain(v) for o, v in options.items()},
                          "summary": _summary(result)})
        current = result.model
    if before is None:  # a recipe of refit steps only: count the original
        before = api._load_counted(model, shapes)[3]
    changes = _compose_resized(resized)
    if tokens_cls is not None and changes:
        raise GraphpruneError(f"{recipe.source}: a prune-tokens step together with a step that resizes graph "
                              "inputs (KV caches) cannot be verified; run them as separate commands.")
    original = api._load(model)[2]
    if tokens_cls is not None:
        def check(staged: Path) -> VerifyReport:
            return api.verify_tokens(original, staged, cls=bool(tokens_cls), samples=recipe.samples,
                                     input_shapes=shapes)
    else:
        def check(staged: Path) -> VerifyReport:
            return verify(original, staged, overrides=shapes, samples=recipe.samples, resized=changes)
    report, after, _ = api._write_checked(current, original, output, step, external_data=None, check=check,
                                          input_shapes=shapes, seed=0, latency_rounds=0, resized=changes)
    return RecipeResult(current, summaries, before, after, report, recipe.to_dict(),
                        "verify_tokens" if tokens_cls is not None else "verify")
