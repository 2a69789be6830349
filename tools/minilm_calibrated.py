"""all-MiniLM-L6-v2: magnitude vs activation-aware criteria, with and without bias compensation.

Calibration: the first 128 sentences of the Pang & Lee polarity corpus from the gensim wheel's test
data (not part of the three evaluation sets), padded to 64 tokens. Quality: Spearman rho on
WordSim353, SimLex-999 and Lee, and the mean cosine to the dense embeddings (models/similarity_eval.py).

Usage: .venv/bin/python tools/minilm_calibrated.py [--ratio 0.5] [--sentences 128]
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from graphprune import api
from graphprune.models import minilm, real
from graphprune.models.similarity_eval import SimilarityBenchmark, cosine_to

CONFIGS = [("l2", False), ("wanda-sp", False), ("wanda-sp", True), ("flap", False), ("flap", True),
           ("act-norm", False), ("act-norm", True)]


def calibration_sentences(count: int) -> list[str]:
    with zipfile.ZipFile(real.find_wheel("gensim")) as wheel:
        text = wheel.read("gensim/test/test_data/pang_lee_polarity.cor").decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--sentences", type=int, default=128)
    args = parser.parse_args(argv)
    dense = minilm.export()
    bench = SimilarityBenchmark.load()
    dense_emb, dense_rho = bench.evaluate(lambda texts: minilm.embed(dense, texts))
    rows = [("dense", "", "", dense_rho, 1.0)]
    with tempfile.TemporaryDirectory() as scratch:
        calib = Path(scratch) / "calib.npz"
        np.savez(calib, **minilm.tokenize(calibration_sentences(args.sentences), pad_to=64))
        pruned = Path(scratch) / "pruned.onnx"
        for units, label in ((("channel",), "MLP neurons"), (("head",), "heads")):
            for criterion, compensate in CONFIGS:
                data = None if criterion == "l2" else calib
                api.optimize(dense, pruned, ratio=args.ratio, units=units, round_to=1, criterion=criterion,
                             calib=data, compensate=compensate if data else None, check=False)
                emb, rho = bench.evaluate(lambda texts: minilm.embed(pruned, texts))
                rows.append((f"{label} -{args.ratio:.0%}", criterion, "yes" if compensate else "no", rho,
                             cosine_to(dense_emb, emb)))
                print(rows[-1], flush=True)
    print("\n| config | criterion | compensation | WordSim353 ρ | SimLex-999 ρ | Lee ρ | cos to dense |")
    print("|---|---|---|---|---|---|---|")
    for config, criterion, compensate, rho, cos in rows:
        print(f"| {config} | {criterion} | {compensate} | {rho['wordsim353']:.3f} | {rho['simlex999']:.3f} | "
              f"{rho['lee']:.3f} | {cos:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
