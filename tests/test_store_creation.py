"""A new SQLite store is made once and whole, whoever opens it at the same time and whenever a process is killed;
one left half-made is refused in one line; a refused command makes no store at all (issue 17)."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_latest_schema_revision

from helpers import TRAIN

TINY = ["train", *TRAIN, "--max-iters", "2", "--eval-interval", "2"]
QUICK_MEMBER = """\
member: tiny
fixed: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, batch_size: 4, max_iters: 2}
grid: {dropout: [0.0]}
"""


@pytest.fixture
def fresh(tmp_path, monkeypatch, prepared) -> dict:
    """A folder with no store, where the commands run with MLflow's default URI (./mlflow.db)."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "tiny.yaml").write_text(QUICK_MEMBER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k == "MLFLOW_DISABLE_TELEMETRY"}
    return {**env, "NANOSWEEP_SWEEPS_DIR": str(tmp_path / "sweeps")}


def nanosweep(env: dict, cwd: Path, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "nanosweep", *args]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def schema(db: Path) -> str | None:
    """The store's schema revision as alembic recorded it; None when there is none."""
    with contextlib.closing(sqlite3.connect(db)) as conn:  # a killed writer's journal is rolled back first
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "alembic_version" not in tables:
            return None
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def assert_absent_or_whole(db: Path) -> None:
    if db.exists():
        assert schema(db) == _get_latest_schema_revision(), "a half-made store"


def test_commands_opening_a_new_store_together_make_one_whole_store(fresh, tmp_path):
    procs = [nanosweep(fresh, tmp_path, *TINY, "--seed", str(seed)) for seed in (1, 2, 3)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], results
    assert_absent_or_whole(tmp_path / "mlflow.db")
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3


@pytest.mark.parametrize("after", [0.0, 0.3, 1.0])
def test_a_kill_at_any_moment_of_creation_leaves_no_store_or_a_whole_one(fresh, tmp_path, after):
    db = tmp_path / "mlflow.db"
    proc = nanosweep(fresh, tmp_path, *TINY)
    building = [db, tmp_path / ".mlflow.db.creating"]  # the store, or the file it is being built in
    while not any(path.exists() for path in building):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert_absent_or_whole(db)
    again = nanosweep(fresh, tmp_path, *TINY)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_absent_or_whole(db)
    assert not (tmp_path / ".mlflow.db.creating").exists()


MLFLOW_OPENS = [sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"]


def half_made_store(db: Path) -> None:
    """A store whose creation by MLflow itself (not by nanosweep) was cut off by SIGKILL mid-migration."""
    for after in (0.3, 0.6, 1.0, 0.15, 1.5):
        db.unlink(missing_ok=True)
        proc = subprocess.Popen([*MLFLOW_OPENS, f"sqlite:///{db}"], stderr=subprocess.DEVNULL)
        while not db.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(after)
        proc.kill()
        proc.wait()
        if db.exists() and schema(db) != _get_latest_schema_revision():
            return
    pytest.fail("MLflow finished making the store before every kill")


@pytest.mark.parametrize("command", [["sweep", "--member", "tiny"], ["analyze"]])
def test_a_store_left_half_made_is_refused_in_one_line_saying_how_to_recover(fresh, tmp_path, command):
    db = tmp_path / "mlflow.db"
    half_made_store(db)
    before = db.read_bytes()
    proc = nanosweep(fresh, tmp_path, *command)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    [line] = err.splitlines()
    assert line.startswith(f"Error: tracking store {db} was left half-made (schema revision ")
    assert "and holds no runs: its creation was cut off by a kill or by another process" in line
    assert line.endswith(f"Delete it (rm {db}) and run again: the store is then made whole, once")
    assert db.read_bytes() == before  # untouched


def test_a_store_that_mlflow_is_making_at_the_same_moment_is_waited_for_not_refused(fresh, tmp_path):
    db = tmp_path / "mlflow.db"
    maker = subprocess.Popen([*MLFLOW_OPENS, f"sqlite:///{db}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not db.exists():
        assert maker.poll() is None
        time.sleep(0.01)
    time.sleep(0.3)
    maker.send_signal(signal.SIGSTOP)  # MLflow (say `mlflow ui`, started at the same time) is making it, slowly
    try:
        proc = nanosweep(fresh, tmp_path, "analyze")
        time.sleep(8)  # the command has started, and found the store half-made
    finally:
        maker.send_signal(signal.SIGCONT)
    assert maker.wait(timeout=300) == 0, maker.stderr.read()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "holds no finished trial or imported runs" in err, err
    assert schema(db) == _get_latest_schema_revision()


REFUSED = [
    (["analyze", "--member", "tiny"], "no tracking store at {db}"),
    (["download", "--member", "tiny"], "no tracking store at {db}"),
    (["sample", "--name", "b32_L2_H2_E32_BS4_MI2_D0_s1"], "no tracking store at {db}"),
    (["register", "--member", "tiny"], "no tracking store at {db}"),
    (["train", *TRAIN, "--run-id", "0123456789abcdef0123456789abcdef"], "no tracking store at {db}"),
    (["analyze", "--search", "nosuch"], "search='nosuch' has no study in sqlite:///{db.parent}/optuna.db"),
]


@pytest.mark.parametrize(
    ("args", "message"), REFUSED, ids=["analyze", "download", "sample", "register", "train-run-id", "analyze-search"]
)
def test_a_refused_command_makes_no_store(fresh, tmp_path, args, message):
    proc = nanosweep(fresh, tmp_path, *args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    [line] = err.splitlines()
    assert line.startswith("Error: ") and message.format(db=tmp_path / "mlflow.db") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweeps"]


def test_a_dry_run_makes_no_store(fresh, tmp_path):
    proc = nanosweep(fresh, tmp_path, "sweep", "--member", "tiny", "--dry-run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err.strip().endswith("1 run"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweeps"]
