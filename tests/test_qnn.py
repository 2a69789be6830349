"""A pruned, QDQ-quantized model on the QNN HTP backend (onnxruntime-qnn, a plugin EP over stock onnxruntime,
in its own Python environment) against the CPU EP.

onnxruntime-qnn ships wheels for Windows x64 (whose QnnHtp.dll is the HTP emulator), Windows ARM64 and Linux
aarch64 (Qualcomm devices) only: on Linux x86_64 it does not install, and this test skips saying so. Elsewhere
point GRAPHPRUNE_QNN_PYTHON at a Python with onnxruntime-qnn installed (e.g. a venv made with
`python -m venv qnn-venv && qnn-venv/bin/pip install onnxruntime-qnn`).
"""

import os
import platform
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_deploy import cosine, images, small_cnn

from graphprune import api, deploy

# Platforms PyPI has onnxruntime-qnn wheels for (checked for 2.3.0 to 2.7.0, Python 3.11).
QNN_WHEELS = {("Windows", "AMD64"), ("Windows", "ARM64"), ("Linux", "aarch64")}
NO_WHEEL = ("onnxruntime-qnn does not install on {system} {machine}: PyPI has wheels for Windows x64, Windows "
            "ARM64 and Linux aarch64 only, so the QNN HTP emulator cannot run here")

# Run in the QNN environment: the model on QNN HTP (no CPU fallback) -> outputs .npy.
CHILD = """
import sys
import numpy as np
import onnxruntime as ort
import onnxruntime_qnn as qnn

model, inputs, outputs = sys.argv[1:4]
ort.register_execution_provider_library(qnn.get_ep_name(), qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == qnn.get_ep_name()]
options = ort.SessionOptions()
options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
options.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path()})
session = ort.InferenceSession(model, options)
np.save(outputs, session.run(None, {"x": np.load(inputs)})[0])
"""


def qnn_python() -> str:
    """The Python with onnxruntime-qnn, or skip with the reason there is none."""
    given = os.environ.get("GRAPHPRUNE_QNN_PYTHON")
    if given:
        return given
    system, machine = platform.system(), platform.machine()
    if (system, machine) not in QNN_WHEELS:
        pytest.skip(NO_WHEEL.format(system=system, machine=machine))
    pytest.skip("no QNN environment: install onnxruntime-qnn into a separate venv and set GRAPHPRUNE_QNN_PYTHON "
                "to its python")


def test_reason_names_this_platform_when_there_is_no_wheel():
    if (platform.system(), platform.machine()) in QNN_WHEELS:
        pytest.skip("this platform has onnxruntime-qnn wheels")
    with pytest.raises(pytest.skip.Exception, match="does not install on"):
        qnn_python()


def test_pruned_qdq_model_runs_on_qnn_htp(tmp_path):
    python = qnn_python()
    dense, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(small_cnn(batch=1), dense)
    np.savez(calib, x=images(32, seed=1))
    pruned, quantized = tmp_path / "pruned.onnx", tmp_path / "qdq.onnx"
    api.optimize(dense, pruned, ratio=0.5, round_to=8)
    deploy.quantize(pruned, quantized, mode="qdq", calib=calib)
    x, got = tmp_path / "x.npy", tmp_path / "qnn.npy"
    np.save(x, images(1))
    run = subprocess.run([python, "-c", CHILD, str(quantized), str(x), str(got)], check=False, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    cpu = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"]).run(None, {"x": np.load(x)})[0]
    # HTP rounds int8 arithmetic its own way: close to the CPU's QDQ kernels, not bit-equal.
    assert cosine(np.load(got), cpu) > 0.99
