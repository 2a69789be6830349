"""prune-tokens on a ViT-Base-like encoder (random init: latency, MACs and fidelity to the dense model).

    .venv/bin/python tools/prune_tokens_vit.py [--layers 12 --hidden 768 --rounds 30] [--markdown table.md]

The ViT (transformers ViTModel, ViT-Base config: 12 layers, 768 wide, 12 heads, MLP 3072, 224x224, patch 16
-> 197 tokens, random init, pooler on) is exported with the legacy exporter (opset 17, batch 1). Rows:
keep 0.7 and 0.5 after layer 3, and two stages (0.7 after 3 and 0.7 after 6). ONNX Runtime CPU latency,
all models timed interleaved in one compare_latency call; fidelity = cosine of the CLS row of
last_hidden_state and of pooler_output to the dense model's, on random images. No accuracy claim:
the weights are random.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from graphprune import api
from graphprune.latency import compare_latency
from graphprune.runtime import make_session


def export_vit(path: Path, layers: int, hidden: int, image: int) -> None:
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       intermediate_size=4 * hidden, image_size=image, patch_size=16)
    model = ViTModel(config).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped(), (torch.randn(1, 3, image, image),), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["last_hidden_state", "pooler_output"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--images", type=int, default=8, help="random images for fidelity")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    configs = [("keep 0.7 after L3", ["0.7@3"]), ("keep 0.5 after L3", ["0.5@3"]),
               ("keep 0.7 after L3 and L6", ["0.7@3", "0.7@6"]), ("keep 1.0 after L3 (oracle)", ["1.0@3"])]
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "vit.onnx"
        export_vit(dense, args.layers, args.hidden, args.image)
        rows, paths = [], []
        for label, keep in configs:
            path = Path(tmp) / f"{len(paths)}.onnx"
            result = api.prune_tokens(dense, path, keep=keep, check=False)
            paths.append(path)
            rows.append((label, result))
        rng = np.random.default_rng(0)
        images = [rng.standard_normal((1, 3, args.image, args.image)).astype(np.float32) for _ in range(args.images)]
        sessions = [make_session(p) for p in [dense, *paths]]
        outs = [[s.run(None, {"pixel_values": x}) for x in images] for s in sessions]
        timing = compare_latency([dense, *paths], {"pixel_values": images[0]}, rounds=args.rounds,
                                 threads=os.cpu_count())
        base = rows[0][1].before.macs
        lines = ["| config | tokens | MACs | latency (median) | speedup | CLS cosine | pooler cosine |",
                 "|---|---|---|---|---|---|---|",
                 (f"| dense | {rows[0][1].stages[0].tokens_before} | {base / 1e9:.2f} G | "
                 f"{timing[0].median_ms:.1f} ms | 1.00x | 1.0000 | 1.0000 |")]
        for k, (label, result) in enumerate(rows, 1):
            cls = np.mean([cosine(d[0][:, 0], p[0][:, 0]) for d, p in zip(outs[0], outs[k], strict=True)])
            pool = np.mean([cosine(d[1], p[1]) for d, p in zip(outs[0], outs[k], strict=True)])
            tokens = " → ".join([str(result.stages[0].tokens_before)] + [str(s.tokens_after) for s in result.stages])
            lines.append(f"| {label} | {tokens} | {result.after.macs / 1e9:.2f} G ({result.after.macs / base - 1:+.1%}) "
                         f"| {timing[k].median_ms:.1f} ms | {timing[0].median_ms / timing[k].median_ms:.2f}x "
                         f"| {cls:.4f} | {pool:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
