"""Deployment: ONNX Runtime's ORT format with its mobile usability check, and int8 quantization.

``export_ort`` converts with onnxruntime.tools.convert_onnx_models_to_ort (input shapes made fixed first
only when asked, with onnxruntime.tools.onnx_model_utils), loads the .ort file in ONNX Runtime and compares
its outputs with the ONNX model's, and runs ONNX Runtime's mobile usability check (``mobile_usability``).
``quantize`` is a pass like the others (verified, counted, a recipe step): int8 through
onnxruntime.quantization, dynamic (weights int8, activations quantized at run time) or static QDQ (activation
ranges measured on calibration data).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune import api
from graphprune.calibration import _split, declared_fixed_batch
from graphprune.errors import GraphpruneError, VerificationError
from graphprune.inputs import make_inputs
from graphprune.io import EXTERNAL_DATA_THRESHOLD, weight_bytes, write_model
from graphprune.metrics import ModelStats, file_size
from graphprune.runtime import first_line, is_oversized, make_session, run_session
from graphprune.verify import VerifyReport, _aggregate, fidelity, verify

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")
OPTIMIZATION_STYLES = ("fixed", "runtime")
TARGET_PLATFORMS = ("arm", "amd64")
# ONNX Runtime's mobile checker: the execution providers it judges, and the ops lists it judges them by.
MOBILE_EPS = {"NNAPI": None, "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
              "CoreML MLProgram": "coreml_supported_mlprogram_ops.md"}

MODES = ("dynamic", "qdq")
QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Ops the quantizers write: counted in the report to show what was quantized.
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul")


def _ort_tools_quiet() -> contextlib.ExitStack:
    """ONNX Runtime's tools print progress to stdout, log through `logging` and let sessions warn on stderr:
    keep all three off the CLI's output (their failures still raise)."""
    import onnxruntime

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, previous)
    onnxruntime.set_default_logger_severity(3)
    stack.callback(onnxruntime.set_default_logger_severity, 2)  # ORT's default: warnings
    return stack


def _proto(model: api.ModelInput) -> onnx.ModelProto:
    """The model as given (a file is read with its external weights), not prepared: ORT optimises it itself."""
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return onnx.load(os.fspath(model))
    except Exception as exc:
        raise GraphpruneError(f"cannot read '{os.fspath(model)}' as an ONNX model: {first_line(exc)}") from exc


def _save(proto: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(proto, os.fspath(path), save_as_external_data=is_oversized(proto),
                    location=f"{path.name}.data")


# ---------- fixed shapes ----------


def fix_shapes(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None,
               dims: Mapping[str, int] | None = None) -> None:
    """Make inputs static in place (onnxruntime.tools.onnx_model_utils): ``shapes`` whole input shapes by
    input name, ``dims`` symbolic dims by name (``batch=1``); output shapes follow where inference can."""
    from onnxruntime.tools.onnx_model_utils import (
        fix_output_shapes,
        make_dim_param_fixed,
        make_input_shape_fixed,
    )

    symbols = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    for param, value in (dims or {}).items():
        if param not in symbols:
            raise GraphpruneError(f"--fix-dim {param}={value}: no input has a symbolic dim '{param}' (the inputs' "
                                  f"symbolic dims: {', '.join(sorted(symbols)) or 'none'}).")
        if value < 1:
            raise GraphpruneError(f"--fix-dim {param}={value}: a fixed dim must be 1 or more.")
        make_dim_param_fixed(proto.graph, param, value)
    for name, shape in (shapes or {}).items():
        if any(d < 1 for d in shape):
            raise GraphpruneError(f"--fix-shape {name}: every dim of a fixed shape must be 1 or more: got "
                                  f"{'x'.join(map(str, shape))}.")
        try:
            make_input_shape_fixed(proto.graph, name, list(shape))
        except ValueError as err:
            raise GraphpruneError(f"--fix-shape {name}:{'x'.join(map(str, shape))}: {err}.") from None
    if shapes or dims:
        # Outputs become static where ONNX shape inference can tell; a model it cannot check keeps them.
        with contextlib.suppress(onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            fix_output_shapes(proto)


def input_shapes_of(proto: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Each graph input's shape: ints where static, the symbol (or None) where not."""
    initializers = {t.name for t in proto.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input if i.name not in initializers}


# ---------- the mobile usability check ----------


def mobile_usability(model: str | os.PathLike) -> dict[str, Any]:
    """ONNX Runtime's mobile usability check (onnxruntime.tools.check_onnx_model_mobile_usability) as data.

    As the tool does, the model is first optimised at the basic level (what the ORT-format conversion
    applies), then shape-inferred; each of NNAPI, CoreML NeuralNetwork and CoreML MLProgram gets ORT's
    verdict (YES / MAYBE / NO: worth trying instead of the CPU EP) from its partitioning of the graph, and,
    where inputs are dynamic and the verdict is not YES, the verdict with the shapes fixed. A model the
    check cannot read gets ``{"error": ...}``: the check advises, it never blocks an export.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    try:
        with tempfile.TemporaryDirectory(prefix="graphprune-mobile-") as tmp, _ort_tools_quiet():
            optimized = Path(tmp) / "model.onnx"
            optimize_model(Path(model), optimized, use_external_initializers=True)
            shaped = ModelProtoWithShapeInfo(optimized).model_with_shape_info
            dynamic, dynamic_values = checker.check_shapes(shaped.graph, logging.getLogger("graphprune.mobile"))
            eps = {name: _ep_verdict(checker, shaped, name, ops, bool(dynamic)) for name, ops in MOBILE_EPS.items()}
    except Exception as exc:  # noqa: BLE001 -- the check advises: any failure of it is reported, not raised
        return {"error": first_line(exc)}
    worth_trying = any(v["suitability"] != "NO" or v.get("with_fixed_shapes", "NO") != "NO" for v in eps.values())
    fixing_helps = any(_RANK[v.get("with_fixed_shapes", "NO")] > _RANK[v["suitability"]] for v in eps.values())
    return {
        "dynamic_inputs": [i.name for i in dynamic],
        "dynamic_values": dynamic_values,
        "execution_providers": eps,
        "nnapi_or_coreml_worth_trying": worth_trying,
        "fixed_shapes_would_help": fixing_helps,
        "recommendation": _recommendation(worth_trying, fixing_helps),
    }


_RANK = {"NO": 0, "MAYBE": 1, "YES": 2}


def _ep_verdict(checker: Any, shaped: onnx.ModelProto, name: str, ops: str | None, dynamic: bool
                ) -> dict[str, Any]:
    def partitions(require_fixed: bool) -> Any:
        if ops is None:
            return checker.check_nnapi_partitions(shaped, require_fixed)
        return checker.check_coreml_partitions(shaped, require_fixed, ops)

    info = partitions(True)
    verdict = {"suitability": info.suitability().name, "nodes": info.num_nodes,
               "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions,
               "unsupported_ops": sorted(info.unsupported_ops),
               "nodes_unsupported_due_to_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
               "nodes_unsupported_due_to_rank": info.num_unsupported_nodes_due_to_rank}
    if dynamic and verdict["suitability"] != "YES":
        verdict["with_fixed_shapes"] = partitions(False).suitability().name
    return verdict


def _recommendation(worth_trying: bool, fixing_helps: bool) -> str:
    if not worth_trying:
        return "use the CPU execution provider: NNAPI and CoreML would run too little of this model."
    if fixing_helps:
        return ("NNAPI or CoreML may help once the input shapes are fixed (--fix-shape / --fix-dim); compare "
                "them with the CPU execution provider on the device.")
    return "NNAPI or CoreML may help: compare them with the CPU execution provider on the device."


# ---------- ORT-format export ----------


@dataclass
class OrtExportResult:
    settings: dict[str, Any]
    input_shapes: dict[str, list[int | str | None]]  # the exported model's inputs
    mobile: dict[str, Any]  # mobile_usability of the converted ONNX model
    verification: VerifyReport | None  # the .ort file against the ONNX model, on the same inputs
    onnx_bytes: int
    ort_bytes: int
    required_operators: list[str] = field(default_factory=list)  # ORT's reduced-build config lines

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "input_shapes": self.input_shapes, "mobile": self.mobile,
                "fidelity": self.verification.to_dict() if self.verification else None,
                "onnx_bytes": self.onnx_bytes, "ort_bytes": self.ort_bytes,
                "required_operators": self.required_operators}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def export_ort(
    model: api.ModelInput,
    output: str | os.PathLike,
    *,
    fix_shape: Mapping[str, Sequence[int]] | None = None,
    fix_dim: Mapping[str, int] | None = None,
    optimization: str = "all",
    style: str = "fixed",
    target_platform: str = "arm",
    check: bool = True,
    mobile_check: bool = True,
    samples: int = 4,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: api.Progress | None = None,
) -> OrtExportResult:
    """Write ``model`` in ONNX Runtime's ORT format (the format of ORT Mobile and minimal builds).

    ``fix_shape`` / ``fix_dim``: make inputs static first (whole shapes by input name / symbolic dims by
    name); dynamic shapes stay dynamic otherwise. ``optimization``: the graph optimisation level baked in
    (ORT's default "all"); ``style``: "fixed" (optimisations applied now, for the CPU EP) or "runtime"
    (saved, replayed at load time: for NNAPI/CoreML); ``target_platform``: "arm" lets QDQ models keep int8
    kernels, "amd64" keeps x86-only layout optimisations. ``check``: load the .ort file in ONNX Runtime and
    compare its outputs with ``model``'s on ``samples`` random input sets (``input_shapes``: their dynamic
    dims). ``mobile_check``: run mobile_usability on the model converted. The input is never modified;
    the .ort file is written atomically.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    for option, value, choices in (("--optimization", optimization, OPTIMIZATION_LEVELS),
                                   ("--style", style, OPTIMIZATION_STYLES),
                                   ("--target-platform", target_platform, TARGET_PLATFORMS)):
        if value not in choices:
            raise GraphpruneError(f"{option} '{value}': choose from {', '.join(choices)}.")
    output = Path(output)
    if output.suffix.lower() != ".ort":
        raise GraphpruneError(f"{output}: an ORT-format file must end in .ort (ONNX Runtime tells the format "
                              "by the extension); choose another name.")
    api._check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        proto = _proto(model)
        fix_shapes(proto, fix_shape, fix_dim)
    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else proto.graph.name or "<model>"
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".graphprune-") as staging:
        source = Path(staging) / "src" / f"{output.stem}.onnx"
        source.parent.mkdir()
        _save(proto, source)
        converted = Path(staging) / "out"
        with step(f"Converting to the ORT format (optimisation {optimization}, {style})"), _ort_tools_quiet(), \
                _env("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", optimization):
            try:
                convert_onnx_models_to_ort(source, output_dir=converted,
                                           optimization_styles=[OptimizationStyle[style.capitalize()]],
                                           target_platform=target_platform)
            except Exception as exc:
                raise GraphpruneError(f"{label}: ONNX Runtime cannot convert it to the ORT format: "
                                      f"{first_line(exc)}") from exc
        staged = next(converted.glob("*.ort"))
        config = next(converted.glob("*.config"), None)
        operators = [line for line in config.read_text().splitlines()
                     if line and not line.startswith("#")] if config else []
        report = None
        if check:
            with step("Comparing the .ort file with the ONNX model"):
                reference = ir.to_proto(model) if isinstance(model, ir.Model) else model
                report = compare_ort(reference, staged, source, samples, input_shapes)
        mobile = {}
        if mobile_check:
            with step("Running ONNX Runtime's mobile usability check"):
                mobile = mobile_usability(source)
        ort_bytes = staged.stat().st_size
        onnx_bytes = file_size(model) if isinstance(model, (str, os.PathLike)) else proto.ByteSize()
        os.replace(staged, output)
    settings = {"model": label, "output": os.fspath(output), "optimization": optimization, "style": style,
                "target_platform": target_platform,
                "fix_shape": {k: list(v) for k, v in (fix_shape or {}).items()}, "fix_dim": dict(fix_dim or {})}
    return OrtExportResult(settings, input_shapes_of(proto), mobile, report, onnx_bytes, ort_bytes, operators)


def compare_ort(reference: api.ModelInput, ort_file: Path, shapes_from: Path, samples: int = 4,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> VerifyReport:
    """The .ort file and the ONNX model on the same random inputs, shaped as ``shapes_from`` declares."""
    ref_session = make_session(reference, label="the ONNX model")
    ort_session = make_session(ort_file, label=f"the ORT-format model ({ort_file.name})")
    ref_names = sorted(o.name for o in ref_session.get_outputs())
    if ref_names != sorted(o.name for o in ort_session.get_outputs()):
        raise VerificationError(f"the ORT-format model's outputs differ from the ONNX model's ({', '.join(ref_names)}).")
    per_sample = []
    for seed in range(max(samples, 1)):
        feeds = make_inputs(shapes_from, overrides=input_shapes, seed=seed)
        per_sample.append(fidelity(run_session(ref_session, feeds, "the ONNX model"),
                                   run_session(ort_session, feeds, "the ORT-format model")))
    return VerifyReport(samples=len(per_sample), outputs=_aggregate(per_sample))


# ---------- quantization ----------


@dataclass
class QuantizeResult:
    model: ir.Model
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None  # on random inputs, as every pass
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # quantization ops written, by op type
    weights: dict[str, int] = field(default_factory=dict)  # initializer elements: int8/uint8 vs float
    calib_verification: VerifyReport | None = None  # on calibration batches (qdq with check)

    def to_dict(self) -> dict[str, Any]:
        return {**api._outcome(self), "quantization_nodes": self.nodes, "weights": self.weights,
                "fidelity_calib": self.calib_verification.to_dict() if self.calib_verification else None}


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over graphprune's calibration set, split into the
    model's fixed batch size where it has one."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], fixed: int | None) -> None:
        self._batches, self._fixed = batches, fixed
        self._chunks: Iterator[dict[str, np.ndarray]] | None = None
        self.runs = self.samples = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._chunks is None:
            self._chunks = (chunk for feeds in self._batches for chunk in _split(feeds, self._fixed))
        chunk = next(self._chunks, None)
        if chunk is not None:
            self.runs += 1
            self.samples += max((array.shape[0] for array in chunk.values() if array.ndim), default=1)
        return chunk


def _preprocess(source: Path, target: Path, enabled: bool, external: bool) -> tuple[Path, str]:
    """onnxruntime.quantization's quant_pre_process (symbolic shapes, basic ORT optimisation, ONNX shapes);
    without symbolic shape inference where that fails. Returns the model to quantize and what ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not enabled:
        return source, "off"
    for skip_symbolic, how in ((False, "full"), (True, "without symbolic shape inference")):
        with contextlib.suppress(Exception), _ort_tools_quiet():
            # ORT's symbolic shape inference fails in many ways on exports it does not know: retry without it.
            quant_pre_process(os.fspath(source), os.fspath(target), skip_symbolic_shape=skip_symbolic,
                              save_as_external_data=external)
            return target, how
    return source, "failed, quantized as written"


def quantize(
    model: api.ModelInput,
    output: str | os.PathLike | None = None,
    *,
    mode: str = "dynamic",
    calib: str | os.PathLike | None = None,
    calib_batches: int | None = None,
    calib_batch_size: int = 8,
    calibrate_method: str = "minmax",
    per_channel: bool = False,
    weight_type: str = "int8",
    activation_type: str = "uint8",
    reduce_range: bool = False,
    op_types: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    preprocess: bool = True,
    check: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: api.Progress | None = None,
) -> QuantizeResult:
    """Quantize to int8 with onnxruntime.quantization, verify against the original, save atomically.

    ``mode``: "dynamic" (quantize_dynamic: int8 weights, activations quantized at run time; no data) or
    "qdq" (quantize_static in the QDQ format: activation ranges measured on ``calib`` by
    ``calibrate_method``; ``calib`` is then required, calibration.load_calibration as for optimize).
    ``weight_type`` / ``activation_type`` (qdq only: dynamic activations are always uint8): int8 or uint8.
    ``per_channel``: one scale per output channel of each weight. ``op_types``: quantize only these op
    types; ``exclude``: node names left in float. ``preprocess``: ORT's quant_pre_process first (shape
    inference and basic optimisation, as ORT recommends). Verification: ``samples`` random input sets,
    and with qdq also the first ``samples`` calibration batches (``calib_verification``).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in MODES:
        raise GraphpruneError(f"--mode '{mode}': choose from {', '.join(MODES)}.")
    for option, value, choices in (("--weight-type", weight_type, QUANT_TYPES),
                                   ("--activation-type", activation_type, QUANT_TYPES),
                                   ("--calibrate-method", calibrate_method, CALIBRATION_METHODS)):
        if value not in choices:
            raise GraphpruneError(f"{option} '{value}': choose from {', '.join(choices)}.")
    if mode == "qdq" and calib is None:
        raise GraphpruneError("--mode qdq quantizes activations with ranges measured on calibration data: give "
                              "--calib SPEC (an .npz/.npy file, a folder of them, or a named set such as "
                              "photos-calib), or use --mode dynamic.")
    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    api._check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = api._load_counted(model, input_shapes)
    calibration = (api._calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
                   if mode == "qdq" and calib is not None else None)
    external = weight_bytes(loaded) > EXTERNAL_DATA_THRESHOLD
    options = {"per_channel": per_channel, "reduce_range": reduce_range,
               "weight_type": QuantType[QUANT_TYPES[weight_type]], "op_types_to_quantize": list(op_types) or None, "nodes_to_exclude": list(exclude) or None,
               "use_external_data_format": external}
    # The histogram calibrators stack each tensor over the runs: every run must hold as many samples.
    runs_of = declared_fixed_batch(loaded) or (None if calibrate_method == "minmax" else 1)
    reader = _Reader(calibration, runs_of) if calibration is not None else None
    with tempfile.TemporaryDirectory(prefix="graphprune-quantize-") as tmp:
        source = Path(tmp) / "float.onnx"
        write_model(loaded, source, external)
        with step("Preparing for quantization (shape inference, basic optimisation)"):
            prepared, how = _preprocess(source, Path(tmp) / "prepared.onnx", preprocess, external)
        quantized_path = Path(tmp) / "quantized.onnx"
        what = "dynamic" if mode == "dynamic" else f"static QDQ, calibrating on {os.fspath(calib)}"
        with step(f"Quantizing ({what})"):
            try:
                with _ort_tools_quiet():
                    if reader is None:
                        quantize_dynamic(prepared, quantized_path, **options)
                    else:
                        quantize_static(prepared, quantized_path, reader, quant_format=QuantFormat.QDQ,
                                        activation_type=QuantType[QUANT_TYPES[activation_type]],
                                        calibrate_method=getattr(CalibrationMethod,
                                                                 CALIBRATION_METHODS[calibrate_method]),
                                        **options)
            except GraphpruneError:
                raise
            except Exception as exc:
                raise GraphpruneError(f"{label}: ONNX Runtime's quantizer failed: {first_line(exc)}") from exc
        if reader is not None and reader.runs == 0:
            raise GraphpruneError(f"--calib {os.fspath(calib)}: the calibration data holds no samples.")
        quantized = ir.from_proto(onnx.load(os.fspath(quantized_path)))  # weights in memory: tmp goes away
    nodes = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(quantized.graph)
                    if node.op_type in QUANT_OPS)
    weights = _weight_elements(quantized)
    calib_reports: list[VerifyReport] = []

    def check_staged(staged: Path) -> VerifyReport:
        if calibration is not None:  # random inputs can fall outside the calibrated ranges: real data too
            chunks = (chunk for batch in calibration for chunk in _split(batch, declared_fixed_batch(loaded)))
            calib_reports.append(verify(original, staged, inputs=list(itertools.islice(chunks, samples))))
        return verify(original, staged, overrides=input_shapes, samples=samples)

    report, after, speed = api._write_checked(
        quantized, original, output, step, external_data=external_data, check=check_staged if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds)
    settings = {"model": label, "mode": mode, "calib": None if calib is None else os.fspath(calib),
                "calib_batches": calib_batches, "calib_batch_size": calib_batch_size,
                "calibration_samples": reader.samples if reader is not None else 0,
                "calibration_runs": reader.runs if reader is not None else 0,
                "calibrate_method": calibrate_method if mode == "qdq" else None, "per_channel": per_channel,
                "weight_type": weight_type, "activation_type": activation_type if mode == "qdq" else "uint8",
                "reduce_range": reduce_range, "op_types": list(op_types), "exclude": list(exclude),
                "preprocess": how, "seed": seed}
    return QuantizeResult(quantized, before, after, report, speed, settings, dict(sorted(nodes.items())), weights,
                          calib_reports[0] if calib_reports else None)


def _weight_elements(model: ir.Model) -> dict[str, int]:
    counts = {"int8": 0, "float": 0, "other": 0}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        kind = ("int8" if tensor.dtype in (ir.DataType.INT8, ir.DataType.UINT8)
                else "float" if tensor.dtype.is_floating_point() else "other")
        counts[kind] += tensor.size
    return counts
