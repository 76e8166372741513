"""One AdamW step for a stack of trials, against PyTorch's own AdamW and clip_grad_norm_ on each trial alone."""

import pytest
import torch

from nanosweep.model import GPT, GPTConfig, init_weights
from nanosweep.optim import StackedAdamW

CONFIG = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
# three trials that differ in every hyperparameter the optimizer takes
TRIALS = [
    dict(seed=1, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0),
    dict(seed=2, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.0, grad_clip=0.05),  # clips at every step
    dict(seed=3, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.5, grad_clip=0.0),  # no clipping
]


def gradients(step: int, flat: torch.Tensor) -> torch.Tensor:
    """The same gradients for the stack and for each trial alone (the optimizer is what is compared, not the
    forward pass): trial 0's too small to clip, trial 1's clipped, sparse zeros, a few large values."""
    g = torch.randn(flat.shape, generator=torch.Generator().manual_seed(step))
    g *= torch.tensor([1e-3, 1e-2, 1e-1])[:, None] * (torch.rand(flat.shape) > 0.1)
    return g


def trial_alone(k: int) -> tuple[GPT, torch.optim.AdamW]:
    """Trial k as a stack of one, stepped by torch.optim.AdamW with nanoGPT's two groups."""
    t = TRIALS[k]
    model = GPT(CONFIG)
    model.load_trial_state(0, init_weights(CONFIG, t["seed"]))
    groups = [{"params": [model.matrices], "weight_decay": t["weight_decay"]}, {"params": [model.gains],
              "weight_decay": 0.0}]  # fmt: skip
    return model, torch.optim.AdamW(groups, lr=t["lr"], betas=t["betas"])


def test_the_stacked_step_equals_torch_adamw_and_clip_grad_norm_on_each_trial_alone_over_50_steps():
    stack = GPT(CONFIG, trials=len(TRIALS))
    for k, t in enumerate(TRIALS):
        stack.load_trial_state(k, init_weights(CONFIG, t["seed"]))
    optimizer = StackedAdamW(
        stack, [t["betas"] for t in TRIALS], [t["weight_decay"] for t in TRIALS], [t["grad_clip"] for t in TRIALS]
    )
    alone = [trial_alone(k) for k in range(len(TRIALS))]
    lr = torch.tensor([t["lr"] for t in TRIALS])
    clipped = [False] * len(TRIALS)
    for step in range(50):
        stack.matrices.grad = gradients(2 * step, stack.matrices)
        stack.gains.grad = gradients(2 * step + 1, stack.gains)
        grads = (stack.matrices.grad.clone(), stack.gains.grad.clone())
        optimizer.step(lr * (step + 1) / 50)  # a warmup, different for each trial
        for k, (model, torch_adamw) in enumerate(alone):
            model.matrices.grad, model.gains.grad = grads[0][k : k + 1].clone(), grads[1][k : k + 1].clone()
            if TRIALS[k]["grad_clip"]:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), TRIALS[k]["grad_clip"])
                clipped[k] |= bool(norm > TRIALS[k]["grad_clip"])
            for group in torch_adamw.param_groups:
                group["lr"] = TRIALS[k]["lr"] * (step + 1) / 50
            torch_adamw.step()
            torch_adamw.zero_grad(set_to_none=True)
    assert clipped == [False, True, False]
    for k, (model, torch_adamw) in enumerate(alone):
        for name, value in model.trial_state(0).items():
            assert torch.allclose(stack.trial_state(k)[name], value, rtol=0, atol=1e-6), (k, name)
        for flat, (exp_avg, exp_avg_sq) in zip((model.matrices, model.gains), optimizer.moments.values()):
            assert torch.allclose(exp_avg[k], torch_adamw.state[flat]["exp_avg"][0], rtol=0, atol=1e-6)
            assert torch.allclose(exp_avg_sq[k], torch_adamw.state[flat]["exp_avg_sq"][0], rtol=1e-5)
        assert float(optimizer.trial_state(k, lr=0.0)["state"][0]["step"]) == 50


def nanogpt_adamw(model: GPT, lr: float, fused: bool) -> torch.optim.AdamW:
    """What nanoGPT's configure_optimizers builds: one tensor per weight, decayed 2-D ones and the rest."""
    weights = [torch.nn.Parameter(w.detach().clone()) for name, w in model.trial_state(0).items()
               if name != "lm_head.weight"]  # fmt: skip
    groups = [{"params": [w for w in weights if w.dim() >= 2], "weight_decay": 0.1},
              {"params": [w for w in weights if w.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)
    for w in weights:
        w.grad = torch.randn_like(w)  # a step, so that it has state to save
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("fused", [False, True], ids=["PyTorch's loop kernel", "PyTorch's fused kernel"])
def test_a_trials_state_is_nanogpts_adamw_state_dict_both_ways_whichever_kernel_saved_it(fused):
    model = GPT(CONFIG)
    model.load_trial_state(0, init_weights(CONFIG, seed=1))
    saved = nanogpt_adamw(model, 3e-4, fused).state_dict()
    stack = GPT(CONFIG, trials=2)
    optimizer = StackedAdamW(stack, [(0.9, 0.95)] * 2, [0.1] * 2, [1.0] * 2)
    optimizer.load_trial_state(1, saved)
    ours = optimizer.trial_state(1, lr=3e-4)
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in saved["param_groups"]]
    for i, state in saved["state"].items():
        assert float(ours["state"][i]["step"]) == float(state["step"]) == 1.0
        assert torch.equal(ours["state"][i]["exp_avg"], state["exp_avg"])
        assert torch.equal(ours["state"][i]["exp_avg_sq"], state["exp_avg_sq"])
    nanogpt_adamw(model, 3e-4, not fused).load_state_dict(ours)  # and nanoGPT's own AdamW loads ours
