"""Loading and saving models through onnx_ir, with clear errors and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from graphprune.errors import GraphpruneError

# Protobuf cannot hold more than 2 GB: larger models keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load a model (external data stays memory-mapped) and normalise it for analysis."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"{path}: no such file.")
    if not path.is_file():
        raise GraphpruneError(f"{path}: is not a file; give the path of an .onnx model.")
    try:
        model = ir.load(path)
    except Exception as err:
        raise GraphpruneError(
            f"{path}: is not a readable ONNX model ({type(err).__name__}); check the file is complete."
        ) from err
    _check_external_data(model, path)
    prepare(model)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.exists():
                raise GraphpruneError(
                    f"{path}: its weights live in '{tensor.location}', which is missing next to the "
                    "model; copy that file beside it."
                )


def prepare(model: ir.Model) -> None:
    """Weights as initializers, nodes in order, shapes inferred: what the analysis relies on."""
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.RemoveInitializersFromInputsPass()(model)
    common.TopologicalSortPass()(model)
    for node in model.graph:
        if not node.name:
            node.name = f"{node.op_type}_{id(node):x}"
    common.ShapeInferencePass(data_prop=True)(model)


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write atomically: a temporary file in the target folder, then a rename."""
    path = Path(path)
    if not path.parent.exists():
        raise GraphpruneError(f"{path}: the output folder '{path.parent}' does not exist; create it first.")
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    data_name = f"{path.name}.data"
    tmp_data = Path(tmp).with_name(Path(tmp).name + ".data")
    try:
        if external_data:
            ir.save(model, tmp, external_data=tmp_data.name)
            os.replace(tmp_data, path.with_name(data_name))
            _rename_external_location(tmp, tmp_data.name, data_name)
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()


def _rename_external_location(model_path: str, old: str, new: str) -> None:
    proto = onnx.load(model_path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, model_path)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
