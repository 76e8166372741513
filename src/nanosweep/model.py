"""nanoGPT's GPT (bias=False) for K trials at once: every weight stacked along a leading trial dimension.

The weights of all K trials are stored in two flat tensors of shape (K, N): the matrices (which AdamW decays) and
the LayerNorm gains (which it does not). The forward pass views them under nanoGPT's names and shapes, so trial
k's weights are the slice [k], its state dict is nanoGPT's (nanoGPT's tools load our checkpoints), and the
optimizer updates all trials in a few operations on the flat tensors (optim.StackedAdamW). One model is a stack of
one: `model(idx)` with idx (B, T) is nanoGPT's interface.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEAD = "lm_head.weight"  # nanoGPT's output head: tied to the token embedding, stored once
EMBEDDING = "transformer.wte.weight"


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


def weight_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """One trial's weights in nanoGPT's parameter order, with their shapes; the tied head is the embedding."""
    C = config.n_embd
    shapes = {EMBEDDING: (config.vocab_size, C), "transformer.wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        shapes[block + "ln_1.weight"] = (C,)
        shapes[block + "attn.c_attn.weight"] = (3 * C, C)  # q, k, v in one matmul
        shapes[block + "attn.c_proj.weight"] = (C, C)
        shapes[block + "ln_2.weight"] = (C,)
        shapes[block + "mlp.c_fc.weight"] = (4 * C, C)
        shapes[block + "mlp.c_proj.weight"] = (C, 4 * C)
    shapes["transformer.ln_f.weight"] = (C,)
    return shapes


def init_weights(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """nanoGPT's init for one trial, as its state dict, drawn from its own seed: matrices normal(0, 0.02), the
    residual projections (c_proj) normal(0, 0.02/sqrt(2 n_layer)) so that the residual stream's variance stays flat
    in depth, gains 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            weights[name] = torch.empty(shape).normal_(0.0, std, generator=generator)
    weights[HEAD] = weights[EMBEDDING]  # tied
    return weights


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Trial k's x (K, B, T, in) times its own weight (K, out, in): one batched matmul for all trials. One trial's
    is nanoGPT's matmul, whose backward writes the weight's gradient in the weight's layout (bmm's is transposed,
    and copied once more on its way into the flat storage)."""
    if weight.size(0) == 1:
        return F.linear(x, weight.view(weight.shape[1:]))
    return torch.bmm(x.flatten(1, -2), weight.mT).unflatten(1, x.shape[1:-1])


def layer_norm(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """LayerNorm without bias (nanoGPT's bias=False), eps 1e-5; each trial k scales by its own gain (K, C). One
    trial's gain goes into the kernel itself, as nanoGPT's does; K gains scale the normalized x after it."""
    if gain.size(0) == 1:
        return F.layer_norm(x, x.shape[-1:], gain.view(gain.shape[1:]), eps=1e-5)  # a view: no copy in backward
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * gain[:, None, None, :]


def runs_of(values: tuple) -> list[tuple[int, int, object]]:
    """(first, end, value) for each run of neighbouring trials that share a value (a dropout rate, a head count):
    a kernel takes one such value, so each run is one call (the sweep orders a fused group so that runs are few)."""
    runs: list[tuple[int, int, object]] = []
    for k, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], k + 1, value)
        else:
            runs.append((k, k + 1, value))
    return runs


def dropout(x: torch.Tensor, rates: tuple[float, ...], rate: torch.Tensor, training: bool) -> torch.Tensor:
    """Dropout on x (K, ...) at each trial's own rate (rates, and the same as a (K,) tensor on x's device): one
    kernel when the rates agree, one mask when they do not."""
    if not training or not any(rates):
        return x
    if len(set(rates)) == 1:
        return F.dropout(x, rates[0], training=True)
    rate = rate.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    keep = torch.rand_like(x) >= rate
    return x * keep / (1 - rate)  # inverted dropout: the expected activation is unchanged


class GPT(nn.Module):
    """nanoGPT's GPT for `trials` trials of one architecture; see the module docstring for the storage."""

    def __init__(
        self,
        config: GPTConfig,
        trials: int = 1,
        rates: tuple[float, ...] | None = None,
        heads: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.config = config
        self.rates = rates or (config.dropout,) * trials  # each trial's dropout rate
        self.heads = heads or (config.n_head,) * trials  # and attention heads: the weights' shapes do not depend on it
        self.register_buffer("rate", torch.tensor(self.rates), persistent=False)  # on the device, for masks
        self.shapes = weight_shapes(config)
        self.matrix_names = [n for n, s in self.shapes.items() if len(s) > 1]
        self.gain_names = [n for n, s in self.shapes.items() if len(s) == 1]
        size = lambda names: sum(math.prod(self.shapes[n]) for n in names)  # noqa: E731
        self.matrices = nn.Parameter(torch.zeros(trials, size(self.matrix_names)))  # decayed by AdamW
        self.gains = nn.Parameter(torch.ones(trials, size(self.gain_names)))  # not decayed

    @property
    def trials(self) -> int:
        return self.matrices.size(0)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight as a (K, *shape) view of the flat storage, under nanoGPT's names."""
        return self.split({"matrices": self.matrices, "gains": self.gains})

    def split(self, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(K, *shape) views of flat tensors laid out like the weights (the weights, or AdamW's moments), the
        matrices first, in nanoGPT's order: torch.optim's parameter order for nanoGPT's two groups. One split per
        flat tensor, so the backward pass gathers every gradient into one (K, N) tensor in one concatenation."""
        views = {}
        for flat, names in ((flats["matrices"], self.matrix_names), (flats["gains"], self.gain_names)):
            parts = flat.split([math.prod(self.shapes[n]) for n in names], dim=1)
            views.update((n, part.view(flat.size(0), *self.shapes[n])) for n, part in zip(names, parts))
        return views

    def trial_state(self, k: int) -> dict[str, torch.Tensor]:
        """Trial k's weights as nanoGPT's state dict (views into the stack: copy them to keep them)."""
        state = {name: w[k] for name, w in self.weights().items()}
        state[HEAD] = state[EMBEDDING]  # tied: one matrix embeds and un-embeds
        return state

    def saved_state(self, k: int) -> dict[str, torch.Tensor]:
        """A copy of trial k's state dict on the CPU (two copies off the device, whatever the number of weights)."""
        flats = {"matrices": self.matrices[k : k + 1], "gains": self.gains[k : k + 1]}
        copies = {name: flat.detach().to("cpu", copy=True) for name, flat in flats.items()}
        state = {name: w[0] for name, w in self.split(copies).items()}
        state[HEAD] = state[EMBEDDING]
        return state

    @torch.no_grad()
    def load_trial_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Put a nanoGPT state dict into trial k's slice (checkpoints of torch.compile'd models have a prefix)."""
        state = {name.removeprefix("_orig_mod."): w for name, w in state.items()}
        expected = set(self.shapes) | {HEAD}
        if set(state) != expected:
            raise ValueError(f"state dict does not fit: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]}")  # fmt: skip
        for name, w in self.weights().items():
            if state[name].shape != w.shape[1:]:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, not {tuple(w.shape[1:])}")
            w[k].copy_(state[name])

    @torch.no_grad()
    def keep(self, trials: list[int]) -> None:
        """Keep only these trials in the stack, in this order (the others have finished)."""
        index = torch.tensor(trials, dtype=torch.long, device=self.matrices.device)
        self.matrices = nn.Parameter(self.matrices.index_select(0, index))
        self.gains = nn.Parameter(self.gains.index_select(0, index))
        self.rates, self.heads = tuple(self.rates[k] for k in trials), tuple(self.heads[k] for k in trials)
        self.rate = self.rate.index_select(0, index)

    def total_params(self) -> int:
        """nanoGPT's count for one trial: every parameter once (the tied head too), minus the position embedding."""
        return sum(math.prod(s) for n, s in self.shapes.items() if n != "transformer.wpe.weight")

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (K, B, T): logits (K, B, T, vocab) and each trial's mean loss (K,). idx (B, T): nanoGPT's interface
        for a stack of one, logits (B, T, vocab) and the mean loss. Without targets, only the last position's
        logits (what generation needs)."""
        if idx.dim() == 2:
            logits, loss = self(idx[None], None if targets is None else targets[None])
            return logits[0], None if loss is None else loss[0]
        K, B, T = idx.size()
        assert K == self.trials, f"{K} trials' inputs for a stack of {self.trials}"
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        w = self.weights()
        wte = w[EMBEDDING]  # (K, vocab, C)
        # trial k's ids index rows k*vocab... of the stacked tables: one embedding lookup for all trials
        offsets = torch.arange(K, device=idx.device)[:, None, None] * wte.size(1)
        x = F.embedding(idx + offsets, wte.flatten(0, 1)) + w["transformer.wpe.weight"][:, None, :T]
        x = dropout(x, self.rates, self.rate, self.training)
        for i in range(self.config.n_layer):
            block = f"transformer.h.{i}."
            x = x + self.attention(layer_norm(x, w[block + "ln_1.weight"]), w, block)  # pre-norm residual stream
            hidden = F.gelu(linear(layer_norm(x, w[block + "ln_2.weight"]), w[block + "mlp.c_fc.weight"]))
            x = x + dropout(linear(hidden, w[block + "mlp.c_proj.weight"]), self.rates, self.rate, self.training)
        x = layer_norm(x, w["transformer.ln_f.weight"])
        if targets is None:
            return linear(x[:, :, [-1], :], wte), None  # the head, tied to the token embedding
        logits = linear(x, wte)
        losses = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
        return logits, losses.view(K, -1).mean(1)

    def attention(self, x: torch.Tensor, w: dict[str, torch.Tensor], block: str) -> torch.Tensor:
        """Causal self-attention of every trial: heads become a batch dimension, and the trials a..b of one head
        count and dropout rate, with their sequences, fold into the batch of one fused kernel (flash attention on
        CUDA)."""
        K, B, T, C = x.size()
        q, k, v = linear(x, w[block + "attn.c_attn.weight"]).split(C, dim=-1)
        rates = self.rates if self.training else (0.0,) * K

        def attend(a: int, b: int, heads_and_rate: tuple[int, float]) -> torch.Tensor:
            nh, rate = heads_and_rate
            # (b-a, B, T, C) -> (b-a, B, nh, T, hs) -> ((b-a) B, nh, T, hs)
            whole = (a, b) == (0, K)  # a slice, even of every trial, would cost a zero-filled copy in backward
            qa, ka, va = ((t if whole else t[a:b]).reshape(b - a, B, T, nh, C // nh).transpose(2, 3).flatten(0, 1)
                          for t in (q, k, v))  # fmt: skip
            y = F.scaled_dot_product_attention(qa, ka, va, dropout_p=rate, is_causal=True)
            return y.unflatten(0, (b - a, B)).transpose(2, 3).reshape(b - a, B, T, C)

        runs = runs_of(tuple(zip(self.heads, rates)))
        # the backward of PyTorch's CPU flash-attention kernel (its choice without dropout) took 8x as long in bf16 as
        # in fp32, its forward no longer: on a CPU, bf16 attention to be differentiated runs as matmuls (bench/README)
        as_matmuls = q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
        with sdpa_kernel(SDPBackend.MATH) if as_matmuls else nullcontext():
            y = torch.cat([attend(*run) for run in runs]) if len(runs) > 1 else attend(*runs[0])
        return dropout(linear(y, w[block + "attn.c_proj.weight"]), self.rates, self.rate, self.training)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled characters, cropping the context to block_size."""
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
