"""Screenshots of the console (docs/img/console-library.png, docs/img/console-playground.png), taken by
Debian's headless Chromium through selenium against a running server: the library page, and the
playground after an ``auto`` request (the streamed answer and the router's α per skill).

    PYTHONPATH=. .venv/bin/python bench/ui_screenshots.py http://127.0.0.1:8000 [--out docs/img]

``chromium()`` is also the browser of the console's tests (tests/ui/test_console.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver
PROMPT = "Is this review positive or negative? The soup was cold and bland."


def chromium(width: int = 1360, height: int = 1000):
    """A headless Chromium driven by selenium (the system's browser and driver: nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if missing := [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]:
        raise RuntimeError(f"{', '.join(missing)} missing: `bash scripts/ensure-chromium.sh` installs Debian's "
                           "chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    return driver


def wait_for(driver, css: str, timeout: float = 120):
    """The first element matching ``css`` once it is shown (raises after ``timeout`` s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def take(url: str, out: Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    try:
        driver.get(f"{url}/ui#/library")
        wait_for(driver, "tr.skill-row")
        library = out / "console-library.png"
        driver.save_screenshot(str(library))

        driver.get(f"{url}/ui#/playground")
        Select(wait_for(driver, "#mode")).select_by_value("auto")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        driver.find_element(By.ID, "send").click()
        wait_for(driver, "#done", timeout=300)
        playground = out / "console-playground.png"
        driver.save_screenshot(str(playground))
    finally:
        driver.quit()
    return [library, playground]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    for path in take(args.url.rstrip("/"), args.out):
        print(path)


if __name__ == "__main__":
    main()
