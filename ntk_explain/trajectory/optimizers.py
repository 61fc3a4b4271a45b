"""The optimisers a trajectory can follow, and each step's update as a linear function of past gradients.

Every supported step (torch.optim.SGD, Adam, AdamW, per parameter element) is

    Δw_s = −η_s λ_d ⊙ w_s − η_s P_s ⊙ Σ_{r≤s} γ_{s,r} g_r,     g_r = ∇L_r(w_r) + λ_c ⊙ w_r,

with L_r the batch loss, λ_c the weight decay that enters the gradient (SGD, Adam) and λ_d the decoupled one
(AdamW). SGD: P_s = 1 and, with momentum μ, dampening τ (b_0 = 1: torch's first buffer is the gradient itself),
γ_{s,r} = b_r μ^{s−r} (plain), δ_{sr} + μ b_r μ^{s−r} (nesterov). Adam: γ_{s,r} = (1−β₁) β₁^{s−r} and the fixed diagonal
preconditioner P_s = 1 / ((1−β₁^{s+1}) (√v_s / √(1−β₂^{s+1}) + ε)) from the recorded second moments v_s.

A test point's Jacobian Ĵ_s integrated along segment s meets the gradient of step r through
E_r = Σ_{s≥r} η_s γ_{s,r} P_s ⊙ Ĵ_s, computed backwards: V_s = η_s P_s ⊙ Ĵ_s, H_s = V_s + μ ⊙ H_{s+1},
E_s = a ⊙ V_s + b_s ⊙ H_s (`Coefficients`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ntk_explain.errors import BadInputError

KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
_REFUSED = {  # group options the decomposition cannot follow, with the value it needs
    "maximize": False,
    "amsgrad": False,
    "differentiable": False,
}


def describe(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> tuple[str, list[dict[str, Any]]]:
    """The optimiser's kind and, per param group, the hyper-parameters the decomposition uses and its members'
    names (`names`: id of a model parameter → its name); anything it cannot follow is refused (BadInputError)."""
    kind = KINDS.get(type(optimizer))
    if kind is None:
        supported = ", ".join(f"torch.optim.{k.__name__}" for k in KINDS)
        raise BadInputError(f"cannot record {type(optimizer).__name__}: the path kernel follows {supported}")
    groups = []
    for number, group in enumerate(optimizer.param_groups):
        for option, needed in _REFUSED.items():
            if option in group and bool(group[option]) != needed:
                raise BadInputError(f"cannot record param group {number}: {option}={group[option]} is not followed")
        members = []
        for param in group["params"]:
            if id(param) not in names:
                raise BadInputError(f"cannot record param group {number}: it holds a tensor that is not the model's")
            members.append(names[id(param)])
        if kind == "sgd":
            settings = {k: group[k] for k in ("momentum", "dampening", "nesterov", "weight_decay")}
        else:  # AdamW is Adam with decoupled weight decay
            decoupled = bool(group.get("decoupled_weight_decay", kind == "adamw"))
            settings = {"betas": [float(b) for b in group["betas"]], "eps": group["eps"], "decoupled": decoupled}
            settings["weight_decay"] = group["weight_decay"]
        groups.append({**{k: _plain(v) for k, v in settings.items()}, "params": members})
    if kind != "sgd":
        kind = "adamw" if any(group["decoupled"] for group in groups) else "adam"
    return kind, groups


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, list)) else float(value)


def learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's learning rate now (a tensor lr read as its value)."""
    return [float(group["lr"]) for group in optimizer.param_groups]


@dataclass(frozen=True)
class Coefficients:
    """One step's update in the form of the module docstring, as flat vectors over the trained parameters (P,):
    learning rate η, preconditioner P, momentum μ, a and b of E_s = a ⊙ V_s + b ⊙ H_s, and the coupled and
    decoupled weight decays."""

    eta: Tensor
    precondition: Tensor
    mu: Tensor
    a: Tensor
    b: Tensor
    coupled: Tensor
    decoupled: Tensor

    def to(self, device: torch.device | str) -> Coefficients:
        return Coefficients(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _flat(sizes: Sequence[int], per_param: Sequence[float | Tensor], dtype: torch.dtype) -> Tensor:
    parts = [
        value.reshape(-1) if isinstance(value, Tensor) else torch.full((n,), float(value), dtype=torch.float64)
        for n, value in zip(sizes, per_param, strict=True)
    ]
    return torch.cat(parts).to(dtype)


def coefficients(
    kind: str,
    groups: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    sizes: Sequence[int],
    step: int,
    lr: np.ndarray,
    second_moments: Mapping[str, np.ndarray] | None,
    dtype: torch.dtype = torch.float64,
) -> Coefficients:
    """The coefficients of step `step` (0-based, counted from a fresh optimiser) of a recorded trajectory: its groups'
    hyper-parameters and learning rates `lr` (G,), and for Adam the second moments after the step."""
    group_of = {name: number for number, group in enumerate(groups) for name in group["params"]}
    per: dict[str, list] = {key: [] for key in ("eta", "precondition", "mu", "a", "b", "coupled", "decoupled")}
    for name in params:
        group = groups[group_of[name]]
        per["eta"].append(lr[group_of[name]])
        if kind == "sgd":
            mu, nesterov = group["momentum"], group["nesterov"]
            first = 1.0 if step == 0 or mu == 0 else 1.0 - group["dampening"]
            per["precondition"].append(1.0)
            per["mu"].append(mu)
            per["a"].append(1.0 if nesterov else 0.0)
            per["b"].append(mu * first if nesterov else first)
            per["coupled"].append(group["weight_decay"])
            per["decoupled"].append(0.0)
        else:
            beta1, beta2 = group["betas"]
            v = torch.from_numpy(np.asarray(second_moments[name], dtype=np.float64))
            correction1, correction2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
            per["precondition"].append(1.0 / (correction1 * (v.sqrt() / correction2**0.5 + group["eps"])))
            per["mu"].append(beta1)
            per["a"].append(0.0)
            per["b"].append(1.0 - beta1)
            decay = group["weight_decay"]
            per["coupled"].append(0.0 if group["decoupled"] else decay)
            per["decoupled"].append(decay if group["decoupled"] else 0.0)
    return Coefficients(**{key: _flat(sizes, values, dtype) for key, values in per.items()})


def has_momentum(groups: Sequence[Mapping[str, Any]], kind: str) -> bool:
    """Whether a step's update holds gradients of earlier steps (then a window's explanation reaches before it)."""
    return kind != "sgd" or any(group["momentum"] != 0 for group in groups)
