"""Bad input: one line naming the value and what is allowed, a non-zero exit, and nothing written.

The table covers every command. Each case runs against one store holding a finished study (a trained run with
its checkpoint, a run with numbers only, a member with a single run), and the store, its artifacts and every
file beside it must be byte for byte what they were: no run, experiment, model, store or output file appears.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import sqlalchemy
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import tiny_config
from helpers import HEADER, SWEEPS
from nanosweep.cli.main import main
from nanosweep.cli.options import failure_line
from nanosweep.tracking.store import ensure_experiment
from study_fakes import log_known_run, shared_store, train_study_run

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--max-iters", "5", "--eval-iters", "2"]
STUDY_ROW = "b64_L4_H4_E128_BS8_MI1000_D10_s1"  # shallow_small's grid point 1
MEMBER = """\
member: tiny
global_id_offset: 200
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 8}
grid:
  dropout: [0.0, 0.1]
overrides: {device: cpu, eval_interval: 5, eval_iters: 2, gradient_accumulation_steps: 1, max_iters: 5}
"""
SPACE = """\
fixed: {block_size: 32, n_layer: 2, n_embd: 32, batch_size: 8, max_iters: 5, eval_iters: 2}
params:
  n_head: {choices: [2, 4]}
"""
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8
CORRUPT = b"SQLite format 3\x00" + bytes(2048)  # a SQLite file's header, then nothing a database holds


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at path: `ro` is a folder nobody writes (chmod does not stop root), `size=2m` a disk soon full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@dataclass(frozen=True)
class Study:
    """The store every case runs against, and what a case may name in it."""

    root: Path  # the working directory: the store, its artifacts and every file a case writes lie under it
    uri: str
    trained_run: str  # id of a finished run with checkpoint, vocabulary and samples
    trained_name: str
    stack: contextlib.ExitStack  # mounts made for the module

    def file(self, name: str, content: str | bytes) -> Path:
        """A file a case reads, written before the store is looked at."""
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def member(self, name: str, content: str | bytes) -> str:
        """A sweeps folder holding one member file."""
        return str(self.file(f"{name}/member.yaml", content).parent)

    @property
    def read_only(self) -> Path:
        """A folder on a read-only file system."""
        if not (self.root / "ro").is_mount():
            self.stack.enter_context(tmpfs(self.root / "ro", "ro,size=1m"))
        return self.root / "ro"

    @property
    def full_disk(self) -> Path:
        """A full 2 MiB disk holding an MLflow store (mlflow.db) and an Optuna storage (optuna.db): their first
        write fails. Made by other processes, so that no connection of this one keeps the mount busy."""
        folder = self.root / "full"
        if not folder.is_mount():
            self.stack.enter_context(tmpfs(folder, "size=2m"))
            make = (
                f"from mlflow import MlflowClient; MlflowClient('sqlite:///{folder}/mlflow.db').search_experiments()",
                f"import optuna; optuna.storages.RDBStorage('sqlite:///{folder}/optuna.db')",
            )
            for code in make:
                subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
            with open(folder / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(bytes(4096))
        return folder

    def study_folder(self, name: str, rows: list[str] | bytes) -> str:
        """A study folder of shallow_small whose results.csv holds the header and rows (or exactly these bytes)."""
        folder = self.root / "inputs" / name / "nanoGPT_results_vijay_shallow_small"
        folder.mkdir(parents=True)
        csv = rows if isinstance(rows, bytes) else "\n".join([HEADER, *rows, ""]).encode()
        (folder / "results.csv").write_bytes(csv)
        return str(folder)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, prepared) -> Iterator[Study]:
    root = tmp_path_factory.mktemp("bad-input")
    with shared_store(root) as uri, contextlib.ExitStack() as stack:
        experiment_id = ensure_experiment("nanosweep")
        trained = train_study_run("nanosweep", experiment_id, "m1", 2)
        log_known_run(experiment_id, "m1", 1, 1, tiny_config(seed=1, dropout=0.0), {20: (3.0, 3.1)})
        log_known_run(experiment_id, "m2", 1, 9, tiny_config(seed=1), {20: (3.2, 3.3)})  # a member of one run
        yield Study(root, uri, trained, tiny_config(seed=2).run_name, stack)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Argv = Callable[[Study], list[str]]


@dataclass(frozen=True)
class Case:
    """A command line that must be refused in one `Error:` line containing `says`, before it writes anything.

    The id starts with the command's name. `new` marks a refusal this table brought (on main the command
    trained, wrote, or printed a traceback); the others are guarantees kept.
    """

    id: str
    argv: Argv
    says: str
    new: bool = True
    env: tuple[tuple[str, Callable[[Study], str]], ...] = ()  # variables the command runs with
    process: bool = False  # a real process: MLflow's own logging reaches its stderr, not CliRunner's


def train(*args: str) -> Argv:
    return lambda s: ["train", *TINY, *args]


def train_into(uri: Callable[[Study], str]) -> Argv:
    return lambda s: ["train", *TINY, "--tracking-uri", uri(s)]


def trial_spec(run_id: str, **config: object) -> str:
    """A train-group --trial argument (JSON: NaN is a number there too)."""
    return json.dumps({"run_id": run_id, "config": {**tiny_config().to_dict(), **config}})


def group(spec: Callable[[Study], str], *args: str) -> Argv:
    return lambda s: ["train-group", "--trial", spec(s), *args]


def sweep_member(name: str, text: str | bytes, *args: str) -> Argv:
    return lambda s: ["sweep", "--member", "tiny", "--dry-run", *args, "--sweeps-dir", s.member(name, text)]


def sweep(*args: str) -> Argv:
    return lambda s: ["sweep", "--member", "shallow_small", "--sweeps-dir", str(SWEEPS), *args]


def search_space(name: str, text: str | bytes, *args: str) -> Argv:
    return lambda s: ["search", "--trials", "1", "--space", str(s.file(name, text)), *args]


def analyze(*args: str) -> Argv:
    return lambda s: ["analyze", *args]


def sample(*args: str | Callable[[Study], str]) -> Argv:
    return lambda s: ["sample", "--name", s.trained_name, *(a(s) if callable(a) else a for a in args)]


def import_csv(name: str, rows: list[str] | bytes, *args: str) -> Argv:
    return lambda s: ["import-results", s.study_folder(name, rows), "--sweeps-dir", str(SWEEPS), *args]


def row(train_loss: str = "2.2", val_loss: str = "2.3", gap: str = "0.1", params: str = "800000.0") -> str:
    return f"{STUDY_ROW},{train_loss},{val_loss},{gap},{params},/content/nanoGPT/{STUDY_ROW}.py"


CASES = [
    # --- train: TrainConfig's rules, before the store is touched ---
    Case(
        "train-learning-rate-nan",
        train("--learning-rate", "nan"),
        "learning_rate=nan is not allowed: it must be a finite number > 0",
    ),
    Case("train-learning-rate-inf", train("--learning-rate", "inf"), "learning_rate=inf is not allowed"),
    Case("train-min-lr-nan", train("--min-lr", "nan"), "min_lr=nan is not allowed: it must be a finite number >= 0"),
    Case("train-grad-clip-nan", train("--grad-clip", "nan"), "grad_clip=nan is not allowed"),
    Case("train-weight-decay-inf", train("--weight-decay", "inf"), "weight_decay=inf is not allowed"),
    Case("train-temperature-nan", train("--temperature", "nan"), "temperature=nan is not allowed"),
    Case(
        "train-temperature-subnormal",
        train("--temperature", "1e-45"),
        "temperature=1e-45 is not allowed: it must be a finite number >= 1e-06",
    ),
    Case(
        "train-samples-huge",
        train("--num-samples", "1000000000"),
        "num_samples=1000000000 is not allowed: it must be an integer in [0, 1000]",
    ),
    Case("train-beta2-nan", train("--beta2", "nan"), "beta2=nan is not allowed: it must be in [0, 1)", new=False),
    Case("train-dropout-one", train("--dropout", "1.0"), "dropout=1.0 is not allowed: it must be in [0, 1)", new=False),
    Case(
        "train-dropout-negative",
        train("--dropout", "-0.1"),
        "dropout=-0.1 is not allowed: it must be in [0, 1)",
        new=False,
    ),
    Case(
        "train-width-not-divisible",
        train("--n-embd", "30", "--n-head", "4"),
        "n_embd=30 is not divisible by n_head=4: each head gets n_embd/n_head channels",
        new=False,
    ),
    Case(
        "train-no-layers", train("--n-layer", "0"), "n_layer=0 is not allowed: it must be a positive integer", new=False
    ),
    Case(
        "train-negative-batch",
        train("--batch-size", "-8"),
        "batch_size=-8 is not allowed: it must be a positive integer",
        new=False,
    ),
    Case(
        "train-block-too-long",
        train("--block-size", "200000"),
        "block_size=200000 is longer than the validation split: it must be below 111540",
        new=False,
    ),
    Case(
        "train-device-unknown",
        train("--device", "tpu"),
        "device='tpu' is not allowed: use auto, cpu, cuda, cuda:N or mps",
        new=False,
    ),
    Case(
        "train-dtype-unknown",
        train("--dtype", "int8"),
        "dtype='int8' is not allowed: use one of auto, float32, bfloat16, float16",
        new=False,
    ),
    Case(
        "train-compile-unknown",
        train("--compile", "yes"),
        "compile='yes' is not allowed: use one of auto, on, off",
        new=False,
    ),
    Case("train-iterations-not-a-number", train("--max-iters", "ten"), "'ten' is not a valid integer", new=False),
    # --- train: runs and experiments named must exist, or be allowed ---
    Case(
        "train-parent-run-unknown",
        train("--parent-run-id", UNKNOWN_RUN),
        f"parent run '{UNKNOWN_RUN}' is not an active run of sqlite:///",
    ),
    Case(
        "train-run-id-unknown",
        train("--run-id", UNKNOWN_RUN),
        f"run '{UNKNOWN_RUN}' is not an active run of sqlite:///",
    ),
    Case("train-run-id-malformed", train("--run-id", "nope"), "run 'nope' is not an active run of sqlite:///"),
    Case(
        "train-run-of-another-config",
        lambda s: [*train()(s), "--run-id", s.trained_run],
        "was trained with config hash",
        new=False,
    ),
    Case(
        "train-experiment-name-too-long",
        train("--experiment", "x" * 600),
        "(600 characters) is not allowed: 'name' exceeds the maximum length of 500 characters",
    ),
    # --- tracking URIs, refused before anything opens them (opening a SQLite URI creates its store) ---
    Case(
        "train-tracking-uri-unknown-scheme",
        train("--tracking-uri", "bogus://x"),
        "tracking URI 'bogus://x' is not one MLflow can use",
    ),
    Case(
        "train-tracking-uri-folder-store",
        train_into(lambda s: f"file://{s.root}/mlruns"),
        "is a folder store (like ./mlruns), which MLflow 3 no longer opens",
    ),
    Case(
        "train-tracking-uri-port-out-of-range",
        train("--tracking-uri", "http://127.0.0.1:99999"),
        "tracking URI http://127.0.0.1:99999 has no valid port (Port out of range 0-65535)",
    ),
    Case(
        "train-tracking-server-unreachable",
        train_into(lambda s: f"http://127.0.0.1:{free_port()}"),
        "is unreachable (",
        new=False,
    ),
    Case(
        "train-tracking-uri-read-only-folder",
        train_into(lambda s: f"sqlite:///{s.read_only}/m.db"),
        "ro is not writable, and a new database is created there",
    ),
    Case(
        "train-tracking-uri-not-a-database",
        train_into(lambda s: f"sqlite:///{s.file('notes.txt', 'hello')}"),
        "notes.txt is not a SQLite database",
    ),
    Case(
        "train-tracking-uri-a-folder",
        train_into(lambda s: f"sqlite:///{s.root}"),
        "names a folder, not a database file",
    ),
    Case(
        "train-tracking-uri-missing-folder",
        train_into(lambda s: f"sqlite:///{s.root}/nope/m.db"),
        "nope does not exist: create it or give another path",
    ),
    Case(
        "train-tracking-uri-corrupt-database",
        train_into(lambda s: f"sqlite:///{s.file('broken.db', CORRUPT)}"),
        "broken.db failed: file is not a database",
    ),
    Case(
        "train-database-full",
        train_into(lambda s: f"sqlite:///{s.full_disk}/mlflow.db"),
        "failed: (sqlite3.OperationalError) database or disk is full",
        process=True,
    ),
    # --- train-group: what a sweep launches ---
    Case(
        "train-group-run-unknown",
        group(lambda s: trial_spec(UNKNOWN_RUN)),
        f"run '{UNKNOWN_RUN}' is not an active run of",
    ),
    Case(
        "train-group-learning-rate-nan",
        group(lambda s: trial_spec(UNKNOWN_RUN, learning_rate=float("nan"))),
        "learning_rate=nan is not allowed",
    ),
    Case(
        "train-group-fractional-samples",
        group(lambda s: trial_spec(UNKNOWN_RUN, num_samples=1.5)),
        "num_samples=1.5 is not allowed: it must be an integer",
    ),
    Case("train-group-trial-not-json", group(lambda s: "{run_id"), "is not allowed: give JSON", new=False),
    Case(
        "train-group-tag-without-value",
        group(lambda s: trial_spec(UNKNOWN_RUN), "--tag", "x"),
        "--tag 'x' is not allowed: give KEY=VALUE",
        new=False,
    ),
    Case(
        "train-group-run-of-another-config",
        group(lambda s: trial_spec(s.trained_run, max_iters=7)),
        "was trained with config hash",
        new=False,
    ),
    # --- sweep: member files checked whole (every grid point) before the store is touched ---
    Case(
        "sweep-fractional-samples",
        lambda s: [
            "sweep",
            "--member",
            "tiny",
            "--sweeps-dir",
            s.member("samples", MEMBER.replace("max_iters: 5", "max_iters: 5, num_samples: 1.5")),
        ],
        "grid point 1 {'dropout': 0.0}: num_samples=1.5 is not allowed: it must be an integer in [0, 1000]",
    ),
    Case(
        "sweep-fractional-warmup",
        sweep_member("warmup", MEMBER.replace("max_iters: 5", "max_iters: 5, warmup_iters: 2.5")),
        "warmup_iters=2.5 is not allowed: it must be an integer >= 0",
    ),
    Case(
        "sweep-learning-rate-nan",
        sweep_member("nan", MEMBER.replace("batch_size: 8", "batch_size: 8, learning_rate: .nan")),
        "learning_rate=nan is not allowed",
    ),
    Case(
        "sweep-grid-value-twice",
        sweep_member("twice", MEMBER.replace("[0.0, 0.1]", "[0.1, 0.1]")),
        "key 'grid.dropout' lists 0.1 twice: give each value once",
    ),
    Case(
        "sweep-key-twice",
        sweep_member("keys", MEMBER + "grid: {dropout: [0.2]}\n"),
        "not valid YAML (key 'grid' is given twice, line 7)",
    ),
    Case(
        "sweep-member-not-utf8",
        sweep_member("latin1", MEMBER.encode() + b"# " + LATIN1 + b"\n"),
        "member.yaml: line 7 holds byte 0xe9, which is not UTF-8: save the file as UTF-8",
    ),
    Case("sweep-member-not-yaml", sweep_member("broken", "grid: {dropout: [0.1]\n"), "not valid YAML", new=False),
    Case(
        "sweep-too-many-runs",
        sweep_member("many", MEMBER.replace("[0.0, 0.1]", "[0.1]"), "--repeats", "100001"),
        "1 grid point(s) x repeats=100001 is 100,001 runs: a sweep of one member trains at most 100,000",
    ),
    Case(
        "sweep-repeats-negative",
        sweep("--repeats", "-1"),
        "Invalid value for '--repeats': -1 is not in the range x>=0.",
        new=False,
    ),
    Case(
        "sweep-member-unknown",
        lambda s: ["sweep", "--member", "tall", "--sweeps-dir", str(SWEEPS)],
        "member='tall' is unknown: choose one of shallow_small, deep_small, shallow_large, deep_large or all",
        new=False,
    ),
    Case(
        "sweep-profile-unknown",
        sweep("--profile", "slow"),
        "profile='slow' is unknown: choose one of full, quick",
        new=False,
    ),
    Case(
        "sweep-executor-unknown",
        sweep("--executor", "k8s"),
        "executor='k8s' is not allowed: choose one of local, ray",
        new=False,
    ),
    Case("sweep-fuse-zero", sweep("--fuse", "0"), "fuse='0' is not allowed: use auto or a positive integer", new=False),
    Case("sweep-workers-negative", sweep("--workers", "-1"), "workers=-1, trials_per_gpu=1 are not allowed", new=False),
    Case(
        "sweep-tracking-uri-unknown-scheme",
        sweep("--tracking-uri", "bogus://x"),
        "tracking URI 'bogus://x' is not one MLflow can use",
    ),
    Case(
        "sweep-experiment-name-too-long",
        sweep("--dry-run", "--experiment", "y" * 600),
        "(600 characters) is not allowed",
    ),
    # --- search: the space (its fixed values too) and the Optuna storage, before any experiment or study ---
    Case(
        "search-fixed-value-invalid",
        search_space("fixed.yaml", SPACE.replace("max_iters: 5", "max_iters: 0")),
        "key 'fixed.max_iters': max_iters=0 is not allowed: it must be a positive integer",
    ),
    Case(
        "search-choice-invalid",
        search_space("choice.yaml", SPACE.replace("[2, 4]", "[2, 0]")),
        "key 'params.n_head.choices': n_head=0 is not allowed",
    ),
    Case(
        "search-key-twice",
        search_space("twice.yaml", SPACE + "params: {n_head: {choices: [8]}}\n"),
        "not valid YAML (key 'params' is given twice, line 4)",
    ),
    Case(
        "search-space-not-utf8",
        search_space("latin1.yaml", SPACE.encode() + b"# " + LATIN1 + b"\n"),
        "latin1.yaml: line 4 holds byte 0xe9, which is not UTF-8",
    ),
    Case(
        "search-space-missing",
        lambda s: ["search", "--trials", "1", "--space", str(s.root / "nope.yaml")],
        "nope.yaml: cannot be read (No such file or directory)",
        new=False,
    ),
    Case(
        "search-storage-unknown-dialect",
        lambda s: [
            *search_space("s.yaml", SPACE, "--storage", "bogus://x")(s),
            "--tracking-uri",
            f"sqlite:///{s.root}/new.db",
        ],
        "Optuna storage bogus://x cannot be opened (Can't load plugin: sqlalchemy.dialects:bogus)",
    ),
    Case(
        "search-storage-a-folder",
        lambda s: [*search_space("s.yaml", SPACE)(s), "--storage", f"sqlite:///{s.root}"],
        "names a folder, not a database file",
    ),
    Case(
        "search-storage-full",
        lambda s: [*search_space("s.yaml", SPACE)(s), "--storage", f"sqlite:///{s.full_disk}/optuna.db"],
        "the Optuna storage failed: database or disk is full",
        process=True,
    ),
    Case(
        "search-storage-corrupt",
        lambda s: [*search_space("s.yaml", SPACE)(s), "--storage", f"sqlite:///{s.file('broken.db', CORRUPT)}"],
        "broken.db cannot be opened (file is not a database): check it, or give another --storage",
    ),
    Case(
        "search-no-trials",
        lambda s: [*search_space("s.yaml", SPACE)(s), "--trials", "0"],
        "trials=0, workers=1 are not allowed: trials >= 1, workers >= 0",
        new=False,
    ),
    Case(
        "search-executor-unknown",
        search_space("s.yaml", SPACE, "--executor", "k8s"),
        "executor='k8s' is not allowed: choose one of local, ray",
        new=False,
    ),
    Case(
        "search-pruner-unknown",
        search_space("s.yaml", SPACE, "--pruner", "soon"),
        "pruner='soon' is unknown: choose one of asha, hyperband, median, none",
        new=False,
    ),
    Case(
        "search-sampler-unknown",
        search_space("s.yaml", SPACE, "--sampler", "best"),
        "sampler='best' is unknown: choose one of tpe, random, grid, cmaes",
        new=False,
    ),
    # --- analyze ---
    Case(
        "analyze-out-read-only",
        lambda s: ["analyze", "--member", "m1", "--out", str(s.read_only)],
        "ro is not writable: choose a folder you may write",
    ),
    Case(
        "analyze-out-inside-read-only",
        lambda s: ["analyze", "--member", "m1", "--out", str(s.read_only / "results")],
        "ro/results cannot be made there",
    ),
    Case(
        "analyze-one-configuration",
        analyze("--member", "m2"),
        "share one configuration of block_size, n_layer, n_head, n_embd, batch_size, max_iters, dropout",
    ),
    Case(
        "analyze-member-unknown",
        analyze("--member", "m9"),
        "member='m9' has no finished quick runs in any experiment of the tracking store",
        new=False,
    ),
    Case(
        "analyze-profile-absent",
        analyze("--member", "m1", "--profile", "full"),
        "profile='full' has no finished runs",
        new=False,
    ),
    Case(
        "analyze-experiment-unknown", analyze("--experiment", "nosuch"), "experiment 'nosuch' does not exist", new=False
    ),
    Case(
        "analyze-search-storage-unknown-dialect",
        analyze("--search", "s", "--storage", "bogus://x"),
        "Optuna storage bogus://x cannot be opened",
    ),
    Case(
        "analyze-tracking-uri-a-folder",
        lambda s: ["analyze", "--tracking-uri", f"sqlite:///{s.root}"],
        "names a folder, not a database file",
    ),
    # --- download ---
    Case(
        "download-out-read-only",
        lambda s: ["download", "--member", "m1", "--out", str(s.read_only)],
        "ro is not writable",
    ),
    Case(
        "download-out-inside-read-only",
        lambda s: ["download", "--member", "m1", "--out", str(s.read_only / "r")],
        "ro/r cannot be made there",
    ),
    Case("download-run-unknown", lambda s: ["download", "--name", "b1_L1"], "no finished run named 'b1_L1'", new=False),
    Case(
        "download-tracking-uri-port-out-of-range",
        lambda s: ["download", "--tracking-uri", "https://localhost:70000"],
        "has no valid port",
    ),
    # --- sample: SampleSettings checks with TrainConfig's rules, before the model is fetched ---
    Case("sample-empty-prompt", sample("--prompt", ""), "prompt='' is not allowed: give at least one character"),
    Case(
        "sample-empty-prompt-file",
        sample("--prompt", lambda s: f"FILE:{s.file('empty.txt', '')}"),
        "prompt='' is not allowed",
    ),
    Case(
        "sample-temperature-subnormal",
        sample("--temperature", "1e-45"),
        "temperature=1e-45 is not allowed: it must be a finite number >= 1e-06",
    ),
    Case("sample-temperature-nan", sample("--temperature", "nan"), "temperature=nan is not allowed"),
    Case(
        "sample-samples-huge",
        sample("--num-samples", "1000000000"),
        "num_samples=1000000000 is not allowed: it must be an integer in [0, 1000]",
    ),
    Case(
        "sample-prompt-file-not-utf8",
        sample("--prompt", lambda s: f"FILE:{s.file('prompt.txt', b'ROMEO ' + LATIN1)}"),
        "prompt.txt: line 1 holds byte 0xe9, which is not UTF-8",
    ),
    Case(
        "sample-prompt-file-missing",
        sample("--prompt", lambda s: f"FILE:{s.root}/nope.txt"),
        "cannot be read (No such file or directory)",
        new=False,
    ),
    Case(
        "sample-prompt-outside-vocabulary",
        sample("--prompt", "\u20ac"),
        "characters '\u20ac' are not in the vocabulary of 65 characters",
        new=False,
    ),
    Case("sample-run-unknown", lambda s: ["sample", "--name", "b1_L1"], "no finished run named 'b1_L1'", new=False),
    Case("sample-device-unknown", sample("--device", "tpu"), "device='tpu' is not allowed", new=False),
    # --- import-results: the whole CSV checked before the first run ---
    Case(
        "import-results-nan-loss",
        import_csv("nan", [row(train_loss="nan")]),
        "results.csv, line 2: Train Loss 'nan' is not allowed: it must be a finite number",
    ),
    Case(
        "import-results-infinite-loss",
        import_csv("inf", [row(val_loss="inf", gap="-inf")]),
        "results.csv, line 2: Val Loss 'inf' is not allowed",
    ),
    Case(
        "import-results-infinite-params",
        import_csv("params", [row(params="-inf")]),
        "line 2: Total Params '-inf' is not allowed",
    ),
    Case(
        "import-results-csv-not-utf8",
        import_csv("latin1", f"{HEADER}\n{row()}".encode() + LATIN1 + b"\n"),
        "results.csv: line 2 holds byte 0xe9, which is not UTF-8",
    ),
    Case(
        "import-results-header-wrong",
        import_csv("header", b"Experiment,Val Loss\n"),
        "line 1: header is 'Experiment,Val Loss', expected",
        new=False,
    ),
    Case(
        "import-results-member-unknown",
        import_csv("member", [row()], "--member", "tall"),
        "member='tall' is unknown",
        new=False,
    ),
    Case(
        "import-results-tracking-uri-unknown-scheme",
        import_csv("uri", [row()], "--tracking-uri", "bogus://x"),
        "tracking URI 'bogus://x' is not one MLflow can use",
    ),
    # --- register: the model's name checked before a model is logged ---
    Case(
        "register-model-name-invalid",
        lambda s: ["register", "--member", "m1", "--model-name", "bad/name:%"],
        "Invalid model name 'bad/name:%'. Names cannot contain '/' or ':'. Choose another with --model-name.",
    ),
    Case(
        "register-member-and-run",
        lambda s: ["register", "--member", "m1", "--name", s.trained_name],
        "give exactly one of --member (its best run) and --name (that run)",
        new=False,
    ),
    Case("register-run-unknown", lambda s: ["register", "--name", "b1_L1"], "no finished run named 'b1_L1'", new=False),
    Case(
        "register-member-unknown",
        lambda s: ["register", "--member", "m9"],
        "member='m9' has no finished quick runs",
        new=False,
    ),
    Case(
        "register-experiment-name-too-long",
        lambda s: ["register", "--member", "m1", "--experiment", "z" * 501],
        "(501 characters) is not allowed",
    ),
    # --- prepare ---
    Case(
        "prepare-input-missing",
        lambda s: ["prepare", "--input", str(s.root / "nope.txt")],
        "does not exist: pass the tiny Shakespeare input.txt",
        new=False,
    ),
    Case("prepare-input-a-folder", lambda s: ["prepare", "--input", str(s.root)], "is a directory", new=False),
    Case(
        "prepare-input-not-shakespeare",
        lambda s: ["prepare", "--input", str(s.file("input.txt", "To be\n"))],
        "not tiny Shakespeare's 86c4e6aa9db7",
        new=False,
    ),
    Case(
        "prepare-data-folder-read-only",
        lambda s: ["prepare"],
        "shakespeare_char: Read-only file system: check the path",
        env=(("NANOSWEEP_DATA_DIR", lambda s: str(s.read_only)),),
    ),
]


def store_state(root: Path) -> dict[str, str]:
    """Every file under root (the stores, their artifacts, inputs, outputs) by its bytes."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_command(argv: list[str], process: bool) -> tuple[int, str]:
    if process:
        done = subprocess.run([sys.executable, "-m", "nanosweep", *argv], capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(case, study, monkeypatch):
    monkeypatch.chdir(study.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
    mlflow.set_tracking_uri(study.uri)  # a case's --tracking-uri must not leak into the next one
    argv = case.argv(study)  # writes the files it names, before the state is taken
    for name, value in case.env:
        monkeypatch.setenv(name, value(study))
    before = store_state(study.root)
    code, output = run_command(argv, case.process)
    after = store_state(study.root)
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert code != 0 and "Traceback" not in output, output
    assert errors == lines[-1:] and case.says in errors[0], output  # one Error line, the last
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_the_table_covers_every_command_with_sixty_cases_or_more():
    commands = sorted(main.commands, key=len, reverse=True)  # train-group before train
    covered = {next(c for c in commands if case.id.startswith(f"{c}-")) for case in CASES}
    assert covered == set(main.commands) and len(CASES) >= 60


def failure_of(action: Callable[[], object]) -> Exception:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError(f"{action} did not fail")


def test_what_slips_past_the_checks_becomes_one_line_naming_what_failed_and_a_bug_keeps_its_traceback(store, tmp_path):
    missing = tmp_path / "gone.txt"
    assert failure_line(failure_of(missing.read_text)) == (
        f"{missing}: No such file or directory: check the path, its permissions and the space left on its disk"
    )
    assert failure_line(failure_of(b"caf\xe9!".decode)) == (
        "a file is not UTF-8 text (invalid continuation byte at byte 3): save it as UTF-8"
    )
    assert failure_line(failure_of(lambda: MlflowClient().get_run("nope"))) == (
        f"tracking store {store} failed: Run with id=nope not found"
    )
    database = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/no/such/folder.db")
    assert failure_line(failure_of(database.connect)) == (
        f"tracking store {store} failed: unable to open database file"
    )
    assert failure_line(failure_of(lambda: int("one"))) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused(store):
    result = CliRunner().invoke(main, ["train", *TINY, "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output == "Error: device='cuda' is not available on this machine: use auto or cpu\n"
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


def test_a_file_that_is_not_tiny_shakespeare_is_refused(store, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSWEEP_DATA_DIR", str(tmp_path / "fresh"))  # nothing prepared there yet
    impostor = tmp_path / "input.txt"
    impostor.write_text("To be, or not to be\n" * 100)
    result = CliRunner().invoke(main, ["train", *TINY, "--input", str(impostor)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert f"input '{impostor}' has sha256 " in result.output and "not tiny Shakespeare's 86c4e6aa9db7" in result.output
    assert not (tmp_path / "fresh" / "shakespeare_char").exists()


def test_an_unreachable_tracking_server_fails_fast_naming_the_uri(store):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["train", *TINY, "--tracking-uri", uri])
    assert time.monotonic() - started < 20  # not MLflow's minutes of HTTP retries
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: tracking server {uri} is unreachable (")
    assert result.output.count("\n") == 1


def test_the_ray_executor_without_ray_installed_says_how_to_install_it(store, sweeps_dir):
    hide_ray = "import sys; sys.modules['ray'] = None; from nanosweep.cli.main import main; main()"  # no Ray
    argv = [sys.executable, "-c", hide_ray, "sweep", "--member", "tiny", "--sweeps-dir", str(sweeps_dir)]
    result = subprocess.run([*argv, "--executor", "ray"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: executor='ray' needs Ray, which is not installed: pip install 'nanosweep[ray]'"
    )
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
