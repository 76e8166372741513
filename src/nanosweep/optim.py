"""AdamW for a stack of K trials in one step: each trial's own learning rate, betas, weight decay, gradient-norm
clip and (fp16) loss scale, broadcast along the trial dimension of the stacked weights (model.GPT).

torch.optim.AdamW takes one value per hyperparameter for a whole parameter group, so K trials with K schedules
would be K optimizers and K clipping and GradScaler loops: a fused step would launch about K single steps' worth
of kernels. Here the arithmetic is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments),
torch.nn.utils.clip_grad_norm_'s (each trial's own total norm) and torch.amp.GradScaler's (skip a step whose
gradients overflowed, halve the scale; double it after 2000 good steps), done once for all trials on the two flat
tensors of the stack; tests compare it with PyTorch's, trial by trial. A trial's slice of the state converts to and
from torch.optim.AdamW's state dict, so checkpoints stay nanoGPT's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nanosweep.model import GPT

EPS = 1e-8  # torch.optim.AdamW's default, nanoGPT's too
CLIP_EPS = 1e-6  # clip_grad_norm_'s guard against a zero norm
# torch.amp.GradScaler's defaults, which nanosweep's fp16 runs have always used
INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0**16, 2.0, 0.5, 2000


class StackedAdamW:
    """AdamW over a GPT's stack of trials; hyperparameters are (K,) tensors, one entry per trial."""

    def __init__(
        self,
        model: GPT,
        betas: list[tuple[float, float]],
        weight_decay: list[float],
        grad_clip: list[float],
        loss_scaling: bool = False,
    ):
        self.model = model
        device = model.matrices.device
        column = lambda values: torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # noqa: E731
        self.hyper = [{"betas": b, "weight_decay": wd} for b, wd in zip(betas, weight_decay)]  # for state dicts
        self.beta1, self.beta2 = column([b[0] for b in betas]), column([b[1] for b in betas])
        self.weight_decay, self.grad_clip = column(weight_decay), column(grad_clip)[:, 0]
        self.steps = torch.zeros(model.trials, device=device)  # AdamW's step count, per trial
        self.moments = {  # exp_avg and exp_avg_sq of each flat tensor
            name: (torch.zeros_like(flat), torch.zeros_like(flat)) for name, flat in self.flats().items()
        }
        self.loss_scaling = loss_scaling  # fp16: each trial's loss scale, as a GradScaler per trial
        self.scale = torch.full((model.trials,), INIT_SCALE, device=device)
        self.growth_tracker = torch.zeros(model.trials, dtype=torch.int32, device=device)

    def flats(self) -> dict[str, torch.nn.Parameter]:
        return {"matrices": self.model.matrices, "gains": self.model.gains}

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        """What to call backward on: the sum of the trials' losses (their parameters are disjoint, so each gets its
        own gradient), each times its loss scale under fp16."""
        return (losses * self.scale).sum() if self.loss_scaling else losses.sum()

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One AdamW step for every trial, at lr (K,); then the gradients are dropped. Each line is one operation on
        the flat tensors (or on a (K,) one), in place where it can be: their number does not grow with K."""
        grads = {name: flat.grad for name, flat in self.flats().items()}
        if self.loss_scaling:
            for g in grads.values():
                g.mul_((1 / self.scale)[:, None])
        norms = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads.values()])
        norm = torch.linalg.vector_norm(norms, dim=0)  # each trial's total gradient norm, as clip_grad_norm_'s
        ok = torch.isfinite(norm) if self.loss_scaling else None  # an overflowed fp16 step is skipped
        if ok is not None:
            norm = torch.where(ok, norm, 0.0)
            for g in grads.values():
                g.masked_fill_(~ok[:, None], 0.0)
        coefficient = torch.where(self.grad_clip > 0, (self.grad_clip / (norm + CLIP_EPS)).clamp(max=1.0), 1.0)
        taken = ok.float()[:, None] if ok is not None else torch.ones_like(self.beta1)  # trials that step
        self.steps += taken[:, 0]
        step = self.steps.clamp(min=1)[:, None]  # a trial whose first steps all overflowed has not stepped yet
        bias1, bias2 = 1 - self.beta1**step, 1 - self.beta2**step
        step_size = lr[:, None] / bias1 * taken  # AdamW's; 0 (no update) for a skipped trial or a learning rate of 0
        moving = step_size > 0
        nonzero_step = torch.where(moving, step_size, 1.0)
        decay = 1 - lr[:, None] * self.weight_decay * taken  # decoupled weight decay, on the matrices only
        for name, flat in self.flats().items():
            g = grads[name].mul_(coefficient[:, None])
            exp_avg, exp_avg_sq = self.moments[name]
            if name == "matrices":
                flat.mul_(decay)
            exp_avg.lerp_(g, (1 - self.beta1) * taken)  # a skipped trial's moments stay as they were
            exp_avg_sq.lerp_(g.mul_(g), (1 - self.beta2) * taken)
            # flat -= step_size * exp_avg / (sqrt(exp_avg_sq / bias2) + eps), with step_size folded into the denominator
            denom = exp_avg_sq.sqrt().mul_(1 / (bias2.sqrt() * nonzero_step)).add_(EPS / nonzero_step)
            flat.addcdiv_(exp_avg, denom.masked_fill_(~moving, math.inf), value=-1.0)
            flat.grad = None
        if ok is not None:  # GradScaler.update, per trial
            self.growth_tracker = torch.where(ok, self.growth_tracker + 1, 0)
            grow = self.growth_tracker >= GROWTH_INTERVAL
            self.scale = torch.where(ok, torch.where(grow, self.scale * GROWTH_FACTOR, self.scale),
                                     self.scale * BACKOFF_FACTOR)  # fmt: skip
            self.growth_tracker = torch.where(grow, 0, self.growth_tracker)

    def keep(self, trials: list[int]) -> None:
        """Keep only these trials, in this order (call after the model's keep: the moments follow its tensors)."""
        index = torch.tensor(trials, dtype=torch.long, device=self.steps.device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        self.beta1, self.beta2, self.weight_decay = pick(self.beta1), pick(self.beta2), pick(self.weight_decay)
        self.grad_clip, self.steps = pick(self.grad_clip), pick(self.steps)
        self.moments = {name: (pick(m), pick(v)) for name, (m, v) in self.moments.items()}
        self.scale, self.growth_tracker = pick(self.scale), pick(self.growth_tracker)
        self.hyper = [self.hyper[k] for k in trials]

    # --- one trial's slice as torch.optim.AdamW's state dict (nanoGPT's checkpoint layout) ----------------------

    def _moments(self, k: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """exp_avg and exp_avg_sq as per-weight (K, *shape) views in torch.optim's parameter order; with k, views of a
        copy of trial k's moments on the CPU, (1, *shape)."""
        moments = self.moments
        if k is not None:
            moments = {n: tuple(t[k : k + 1].to("cpu", copy=True) for t in pair) for n, pair in moments.items()}
        split = lambda i: list(self.model.split({n: pair[i] for n, pair in moments.items()}).values())  # noqa: E731
        return split(0), split(1)

    def trial_state(self, k: int, lr: float) -> dict[str, Any]:
        """Trial k's state, copied to the CPU, as torch.optim.AdamW.state_dict() gives it for nanoGPT's two groups:
        what a checkpoint holds, and what nanoGPT's own AdamW loads."""
        exp_avg, exp_avg_sq = self._moments(k)
        step = self.steps[k].to("cpu", copy=True)
        state = {i: {"step": step.clone(), "exp_avg": m[0], "exp_avg_sq": v[0]}  # a step count per tensor, as torch's
                 for i, (m, v) in enumerate(zip(exp_avg, exp_avg_sq))}  # fmt: skip
        n_matrices, hyper = len(self.model.matrix_names), self.hyper[k]
        common = dict(lr=lr, betas=hyper["betas"], eps=EPS, amsgrad=False, maximize=False, foreach=None,
                      capturable=False, differentiable=False, fused=None)  # fmt: skip
        groups = [
            {**common, "weight_decay": hyper["weight_decay"], "params": list(range(n_matrices))},
            {**common, "weight_decay": 0.0, "params": list(range(n_matrices, len(state)))},
        ]
        return {"state": state, "param_groups": groups}

    def scaler_state(self, k: int) -> dict[str, Any]:
        """Trial k's loss scale as torch.amp.GradScaler.state_dict() gives it."""
        scale, tracker = torch.stack([self.scale[k], self.growth_tracker[k].float()]).tolist()
        return {"scale": scale, "growth_factor": GROWTH_FACTOR, "backoff_factor": BACKOFF_FACTOR,
                "growth_interval": GROWTH_INTERVAL, "_growth_tracker": int(tracker)}  # fmt: skip

    @torch.no_grad()
    def load_trial_state(self, k: int, state: dict[str, Any], scaler: dict[str, Any] | None = None) -> None:
        """Put a torch.optim.AdamW state dict (a checkpoint's, from any device or kernel) into trial k's slice."""
        exp_avg, exp_avg_sq = self._moments()
        saved = state["state"]
        if len(saved) != len(exp_avg):
            raise ValueError(f"optimizer state holds {len(saved)} tensors, the model {len(exp_avg)}")
        for i, (m, v) in enumerate(zip(exp_avg, exp_avg_sq)):
            m[k].copy_(saved[i]["exp_avg"])
            v[k].copy_(saved[i]["exp_avg_sq"])
        self.steps[k] = float(saved[0]["step"])
        if scaler is not None:
            self.scale[k], self.growth_tracker[k] = scaler["scale"], scaler["_growth_tracker"]
