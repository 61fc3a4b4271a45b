"""The models of bench workload 8: pairs that compute alike, one of each pair with layers the tangent plan cannot
structure (they take the generic path), so that the bench shows what the generic path costs.

- `attention_torch`: token ids (n, 32) → Embedding(1000, 64) + positions `pos(arange(L))` (no batch axis) →
  `nn.TransformerEncoder` (2 layers, 4 heads, feed-forward 128; its attention's `in_proj_weight` is used functionally)
  → masked mean → Linear(64, 10): the generic parameters make it run under `vmap(jacrev)`.
- `attention_linear`: the same shape, written with `nn.Linear` q, k, v and output projections, LayerNorm and a GELU
  MLP, positions from a (1, L) buffer (broadcast over the batch): every parameter structured, one batched pass.
- `gru`: Embedding(1000, 64) → `nn.GRU(64, 64)` → last state → Linear(64, 10): RNNs cannot run under vmap, so the
  plan takes the per-sample loop.
- `stdconv` / `conv`: a CNN on (3, 16, 16) with weight-standardised convolutions (a Conv2d subclass with its own
  forward: generic, vmap) or plain ones (formed), GroupNorm, ReLU, pooling, Linear(32, 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCABULARY, LENGTH, WIDTH, CLASSES = 1000, 32, 64, 10


class TorchEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.pos = nn.Embedding(LENGTH, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.encoder(h).mean(1))


class Block(nn.Module):
    """A pre-LN Transformer block of nn.Linear projections."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, h: Tensor) -> Tensor:
        n, length, _ = h.shape
        x = self.norm1(h)
        q, k, v = (proj(x).reshape(n, length, 4, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        h = h + self.out((weights @ v).transpose(1, 2).reshape(n, length, -1))
        return h + self.mlp(self.norm2(h))


class LinearEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.pos = nn.Embedding(LENGTH, WIDTH)
        self.register_buffer("positions", torch.arange(LENGTH)[None])
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos(self.positions[:, : ids.shape[1]])
        return self.head(self.blocks(h).mean(1))


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.gru = nn.GRU(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.gru(self.embed(ids))[1][-1])


class StdConv2d(nn.Conv2d):
    """Weight standardisation (BiT): each output channel's weight standardised before the convolution."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _cnn(conv: type[nn.Conv2d]) -> nn.Module:
    return nn.Sequential(
        conv(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        conv(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )


def make_generic_model(name: str) -> nn.Module:
    """The model `name` (bench.py's `GENERIC_MODELS`), float32, seeded, eval mode."""
    torch.manual_seed(0)
    builders = {
        "attention_torch": TorchEncoder,
        "attention_linear": LinearEncoder,
        "gru": GRUClassifier,
        "stdconv": lambda: _cnn(StdConv2d),
        "conv": lambda: _cnn(nn.Conv2d),
    }
    return builders[name]().eval()


def generic_inputs(name: str, n: int) -> Tensor:
    """Token ids (n, 32) for the text models, randn (n, 3, 16, 16) for the CNNs; seeded."""
    generator = torch.Generator().manual_seed(1)
    if name in ("stdconv", "conv"):
        return torch.randn((n, 3, 16, 16), generator=generator)
    return torch.randint(0, VOCABULARY, (n, LENGTH), generator=generator)


def batchnorm_cnn() -> nn.Module:
    """Workload 9's model: a BatchNorm CNN of 6 330 parameters on (1, 12, 12) images, float64, seeded, eval mode
    (random running statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    ).double()
    for norm in (m for m in model if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.normal_(0.0, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
    return model.eval()
