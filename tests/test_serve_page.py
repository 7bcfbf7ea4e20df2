"""The `folio serve` page in a real headless Chromium (OS package, driven by Selenium): the runs
table, a live loss curve that grows as a training run appends metrics, a streamed answer in the
playground and its stop button. A failing test leaves page.png in its tmp dir."""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import copy_run
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from folio.config import ServeConfig
from folio.infer.serve.app import background

pytestmark = pytest.mark.slow  # a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # scripts/install-browser.sh
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,1500"]


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def runs(tiny_run, tmp_path) -> Path:
    """`tiny` (finished) and `live` (training: holds .lock, metrics cut to the first rows)."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    copy_run(tiny_run, runs / "live", max_iters=1000)
    lines = (runs / "live" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (runs / "live" / "metrics.jsonl").write_text("".join(lines[:4]))
    return runs


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition())


def points(driver) -> int:
    return int(driver.find_element(By.ID, "chart").get_attribute("data-points"))


def test_page_shows_runs_live_curves_and_streams_an_answer(browser, runs, tmp_path):
    cfg = ServeConfig(runs_dir=str(runs), port=0, max_tokens=10**6)
    with open(runs / "live" / ".lock", "w") as lock, background(cfg) as url:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the training process holds it
        try:
            browser.get(url)
            # runs table
            rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#runs tr[data-run]")
            wait(browser, lambda: len(rows()) == 2)
            status = {r.get_attribute("data-run"): r.find_element(By.CLASS_NAME, "status").text
                      for r in rows()}
            assert status == {"live": "training", "tiny": "finished"}
            assert "2L · 2H · 32d" in browser.find_element(By.ID, "runs").text

            # the live curve grows when the trainer appends rows
            wait(browser, lambda: points(browser) > 0)
            before = points(browser)
            with open(runs / "live" / "metrics.jsonl", "a") as f:
                for i in range(3):
                    f.write(json.dumps({"kind": "train", "iter": 500 + i, "loss": 2.0}) + "\n")
                f.write(json.dumps({"kind": "eval", "iter": 502, "train_loss": 2.0,
                                    "val_loss": 2.1}) + "\n")
            wait(browser, lambda: points(browser) == before + 4)

            # playground: an answer streams in, piece by piece
            Select(browser.find_element(By.ID, "model")).select_by_visible_text("tiny")
            prompt = browser.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("ROMEO:")
            tokens = browser.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("40")
            browser.find_element(By.ID, "generate").click()
            output = browser.find_element(By.ID, "output")
            wait(browser, lambda: output.get_attribute("data-done") == "true")
            assert int(output.get_attribute("data-chunks")) > 1
            assert browser.find_element(By.ID, "out-prompt").text == "ROMEO:"
            assert browser.find_element(By.ID, "out-text").text.strip()
            assert "40 tokens" in browser.find_element(By.ID, "stats").text

            # the stop button ends a generation that would otherwise run for minutes
            tokens.clear()
            tokens.send_keys("1000000")
            browser.find_element(By.ID, "generate").click()
            wait(browser, lambda: int(output.get_attribute("data-chunks")) > 5)
            browser.find_element(By.ID, "stopbtn").click()
            wait(browser, lambda: output.get_attribute("data-done") == "true")
            assert browser.find_element(By.ID, "stats").text == "stopped"
            deadline = time.monotonic() + 20  # the status line refreshes every 5 s
            while "0 generating" not in browser.find_element(By.ID, "load").text:
                assert time.monotonic() < deadline, "the stopped generation kept its slot"
                time.sleep(0.2)
        except Exception:
            browser.save_screenshot(str(tmp_path / "page.png"))
            raise


def svg_paths(driver, prefix: str) -> list[str]:
    """The `d` of every drawn line of a report chart (empty ones left out)."""
    return [d for d in driver.execute_script(
        f"return [...document.querySelectorAll('#{prefix}chart path')]"
        ".map(p => p.getAttribute('d'))") if d]


def test_report_cards_open_from_the_runs_table_and_draw_their_curves(browser, runs, tmp_path):
    from folio.cli import main as folio_main

    with background(ServeConfig(runs_dir=str(runs), port=0)) as url:
        try:
            browser.get(url)
            wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "a.report")) == 3)
            card = browser.find_element(By.CSS_SELECTOR, "#runs tr[data-run='tiny'] a.report")
            assert card.get_attribute("href") == f"{url}/api/runs/tiny/report"
            compare = browser.find_element(By.CSS_SELECTOR, "#compare a.report")
            assert compare.text == "compare the 2 ticked runs"
            browser.get(compare.get_attribute("href"))
            wait(browser, lambda: len(svg_paths(browser, "loss-")) == 6)  # 3 lines per run
            assert browser.find_element(By.ID, "loss-legend").text.split("\n")[0].startswith(
                "live")
            diff = browser.find_element(By.XPATH, "//section[h2[contains(., 'between')]]")
            assert "max_iters" in diff.text and "1,000" in diff.text
        except Exception:
            browser.save_screenshot(str(tmp_path / "page.png"))
            raise
    # the page `folio report` writes, opened from disk: both charts drawn from the metrics
    assert folio_main(["report", str(runs / "tiny")]) == 0
    browser.get((runs / "tiny" / "report.html").as_uri())
    wait(browser, lambda: len(svg_paths(browser, "bpb-")) >= 2)
    rows = [json.loads(line) for line in (runs / "tiny" / "metrics.jsonl").open()]
    train = [r for r in rows if r["kind"] == "train"]
    raw = svg_paths(browser, "loss-")[0]  # the raw train loss: one point per log line
    assert raw.count("L") + 1 == len(train)
    assert browser.find_elements(By.CSS_SELECTOR, "pre.sample")
    assert browser.get_screenshot_as_png()[:4] == b"\x89PNG"
