"""nanoGPT's GPT: parameter counts, state-dict names, tying and init, as nanoGPT's tools expect them."""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanosweep.model import GPT, GPTConfig, init_weights

VOCAB = 65
STUDY_ARCHITECTURES = list(itertools.product([64, 128], [4, 6], [4, 8], [128, 256]))  # block, layers, heads, embd


@pytest.mark.parametrize(("block", "layers", "heads", "embd"), STUDY_ARCHITECTURES)
def test_total_params_match_nanogpt_formula_for_every_study_architecture(block, layers, heads, embd):
    model = GPT(GPTConfig(block, VOCAB, layers, heads, embd))
    assert model.total_params() == 12 * layers * embd**2 + (2 * layers + 1) * embd + VOCAB * embd


@pytest.mark.parametrize(
    ("layers", "embd", "expected"), [(4, 128, 795_904), (4, 256, 3_164_672), (6, 128, 1_189_632), (6, 256, 4_738_560)]
)
def test_total_params_match_reference_values(layers, embd, expected):
    assert GPT(GPTConfig(128, VOCAB, layers, 4, embd)).total_params() == expected


def test_state_dict_names_are_nanogpts():
    model = GPT(GPTConfig(64, VOCAB, 2, 4, 32))
    per_block = [
        "ln_1.weight",
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "ln_2.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ]
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    expected |= {f"transformer.h.{i}.{name}" for i in range(2) for name in per_block}
    assert set(model.trial_state(0)) == expected


def test_head_is_tied_to_token_embedding_and_has_no_bias():
    state = GPT(GPTConfig(64, VOCAB, 2, 4, 32)).trial_state(0)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert all(not name.endswith(".bias") for name in state)


def test_residual_projections_use_the_scaled_init_and_each_seed_its_own_weights():
    layers = 6
    config = GPTConfig(128, VOCAB, layers, 8, 256)
    state = init_weights(config, seed=1)
    c_proj = torch.cat([state[f"transformer.h.{i}.mlp.c_proj.weight"].flatten() for i in range(layers)])
    c_fc = torch.cat([state[f"transformer.h.{i}.mlp.c_fc.weight"].flatten() for i in range(layers)])
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * layers), rel=0.02)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(state["transformer.wpe.weight"], init_weights(config, seed=1)["transformer.wpe.weight"])
    assert not torch.equal(state["transformer.wpe.weight"], init_weights(config, seed=2)["transformer.wpe.weight"])


def test_a_stack_of_trials_holds_each_trials_weights_as_its_slice_and_keeps_a_chosen_few():
    config = GPTConfig(16, VOCAB, 2, 2, 32)
    stack = GPT(config, trials=3)
    for k in range(3):
        stack.load_trial_state(k, init_weights(config, seed=k))
    idx = torch.randint(VOCAB, (3, 2, 16))
    logits, _ = stack(idx)
    stack.keep([2, 0])
    assert stack.trials == 2 and torch.equal(stack.trial_state(0)["transformer.wte.weight"],
                                             init_weights(config, seed=2)["transformer.wte.weight"])  # fmt: skip
    assert torch.allclose(stack(idx[[2, 0]])[0], logits[[2, 0]], atol=1e-6)


def test_forward_loss_at_init_is_near_uniform_and_generation_crops_context():
    config = GPTConfig(16, VOCAB, 2, 2, 32)
    model = GPT(config)
    model.load_trial_state(0, init_weights(config, seed=0))
    idx, targets = torch.randint(VOCAB, (3, 16)), torch.randint(VOCAB, (3, 16))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.2)
    out = model.generate(idx[:, :4], max_new_tokens=30, temperature=0.8, top_k=10)  # runs past block_size 16
    assert out.shape == (3, 34)


class AtenOps(TorchDispatchMode):
    """The names of the aten operations dispatched while it is active, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trials", [1, 2])
def test_on_a_cpu_bf16_attention_runs_as_matmuls_and_agrees_with_fp32_s_flash_kernel(trials):
    config = GPTConfig(16, VOCAB, 2, 2, 32)  # dropout 0: PyTorch would pick its CPU flash-attention kernel
    model = GPT(config, trials=trials)
    for k in range(trials):
        model.load_trial_state(k, init_weights(config, seed=k))
    idx, targets = torch.randint(VOCAB, (trials, 4, 16)), torch.randint(VOCAB, (trials, 4, 16))
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        with AtenOps() as ops, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            losses[dtype] = model(idx, targets)[1]
            losses[dtype].sum().backward()
        flash = {name for name in ops.names if "flash_attention" in name}
        assert bool(flash) == (dtype == torch.float32), (dtype, flash)  # its bf16 backward is slow on a CPU
    assert torch.allclose(losses[torch.bfloat16].float(), losses[torch.float32], atol=2e-2)
    with AtenOps() as ops, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, targets)  # an evaluation: no backward, and the kernel's forward is fast in bf16
    assert any("flash_attention" in name for name in ops.names)
