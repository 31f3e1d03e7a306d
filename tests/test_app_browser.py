"""The Gradio app in a real browser: start it on a loopback port, drive the page in headless Chromium
(selenium + Debian's chromedriver), run a short world-model rollout with TempCache on, and check that
both videos and the metrics table appear. Skips, saying why, without gradio, selenium or Chromium
(``.ci/run`` installs Debian's ``chromium`` and ``chromium-driver``)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from _app import load_app, tiny_world_model

FRAMES = 2


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')"
    )
    chromium, driver_path = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no Chromium installed: the browser test needs Chromium and its chromedriver "
            "(Debian: apt-get install chromium chromium-driver; .ci/run does it)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_app(tmp_path):
    app = load_app()
    with tiny_world_model(tmp_path / "world_model"):
        demo = app.build_app(frames=FRAMES)
        port = _free_port()
        app.launch(demo, port=port, block=False)
        yield f"http://127.0.0.1:{port}/"
        demo.close()


def test_world_model_run_in_headless_chromium(browser, served_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served_app)
    wait = WebDriverWait(browser, 60)
    run = wait.until(ec.element_to_be_clickable((By.ID, "run-button")))
    browser.find_element(By.CSS_SELECTOR, "#field-tempcache-enabled input[type=checkbox]").click()
    run.click()

    def finished(driver):
        text = driver.find_element(By.ID, "run-message").text
        return text if text.startswith(("Done", "Cannot run", "Something went wrong")) else False

    message = wait.until(finished)
    browser.save_screenshot(str(tmp_path / "app.png"))
    assert message.startswith("Done: TempCache ran at"), message
    for video in ("dense-video", "accel-video", "truth-video"):
        wait.until(lambda d, v=video: d.find_elements(By.CSS_SELECTOR, f"#{v} video[src]"))
        source = browser.find_element(By.CSS_SELECTOR, f"#{video} video").get_attribute("src")
        assert source.endswith(".mp4"), source
    table = browser.find_element(By.ID, "metrics-table").text
    assert "speedup" in table and "PSNR vs truth dB" in table
    assert "dense" in table and "TempCache" in table
    assert browser.find_elements(By.CSS_SELECTOR, "#chunk-plot img")
    browser.save_screenshot(str(tmp_path / "app.png"))
    assert (tmp_path / "app.png").stat().st_size > 10_000
