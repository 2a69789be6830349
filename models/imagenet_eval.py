"""Agreement of a pruned ImageNet classifier with its dense original on the offline photo set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .photos import VIEWS, batch_names, imagenet_batch

# A few ImageNet-1k class indices used by sanity checks (no label file ships offline).
CAT_CLASSES = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"}


def topk_agreement(
    dense_logits: np.ndarray, pruned_logits: np.ndarray, k: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """For each k: fraction of rows whose dense top-1 class is in the pruned top-k ('top1', 'top5', ...).

    top1 is plain argmax agreement.
    """
    dense_logits, pruned_logits = np.asarray(dense_logits), np.asarray(pruned_logits)
    if dense_logits.shape != pruned_logits.shape or dense_logits.ndim != 2:
        raise ValueError(f"need two [N, classes] arrays, got {dense_logits.shape} and {pruned_logits.shape}")
    reference = dense_logits.argmax(axis=1)[:, None]
    order = np.argsort(-pruned_logits, axis=1, kind="stable")
    return {f"top{kk}": float((order[:, :kk] == reference).any(axis=1).mean()) for kk in k}


def run_onnx(onnx_path: str | Path, batch: np.ndarray, providers: list[str] | None = None) -> np.ndarray:
    """First output of the model on `batch`, in chunks if the model's batch dimension is fixed."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else len(batch)
    if len(batch) % fixed:
        raise ValueError(f"{onnx_path}: fixed batch {fixed} does not divide the {len(batch)} images")
    chunks = [session.run(None, {inp.name: batch[i : i + fixed]})[0] for i in range(0, len(batch), fixed)]
    return np.concatenate(chunks)


def evaluate_mobilenet_v2(
    onnx_path_dense: str | Path, onnx_path_pruned: str | Path, providers: list[str] | None = None
) -> dict:
    """Top-1/top-5 agreement and logit drift of the pruned model against the dense one on the photos."""
    batch = imagenet_batch(224, VIEWS)
    dense = run_onnx(onnx_path_dense, batch, providers)
    pruned = run_onnx(onnx_path_pruned, batch, providers)
    agreement = topk_agreement(dense, pruned, (1, 5))
    disagree = dense.argmax(1) != pruned.argmax(1)
    names = batch_names(VIEWS)
    return {
        "images": len(batch),
        "top1_agreement": agreement["top1"],
        "top5_agreement": agreement["top5"],
        "max_abs_logit_diff": float(np.abs(dense - pruned).max()),
        "disagreements": [names[i] for i in np.flatnonzero(disagree)],
    }
