"""Basic auth on the tracking server: no credentials, no access; the admin's credentials, a working sweep."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.server

SEARCH = "/api/2.0/mlflow/experiments/search"


def test_tracking_api_refuses_requests_without_valid_credentials(server) -> None:
    url = server.uri + SEARCH
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
    wrong = requests.get(url, params={"max_results": 1}, auth=(server.username, "not-the-password"), timeout=30)
    assert wrong.status_code == 401
    right = requests.get(url, params={"max_results": 1}, auth=(server.username, server.password), timeout=30)
    assert right.status_code == 200, right.text
    assert requests.get(server.uri + "/health", timeout=30).status_code == 200  # health checks need no login


@pytest.mark.parametrize("command", [["train", "--max-iters", "2"], ["sweep", "--member", "shallow_small"]])
def test_commands_without_credentials_fail_in_one_line(server, command) -> None:
    done = server.cli(*command, "--experiment", "never-created", authenticated=False, timeout=120)
    assert done.returncode == 1, done.stdout
    lines = done.stdout.strip().splitlines()
    assert lines == [
        f"Error: tracking server {server.uri} refused the request (HTTP 401): "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ]
    assert server.client().get_experiment_by_name("never-created") is None


def test_authenticated_sweep_succeeds(server, tiny_sweep) -> None:
    assert tiny_sweep.parent.info.status == "FINISHED"
    assert [r.info.status for r in tiny_sweep.children] == ["FINISHED"] * 4
