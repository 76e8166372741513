"""Training progress a person can watch: a tqdm bar on a terminal, plain periodic lines in a log file.

ProgressObserver sits between the training loop and the tracked run: it sees the same metrics the run
logs (iter_loss, lr, tokens_per_sec every log_interval; train_loss, val_loss at every evaluation),
passes everything on, and shows iteration, loss, the last evaluation, tokens/s and the ETA.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from nanosweep.config import TrainConfig
from nanosweep.group import RunObserver

LINE_SECONDS = 30.0  # without a terminal: a line at every evaluation, and between them at most this often


class ProgressObserver:
    """A RunObserver that shows progress on stream and forwards every call to the run it wraps."""

    def __init__(self, run: RunObserver, cfg: TrainConfig, start_iter: int = 0, stream: TextIO | None = None):
        self.run = run
        self.cfg = cfg
        self.stream = stream or sys.stderr
        self.start_iter = start_iter  # a resumed run starts at its checkpoint: the ETA counts from there
        self.started = time.monotonic()
        self.last_line = self.started
        self.loss: float | None = None
        self.tokens_per_sec: float | None = None
        self.evaluation = ""  # "train 2.41 val 2.45 @200"
        self.finished = False
        interactive = getattr(self.stream, "isatty", lambda: False)()
        self.bar = (
            tqdm(
                total=cfg.max_iters,
                initial=start_iter,
                desc=cfg.run_name,
                file=self.stream,
                unit="it",
                dynamic_ncols=True,
            )
            if interactive
            else None
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log_metrics(metrics, step)
        if self.finished:
            return
        evaluated = "val_loss" in metrics
        self.finished = evaluated and step >= self.cfg.max_iters  # the last evaluation: nothing more to show
        if evaluated:
            self.evaluation = f"train {metrics['train_loss']:.4f} val {metrics['val_loss']:.4f} @{step}"
        if "iter_loss" in metrics:
            self.loss, self.tokens_per_sec = metrics["iter_loss"], metrics["tokens_per_sec"]
        if self.bar is not None:
            self.bar.update(max(0, step - self.bar.n))
            self.bar.set_postfix_str(self._fields(), refresh=True)
            if self.finished:
                self.bar.close()
        elif evaluated or time.monotonic() - self.last_line >= LINE_SECONDS:
            self._line(step)

    def log_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run.log_checkpoint(checkpoint)

    def _fields(self) -> str:
        fields = []
        if self.loss is not None:
            fields.append(f"loss {self.loss:.4f}")
        if self.evaluation:
            fields.append(self.evaluation)
        if self.tokens_per_sec is not None:
            fields.append(f"{self.tokens_per_sec:,.0f} tok/s")
        return " | ".join(fields)

    def _line(self, step: int) -> None:
        """One plain line: where the run is, its losses, speed and the time left at the pace so far."""
        now = time.monotonic()
        done, total = step - self.start_iter, self.cfg.max_iters - self.start_iter
        eta = tqdm.format_interval((now - self.started) / done * (total - done)) if done > 0 else "-"
        percent = 100 * step / self.cfg.max_iters if self.cfg.max_iters else 100
        self.stream.write(
            f"{self.cfg.run_name} iter {step}/{self.cfg.max_iters} ({percent:.0f}%) | {self._fields()} | ETA {eta}\n"
        )
        self.stream.flush()
        self.last_line = now
