"""Small float64 test models: an MLP, a CNN with BatchNorm, models that reuse a Linear and a Conv2d, token-embedding
models (one tied to its output layer), models with LayerNorm, RMSNorm, GroupNorm and BatchNorm1d, and one with
position embeddings broadcast over the batch.

`MODELS[name]` is (factory, input shape, vocabulary): inputs are Gaussian, or token ids below the vocabulary given
as float64 (the pipeline computes in the inputs' dtype), which the model casts to indices."""

import torch
from torch import nn


def mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, classes))
        .double()
        .eval()
    )


def cnn(classes: int = 3) -> nn.Module:
    """Inputs (1, 4, 4); the last conv sees 2×2 → 1×1, so it has one site and is factorised."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 2, stride=2),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.Conv2d(6, 5, 2),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(5, classes),
    ).double()
    for bn in (model[1], model[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return model.eval()


class Twice(nn.Module):
    """h = tanh(A tanh(A x)), f = B h: one nn.Linear applied twice."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def twice(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return Twice(classes).double().eval()


class ConvTwice(nn.Module):
    """x (2, 4, 4) → one Conv2d applied twice, tanh between, 32 sites in all: its gradient is formed per call."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


def convtwice(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return ConvTwice(classes).double().eval()


def _randomise(*norms: nn.Module) -> None:
    """Random γ and β (and running statistics), so that they are no identity."""
    for norm in norms:
        if norm.weight is not None:
            norm.weight.data.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.normal_()
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)


class Bag(nn.Module):
    """Token ids (2, 3) → Embedding(vocabulary, 5) → tanh → flatten → Linear(30, classes): one lookup of 6 sites."""

    def __init__(self, classes: int = 3, vocabulary: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 5)
        self.head = nn.Linear(30, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids.long())).flatten(1))


def bag(classes: int = 3, vocabulary: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return Bag(classes, vocabulary).double().eval()


class Tied(nn.Module):
    """Token ids (4,) → Embedding(7, 5) → tanh → mean → Linear(5, 7) whose weight is the embedding's (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids.long())).mean(1))


def tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied().double().eval()


class Normed(nn.Module):
    """x (3, 6) → Linear(6, 8) at 3 positions → LayerNorm(8) → tanh → the same LayerNorm (a second call) → RMSNorm(8)
    → tanh → LayerNorm((3, 8)) without bias → flatten → Linear(24, classes)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.joint = nn.LayerNorm((3, 8), bias=False)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.norm(self.proj(x))))
        return self.head(self.joint(torch.tanh(self.rms(h))).flatten(1))


def normed(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = Normed(classes).double()
    _randomise(model.norm, model.rms, model.joint)
    return model.eval()


def grouped(classes: int = 3) -> nn.Module:
    """Inputs (2, 4, 4): Conv2d → GroupNorm(2, 4) → ReLU → Conv2d(4, 6, 2, stride 2) → tanh → flatten →
    BatchNorm1d(24) → Linear(24, classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.BatchNorm1d(24),
        nn.Linear(24, classes),
    ).double()
    _randomise(model[1], model[6])
    return model.eval()


class Positions(nn.Module):
    """x (3, 4) → Linear(4, 4) at 3 positions + two learned position embeddings of a buffer arange(3)[None] (a batch
    axis of 1, broadcast over the batch: a lookup, 16 rows, and a formed one, 3 rows) → tanh → flatten → Linear."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.pos = nn.Embedding(16, 4)
        self.offset = nn.Embedding(3, 4)
        self.head = nn.Linear(12, classes)
        self.register_buffer("positions", torch.arange(3)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.pos(self.positions) + self.offset(self.positions)
        return self.head(torch.tanh(h).flatten(1))


def positions(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return Positions(classes).double().eval()


def conv1d(classes: int = 3) -> nn.Module:
    """Inputs (2, 5): Conv1d(2, 4, 3, padding=1) (5 sites: formed) → GroupNorm(2, 4) → tanh → Conv1d(4, 3, 5) (one
    site: factorised) → flatten → Linear(3, classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv1d(4, 3, 5),
        nn.Flatten(),
        nn.Linear(3, classes),
    ).double()
    _randomise(model[1])
    return model.eval()


MODELS = {
    "mlp": (mlp, (6,), 0),
    "cnn": (cnn, (1, 4, 4), 0),
    "twice": (twice, (6,), 0),
    "convtwice": (convtwice, (2, 4, 4), 0),
    "bag": (bag, (2, 3), 48),
    "tied": (tied, (4,), 7),
    "normed": (normed, (3, 6), 0),
    "grouped": (grouped, (2, 4, 4), 0),
    "positions": (positions, (3, 4), 0),
    "conv1d": (conv1d, (2, 5), 0),
}


def data(name: str, n: int, seed: int) -> torch.Tensor:
    """n inputs of test model `name`: Gaussian, or token ids below its vocabulary (as float64)."""
    _, shape, vocabulary = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    if vocabulary:
        return torch.randint(0, vocabulary, (n, *shape), generator=generator).double()
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64)
