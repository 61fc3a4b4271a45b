"""The float64 torch.func.jacrev reference eNTK: Jacobians of every parameter, then einsum."""

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), of arrays or tensors."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def jacobian(model: nn.Module, x: Tensor, names: tuple[str, ...] | None = None) -> Tensor:
    """J (n, C, P): per-sample Jacobian of the logits w.r.t. the (selected) parameters."""
    params = {n: p.detach() for n, p in model.named_parameters() if names is None or n in names}
    state = {**dict(model.named_buffers()), **{n: p.detach() for n, p in model.named_parameters()}}

    def logits(p: dict, x_one: Tensor) -> Tensor:
        return functional_call(model, {**state, **p}, (x_one[None],))[0]

    jac = vmap(jacrev(logits), (None, 0))(params, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def kernel(ja: Tensor, jb: Tensor, kind: str) -> Tensor:
    """The eNTK variants of SPEC §1 from Jacobians (n, C, P) and (m, C, P)."""
    if kind == "full":
        return torch.einsum("ncp,mdp->nmcd", ja, jb)
    if kind == "diagonal":
        return torch.einsum("ncp,mcp->nmc", ja, jb)
    if kind == "trace":
        return torch.einsum("ncp,mcp->nm", ja, jb)
    if kind == "pseudo":
        return ja.sum(1) @ jb.sum(1).T / ja.shape[1]
    raise ValueError(kind)


def self_kernel(ja: Tensor, kind: str) -> Tensor:
    """K(x, x) for every row of ja."""
    return torch.stack([kernel(j[None], j[None], kind)[0, 0] for j in ja])
