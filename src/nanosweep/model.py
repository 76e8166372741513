"""nanoGPT's GPT (bias=False): same modules, init and state-dict names, so its tools load our checkpoints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """nanoGPT's model_args, stored verbatim in every checkpoint."""

    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False

    def to_model_args(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (K, B, T, C), weight (K, C): one gain per trial
        x = F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight[:, None, None, :]
        return x if self.bias is None else x + self.bias[:, None, None, :]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Trial k's x (K, B, T, in) times its own weight (K, out, in): one batched matmul for all trials."""
    return torch.bmm(x.flatten(1, -2), weight.mT).unflatten(1, x.shape[1:-1])


def dropout_runs(rates: tuple[float, ...], training: bool) -> list[tuple[int, int, float]]:
    """(first, end, rate) for each run of neighbouring trials that share a dropout rate; one run when all do.

    A kernel's dropout probability is one number, so trials with different rates need separate calls
    (the sweep orders a fused group by dropout, so this is one or two calls).
    """
    if not training:
        return [(0, len(rates), 0.0)]
    runs: list[tuple[int, int, float]] = []
    for k, rate in enumerate(rates):
        if runs and runs[-1][2] == rate:
            runs[-1] = (runs[-1][0], k + 1, rate)
        else:
            runs.append((k, k + 1, rate))
    return runs


def dropout(x: torch.Tensor, rates: tuple[float, ...], training: bool) -> torch.Tensor:
    """Dropout on x (K, ...) at each trial's own rate."""
    runs = dropout_runs(rates, training)
    if len(runs) == 1:
        return F.dropout(x, runs[0][2], training=training) if runs[0][2] else x
    return torch.cat([F.dropout(x[a:b], rate, training=True) for a, b, rate in runs])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head

    def forward(self, x: torch.Tensor, rates: tuple[float, ...]) -> torch.Tensor:
        K, B, T, C = x.size()
        q, k, v = linear(x, self.c_attn.weight).split(C, dim=-1)
        # (K, B, T, C) -> (K, B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.reshape(K, B, T, self.n_head, C // self.n_head).transpose(2, 3) for t in (q, k, v))

        def attend(a: int, b: int, rate: float) -> torch.Tensor:
            # trials a..b and their sequences fold into the batch of one fused kernel (flash on CUDA)
            y = F.scaled_dot_product_attention(
                q[a:b].flatten(0, 1), k[a:b].flatten(0, 1), v[a:b].flatten(0, 1), dropout_p=rate, is_causal=True
            )
            return y.unflatten(0, (b - a, B))

        runs = dropout_runs(rates, self.training)
        y = torch.cat([attend(*run) for run in runs]) if len(runs) > 1 else attend(*runs[0])
        y = y.transpose(2, 3).reshape(K, B, T, C)
        return dropout(linear(y, self.c_proj.weight), rates, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, rates: tuple[float, ...]) -> torch.Tensor:
        hidden = F.gelu(linear(x, self.c_fc.weight))
        return dropout(linear(hidden, self.c_proj.weight), rates, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rates: tuple[float, ...]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rates)  # pre-norm residual stream
        return x + self.mlp(self.ln_2(x), rates)


class GPT(nn.Module):
    """nanoGPT's GPT. Its forward runs K trials at once (see `fused_forward`); one model is a stack of one.

    The parameters keep nanoGPT's names, shapes and init, so a model is a nanoGPT model for checkpoints,
    optimizers and samplers. The computation always carries a leading trial dimension K.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def total_params(self) -> int:
        """nanoGPT's count: every parameter once (tied head too), minus the position embedding."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, rates: tuple[float, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T): nanoGPT's interface, logits and the mean loss of this model.

        idx (K, B, T): K trials at once, every parameter stacked (K, ...) by `fused_forward`, which also
        passes each trial's dropout rate; returns logits (K, B, T, vocab) and each trial's mean loss (K,).
        """
        if idx.dim() == 2:  # one model is a stack of one trial
            logits, loss = fused_forward([self], idx[None], None if targets is None else targets[None])
            return logits[0], None if loss is None else loss[0]
        K, B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        rates = rates or (self.config.dropout,) * K
        wte = self.transformer.wte.weight  # (K, vocab, C)
        # trial k's ids index rows k*vocab... of the stacked tables: one embedding lookup for all trials
        offsets = torch.arange(K, device=idx.device)[:, None, None] * wte.size(1)
        x = F.embedding(idx + offsets, wte.flatten(0, 1)) + self.transformer.wpe.weight[:, None, :T]
        x = dropout(x, rates, self.training)
        for block in self.transformer.h:
            x = block(x, rates)
        x = self.transformer.ln_f(x)
        if targets is None:
            return linear(x[:, :, [-1], :], wte), None  # generation needs only the last position
        logits = linear(x, wte)  # the head, tied to the token embedding
        losses = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
        return logits, losses.view(K, -1).mean(1)

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], fused: bool
    ) -> torch.optim.AdamW:
        """AdamW with decay on 2-D tensors (matmuls, embeddings) only, never on norms or biases.

        fused: PyTorch's fused kernel, the whole update in one launch (what CUDA runs; it exists on CPU too).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx by max_new_tokens sampled characters, cropping the context to block_size."""
        for _ in range(max_new_tokens):
            context = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
        return idx


def fused_forward(
    models: Sequence[GPT], idx: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run K models of one architecture as one stacked model: idx (K, B, T) -> logits, per-trial losses (K,).

    Each parameter is stacked along a new leading trial dimension (differentiably: gradients flow back
    to every model's own tensors, so each keeps its own optimizer), and the matmuls run batched.
    """
    first = models[0]
    names = [name for name, _ in first.named_parameters()]
    if len(models) == 1:
        stacked = {name: p[None] for name, p in first.named_parameters()}
    else:
        per_model = [dict(m.named_parameters()) for m in models]
        stacked = {name: torch.stack([params[name] for params in per_model]) for name in names}
    rates = tuple(m.config.dropout for m in models)
    return functional_call(first, stacked, (idx, targets, rates), tie_weights=True, strict=True)
