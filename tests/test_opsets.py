"""Opsets 11 to the newest ONNX Runtime runs: the same zoo models, exported or converted, pass the oracle."""

import onnx
import onnx.version_converter
import pytest
from oracle import check_model

from graphprune.models.zoo import export, sample_input

MODELS = ["resnet_basic", "shufflenet_v2", "yolov8_c2f", "mobilenet_v3", "densenet_block", "unet"]
NEWEST_RUNNABLE = 23  # the newest opset this project's ONNX Runtime executes


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("name", MODELS)
def test_old_opsets_from_the_exporter(name, opset, tmp_path_factory):
    proto = onnx.load(export(name, "legacy", cache_dir=tmp_path_factory.getbasetemp() / "opsets", opset=opset))
    assert proto.opset_import[0].version == opset
    check_model(proto, {"input": sample_input(name)}, ratio=0.5)


@pytest.mark.parametrize("name", MODELS)
def test_newest_opset_by_conversion(name, tmp_path_factory):
    proto = onnx.load(export(name, "legacy", cache_dir=tmp_path_factory.getbasetemp() / "opsets"))
    converted = onnx.version_converter.convert_version(proto, NEWEST_RUNNABLE)
    check_model(converted, {"input": sample_input(name)}, ratio=0.5)
