"""Small float64 models of the kinds researchers bring, for conformance tests against a float64 jacrev reference.

`ARCHITECTURES[name]` is an `Architecture`: a factory (float64, eval mode, seeded), `inputs(n, seed)` giving one
batch of n rows (one tensor, passed positionally, or a dict of named tensors, passed as keyword arguments), and the
number of classes. Float inputs are float64; token ids and attention masks are int64 and stay integers (no model
casts float inputs to ids). Normalisation layers have random affine parameters and running statistics.

`reference_jacobian` is the float64 reference: vmap(jacrev) over functional_call, one sample (a batch of one) at a
time, or a per-sample torch.autograd loop for models vmap cannot run.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

Batch = Tensor | dict[str, Tensor]


@dataclass(frozen=True)
class Architecture:
    factory: Callable[[], nn.Module]  # float64, eval mode
    inputs: Callable[[int, int], Batch]  # (n, seed) -> one batch of n rows
    classes: int


# --------------------------------------------------------------------------------------------------
# Helpers


def _randomise(*norms: nn.Module) -> None:
    """Random γ and β (and running statistics), so that normalisation layers are no identity."""
    with torch.no_grad():
        for norm in norms:
            if getattr(norm, "weight", None) is not None:
                norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.5, 0.5)
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean.normal_(0.0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)


def _norms(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _finish(model: nn.Module) -> nn.Module:
    """float64, randomised normalisation layers, eval mode."""
    model = model.double()
    _randomise(*_norms(model))
    return model.eval()


def _gaussian(*shape: int) -> Callable[[int, int], Tensor]:
    def inputs(n: int, seed: int) -> Tensor:
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    return inputs


def _tokens(vocabulary: int, length: int) -> Callable[[int, int], Tensor]:
    """Token ids in [0, vocabulary), int64, no padding."""

    def inputs(n: int, seed: int) -> Tensor:
        return torch.randint(0, vocabulary, (n, length), generator=torch.Generator().manual_seed(seed))

    return inputs


def _padded(n: int, seed: int, vocabulary: int, length: int) -> tuple[Tensor, Tensor]:
    """ids (n, length) int64 with tokens 1..vocabulary-1 and a random number of trailing 0-pads (≥ 2 real tokens
    per row), and the int64 attention mask (1 = real, 0 = pad)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=generator)
    ids = torch.randint(1, vocabulary, (n, length), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


# --------------------------------------------------------------------------------------------------
# 1. Pre-activation ResNet


class PreActBlock(nn.Module):
    """BN → ReLU → conv → BN → ReLU → conv, + the identity (or a 1×1 conv of the pre-activated input)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """(3, 8, 8) → stem conv → block(4 → 4) → block(4 → 8, stride 2) → BN → ReLU → global average pool → Linear."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.block1 = PreActBlock(4, 4)
        self.block2 = PreActBlock(4, 8, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(self.stem(x)))
        return self.head(F.relu(self.bn(h)).mean((2, 3)))


def _calibrate(model: nn.Module, x: Tensor) -> None:
    """BatchNorm running statistics from one training-mode pass over x, then perturbed (means shifted by 0.2σ,
    variances scaled by 0.7-1.4): random statistics independent of the activations leave ReLU channels dead."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model(x)
        for norm in norms:
            norm.momentum = 0.1
            norm.running_mean.add_(0.2 * norm.running_var.sqrt() * torch.randn_like(norm.running_mean))
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.7, 1.4))
    model.eval()


def preact_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = _finish(PreActResNet())
    _calibrate(model, torch.randn(64, 3, 8, 8, dtype=torch.float64))
    return model


# --------------------------------------------------------------------------------------------------
# 2. nn.TransformerEncoder with its defaults (nested-tensor fast path under no_grad)

TRANSFORMER_VOCABULARY, TRANSFORMER_LENGTH = 11, 6


class TorchTransformer(nn.Module):
    """ids (L,) int64, 0 = padding → Embedding + learned positions → nn.TransformerEncoder (defaults, 2 layers) with
    src_key_padding_mask → masked mean over the real positions → Linear."""

    def __init__(self, classes: int = 3, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(TRANSFORMER_VOCABULARY, d, padding_idx=0)
        self.pos = nn.Embedding(TRANSFORMER_LENGTH, d)
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=2, dim_feedforward=16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = self.encoder(h, src_key_padding_mask=pad)
        real = (~pad).to(h.dtype)[..., None]
        return self.head((h * real).sum(1) / real.sum(1))


def transformer_torch() -> nn.Module:
    torch.manual_seed(0)
    return _finish(TorchTransformer())


def _transformer_torch_inputs(n: int, seed: int) -> Tensor:
    return _padded(n, seed, TRANSFORMER_VOCABULARY, TRANSFORMER_LENGTH)[0]


# --------------------------------------------------------------------------------------------------
# 3. A hand-written pre-LN Transformer block

BLOCK_VOCABULARY, BLOCK_LENGTH = 13, 6


class TransformerBlock(nn.Module):
    """input_ids, attention_mask (L,) int64 → Embedding + positions → LN → q, k, v → masked softmax attention
    (2 heads, -inf on padded keys) → out proj → residual → LN → Linear, GELU, Linear → residual → LN → first token →
    Linear. Returns {"logits": ...}."""

    def __init__(self, classes: int = 3, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(BLOCK_VOCABULARY, d)
        self.pos = nn.Embedding(BLOCK_LENGTH, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def _split(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        return x.reshape(n, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(length, device=input_ids.device))
        h = self.ln1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + self.out(attended)
        x = x + self.mlp(self.ln2(x))
        return {"logits": self.head(self.ln_f(x)[:, 0])}


def transformer_block() -> nn.Module:
    torch.manual_seed(0)
    return _finish(TransformerBlock())


def _transformer_block_inputs(n: int, seed: int) -> dict[str, Tensor]:
    ids, mask = _padded(n, seed, BLOCK_VOCABULARY, BLOCK_LENGTH)
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------
# 4. GRU


class GRUClassifier(nn.Module):
    """ids (5,) int64 → Embedding(9, 4) → GRU(4, 6), one layer → last hidden state → Linear(6, 3)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.gru = nn.GRU(4, 6, num_layers=1, batch_first=True)
        self.head = nn.Linear(6, classes)

    def forward(self, ids: Tensor) -> Tensor:
        _, last = self.gru(self.embed(ids))
        return self.head(last[-1])


def gru() -> nn.Module:
    torch.manual_seed(0)
    return _finish(GRUClassifier())


# --------------------------------------------------------------------------------------------------
# 5. Conv1d with dilation and GroupNorm


def conv1d(classes: int = 3) -> nn.Module:
    """(2, 16) → Conv1d(2, 4, 3, dilation 2, padding 2) → GroupNorm(2, 4) → GELU → Conv1d(4, 6, 3, stride 2) →
    GroupNorm(3, 6) → ReLU → AdaptiveAvgPool1d(1) → flatten → Linear(6, classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, dilation=2, padding=2),
        nn.GroupNorm(2, 4),
        nn.GELU(),
        nn.Conv1d(4, 6, 3, stride=2),
        nn.GroupNorm(3, 6),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, classes),
    )
    return _finish(model)


# --------------------------------------------------------------------------------------------------
# 6. Depthwise-separable convs with a channels-last LayerNorm (timm / ConvNeXt style)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, as timm and ConvNeXt write it."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Depthwise(nn.Module):
    """(3, 6, 5) → depthwise Conv2d(3, 3, 3, groups 3) → LayerNorm2d → GELU → pointwise Conv2d(3, 6, 1) →
    LayerNorm2d → ReLU → mean over H, W → Linear(6, classes)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.norm1 = LayerNorm2d(3)
        self.pointwise = nn.Conv2d(3, 6, 1)
        self.norm2 = LayerNorm2d(6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.norm1(self.depthwise(x)))
        h = F.relu(self.norm2(self.pointwise(h)))
        return self.head(h.mean((2, 3)))


def depthwise() -> nn.Module:
    torch.manual_seed(0)
    return _finish(Depthwise())


# --------------------------------------------------------------------------------------------------
# 7. Weight-standardised convolutions (timm / BiT style)


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel (over in, kh, kw) on every call."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def std_conv(classes: int = 3) -> nn.Module:
    """(2, 6, 6) → StdConv2d(2, 4, 3, padding 1) → GroupNorm(2, 4) → ReLU → StdConv2d(4, 4, 3, stride 2) → flatten
    (4 · 2 · 2) → Linear(16, classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        StdConv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        StdConv2d(4, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(16, classes),
    )
    return _finish(model)


# --------------------------------------------------------------------------------------------------
# 8.-10. Tied weights: a Linear reused transposed, an Embedding reused as the output head, and both


class TiedDecoder(nn.Module):
    """x (6,) → h = tanh(enc x) → r = encᵀ h (a tied decoder, F.linear with enc.weight.t()) → head([h, tanh r])."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.head = nn.Linear(10, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x))
        r = F.linear(h, self.enc.weight.t())
        return self.head(torch.cat([h, torch.tanh(r)], -1))


def tied_decoder() -> nn.Module:
    torch.manual_seed(0)
    return _finish(TiedDecoder())


class TiedEmbeddingHead(nn.Module):
    """ids (5,) int64 → h = tanh(mean of Embedding(7, 5)) → logits = h Eᵀ + b: the table is the output head."""

    def __init__(self, vocabulary: int = 7, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocabulary, d)
        self.bias = nn.Parameter(torch.randn(vocabulary))

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.emb(ids).mean(1))
        return h @ self.emb.weight.T + self.bias


def tied_embedding_head() -> nn.Module:
    torch.manual_seed(0)
    return _finish(TiedEmbeddingHead())


class AutoencoderTied(nn.Module):
    """ids (4,) int64 → e = mean of Embedding(6, 5) → h = tanh(enc e) → d = encᵀ h → logits = d Eᵀ."""

    def __init__(self, vocabulary: int = 6, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocabulary, d)
        self.enc = nn.Linear(d, 3)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids).mean(1)
        h = torch.tanh(self.enc(e))
        d = F.linear(h, self.enc.weight.t())
        return d @ self.emb.weight.T


def autoencoder_tied() -> nn.Module:
    torch.manual_seed(0)
    return _finish(AutoencoderTied())


# --------------------------------------------------------------------------------------------------
# 11. A tiny Hugging Face BERT (only where transformers imports)

BERT_VOCABULARY, BERT_LENGTH = 30, 6


def hf_bert(attn_implementation: str = "eager") -> nn.Module:
    """A tiny BertForSequenceClassification, float64, eval, with random LayerNorm γ and β.

    With transformers 5.x and torch 2.13, "eager" and the default ("sdpa") attention give the same logits, and both
    work with a plain (per-sample) jacrev, but neither runs under vmap: building the mask calls
    `padding_mask.all()` (masking_utils._ignore_bidirectional_mask_sdpa), data-dependent control flow, so
    reference_jacobian falls back to its per-sample loop. Eager is used here."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=BERT_VOCABULARY,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation=attn_implementation,
    )
    return _finish(BertForSequenceClassification(config))


def _hf_bert_inputs(n: int, seed: int) -> dict[str, Tensor]:
    ids, mask = _padded(n, seed, BERT_VOCABULARY, BERT_LENGTH)
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_bert(directory: str | Path) -> None:
    """save_pretrained the tiny BERT (safetensors, config.json) into `directory`, for loading tests."""
    hf_bert().save_pretrained(str(directory))


def _has_transformers() -> bool:
    """Whether transformers is installed, without importing it (importing it takes seconds)."""
    return importlib.util.find_spec("transformers") is not None


# --------------------------------------------------------------------------------------------------
# The reference Jacobian


def _logits(out: object) -> Tensor:
    """The logits of a model's output: the tensor, `.logits` of an object or dict, or the first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def model_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Call the model (positionally for a tensor, keyword arguments for a dict) and return its logits: the tensor,
    `.logits` of an object or dict output, or the first element of a tuple."""
    return _logits(model(**batch) if isinstance(batch, dict) else model(batch))


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def _row(batch: Batch, i: int) -> Batch:
    """Row i of the batch as a batch of one."""
    if isinstance(batch, dict):
        return {k: v[i : i + 1] for k, v in batch.items()}
    return batch[i : i + 1]


def vmap_jacobian(model: nn.Module, batch: Batch) -> Tensor:
    """J (n, C, P) by vmap(jacrev) over functional_call, each sample a batch of one; raises where vmap cannot run
    the model."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def logits(p: dict[str, Tensor], one: Batch) -> Tensor:
        state = {**buffers, **p}
        if isinstance(one, dict):
            out = functional_call(model, state, (), {k: v[None] for k, v in one.items()})
        else:
            out = functional_call(model, state, (one[None],))
        return _logits(out)[0]

    jac = vmap(jacrev(logits), (None, 0))(params, batch)
    return torch.cat([jac[name].flatten(2) for name in params], dim=2)


def loop_jacobian(model: nn.Module, batch: Batch) -> Tensor:
    """J (n, C, P) by a per-sample loop with torch.autograd: one forward per sample (a batch of one), one backward
    per output."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    with torch.enable_grad():
        for i in range(_rows(batch)):
            out = model_logits(model, _row(batch, i))[0]
            grads = []
            for c in range(out.shape[0]):
                g = torch.autograd.grad(out[c], params, retain_graph=c + 1 < out.shape[0], allow_unused=True)
                flat = [(torch.zeros_like(p) if d is None else d).flatten() for p, d in zip(params, g, strict=True)]
                grads.append(torch.cat(flat))
            rows.append(torch.stack(grads))
    return torch.stack(rows)


def reference_jacobian(model: nn.Module, batch: Batch) -> Tensor:
    """J (n, C, P): per-sample Jacobian of the logits w.r.t. every parameter (named_parameters() order, shared
    tensors once), float64, by vmap(jacrev) over functional_call with a batch of one per sample; buffers passed. If
    vmap cannot run the model (data-dependent control flow, RNNs), falls back to a per-sample loop with
    torch.autograd (one backward per output)."""
    try:
        return vmap_jacobian(model, batch)
    except Exception:
        return loop_jacobian(model, batch)


# --------------------------------------------------------------------------------------------------
# The registry

ARCHITECTURES: dict[str, Architecture] = {
    "preact_resnet": Architecture(preact_resnet, _gaussian(3, 8, 8), 4),
    "transformer_torch": Architecture(transformer_torch, _transformer_torch_inputs, 3),
    "transformer_block": Architecture(transformer_block, _transformer_block_inputs, 3),
    "gru": Architecture(gru, _tokens(9, 5), 3),
    "conv1d": Architecture(conv1d, _gaussian(2, 16), 3),
    "depthwise": Architecture(depthwise, _gaussian(3, 6, 5), 3),
    "std_conv": Architecture(std_conv, _gaussian(2, 6, 6), 3),
    "tied_decoder": Architecture(tied_decoder, _gaussian(6), 3),
    "tied_embedding_head": Architecture(tied_embedding_head, _tokens(7, 5), 7),
    "autoencoder_tied": Architecture(autoencoder_tied, _tokens(6, 4), 6),
}
if _has_transformers():
    ARCHITECTURES["hf_bert"] = Architecture(hf_bert, _hf_bert_inputs, 3)
