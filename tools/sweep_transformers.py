"""Transformers the zoo does not hold, through analyze and the oracle: what a new user's model meets.

Builds small random-init models of many Hugging Face architectures (structure only), exports each
with the chosen exporters, and for every export prints the prunable unit kinds, the declined nodes,
and whether the correctness oracle holds (ratio 0 changes nothing, pruning equals masking, planted
dead units are exactly what L2 removes). Needs the dev extra (torch, transformers).

Usage: python tools/sweep_transformers.py [--exporters legacy,legacy-dynamic,dynamo] [NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SEQ = 12


def architectures():
    """name -> builder of a tiny model (2 layers, width 64, 4 heads), each a different attention form."""
    import transformers as T

    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128,
             "vocab_size": 100}
    return {
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(n_layers=2, n_heads=4, dim=64, hidden_dim=128,
                                                                   vocab_size=100)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**small)),
        "albert (shared layers)": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=32, **small)),
        "t5 encoder (relative bias)": lambda: T.T5EncoderModel(T.T5Config(d_model=64, d_kv=16, d_ff=128,
                                                                          num_layers=2, num_heads=4,
                                                                          vocab_size=100)),
        "gpt-neox (fused qkv, partial rotary)": lambda: T.GPTNeoXModel(T.GPTNeoXConfig(**small)),
        "falcon (multi-query)": lambda: T.FalconModel(T.FalconConfig(hidden_size=64, num_hidden_layers=2,
                                                                     num_attention_heads=4, multi_query=True,
                                                                     vocab_size=100,
                                                                     new_decoder_architecture=False)),
        "opt": lambda: T.OPTModel(T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              ffn_dim=128, vocab_size=100, word_embed_proj_dim=64)),
        "bloom (alibi)": lambda: T.BloomModel(T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=100)),
        "phi": lambda: T.PhiModel(T.PhiConfig(**small)),
        "gemma (multi-query, GeGLU)": lambda: T.GemmaModel(T.GemmaConfig(num_key_value_heads=1, head_dim=16,
                                                                         **small)),
        "clip text": lambda: T.CLIPTextModel(T.CLIPTextConfig(**small)),
    }


def export(build, exporter: str, path: Path) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    model = build().eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 100, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(LastHidden(), (ids, mask), path, dynamo=True, external_data=False, verbose=False,
                              **names)
        else:
            dynamic = None
            if exporter == "legacy-dynamic":
                dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                           "last_hidden_state": {0: "batch", 1: "sequence"}}
            torch.onnx.export(LastHidden(), (ids, mask), path, dynamo=False, opset_version=17,
                              dynamic_axes=dynamic, **names)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--exporters", default="legacy,legacy-dynamic,dynamo")
    args = parser.parse_args(argv)
    from oracle import check_model

    from graphprune.api import analyze

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, build in architectures().items():
            if args.names and not any(n in name for n in args.names):
                continue
            for exporter in args.exporters.split(","):
                path = Path(scratch) / f"{name.split()[0]}-{exporter}.onnx"
                start = time.perf_counter()
                try:
                    feeds = export(build, exporter, path)
                except Exception as exc:  # noqa: BLE001 -- a failing exporter is a row, not a crash
                    rows.append((name, exporter, "-", "-", f"export failed: {str(exc).splitlines()[0][:60]}"))
                    continue
                report = analyze(path)
                kinds = ", ".join(f"{kind} {size}" for kind, size in sorted({(s.kind, s.size) for s in report.prunable}))
                proto = onnx.load(path)
                wanted = {i.name for i in proto.graph.input}
                try:
                    result = check_model(proto, {k: v for k, v in feeds.items() if k in wanted}, ratio=0.5)
                    verdict = f"holds ({result['removed']} units removed)"
                except AssertionError as exc:
                    verdict = f"FAILS: {str(exc).splitlines()[0][:80]}"
                declined = "; ".join(sorted({f"{d['op']}: {d['reason'][:50]}" for d in report.declined})) or "none"
                rows.append((name, exporter, kinds or "nothing", declined,
                             f"{verdict}, {time.perf_counter() - start:.0f} s"))
                print(" | ".join(rows[-1]), flush=True)
    print("\n| architecture | exporter | prunable (kind size, per layer) | declined nodes | oracle |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if any("FAILS" in row[-1] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
