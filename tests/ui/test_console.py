"""The console in a real headless Chromium (Debian's chromium + chromium-driver, through selenium) against a
real server (real vLLM engine, real Redis, the bundled base model): the library, an upload through the page,
the playground with that skill and with auto (streamed answer and plan), a composition saved, shown with its
quality report and deleted (after the browser's confirmation dialog, which names it; dismissing the one for
"Compress the library" sends nothing); and with MOSAIC_API_KEY set, an upload only once the key is entered."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.ui_screenshots import chromium, wait_for
from server.cli.launch import serving
from tests.helpers import DEMO, drop_prefix, mosaic_env, new_prefix, run_cli

pytestmark = pytest.mark.slow
ROOT_KEY = "ui-test-root-key"
UPLOADED = "ui_sentiment"  # the demo sentiment skill's files, uploaded through the page under a new name


def _server(base_model_dir, base_spec, tmp_path_factory, redis_client, demo: bool, **extra: str):
    data = tmp_path_factory.mktemp("ui")
    env = mosaic_env(base_model_dir, base_spec.model_id, data, new_prefix("ui"), **extra)
    for d in sorted(DEMO.iterdir()) if demo else []:
        assert run_cli(env, "skills", "add", str(d), "--name", d.name).returncode == 0
    try:
        with serving(env, data / "server.log") as (url, _, _):
            yield url
    finally:
        drop_prefix(redis_client, env["MOSAIC_REDIS_PREFIX"])
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def server(base_model_dir, base_spec, tmp_path_factory, redis_client):
    yield from _server(base_model_dir, base_spec, tmp_path_factory, redis_client, demo=True,
                       max_tokens_limit="48")


@pytest.fixture(scope="module")
def locked_server(base_model_dir, base_spec, tmp_path_factory, redis_client):
    """A server with keys (the reference engine: only uploads are asked of it, and it starts in seconds)."""
    yield from _server(base_model_dir, base_spec, tmp_path_factory, redis_client, demo=False,
                       engine="hf", api_key=ROOT_KEY)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def _open(browser, url: str, route: str):
    browser.get(f"{url}/ui#/{route}")


def _names(browser) -> list[str]:
    wait_for(browser, "#library-count")
    return [row.get_attribute("data-name") for row in browser.find_elements("css selector", "tr.skill-row")]


def _upload(browser, name: str, files: list[Path]) -> None:
    wait_for(browser, "#upload-name").send_keys(name)
    browser.find_element("id", "upload-input").send_keys("\n".join(str(f) for f in files))
    browser.find_element("id", "upload-submit").click()


def _dialog(browser, timeout: float = 10):
    """The browser's own confirmation dialog (window.confirm), once it is shown."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(ec.alert_is_present())


def _status(browser, css: str, timeout: float = 60):
    """The upload's outcome: the success line or the error box, whichever appears."""
    return wait_for(browser, css, timeout)


def test_the_library_lists_the_demo_skills_and_filters(browser, server):
    _open(browser, server, "library")
    assert sorted(_names(browser)) == sorted(d.name for d in DEMO.iterdir())
    wait_for(browser, "#library-filter").send_keys("french")
    assert _names(browser) == ["french_color"]
    assert browser.find_element("id", "library-count").text == "1 of 8 skills"


def test_an_upload_through_the_page_is_listed_and_its_problems_are_shown(browser, server):
    _open(browser, server, "upload")
    _upload(browser, "bad name!", [DEMO / "sentiment" / "adapter_config.json"])
    problems = [li.text for li in _status(browser, "#upload-status .error").find_elements("css selector", "ul.problems li")]
    assert len(problems) >= 2 and any("adapter_model.safetensors is missing" in p for p in problems), problems

    _open(browser, server, "upload")
    browser.refresh()
    _upload(browser, UPLOADED, [DEMO / "sentiment" / f for f in ("adapter_config.json", "adapter_model.safetensors", "mosaic.json")])
    assert f"{UPLOADED} v1" in _status(browser, "#upload-done").text
    _open(browser, server, "library")
    assert UPLOADED in _names(browser)
    row = browser.find_element("css selector", f'tr.skill-row[data-name="{UPLOADED}"]')
    assert "positive or negative" in row.text  # the description came from the dropped mosaic.json


def _ask(browser, mode: str) -> str:
    from selenium.webdriver.support.ui import Select

    Select(wait_for(browser, "#mode")).select_by_value(mode)
    browser.find_element("id", "send").click()
    wait_for(browser, "#done", timeout=300)
    return browser.find_element("id", "answer").text


def test_the_playground_streams_a_skill_and_auto_with_their_plans(browser, server):
    _open(browser, server, f"playground?model={UPLOADED}")
    browser.refresh()
    assert _ask(browser, "skill").strip()
    assert browser.find_element("css selector", ".plan-plan").text == "skill"
    assert browser.find_element("css selector", ".plan-skills").text == f"{UPLOADED}@1"

    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("Reverse the list: red, green, blue")
    assert _ask(browser, "auto").strip()
    bars = browser.find_elements("css selector", ".alpha-bar")
    assert len(bars) >= 2, browser.find_element("id", "plan").text  # the router's α per skill
    assert browser.find_element("css selector", ".plan-reason").text


def test_ops_shows_the_engine_requests_per_skill_and_compression(browser, server):
    _open(browser, server, "ops")
    engine = wait_for(browser, "#ops-engine")
    assert "vllm" in engine.text and "answering" in engine.text
    served = [r.text.split()[0] for r in wait_for(browser, "#ops-targets").find_elements("css selector", "tbody tr")]
    assert UPLOADED in served, served  # the playground's request, from /metrics
    assert "idle" in wait_for(browser, "#ops-compression").text
    wait_for(browser, "#compress").click()
    dialog = _dialog(browser)
    assert "Compress the whole library?" in dialog.text
    dialog.dismiss()
    time.sleep(4)  # past the page's refresh (3 s): a started job would show as running or done
    assert "idle" in wait_for(browser, "#ops-compression").text


def test_a_composition_saved_from_the_page_shows_its_quality_report_and_can_be_deleted(browser, server):
    _open(browser, server, "compose")
    browser.refresh()
    for name in ("reverse_list", "uppercase"):
        wait_for(browser, f'input.pick[value="{name}"]').click()
    browser.execute_script("const s = document.querySelectorAll('input.weight')[0]; s.value = '0.5';"
                           "s.dispatchEvent(new Event('input'));")
    browser.find_element("id", "preview").click()
    plan = wait_for(browser, "#preview-plan .plan-plan", timeout=300)
    assert plan.text == "composition" and browser.find_element("css selector", "#preview-plan .plan-cache").text in ("hit", "miss")
    browser.find_element("id", "compose-name").send_keys("ui_combo")
    quality = browser.find_element("id", "quality-prompts")
    quality.clear()
    quality.send_keys("2")
    browser.find_element("id", "save").click()
    report = wait_for(browser, "#quality .quality-bars", timeout=300)
    assert browser.current_url.endswith("#/skill/ui_combo")
    assert len(report.find_elements("css selector", ".quality-bar")) == 2
    assert "reverse_list@1" in report.text and "uppercase@1" in report.text

    browser.find_element("css selector", "#delete-skill button").click()
    dialog = _dialog(browser)
    assert dialog.text.startswith("Delete ui_combo (all 1 versions)?"), dialog.text
    dialog.accept()
    names = _names(browser)
    assert "ui_combo" not in names and UPLOADED in names


def test_with_keys_the_page_uploads_only_once_the_key_is_entered(browser, locked_server):
    _open(browser, locked_server, "upload")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    files = [DEMO / "uppercase" / f for f in ("adapter_config.json", "adapter_model.safetensors")]
    _upload(browser, "keyed", files)
    error = _status(browser, "#upload-status .error")
    assert "API key" in error.text and "HTTP 401" in error.text
    key_input = wait_for(browser, "#key-input")  # the page asks for a key
    key_input.send_keys(ROOT_KEY)
    browser.find_element("id", "key-use").click()
    browser.find_element("id", "upload-submit").click()  # the form kept the name and files
    assert "keyed v1" in _status(browser, "#upload-done").text
    _open(browser, locked_server, "library")
    assert _names(browser) == ["keyed"]
