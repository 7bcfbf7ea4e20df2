"""Screenshot of a report card in headless Chromium (for docs/report.png):
`python scripts/report_screenshot.py RUN_DIR/report.html docs/report.png [WIDTH]`.
Needs Chromium and its driver (scripts/install-browser.sh) and selenium (requirements-test.txt).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def screenshot(page: Path, out: Path, width: int = 1100) -> None:
    options = webdriver.ChromeOptions()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--window-size={width},1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.resolve().as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, height + 140)  # the window's frame takes some
        out.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
