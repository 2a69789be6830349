"""Human similarity judgements from gensim's test data, and Spearman rho of a sentence encoder on them.

Read straight out of the gensim wheel fetched by tools/fetch_models.py (never installed):
WordSim353 (353 word pairs), SimLex-999 (999 word pairs) and the Lee corpus (50 news documents with a
50 x 50 matrix of mean human similarity). The files are latin-1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .real import wheel_file

PACKAGE = "gensim"
_DATA = "gensim/test/test_data/"
SETS = ("wordsim353", "simlex999", "lee")

Pair = tuple[str, str, float]
Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> one row per text


def _lines(name: str) -> list[str]:
    return wheel_file(PACKAGE, _DATA + name).read_text(encoding="latin-1").splitlines()


def _pairs(name: str) -> list[Pair]:
    """Tab-separated word1, word2, mean score; '#' lines are the header."""
    pairs = []
    for line in _lines(name):
        if not line.strip() or line.startswith("#"):
            continue
        first, second, score = line.split("\t")[:3]
        pairs.append((first, second, float(score)))
    return pairs


def wordsim353() -> list[Pair]:
    return _pairs("wordsim353.tsv")


def simlex999() -> list[Pair]:
    """gensim's copy keeps only word1, word2 and the SimLex999 score (no POS or other columns)."""
    return _pairs("simlex999.txt")


def lee() -> tuple[list[str], np.ndarray]:
    """The 50 documents of lee.cor and their 50 x 50 human similarity matrix (upper triangle filled)."""
    docs = [line.strip() for line in _lines("lee.cor") if line.strip()]
    rows = [line.split() for line in _lines("similarities0-1.txt") if line.strip() and not line.startswith("#")]
    return docs, np.asarray(rows, dtype=np.float64)


def lee_pairs() -> tuple[list[str], list[tuple[int, int, float]]]:
    """Documents and the 1225 judged pairs i < j of the Lee matrix."""
    docs, sims = lee()
    rows, cols = np.triu_indices(len(docs), k=1)
    return docs, [(int(i), int(j), float(sims[i, j])) for i, j in zip(rows, cols)]


@dataclass
class SimilarityBenchmark:
    """Every text of the three sets, embedded once per model; rho per set from those embeddings."""

    texts: list[str]
    # set name -> (index of first text, index of second text, human score)
    pairs: dict[str, list[tuple[int, int, float]]]

    @classmethod
    def load(cls) -> SimilarityBenchmark:
        texts: list[str] = []
        index: dict[str, int] = {}

        def at(text: str) -> int:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            return index[text]

        # Words are embedded as one-word sentences, as written (the tokenizer lower-cases).
        pairs = {name: [(at(a), at(b), score) for a, b, score in reader()]
                 for name, reader in (("wordsim353", wordsim353), ("simlex999", simlex999))}
        docs, judged = lee_pairs()
        offset = [at(doc) for doc in docs]
        pairs["lee"] = [(offset[i], offset[j], score) for i, j, score in judged]
        return cls(texts, pairs)

    def spearman(self, embeddings: np.ndarray) -> dict[str, float]:
        """Spearman rho between cosine similarity of the embeddings and the human scores, per set."""
        from scipy.stats import spearmanr

        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        result = {}
        for name, pairs in self.pairs.items():
            first, second, human = (np.asarray(column) for column in zip(*pairs))
            cosine = np.einsum("ij,ij->i", unit[first], unit[second])
            result[name] = float(spearmanr(cosine, human).statistic)
        return result

    def evaluate(self, embed: Embed) -> tuple[np.ndarray, dict[str, float]]:
        embeddings = embed(self.texts)
        return embeddings, self.spearman(embeddings)


def cosine_to(dense: np.ndarray, pruned: np.ndarray) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    if dense.shape != pruned.shape:
        raise ValueError(f"embedding shapes differ: {dense.shape} vs {pruned.shape}")
    norms = np.linalg.norm(dense, axis=1) * np.linalg.norm(pruned, axis=1)
    return float(np.mean(np.einsum("ij,ij->i", dense, pruned) / np.maximum(norms, 1e-12)))
