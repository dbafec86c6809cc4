"""PyTorch reference of the network and the A-Softmax loss, for parity tests only.

Written after the public PyTorch code the paper builds on: the CIFAR-style FER ResNet18
(44x44 input, `avg_pool2d(out, 4)`, dropout before `linear`), the official CBAM module, and the
clcarwin/sphereface_pytorch AngleLinear/AngleLoss. torch is a test-only dependency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, x):
        h, w = x.size(2), x.size(3)
        avg = self.mlp(F.avg_pool2d(x, (h, w), stride=(h, w)))
        mx = self.mlp(F.max_pool2d(x, (h, w), stride=(h, w)))
        return torch.sigmoid(avg + mx).unsqueeze(2).unsqueeze(3)


class BasicConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, stride=1, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = BasicConv()

    def forward(self, x):
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, channels: int, order: str):
        super().__init__()
        self.order = order
        self.ChannelGate = ChannelGate(channels)
        self.SpatialGate = SpatialGate()

    def forward(self, x):
        if self.order == "channel_first":
            x = x * self.ChannelGate(x)
            return x * self.SpatialGate(x)
        if self.order == "spatial_first":
            x = x * self.SpatialGate(x)
            return x * self.ChannelGate(x)
        return x * self.ChannelGate(x) * self.SpatialGate(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, cbam: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.cbam = CBAM(planes, cbam) if cbam else None
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return F.relu(out + self.shortcut(x))


def cosine(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-12):
    """clcarwin AngleLinear's cos(theta) (columns of w normalised), clamped, and |x|."""
    ww = w / w.pow(2).sum(0, keepdim=True).sqrt()
    xlen = (x.pow(2).sum(1) + eps).sqrt()
    wlen = ww.pow(2).sum(0).sqrt()
    cos = x.mm(ww) / xlen.view(-1, 1) / wlen.view(1, -1)
    return cos.clamp(-1, 1), xlen


CHEBYSHEV = [
    lambda x: x**0,
    lambda x: x**1,
    lambda x: 2 * x**2 - 1,
    lambda x: 4 * x**3 - 3 * x,
    lambda x: 8 * x**4 - 8 * x**2 + 1,
    lambda x: 16 * x**5 - 20 * x**3 + 5 * x,
]


def a_softmax_loss(x, w, labels, m: int, lam: float):
    """clcarwin's AngleLinear + AngleLoss (gamma 0), with pi for the k boundaries."""
    cos, xlen = cosine(x, w)
    cos_m = CHEBYSHEV[m](cos)
    theta = cos.detach().acos()
    k = (m * theta / math.pi).floor()
    phi = ((-1.0) ** k) * cos_m - 2 * k
    cos_x, phi_x = cos * xlen.view(-1, 1), phi * xlen.view(-1, 1)
    index = F.one_hot(labels, cos.size(1)).bool()
    output = cos_x * 1.0
    output[index] -= cos_x[index] / (1 + lam)
    output[index] += phi_x[index] / (1 + lam)
    return F.cross_entropy(output, labels)


class AngleLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        w = torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.weight = nn.Parameter(w)

    def forward(self, x):
        cos, xlen = cosine(x, self.weight)
        return cos * xlen.view(-1, 1)


class ResNet18(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        width: int = 64,
        cbam: str | None = "channel_first",
        head: str = "softmax",
        dropout: float = 0.0,
        in_channels: int = 1,
    ):
        super().__init__()
        self.dropout = dropout
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**stage
            blocks = [
                BasicBlock(in_planes, planes, stride, cbam),
                BasicBlock(planes, planes, 1, cbam),
            ]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            in_planes = planes
        if head == "softmax":
            self.linear = nn.Linear(8 * width, num_classes)
        else:
            self.linear = AngleLinear(8 * width, num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        return F.dropout(out, p=self.dropout, training=self.training)

    def forward(self, x):
        return self.linear(self.features(x))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, including non-trivial BatchNorm affine and running stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bn" in name or "shortcut.1" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p[0].numel())) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model
