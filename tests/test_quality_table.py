"""tools/quality_table.py on its cheapest configurations: silero-vad at -35% MACs, L2 and calibrated FLAP."""

import importlib.util
import sys
from pathlib import Path

import pytest

from graphprune.models.evaluators import get_evaluator

TOOL = Path(__file__).resolve().parents[1] / "tools" / "quality_table.py"


def _tool():
    spec = importlib.util.spec_from_file_location("quality_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not get_evaluator("silero_vad").available(), reason="silero-vad/pyannote wheels not fetched")
def test_silero_rows(tmp_path):
    tool = _tool()
    result = tool.measure_model("silero_vad", [0.35], ["uniform"], 60.0, tmp_path,
                                [("l2", "l2", "none"), ("flap+bias", "flap", "bias")], log=lambda _: None)
    l2, flap = result["rows"]
    assert l2.error is None and 0.0 <= l2.value <= 1.0
    assert l2.macs is not None and l2.macs <= -0.3
    # Calibrated on speech the evaluator does not score (CPython's test clip) with its recurrent state.
    assert flap.error is None and flap.value > 0.9 and "calibration" not in (flap.error or "")
    text = tool.markdown([result], "python tools/quality_table.py", 1.0)
    assert "## silero_vad" in text and "| −35% MACs, uniform |" in text
