"""The dashboard in a real headless Chromium (Debian's, through chromedriver and selenium).

The dashboard runs as the operator runs it (``taskiq-redis dashboard``, or an application that
mounts it under /tasks); the tests read what the page shows and click its buttons.
``TASKIQ_REDIS_SCREENSHOT=1`` saves the queues page with a backlog as docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from taskiq_redis import keys
from tests.dashboard_support import ROOT, DashboardProcess, app_options
from tests.queue_kinds import make_broker
from tests.queue_kinds import message as queue_message
from tests.servers import RedisServers, Topology
from tests.test_dashboard import message
from tests.test_queues_cli import dead_letter_fields, kick, stream_broker

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module, with a profile of its own."""
    profile = tempfile.mkdtemp(prefix="taskiq-redis-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,720",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``check()`` (a look at the page) until it is truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (NoSuchElementException, StaleElementReferenceException) as error:
            last = error  # not there yet, or replaced by a refresh while it was read
        else:
            if last:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: still {last!r} after {timeout} s")


def cell(browser: WebDriver, queue: str, field: str) -> str:
    """The text of a field of a queue's row on the queues page, as the page shows it."""
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-queue="{queue}"]')
    return str(row.find_element(By.CSS_SELECTOR, f'[data-field="{field}"]').text)


async def test_a_backlog_appears_and_drains_without_reloading(
    topology: Topology, browser: WebDriver, unique: str
) -> None:
    queue = f"orders-{unique}"
    broker = stream_broker(topology, queue, xread_count=10)
    await broker.startup()
    try:
        with DashboardProcess.cli(topology, queue, "--refresh", "1") as dashboard:
            browser.get(dashboard.url + "/")
            browser.execute_script("window.notReloaded = true")
            await until(lambda: cell(browser, queue, "length") == "0", "an empty queue")
            for number in range(40):
                await kick(broker, f"order {number}")
            await until(lambda: cell(browser, queue, "length") == "40", "the backlog of 40")
            await until(
                lambda: cell(browser, queue, "rate") not in ("-", "0.0/s"), "messages added/s"
            )
            polylines = browser.find_elements(By.CSS_SELECTOR, f'tr[data-queue="{queue}"] polyline')
            assert polylines, "no chart"
            if topology.name == "single" and os.environ.get("TASKIQ_REDIS_SCREENSHOT"):
                browser.save_screenshot(str(ROOT / "docs" / "dashboard.png"))

            listener = broker.listen()
            try:
                for _ in range(40):  # a worker takes and acknowledges every message
                    taken = await asyncio.wait_for(anext(listener), 10)
                    await taken.ack()  # type: ignore[misc]
            finally:
                await listener.aclose()
            await until(lambda: cell(browser, queue, "length") == "0", "the drained queue")
            assert browser.execute_script("return window.notReloaded") is True
    finally:
        await broker.shutdown()


async def test_requeue_a_dead_letter_with_the_button_and_names_show_as_text(
    topology: Topology, browser: WebDriver, raw_redis: Any, unique: str
) -> None:
    queue = f"dl-{unique}"
    hostile = "<script>window.pwned = 1; alert(1)</script>"
    await raw_redis.xadd(queue, {"data": b"first"})
    letter = await raw_redis.xadd(
        keys.dead_letter_key(queue), dead_letter_fields(message(hostile), queue, "1-1")
    )
    letter_id = letter.decode()
    with DashboardProcess.cli(topology, queue, "--allow-actions") as dashboard:
        browser.get(f"{dashboard.url}/queues/{queue}")
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-letter="{letter_id}"]')
        assert row.find_element(By.CSS_SELECTOR, '[data-field="task"]').text == hostile
        assert browser.execute_script("return window.pwned") is None
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 (reading it looks for an alert)

        row.find_element(By.CSS_SELECTOR, 'button[data-action="requeue"]').click()
        status = await until(
            lambda: browser.find_element(By.CSS_SELECTOR, '[role="status"]').text,
            "the outcome of the requeue",
        )
        assert status == f"Requeued 1 dead letters to {queue}."
        assert browser.find_element(By.CSS_SELECTOR, '[data-field="dead"]').text == "0"
        assert browser.find_element(By.CSS_SELECTOR, '[data-field="length"]').text == "2"
        assert browser.find_element(By.ID, "dead-letters").text == "No dead letters."
    assert await raw_redis.xlen(keys.dead_letter_key(queue)) == 0
    assert await raw_redis.xlen(queue) == 2


async def test_read_only_shows_no_button_and_refuses_a_post(
    topology: Topology, browser: WebDriver, raw_redis: Any, unique: str
) -> None:
    queue = f"ro-{unique}"
    await raw_redis.xadd(keys.dead_letter_key(queue), dead_letter_fields(b"m", queue, "1-1"))
    with DashboardProcess.cli(topology, queue) as dashboard:
        browser.get(f"{dashboard.url}/queues/{queue}")
        assert browser.find_element(By.CSS_SELECTOR, '[data-field="dead"]').text == "1"
        assert browser.find_elements(By.TAG_NAME, "button") == []
        assert "start the dashboard with --allow-actions" in browser.page_source
        async with httpx.AsyncClient() as http:
            refused = await http.post(
                f"{dashboard.url}/actions/purge", data={"queue": queue, "token": "guess"}
            )
            assert refused.status_code == 403
            assert "Refused: this dashboard is read-only" in refused.text
            assert (await http.get(f"{dashboard.url}/actions/purge")).status_code == 405
    assert await raw_redis.xlen(keys.dead_letter_key(queue)) == 1


async def test_mounted_under_a_path_its_links_refresh_and_actions_stay_there(
    topology: Topology, browser: WebDriver, raw_redis: Any, unique: str
) -> None:
    queue = f"mounted-{unique}"
    await raw_redis.xadd(queue, {"data": b"m"})
    letter = await raw_redis.xadd(
        keys.dead_letter_key(queue), dead_letter_fields(message("t"), queue, "1-1")
    )
    options = {
        **app_options(topology),
        "queue_names": [queue],
        "allow_actions": True,
        "refresh": 1,
    }
    with DashboardProcess.mounted(options) as dashboard:
        async with httpx.AsyncClient() as http:
            home = await http.get(dashboard.url.removesuffix("/tasks") + "/")
        assert home.text == "the application's own home page"
        browser.get(dashboard.url + "/")
        await until(lambda: cell(browser, queue, "length") == "1", "the queue")
        await raw_redis.xadd(queue, {"data": b"m"})
        await until(lambda: cell(browser, queue, "length") == "2", "the refreshed length")

        browser.find_element(By.LINK_TEXT, queue).click()
        await until(lambda: browser.current_url == f"{dashboard.url}/queues/{queue}", "queue")
        button = browser.find_element(
            By.CSS_SELECTOR, f'tr[data-letter="{letter.decode()}"] button[data-action="requeue"]'
        )
        button.click()
        await until(
            lambda: (
                browser.find_element(By.CSS_SELECTOR, '[role="status"]').text
                == f"Requeued 1 dead letters to {queue}."
            ),
            "the requeue's outcome",
        )
        assert browser.current_url.startswith(f"{dashboard.url}/queues/{queue}?outcome=")
        for name, path in (("Schedules", "/schedules"), ("Scripts", "/scripts"), ("Queues", "/")):
            browser.find_element(By.LINK_TEXT, name).click()
            wanted = dashboard.url + path
            await until(lambda: browser.current_url == wanted, name)  # noqa: B023
            assert browser.find_element(By.TAG_NAME, "h1").text == name


def click(browser: WebDriver, selector: str) -> bool:
    """Click what ``selector`` finds (for :func:`until`: a refresh may replace it meanwhile)."""
    browser.find_element(By.CSS_SELECTOR, selector).click()
    return True


async def test_a_queue_page_refreshes_shows_every_level_and_cancels_with_the_button(
    topology: Topology, browser: WebDriver, raw_redis: Any, unique: str
) -> None:
    queue = f"cancel-{unique}"
    broker = make_broker("stream", topology, queue)
    await broker.startup()
    try:
        await broker.kick(queue_message("held-high", priority=3))
        await broker.kick(queue_message("target"))
        high = keys.priority_key(queue, 3)
        await raw_redis.xreadgroup("taskiq", "worker-1", {high: ">"}, count=1)
        with DashboardProcess.cli(
            topology, queue, "--allow-actions", "--refresh", "1"
        ) as dashboard:
            browser.get(f"{dashboard.url}/queues/{queue}")
            browser.execute_script("window.notReloaded = true")
            held = browser.find_element(By.CSS_SELECTOR, '#pending tr[data-level="3"]').text
            assert held.startswith("3 ")
            assert "held-high" in held
            assert "worker-1" in held
            await broker.kick(queue_message("later"))
            await until(
                lambda: browser.find_elements(By.CSS_SELECTOR, '#waiting tr[data-task="later"]'),
                "the message kicked after the page opened",
            )
            assert browser.execute_script("return window.notReloaded") is True

            button = '#waiting tr[data-task="target"] button[data-action="cancel"]'
            await until(lambda: click(browser, button), "the cancel button")
            WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
            assert browser.switch_to.alert.text == "Cancel task target? It will never run."
            browser.switch_to.alert.accept()
            status = await until(
                lambda: browser.find_element(By.CSS_SELECTOR, '[role="status"]').text,
                "the outcome of the cancel",
            )
            assert status == f"target: cancelled; it was waiting in {queue} and will never run."
            assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-task="target"]') == []
            assert browser.find_element(By.CSS_SELECTOR, '[data-field="length"]').text == "2"
            left = [fields[b"data"] for _, fields in await raw_redis.xrange(queue)]
            assert len(left) == 1
            assert b'"task_id":"later"' in left[0]

            await raw_redis.delete(queue, high)  # the key becomes something else: the page
            await raw_redis.set(queue, "not a queue")  # keeps what it shows and says why
            offline = await until(
                lambda: browser.find_element(By.ID, "offline").text, "the reason not refreshed"
            )
            assert offline == (
                f"Not refreshed: '{queue}' is a Redis string, not a stream or list queue; retrying."
            )
            assert browser.find_element(By.CSS_SELECTOR, '#waiting tr[data-task="later"]')
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_an_outage_shows_a_banner_and_the_page_recovers(
    topology: Topology, browser: WebDriver, redis_servers: RedisServers, unique: str
) -> None:
    queue = f"outage-{unique}"
    with DashboardProcess.cli(topology, queue, "--refresh", "1") as dashboard:
        browser.get(dashboard.url + "/")
        await until(lambda: cell(browser, queue, "length") == "0", "the queue")
        redis_servers.stop_standalone()
        try:
            banner = await until(
                lambda: browser.find_element(By.CSS_SELECTOR, '#queues [role="alert"]').text,
                "the outage banner",
            )
            assert banner.startswith("Redis cannot be read: ")
            assert "Retrying at each refresh." in banner
        finally:
            redis_servers.start_standalone()
        await until(
            lambda: not browser.find_elements(By.CSS_SELECTOR, '#queues [role="alert"]'),
            "the banner gone",
        )
        assert cell(browser, queue, "length") == "0"


def test_screenshot_is_committed() -> None:
    """docs/dashboard.png is the page with a backlog (remade with TASKIQ_REDIS_SCREENSHOT=1)."""
    picture = Path(ROOT / "docs" / "dashboard.png").read_bytes()
    assert picture.startswith(b"\x89PNG")
