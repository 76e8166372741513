"""A tracking server that is not there fails a command at once, in one line that names the URI.

Needs no server (nothing listens on the port), so it runs in every test session.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanosweep.data import PreparedData

TINY_TRAIN = ["--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--max-iters", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = [
    ["train", *TINY_TRAIN],
    ["sweep", "--member", "shallow_small"],
    ["analyze", "--member", "shallow_small"],
    ["download", "--member", "shallow_small"],
    ["sample", "--name", "b64_L4_H4_E128_BS8_MI1000_D10_s1"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_unreachable_server_fails_fast_in_one_line(command: list[str], tmp_path: Path, prepared: PreparedData) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "nanosweep", *command, "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and uri in lines[0] and "unreachable" in lines[0]
    assert seconds < 60, f"took {seconds:.1f} s: MLflow's HTTP retries (minutes) were not cut short"
    assert not list(tmp_path.iterdir()), "nothing may be written when the server is unreachable"
