"""Tiny Shakespeare, character level: find the text, prepare ids once, sample batches in memory."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SOURCE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


class DataError(RuntimeError):
    """The text cannot be found, fetched or trusted."""


def data_dir() -> Path:
    """Where the downloaded text and prepared ids live: NANOSWEEP_DATA_DIR or ~/.cache/nanosweep."""
    return Path(os.environ.get("NANOSWEEP_DATA_DIR") or Path.home() / ".cache" / "nanosweep")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write then rename, so concurrent trials never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def find_input(explicit: str | os.PathLike | None = None) -> Path:
    """The verified tiny Shakespeare text: --input, NANOSWEEP_INPUT, the cache, or a fresh download."""
    chosen = explicit or os.environ.get("NANOSWEEP_INPUT")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise DataError(f"input {str(path)!r} does not exist: pass the tiny Shakespeare input.txt")
        _check_digest(path)
        return path
    cached = data_dir() / "input.txt"
    if not cached.is_file():
        try:
            with urllib.request.urlopen(SOURCE_URL, timeout=60) as response:
                payload = response.read()
        except OSError as exc:
            raise DataError(
                f"cannot download tiny Shakespeare from {SOURCE_URL} ({exc}); pass a local copy with --input"
            ) from exc
        _write_atomically(cached, payload)
    _check_digest(cached)
    return cached


def cache_input(payload: bytes) -> Path:
    """Keep a copy of the text sent from elsewhere (a sweep's driver) in this machine's cache, where find_input
    looks; a machine of a cluster may have no internet. The copy is checked before it is written."""
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SHA256:
        raise DataError(f"the text received has sha256 {digest[:12]}..., not tiny Shakespeare's {SHA256[:12]}...")
    cached = data_dir() / "input.txt"
    if not (cached.is_file() and sha256_of(cached) == SHA256):
        _write_atomically(cached, payload)
    return cached


def _check_digest(path: Path) -> None:
    digest = sha256_of(path)
    if digest != SHA256:
        raise DataError(
            f"input {str(path)!r} has sha256 {digest[:12]}..., not tiny Shakespeare's {SHA256[:12]}...: "
            "pass the canonical input.txt (or delete a corrupt cached copy to re-download)"
        )


@dataclass(frozen=True)
class Vocab:
    """The 65 characters, sorted; an id is a position in that list."""

    chars: str

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = {ch: i for i, ch in enumerate(self.chars)}
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            raise DataError(f"characters {''.join(unknown)!r} are not in the vocabulary of {self.size} characters")
        return [stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        """nanoGPT's meta.pkl as JSON: vocab_size, itos, stoi (JSON keys are strings)."""
        meta = {
            "vocab_size": self.size,
            "itos": {str(i): ch for i, ch in enumerate(self.chars)},
            "stoi": {ch: i for i, ch in enumerate(self.chars)},
        }
        return json.dumps(meta, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        itos = json.loads(text)["itos"]
        return cls("".join(itos[str(i)] for i in range(len(itos))))


@dataclass(frozen=True)
class PreparedData:
    """Paths of the prepared split ids and vocabulary, written once and shared by every run."""

    root: Path
    digest: str

    @property
    def train_bin(self) -> Path:
        return self.root / "train.bin"

    @property
    def val_bin(self) -> Path:
        return self.root / "val.bin"

    @property
    def vocab_json(self) -> Path:
        return self.root / "vocab.json"

    def vocab(self) -> Vocab:
        return Vocab.from_json(self.vocab_json.read_text(encoding="utf-8"))


def prepare(explicit: str | os.PathLike | None = None) -> PreparedData:
    """Write train/val uint16 ids and vocab.json under the data dir, unless already there."""
    prepared = PreparedData(data_dir() / "shakespeare_char", SHA256[:16])
    done = prepared.train_bin.is_file() and prepared.val_bin.is_file() and prepared.vocab_json.is_file()
    if done and not (explicit or os.environ.get("NANOSWEEP_INPUT")):
        return prepared
    source = find_input(explicit)  # a named input is always checked, even when the ids exist
    if done:
        return prepared
    text = source.read_text(encoding="utf-8")
    vocab = Vocab("".join(sorted(set(text))))
    ids = np.array(vocab.encode(text), dtype=np.uint16)
    split = int(len(ids) * TRAIN_FRACTION)
    _write_atomically(prepared.train_bin, ids[:split].tobytes())
    _write_atomically(prepared.val_bin, ids[split:].tobytes())
    _write_atomically(prepared.vocab_json, vocab.to_json().encode("utf-8"))
    return prepared


class Batches:
    """Both splits held on the training device; windows are gathered there, never re-read from disk."""

    def __init__(self, prepared: PreparedData, device: torch.device):
        def load(path: Path) -> torch.Tensor:
            ids = np.fromfile(path, dtype=np.uint16).astype(np.int64)
            return torch.from_numpy(ids).to(device)

        self.splits = {"train": load(prepared.train_bin), "val": load(prepared.val_bin)}
        self.device = device

    def draw_starts(
        self, split: str, block_size: int, generators: list[torch.Generator], n: int, steps: int = 1
    ) -> torch.Tensor:
        """Each trial's window starts for `steps` batches of n windows, (K, steps, n), on the device.

        The starts are drawn by each trial's CPU generator, so a run draws the same batches on any device and its
        checkpointed generator state resumes on CPU or GPU alike; drawing many steps at once gives the same stream
        as one draw per step (tests check it), and crosses to the device in one copy.
        """
        high = len(self.splits[split]) - block_size
        starts = torch.stack([torch.randint(high, (steps, n), generator=g) for g in generators])
        if self.device.type == "cuda":  # from pageable memory the copy would wait for the GPU's queue: pin it first
            starts = starts.pin_memory()
        return starts.to(self.device, non_blocking=True)

    def windows(self, split: str, block_size: int, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of block_size+1 characters at starts (..., n): inputs and next-character targets."""
        windows = self.splits[split][starts[..., None] + torch.arange(block_size + 1, device=self.device)]
        return windows[..., :-1], windows[..., 1:]

    def sample_trials(
        self, split: str, n: int, block_size: int, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each fused trial's own n windows, from its own generator: (K, n, block_size) twice."""
        return self.windows(split, block_size, self.draw_starts(split, block_size, generators, n)[:, 0])
