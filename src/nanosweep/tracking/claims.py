"""One driver per point: claims taken as experiment names the store keeps unique (README, "Claims")."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from nanosweep.signals import stop_signals
from nanosweep.tracking.heartbeat import alive
from nanosweep.tracking.names import CLAIM_DRIVER_TAG, CLAIM_PREFIX


@dataclass(frozen=True)
class Claim:
    number: int  # the point's claims are numbered 1, 2, ... in the order they were taken
    driver: str  # the parent run id of the sweep or search that took it


class Claims:
    """Which driver (sweep or search) may launch a point: one configuration (its config hash) of one scope (a
    sweep's profile, or search-<name>) in one experiment. README, "Claims: one driver per point".

    A claim is an experiment whose name says which point and which claim number it is: MLflow refuses to create
    an experiment whose name exists (deleted ones included), so of drivers taking the same number, exactly one
    succeeds. Each claim is deleted at once: out of the UI, its name kept. The latest claim of a point stands for
    as long as its driver lives (its parent run RUNNING with a fresh heartbeat). Read the claims before the runs:
    whoever launched since this read took the next number first, so this driver's take of it fails.
    """

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str, str], Claim] = {}  # (experiment id, scope, config hash) -> latest claim
        self._alive: dict[str, bool] = {}  # driver -> alive, looked up once
        client, token = MlflowClient(), None
        while True:
            page = client.search_experiments(
                ViewType.ALL, max_results=1000, filter_string=f"name LIKE '{CLAIM_PREFIX}/%'", page_token=token
            )
            for experiment in page:
                self._note(experiment.name, experiment.tags.get(CLAIM_DRIVER_TAG, ""))
            token = page.token
            if not token:
                return

    def _note(self, name: str, driver: str) -> None:
        *point, number = name.removeprefix(f"{CLAIM_PREFIX}/").split("/")
        if len(point) < 3 or not number.isdigit():
            return  # not one of ours
        key = (point[0], "/".join(point[1:-1]), point[-1])
        if key not in self.latest or int(number) > self.latest[key].number:
            self.latest[key] = Claim(int(number), driver)

    def holder(self, experiment_id: str, scope: str, config_hash: str) -> str | None:
        """The driver whose claim on the point stands (it is the latest, and its driver lives), if any."""
        claim = self.latest.get((experiment_id, scope, config_hash))
        if claim is None:
            return None
        if claim.driver not in self._alive:
            try:
                run = MlflowClient().get_run(claim.driver)
                self._alive[claim.driver] = run.info.status == "RUNNING" and alive(run.data.tags)
            except MlflowException:  # its run is gone: so is it
                self._alive[claim.driver] = False
        return claim.driver if self._alive[claim.driver] else None

    def take(self, experiment_id: str, scope: str, config_hash: str, driver: str) -> str:
        """Claim the point for driver: the next number after the latest one read. Returns the driver holding that
        claim now: driver itself, or the one that took it first."""
        key = (experiment_id, scope, config_hash)
        number = self.latest[key].number + 1 if key in self.latest else 1
        name = f"{CLAIM_PREFIX}/{experiment_id}/{scope}/{config_hash}/{number}"
        client = MlflowClient()
        with stop_signals.deferred():  # created and deleted in one step
            try:
                client.delete_experiment(client.create_experiment(name, tags={CLAIM_DRIVER_TAG: driver}))
                winner = driver
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                existing = client.get_experiment_by_name(name)  # a retried request of ours, or another driver's
                winner = existing.tags.get(CLAIM_DRIVER_TAG, "") if existing else ""
                if winner == driver and existing.lifecycle_stage == "active":
                    client.delete_experiment(existing.experiment_id)
        self._note(name, winner)
        self._alive.setdefault(winner, True)  # it took the claim just now
        return winner
