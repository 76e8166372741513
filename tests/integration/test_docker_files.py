"""docker/: what can be checked without a Docker engine (CI has none).

The compose file is read as YAML and held to the deployment's promises; where a Compose v2 client is
installed, `docker compose config` must also resolve it (it needs no engine).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = DOCKER / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_ports_are_published_on_localhost_only(compose) -> None:
    ports = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert ports and all(port.startswith("127.0.0.1:") for port in ports), ports


def test_postgres_keeps_its_data_in_a_named_volume_and_reports_health(compose) -> None:
    postgres = compose["services"]["postgres"]
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert set(compose["volumes"]) >= {"postgres-data", "mlflow-artifacts", "nanosweep-data"}


def test_mlflow_server_uses_postgres_proxied_artifacts_and_basic_auth(compose) -> None:
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql://" in command and "@postgres:5432/mlflow" in command
    assert "--serve-artifacts" in command and "--artifacts-destination=" in command
    assert "--app-name=basic-auth" in command
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    auth_ini = compose["configs"]["basic_auth"]["content"]
    assert "database_uri = postgresql://" in auth_ini and "authenticate_request_basic_auth" in auth_ini


def test_trainer_reserves_gpus_and_reaches_the_server_with_credentials(compose) -> None:
    trainer = compose["services"]["trainer"]
    [device] = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    env = trainer["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "MLFLOW_TRACKING_USERNAME" in env and "MLFLOW_TRACKING_PASSWORD" in env


def test_ray_nodes_run_the_trainer_image_with_gpus_on_the_workers_and_credentials_for_the_server(compose) -> None:
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert head["image"] == worker["image"] == compose["services"]["trainer"]["image"]  # one Python, torch, Ray
    assert head["entrypoint"] == worker["entrypoint"] == ["ray"]
    assert "--head" in head["command"] and "--block" in head["command"]
    assert "--address=ray-head:6379" in worker["command"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    for node in (head, worker):
        assert node["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(node["environment"])
    assert "ray" in (DOCKER / "Dockerfile").read_text().split("AS trainer", 1)[1]  # the image has the extra


def test_searches_find_their_optuna_database_on_the_stacks_postgres_from_the_trainer_and_every_ray_node(
    compose,
) -> None:
    initdb = "".join(path.read_text() for path in sorted((DOCKER / "initdb").glob("*.sql")))
    assert "CREATE DATABASE optuna;" in initdb  # made beside MLflow's when the volume is new
    for name in ("trainer", "ray-head", "ray-worker"):
        storage = compose["services"][name]["environment"]["NANOSWEEP_OPTUNA_STORAGE"]
        assert storage.startswith("postgresql+psycopg://mlflow:") and storage.endswith("@postgres:5432/optuna")
    assert "server" in (DOCKER / "Dockerfile").read_text().split("AS trainer", 1)[1]  # psycopg in the image


def test_secrets_come_from_an_uncommitted_env_file_with_a_committed_example() -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= required
    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert required <= set(example), "every required variable is in .env.example"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=DOCKER).returncode == 0
    assert ignored, "docker/.env must be ignored by git"


def test_trainer_image_runs_as_a_non_root_user_on_a_cuda_pytorch_base() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTORCH_IMAGE=pytorch/pytorch:\S+-cuda\S+", dockerfile, re.M)
    trainer = dockerfile.split("AS trainer", 1)[1]
    assert re.search(r"^USER nanosweep$", trainer, re.M) and "VOLUME /data" in trainer


def compose_v2() -> list[str] | None:
    """A Compose v2 client (`docker compose` or a `docker-compose` that is v2), or None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            version = subprocess.run([*command, "version"], capture_output=True, text=True)
            if version.returncode == 0 and "v2" in version.stdout:
                return command
    return None


def test_docker_compose_config_resolves_with_the_example_env_file(tmp_path) -> None:
    command = compose_v2()
    if command is None:
        pytest.skip("no Docker Compose v2 client here (it needs no engine for `config`)")
    base = [*command, "-f", str(COMPOSE), "--profile", "train"]
    empty = tmp_path / "empty.env"
    empty.touch()
    missing = subprocess.run([*base, "--env-file", str(empty), "config"], capture_output=True, text=True)
    assert missing.returncode != 0 and re.search(r"set \w+ in docker/.env", missing.stderr), missing.stderr
    done = subprocess.run([*base, "--env-file", str(DOCKER / ".env.example"), "config"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "host_ip: 127.0.0.1" in done.stdout and "trainer:" in done.stdout
