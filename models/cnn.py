"""Small CNN architectures for the zoo.

Widths and inputs are tiny so export + ONNX Runtime run in well under a second each; the
structure (residuals, SE gates, splits, concats, shuffles) follows the original designs
because those graph patterns are what the pruning analyzer has to handle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _finalize(model: nn.Module, seed: int) -> nn.Module:
    # Randomize norm statistics/affine params: with default init BN folds to an identity and
    # would hide bugs in how the pruner slices BN tensors.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def conv_bn(
    cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _ResNet(nn.Module):
    def __init__(self, stem: int, blocks: list[nn.Module], feat: int, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, stem, 3)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(feat, num_classes)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet_basic() -> nn.Module:
    torch.manual_seed(0)
    blocks = [BasicBlock(16, 16), BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 32)]
    return _finalize(_ResNet(16, blocks, 32), 0)


def resnet_bottleneck() -> nn.Module:
    torch.manual_seed(1)
    blocks = [
        Bottleneck(16, 8, 32),
        Bottleneck(32, 8, 32),
        Bottleneck(32, 16, 64, stride=2),
        Bottleneck(64, 16, 64),
    ]
    return _finalize(_ResNet(16, blocks, 64), 1)


def resnext() -> nn.Module:
    # ResNeXt: bottleneck whose 3x3 is a grouped conv (cardinality 8 / 4 groups).
    torch.manual_seed(2)
    blocks = [
        Bottleneck(16, 32, 64, groups=8),
        Bottleneck(64, 32, 64, groups=8),
        Bottleneck(64, 32, 64, stride=2, groups=4),
    ]
    return _finalize(_ResNet(16, blocks, 64), 2)


# --------------------------------------------------------------------------- MobileNet


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class _MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        # (expand, out, stride)
        cfg = [(1, 8, 1), (6, 12, 2), (6, 12, 1), (6, 16, 2), (6, 16, 1)]
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.ReLU6)]
        cin = 16
        for t, c, s in cfg:
            layers.append(InvertedResidual(cin, c, s, t))
            cin = c
        layers.append(conv_bn(cin, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> nn.Module:
    torch.manual_seed(3)
    return _finalize(_MobileNetV2(), 3)


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.gate = gate()

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * s


class MBv3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn(cin, exp, 1, act=act))
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            squeeze = max(8, (exp // 4 + 4) // 8 * 8)
            layers.append(SqueezeExcite(exp, squeeze, nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


class _MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        HS, RE = nn.Hardswish, nn.ReLU
        # (k, exp, out, se, act, stride) -- a cut-down MobileNetV3-Small table
        cfg = [
            (3, 16, 16, True, RE, 2),
            (3, 48, 24, False, RE, 2),
            (3, 64, 24, False, RE, 1),
            (5, 72, 32, True, HS, 2),
            (5, 96, 32, True, HS, 1),
        ]
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=HS)]
        cin = 16
        for k, e, c, se, act, s in cfg:
            layers.append(MBv3Block(cin, k, e, c, se, act, s))
            cin = c
        layers.append(conv_bn(cin, 96, 1, act=HS))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3() -> nn.Module:
    torch.manual_seed(4)
    return _finalize(_MobileNetV3(), 4)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, feats: list[torch.Tensor]):
        x = torch.cat(feats, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2)
        )


class _DenseNet(nn.Module):
    def __init__(self, growth: int = 8, num_classes: int = 10):
        super().__init__()
        c = 16
        self.stem = conv_bn(3, c, 3)
        self.block1 = DenseBlock(4, c, growth)
        c += 4 * growth  # 48
        self.trans1 = Transition(c, c // 2)
        c //= 2  # 24
        self.block2 = DenseBlock(3, c, growth)
        c += 3 * growth  # 48
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block2(self.trans1(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet_block() -> nn.Module:
    torch.manual_seed(5)
    return _finalize(_DenseNet(), 5)


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn(cin, half, 1),
            )
        else:
            assert cin == cout
            self.branch1 = nn.Sequential()
        b2_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=None),
            conv_bn(half, half, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class _ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, 24, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.conv5 = conv_bn(96, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage3(self.stage2(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2() -> nn.Module:
    torch.manual_seed(6)
    return _finalize(_ShuffleNetV2(), 6)


# --------------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, se_ratio: float = 0.25):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.SiLU))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU))
        # EfficientNet sizes the SE squeeze from the block *input* width, not the expanded one.
        layers.append(SqueezeExcite(hidden, max(1, int(cin * se_ratio)), nn.SiLU, nn.Sigmoid))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


class _EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        # (expand, k, out, stride)
        cfg = [(1, 3, 8, 1), (6, 3, 12, 2), (6, 3, 12, 1), (6, 5, 20, 2), (6, 5, 20, 1)]
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.SiLU)]
        cin = 16
        for e, k, c, s in cfg:
            layers.append(MBConv(cin, c, k, s, e))
            cin = c
        layers.append(conv_bn(cin, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def efficientnet() -> nn.Module:
    torch.manual_seed(7)
    return _finalize(_EfficientNet(), 7)


# --------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    # channels-first LayerNorm done the torchvision way: permute, normalize last dim, permute back
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # real init is 1e-6; random values keep the branch numerically visible
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.25)

    def forward(self, x):
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class _ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, int] = (32, 64), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtBlock(dims[0]))
        self.down = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]), ConvNeXtBlock(dims[1]))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


def convnext() -> nn.Module:
    torch.manual_seed(8)
    return _finalize(_ConvNeXt(), 8)


# --------------------------------------------------------------------------- U-Net


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(conv_bn(cin, cout, 3), conv_bn(cout, cout, 3))


class _UNet(nn.Module):
    def __init__(self, base: int = 16, num_classes: int = 2):
        super().__init__()
        b = base
        self.enc1 = DoubleConv(3, b)
        self.enc2 = DoubleConv(b, 2 * b)
        self.mid = DoubleConv(2 * b, 4 * b)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * b, 2 * b, 2, 2)
        self.dec2 = DoubleConv(4 * b, 2 * b)
        self.up1 = nn.ConvTranspose2d(2 * b, b, 2, 2)
        self.dec1 = DoubleConv(2 * b, b)
        self.out = nn.Conv2d(b, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


def unet() -> nn.Module:
    torch.manual_seed(9)
    return _finalize(_UNet(), 9)


# --------------------------------------------------------------------------- Inception


class InceptionModule(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class _Inception(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 32, 3)
        self.inc1 = InceptionModule(32, 16, 16, 24, 4, 8, 8)  # -> 56
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.inc2 = InceptionModule(56, 24, 24, 32, 8, 16, 16)  # -> 88
        self.fc = nn.Linear(88, num_classes)

    def forward(self, x):
        x = self.inc2(self.pool(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def inception() -> nn.Module:
    torch.manual_seed(10)
    return _finalize(_Inception(), 10)


# --------------------------------------------------------------------------- YOLOv8 (C2f)


def yconv(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return conv_bn(cin, cout, k, s, act=nn.SiLU)


class YBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = yconv(c, c, 3)
        self.cv2 = yconv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = yconv(c1, 2 * self.c, 1)
        self.cv2 = yconv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    def __init__(self, chs: tuple[int, ...], nc: int = 4, reg_max: int = 4):
        super().__init__()
        self.nc, self.reg = nc, 4 * reg_max
        self.no = self.reg + nc
        c2, c3 = 16, 16
        self.box = nn.ModuleList(
            nn.Sequential(yconv(c, c2, 3), yconv(c2, c2, 3), nn.Conv2d(c2, self.reg, 1)) for c in chs
        )
        self.cls = nn.ModuleList(
            nn.Sequential(yconv(c, c3, 3), yconv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in chs
        )

    def forward(self, feats: list[torch.Tensor]):
        outs = [torch.cat((b(f), c(f)), 1) for f, b, c in zip(feats, self.box, self.cls)]
        n = feats[0].shape[0]
        y = torch.cat([o.view(n, self.no, -1) for o in outs], 2)
        box, cls = y.split((self.reg, self.nc), 1)
        return torch.cat((box, cls.sigmoid()), 1)


class _YoloV8(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = yconv(3, 16, 3, 2)
        self.b1 = yconv(16, 32, 3, 2)
        self.b2 = C2f(32, 32, 1, shortcut=True)  # P3, stride 4
        self.b3 = yconv(32, 64, 3, 2)
        self.b4 = C2f(64, 64, 2, shortcut=True)  # P4, stride 8
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(96, 32, 1)  # top-down P3 out
        self.n2 = yconv(32, 32, 3, 2)
        self.n3 = C2f(96, 64, 1)  # bottom-up P4 out
        self.detect = Detect((32, 64))

    def forward(self, x):
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.b4(self.b3(p3))
        n3 = self.n1(torch.cat([self.up(p4), p3], 1))
        n4 = self.n3(torch.cat([self.n2(n3), p4], 1))
        return self.detect([n3, n4])


def yolov8_c2f() -> nn.Module:
    torch.manual_seed(11)
    return _finalize(_YoloV8(), 11)


# --------------------------------------------------------------------------- 1-D / flatten


class _AudioNet(nn.Module):
    # M5-style raw-waveform classifier
    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout, k, s=1):
            return nn.Sequential(nn.Conv1d(cin, cout, k, s, bias=False), nn.BatchNorm1d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 16, 80, 4),
            nn.MaxPool1d(4),
            block(16, 16, 3),
            nn.MaxPool1d(4),
            block(16, 32, 3),
            nn.MaxPool1d(4),
            block(32, 32, 3),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool1d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


def conv1d_audio() -> nn.Module:
    torch.manual_seed(12)
    return _finalize(_AudioNet(), 12)


class _FlattenNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3),
            nn.MaxPool2d(2),
            conv_bn(8, 16, 3),
            nn.MaxPool2d(2),
            conv_bn(16, 16, 3, 2),
        )
        # 16 channels x 4 x 4 spatial: the Linear sees channel-major blocks of 16 features
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


def flatten_gemm() -> nn.Module:
    torch.manual_seed(13)
    return _finalize(_FlattenNet(), 13)
