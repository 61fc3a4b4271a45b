"""Small float64 test models: an MLP, a CNN with BatchNorm, and a model that reuses a Linear."""

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


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (1, 4, 4)), "twice": (twice, (6,))}
