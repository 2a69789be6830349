"""Evaluators of the real models on offline data; the real ones skip when their wheels are not fetched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune.errors import GraphpruneError
from graphprune.models import evaluators as ev
from graphprune.models import real

pytest.importorskip("onnxruntime")

# name -> (metric key, lowest sane dense value, highest sane dense value); the dense numbers measured are in
# docs/evaluators.md.
DENSE_RANGES = {
    "mobilenet_v2": {"top1": (1.0, 1.0), "top5": (1.0, 1.0)},
    # Published for all-MiniLM-L6-v2 (../shared/data/OFFLINE_MODELS.md): 0.729, 0.446, 0.508.
    "minilm": {"wordsim353": (0.719, 0.739), "simlex999": (0.436, 0.456), "lee": (0.498, 0.518),
               "mean": (0.55, 0.57)},
    "ppocr_rec": {"cer": (0.0, 0.05), "line_accuracy": (0.5, 1.0)},
    "magika": {"accuracy": (0.8, 1.0)},
    "silero_vad": {"f1": (0.9, 1.0), "precision": (0.9, 1.0), "recall": (0.9, 1.0)},
}
PERFECT = {
    "mobilenet_v2": {"top1": 1.0, "top5": 1.0},
    "minilm": {"cosine_to_dense": 1.0},
    "ppocr_rec": {"cer_to_dense": 0.0, "same_lines": 1.0},
    "magika": {"same_label": 1.0},
    "silero_vad": {"same_decision": 1.0, "max_abs_prob_diff": 0.0},
}


def need(evaluator: ev.Evaluator) -> None:
    if not evaluator.available():
        pytest.skip(f"{evaluator.name}: wheels not fetched, run `python tools/fetch_models.py`")


def test_registry():
    assert set(ev.EVALUATORS) == set(DENSE_RANGES) == set(PERFECT)
    for name, evaluator in ev.EVALUATORS.items():
        assert evaluator.name == name and evaluator.metric
        assert evaluator.primary in DENSE_RANGES[name]
    assert ev.get_evaluator("magika") is ev.EVALUATORS["magika"]
    with pytest.raises(GraphpruneError, match="Unknown evaluator 'resnet'"):
        ev.get_evaluator("resnet")
    with pytest.raises(GraphpruneError, match="does not exist"):
        ev.EVALUATORS["magika"].evaluate("no/such/model.onnx")


def test_edit_distance_and_character_error_rate():
    assert ev.edit_distance("kitten", "sitting") == 3
    assert ev.edit_distance("", "abc") == ev.edit_distance("abc", "") == 3
    assert ev.character_error_rate(["abcd", "ef"], ["abcd", "ef"]) == 0.0
    assert ev.character_error_rate(["abcd", "ef"], ["abd", "efg"]) == pytest.approx(2 / 6)


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    characters = ("", "a", "b", " ")
    steps = [1, 1, 0, 1, 2, 2, 3, 0, 0, 2]  # a a _ a b b ' ' _ _ b -> "aab b"
    probs = np.eye(4, dtype=np.float32)[steps][None]
    assert ev._ctc_greedy(probs, characters) == ["aab b"]


def test_ocr_texts_are_deterministic_ascii():
    lines = ev.ocr_texts()
    assert lines == ev.ocr_texts() and len(lines) == ev.OCR_LINES
    assert all(line.isascii() and 10 <= len(line) <= 60 for line in lines)


@pytest.mark.real
def test_ocr_texts_are_in_the_recogniser_dictionary():
    need(ev.EVALUATORS["ppocr_rec"])
    characters = set(ev._ocr_characters(str(real.ppocr_rec_path())))
    assert len(characters) == 6625  # the recogniser's output classes: blank, 6623 characters, space
    assert set("".join(ev.ocr_texts())) <= characters


@pytest.mark.real
def test_vad_reference_from_the_pyannote_sample():
    need(ev.EVALUATORS["silero_vad"])
    audio, speech = ev.vad_sample()
    assert len(audio) == 937 * ev.VAD_CHUNK and audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    assert speech.shape == (937,) and 0.6 < speech.mean() < 0.9  # turns cover 6.69 s to 30 s, with gaps


@pytest.mark.real
def test_magika_files_have_labels_in_the_label_space():
    need(ev.EVALUATORS["magika"])
    files = ev.magika_files()
    labels = {label for _, label in files}
    assert len(files) >= 100 and len(labels) >= 10 and labels <= set(real.magika_labels())


@pytest.mark.real
@pytest.mark.parametrize("name", list(ev.EVALUATORS))
def test_dense_metric_and_perfect_self_agreement(name):
    evaluator = ev.EVALUATORS[name]
    need(evaluator)
    result = evaluator.compare(evaluator.dense_model(), evaluator.dense_model())
    assert result["evaluator"] == name and result["primary"] in result["dense"]
    assert result["dense"] == result["pruned"]
    for key, (low, high) in DENSE_RANGES[name].items():
        assert low <= result["dense"][key] <= high, (key, result["dense"][key])
    assert result["agreement"] == pytest.approx(PERFECT[name], abs=1e-6)


@pytest.mark.real
def test_a_damaged_model_proto_disagrees():
    evaluator = ev.EVALUATORS["magika"]
    need(evaluator)
    dense = onnx.load(evaluator.dense_model())
    damaged = onnx.ModelProto()
    damaged.CopyFrom(dense)
    weights = [t for t in damaged.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    largest = max(weights, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(largest).copy()
    values.reshape(-1)[::2] = 0.0
    largest.CopyFrom(numpy_helper.from_array(values, largest.name))
    result = evaluator.compare(dense, damaged)
    assert result["dense"]["accuracy"] >= 0.8
    assert result["agreement"]["same_label"] < 1.0
    assert result["pruned"]["accuracy"] < result["dense"]["accuracy"]
