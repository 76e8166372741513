"""The sweep as a person sees it: the MLflow UI in headless Chromium (Debian's), logged in with basic auth.

Screenshots go to NANOSWEEP_TEST_SCREENSHOTS (default tests/integration/screenshots/) for a human to look at.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_checks import skip_or_fail

pytestmark = [pytest.mark.server, pytest.mark.browser]

CHROMIUM = os.environ.get("NANOSWEEP_TEST_CHROMIUM", "/usr/bin/chromium")
# without the background-networking flags Chromium keeps calling home, which this network refuses
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# the "Model training" view (not GenAI), and the assistant panel closed, as a person would leave them
UI_SETTINGS = """
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("NANOSWEEP_TEST_SCREENSHOTS", Path(__file__).parent / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server) -> Iterator:
    if not shutil.which(CHROMIUM):
        skip_or_fail(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(
            http_credentials={"username": server.username, "password": server.password},
            viewport={"width": 1600, "height": 1500},
        )
        context.add_init_script(UI_SETTINGS)
        context.set_default_timeout(TIMEOUT_MS)
        yield context.new_page()
        browser.close()


def shoot(page, screenshots: Path, name: str) -> None:
    path = screenshots / f"{name}.png"
    page.wait_for_timeout(1000)  # let charts finish drawing
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def test_experiment_page_lists_the_sweep_with_its_trials_nested(server, tiny_sweep, page, screenshots) -> None:
    parent_id = tiny_sweep.parent.info.run_id
    page.goto(f"{server.uri}/#/experiments/{tiny_sweep.experiment_id}/runs")
    parent_cell = page.locator('[role="gridcell"]').filter(has=page.locator(f'a[href$="/runs/{parent_id}"]'))
    parent_cell.get_by_text(tiny_sweep.parent.info.run_name, exact=True).wait_for()
    first_child = page.get_by_text(tiny_sweep.children[0].info.run_name, exact=True)
    assert first_child.count() == 0, "the trials show only when their sweep is expanded"
    parent_cell.locator("button").first.click()  # the expander before the run name
    for run in tiny_sweep.children:
        page.locator(f'a[href$="/runs/{run.info.run_id}"]').wait_for()
        page.get_by_text(run.info.run_name, exact=True).wait_for()
    shoot(page, screenshots, "1-experiment-runs")


def test_run_page_shows_params_and_the_val_loss_chart(server, tiny_sweep, page, screenshots) -> None:
    run = tiny_sweep.children[-1]
    base = f"{server.uri}/#/experiments/{tiny_sweep.experiment_id}/runs/{run.info.run_id}"
    page.goto(base)
    page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    params = page.locator("table, [role='table']").filter(has_text="n_embd")
    for key in ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters", "dropout", "total_params"):
        params.get_by_text(key, exact=True).first.wait_for()
    shoot(page, screenshots, "2-run-overview")

    page.goto(f"{base}/model-metrics")
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=page.get_by_text("val_loss", exact=True))
    card.locator(".js-plotly-plot path.js-line").first.wait_for()  # a drawn line, not an empty chart
    shoot(page, screenshots, "3-run-metrics")


def test_compare_view_opens_for_two_runs(server, tiny_sweep, page, screenshots) -> None:
    first, last = tiny_sweep.children[0], tiny_sweep.children[-1]
    runs = json.dumps([first.info.run_id, last.info.run_id])
    page.goto(f"{server.uri}/#/compare-runs?runs={runs}&experiments={json.dumps([tiny_sweep.experiment_id])}")
    page.get_by_text("Comparing 2 Runs", exact=False).wait_for()
    for run in (first, last):
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    page.get_by_text("max_iters", exact=True).first.wait_for()  # the params table, side by side
    shoot(page, screenshots, "4-compare-runs")
