"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver),
served by a running processor: every page loads, a login, a retry clicked on a failed
task, and the page showing it succeeded.

With PROCQUEUE_DASHBOARD_SCREENSHOT=path/to.png the test also lets the queue chart
gather a few samples and saves the overview there (docs/dashboard.png is made so).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import sample_tasks
from helpers import SESSION_ID, SESSION_MARKER, wait_until
from test_dashboard import TOKEN, task_state

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "install Chromium: apt-get install -y chromium chromium-driver"
SCREENSHOT_ENV = "PROCQUEUE_DASHBOARD_SCREENSHOT"
SECRET_KEY = "key-only-a-logged-in-operator-sees"


def require_chromium() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip install -e '.[test]')")
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: {INSTALL}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                     "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    # Marked as every process of the run is: one that outlives a crashed test is killed at its end.
    service = Service(CHROMEDRIVER, env=dict(os.environ, **{SESSION_MARKER: SESSION_ID}))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver) -> str:
    """The page's text; "" when the page was replaced between finding its body and
    reading it (a form's POST answered by a redirect lands while a poll reads), so the
    poll asks again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except StaleElementReferenceException:
        return ""


def open_page(driver, url: str, title: str) -> str:
    """Load `url` until its title says `title` (the first request may meet the dashboard
    still starting: that page reloads itself)."""
    driver.get(url)
    wait_until(lambda: title in driver.title, timeout=20, message=lambda: f"{title!r} at {url} (title {driver.title!r})")
    return text_of(driver)


@pytest.mark.timeout(400 if os.environ.get(SCREENSHOT_ENV) else 180)
def test_an_operator_logs_in_retries_a_failed_task_and_sees_it_succeed(db, start_processor, browser, tmp_path):
    from selenium.webdriver.common.by import By

    processor = start_processor("--numthreads", "2", "--metrics-port", "0",
                                extra_env={"PROCQUEUE_DASHBOARD_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{processor.metrics_port()}"
    task = sample_tasks.fail_until_retried.delay(args=(SECRET_KEY,))
    wait_until(lambda: task_state(db, task) == "failed", timeout=20, message="the first run failed")

    overview = open_page(browser, f"{base}/", "Overview")
    assert "Processors and their workers" in overview and "sample.fail_until_retried" in overview
    assert "Schedules" in open_page(browser, f"{base}/schedules", "Recurring schedules")
    assert "sample.fail_until_retried" in open_page(browser, f"{base}/tasks?state=failed", "Tasks")
    before_login = open_page(browser, f"{base}/tasks/{task}", f"Task {task}")
    assert SECRET_KEY not in before_login and "fails on purpose" not in before_login
    assert not browser.find_elements(By.XPATH, "//button[text()='Retry']")

    browser.find_element(By.LINK_TEXT, "Log in").click()
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.XPATH, "//button[text()='Log in']").click()
    wait_until(lambda: "Overview" in browser.title, timeout=10, message="the overview after the login")
    page = open_page(browser, f"{base}/tasks/{task}", f"Task {task}")
    assert SECRET_KEY in page and "fails on purpose" in page

    browser.find_element(By.XPATH, "//button[text()='Retry']").click()
    wait_until(lambda: "Retried" in text_of(browser), timeout=10, message="the retry's confirmation")

    def shows_succeeded() -> bool:
        browser.refresh()
        return "succeeded" in browser.find_element(By.CSS_SELECTOR, "td .state").text

    wait_until(shows_succeeded, timeout=30, interval=0.5, message="the task page showing it succeeded")
    assert task_state(db, task) == "succeeded"
    assert "by dashboard (127.0.0.1:" in text_of(browser)  # the retry in its history, and who did it
    browser.save_screenshot(str(tmp_path / "task.png"))
    if os.environ.get(SCREENSHOT_ENV):
        take_overview_screenshot(browser, base, Path(os.environ[SCREENSHOT_ENV]))
    assert processor.stop() == 0


def take_overview_screenshot(browser, base: str, path: Path) -> None:
    """Tasks of each kind and a dozen queue samples (two minutes), for the README."""
    from selenium.webdriver.common.by import By

    for message in ("card declined for order 1041", "upstream timed out"):  # first: failed by the screenshot
        sample_tasks.fail.delay(args=(message,))
    for index in range(60):  # enough to keep both workers busy past the screenshot
        sample_tasks.sleep_then_record.delay(args=(3 + index % 5, f"shot-{index}"))

    def chart_points() -> int:
        open_page(browser, f"{base}/", "Overview")
        lines = browser.find_elements(By.CSS_SELECTOR, "polyline.waiting")
        return len(lines[0].get_attribute("points").split()) if lines else 0

    wait_until(lambda: chart_points() >= 12, timeout=200, interval=5, message="a dozen samples on the chart")
    browser.set_window_size(1280, 1250)
    path.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(path))
