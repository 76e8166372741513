"""Training windows drawn in bulk: the same stream, and the same generator state, as one draw per step."""

import torch

from nanosweep.data import Batches


def test_drawing_many_steps_at_once_gives_each_trial_the_stream_of_one_draw_per_step(prepared):
    batches = Batches(prepared, torch.device("cpu"))
    per_step = [torch.Generator().manual_seed(s) for s in (1, 2)]
    bulk = [torch.Generator().manual_seed(s) for s in (1, 2)]
    one_by_one = torch.stack([batches.draw_starts("train", 32, per_step, 8)[:, 0] for _ in range(5)], dim=1)
    assert torch.equal(batches.draw_starts("train", 32, bulk, 8, steps=5), one_by_one)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(per_step, bulk))  # a checkpoint's state
    x, y = batches.windows("train", 32, one_by_one[:, 2])
    assert x.shape == y.shape == (2, 8, 32) and torch.equal(x[..., 1:], y[..., :-1])  # targets: the next character
