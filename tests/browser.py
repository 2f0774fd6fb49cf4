"""Headless Chromium for the tests (selenium driving the system's ``chromium`` and
``chromedriver``: Debian's ``chromium`` and ``chromium-driver`` packages, which ``.ci/run``
installs when they are missing)."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Iterator

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "chromium.chromedriver")


def missing() -> str | None:
    """Why no headless browser can run here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install selenium (it is in ttreg's dev extra)"
    if not any(shutil.which(b) for b in BROWSERS):
        return "no Chromium here: apt-get install chromium chromium-driver (.ci/run does it)"
    if not any(shutil.which(d) for d in DRIVERS):
        return "no chromedriver here: apt-get install chromium-driver (.ci/run does it)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver that records the page's console (``get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.binary_location = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts,
                              service=Service(next(shutil.which(d) for d in DRIVERS if shutil.which(d))))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, path: Path, timeout: float = 20.0) -> float:
    """Load ``path`` and wait until its script has drawn; return the time to that point (ms,
    the page's ``performance.now()``, counted from the start of navigation)."""
    driver.get(Path(path).resolve().as_uri())
    t0 = time.time()
    while time.time() - t0 < timeout:
        ready = driver.execute_script("return window.ttregReady || null")
        if ready is not None:
            return float(ready)
        time.sleep(0.05)
    raise AssertionError(f"{path}: the page did not finish drawing in {timeout} s; console: "
                         f"{driver.get_log('browser')}")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
