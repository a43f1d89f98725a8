"""The dashboard, end to end in headless Chromium: what radiology IT sees and clicks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import dcmtk
from tests.helpers.admin_http import TOKEN, AdminClient
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.test_admin_api import http_section

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver "
                    "(make test installs them)")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, condition: Any, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _rows(driver: WebDriver, table: str) -> list[list[str]]:
    """The table's cells as text (read again if the page re-renders meanwhile)."""
    def read(d: WebDriver) -> list[list[str]]:
        return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                for row in d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")]
    return list(_retry(driver, read))


def _retry(driver: WebDriver, action: Any) -> Any:
    for _ in range(20):
        try:
            return action(driver)
        except StaleElementReferenceException:
            continue
    return action(driver)


def _click(driver: WebDriver, xpath: str) -> None:
    _retry(driver, lambda d: d.find_element(By.XPATH, xpath).click())


def test_dashboard_shows_the_node_and_a_click_on_requeue_delivers_a_dead_letter(
    tmp_path: Path, browser: WebDriver
) -> None:
    pacs_port = free_port()  # the PACS is down at first
    destination = {"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": pacs_port,
                   "timeout": 3.0, "retry": {"initial_seconds": 0.1, "max_seconds": 0.2,
                                             "max_attempts": 1}}
    config = make_config(tmp_path / "gw", f"sqlite:///{tmp_path / 'index.db'}",
                         http=http_section(tmp_path), destination=[destination],
                         route=[{"name": "all", "destinations": ["pacs"]}])
    with running_node(config) as node:
        assert node.admin_server is not None
        api = AdminClient(node.admin_server.port)
        assert dcmtk.storescu(node.receiver.port,
                              make_study(tmp_path / "s", 2, patient_id="PAT-DASH",
                                         accession_number="ACC-DASH"), calling="CT01").ok
        wait_until(lambda: len(api.get("/api/dead-letters")) == 2, 30)

        browser.get(f"http://127.0.0.1:{node.admin_server.port}/")
        # no data without the token
        assert browser.find_element(By.ID, "dashboard").is_displayed() is False
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(browser, lambda d: len(_rows(d, "dead-letters")) == 2)

        # what is on screen
        associations = _rows(browser, "associations")
        assert associations[0][1:4] == ["CT01", associations[0][2], "released"]
        assert associations[0][4] == "2"
        queue = _rows(browser, "queues")[0]
        assert queue[:2] == ["pacs", "attention"]
        assert queue[5] == "2"  # dead letters
        study = _rows(browser, "studies")[0]
        assert study[1:3] == ["PAT-DASH", "ACC-DASH"]
        assert study[6] == "pacs: 2 dead"
        letters = _rows(browser, "dead-letters")
        assert all("could not connect to PEER@127.0.0.1" in row[5]
                   for row in letters), letters

        # the PACS is back: requeue one dead letter with a click
        with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER", port=pacs_port) as pacs:
            job_id = _retry(browser, lambda d: d.find_element(
                By.CSS_SELECTOR, "#dead-letters tbody tr").get_attribute("data-job"))
            _click(browser, f"//table[@id='dead-letters']//tr[@data-job='{job_id}']"
                            "//button[.='Requeue']")
            _wait(browser, lambda d: len(_rows(d, "dead-letters")) == 1)
            assert _rows(browser, "dead-letters")[0][0] != job_id
            wait_until(lambda: len(pacs.files()) == 1, 30, message="the requeued instance")
            _wait(browser, lambda d: _rows(d, "studies")[0][6] == "pacs: 1 dead, 1 done")

            # pause and resume from the queue table
            _click(browser, "//table[@id='queues']//button[.='Pause']")
            _wait(browser, lambda d: _rows(d, "queues")[0][1] == "paused")
            assert api.get("/api/queues")[0]["paused"] is True
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            screenshot = ARTIFACTS / "dashboard.png"
            assert browser.save_screenshot(str(screenshot))
            assert screenshot.stat().st_size > 10_000
            _click(browser, "//table[@id='queues']//button[.='Resume']")
            _wait(browser, lambda d: _rows(d, "queues")[0][1] != "paused")
            assert api.get("/api/queues")[0]["paused"] is False


def test_dashboard_asks_again_for_a_token_the_node_refuses(
    tmp_path: Path, browser: WebDriver
) -> None:
    config = make_config(tmp_path / "gw", f"sqlite:///{tmp_path / 'index.db'}",
                         http=http_section(tmp_path))
    with running_node(config) as node:
        assert node.admin_server is not None
        browser.get(f"http://127.0.0.1:{node.admin_server.port}/")
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(browser, lambda d: d.find_element(By.ID, "error").text != "")
        assert browser.find_element(By.ID, "error").text == "The token was not accepted."
        assert browser.find_element(By.ID, "token-form").is_displayed()
        assert not browser.find_element(By.ID, "dashboard").is_displayed()
