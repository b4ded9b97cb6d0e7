"""The public health page, loaded in a real headless Chromium against a live 3-server swarm."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from blocks.checkpoint import Checkpoint
from blocks.synthetic import make_random_checkpoint
from harness.local_swarm import LocalSwarm
from harness.processes import Child
from tests.helpers.artifacts import ARTIFACTS

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()


def test_health_page_shows_coverage_and_servers_and_refreshes(tmp_path, browser):
    path = make_random_checkpoint(tmp_path / "llama8", "llama", num_layers=8, seed=13)
    name = Checkpoint(path).default_model_name
    ARTIFACTS.mkdir(exist_ok=True)
    with LocalSwarm(
        path,
        [(0, 3), (3, 6), (0, 6)],
        server_args=["--throughput", "50", "--region", "europe-west"],
        workdir=tmp_path / "swarm",
    ) as swarm:
        page = Child(
            "health",
            [
                sys.executable,
                "-m",
                "relay.health",
                "--initial-peers",
                *swarm.initial_peers,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--refresh-period",
                "1.5",
            ],
            tmp_path / "health.log",
        )
        try:
            url = page.wait_for_line(lambda line: "serving http://127.0.0.1:" in line, 60).split()[-1]
            state = wait_for(lambda: get_json(url + "api/v1/state")[1]["models"], 180, "the first crawl")
            (model,) = state
            assert model["name"] == name and model["family"] == "llama" and model["num_blocks"] == 8
            assert [b["servers"] for b in model["blocks"]] == [2, 2, 2, 2, 2, 2, 0, 0]
            assert [b["throughput"] for b in model["blocks"]][:3] == [100.0, 100.0, 100.0]
            assert model["healthy"] is False and model["missing_blocks"] == [6, 7]
            rows = {row["peer_id"]: row for row in model["servers"]}
            assert set(rows) == {server.peer_id for server in swarm.servers}
            for server in swarm.servers:
                row = rows[server.peer_id]
                assert row["state"] == "online" and row["reachable"] is True and row["region"] == "europe-west"
                assert row["device_type"] == "cpu" and row["version"] and row["last_seen"]
                assert row["direct"] is True and row["bridge_addrs"] == []

            browser.get(url)
            cells = wait_for(
                lambda: browser.find_elements(By.CSS_SELECTOR, f'section[data-model="{name}"] .cell'), 180, "the bar"
            )
            assert [int(c.get_attribute("data-servers")) for c in cells] == [2, 2, 2, 2, 2, 2, 0, 0]
            assert [c.get_attribute("class") for c in cells][-3:] == ["cell c2", "cell c0", "cell c0"]
            red = cells[-1].value_of_css_property("background-color")
            assert red in ("rgba(217, 48, 37, 1)", "rgb(217, 48, 37)")
            assert "no server for block(s) 6–7" in browser.find_element(By.CSS_SELECTOR, ".badge").text
            rows_in_dom = browser.find_elements(By.CSS_SELECTOR, "tr.server")
            assert {r.get_attribute("data-peer") for r in rows_in_dom} == set(rows)
            assert all("online" in r.text and "europe-west" in r.text for r in rows_in_dom)
            browser.save_screenshot(str(ARTIFACTS / "health-page.png"))

            browser.set_window_size(390, 844)  # a phone: the page must not scroll sideways, only the table may
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
            browser.save_screenshot(str(ARTIFACTS / "health-page-phone.png"))
            browser.set_window_size(1280, 900)

            # Without reloading, the page follows the swarm: a killed server turns unreachable.
            victim = next(server for server in swarm.servers if rows[server.peer_id]["start_block"] == 3)
            browser.execute_script("window.swarmTestMarker = 42")  # a reload would wipe it
            victim.kill()

            def updated():
                cells = browser.find_elements(By.CSS_SELECTOR, ".cell")
                row = browser.find_element(By.CSS_SELECTOR, f'tr.server[data-peer="{victim.peer_id}"]')
                return [int(c.get_attribute("data-servers")) for c in cells] == [
                    2,
                    2,
                    2,
                    1,
                    1,
                    1,
                    0,
                    0,
                ] and "no" in row.text

            wait_for(updated, 180, "the page to show the dead server")
            assert browser.execute_script("return window.swarmTestMarker") == 42
        finally:
            page.stop()
