"""The kiosk page (examples/kiosk) end to end, in headless Chromium.

``edge-slm serve`` runs as a subprocess with a tiny random bundle and ``--static
examples/kiosk``; selenium drives Debian's ``chromium`` through ``chromedriver``. One page
load: the SSE parser on split chunks, a question typed and sent, its answer streamed
(growing piece by piece, equal to the API's non-streamed answer at ``temperature: 0``:
the tiny model's text is gibberish, so its meaning is not checked), a screenshot to
``docs/kiosk.png``, a FAQ button and the FAQ search through a served tiny embedder, the
reset button, the error shown for an unreachable server and the retry, Stop mid-answer,
and the idle countdown and reset.

Opt-in (``-m browser``): ``make test-browser`` installs chromium, chromium-driver and
selenium, then runs it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
KIOSK = ROOT / "examples" / "kiosk"
SCREENSHOT = ROOT / "docs" / "kiosk.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# What root needs to run Chromium here, and no traffic of its own (the network is closed).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--window-size=800,480",  # the Raspberry Pi touchscreen
]
# Settings over config.json's: a short system prompt (the tiny model's context is 128
# tokens), greedy decoding, no idle reset until the test asks for one, and FAQ search for
# exact matches only (a random embedder finds every sentence alike).
QUERY = (
    "?system_prompt=Be%20brief.&temperature=0&max_tokens=24&idle_timeout_s=0&faq_threshold=0.9999"
)
QUESTION = "Where is the train station?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as res:
        return json.loads(res.read())


def _serve_command(bundle: Path, embedder: Path, port: int) -> list[str]:
    """``edge-slm serve GENERATOR EMBEDDER --static examples/kiosk --port PORT``."""
    return [
        str(Path(sys.executable).with_name("edge-slm")),
        "serve",
        str(bundle),
        str(embedder),
        "--static",
        str(KIOSK),
        "--port",
        str(port),
    ]


@pytest.fixture(scope="module")
def kiosk_bundle(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (conftest's ``hf_models``) as an fp32 bundle of optimum's graph."""
    from edge_slm_export.decoder import ExportOptions, export_decoder

    out = tmp_path_factory.mktemp("kiosk") / "llama"
    return export_decoder(str(hf_models["llama"]), out, ExportOptions(graph="optimum"))


@pytest.fixture(scope="module")
def embedder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence-transformers BERT (mean pooling) as a feature-extraction bundle."""
    from tiny_encoders import build_sentence_transformer

    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("kiosk-embedder")
    return export_encoder(str(build_sentence_transformer(root / "st")), root / "embedder")


@pytest.fixture(scope="module")
def server(
    kiosk_bundle: Path, embedder_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``edge-slm serve GENERATOR EMBEDDER --static examples/kiosk`` on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = _serve_command(kiosk_bundle, embedder_bundle, port)
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"edge-slm serve exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"edge-slm serve not ready after 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium at 800x480, driven by chromedriver."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"{missing} not installed: run `make test-browser` (apt-get chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(
            "selenium is not installed: run `make test-browser` (pip install -e '.[browser]')"
        )

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_script_timeout(90)
    # The viewport itself at the touchscreen's size (--window-size counts the window's frame).
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 800, "height": 480, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield browser
    finally:
        browser.quit()


def _wait(browser: Any, script: str, timeout: float = 60, what: str = "") -> Any:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > deadline:
            log = browser.execute_script("return document.getElementById('error').innerText")
            pytest.fail(f"timed out waiting for {what or script} (error banner: {log!r})")
        time.sleep(0.05)


SPLIT_CHUNKS_JS = """
const p = new kiosk.SSEParser();
const events = [];
// One stream cut at awkward places: inside "data:", between \\r and \\n, inside the JSON,
// a comment line, an event split over two data lines, the last event without its blank line.
const pieces = ["da", "ta: {\\"a\\":", " 1}\\r", "\\n\\r\\n", ": keep-alive\\n\\n",
                "data: x\\ndata:", "y\\n", "\\n", "event: e\\ndata: [DONE]"];
for (const piece of pieces) events.push(...p.push(piece));
events.push(...p.end());
return events;
"""

LISTEN_JS = """
window.__deltas = [];
window.__done = null;
document.addEventListener("kiosk:delta",
  (e) => __deltas.push([e.detail.text, performance.now()]));
document.addEventListener("kiosk:done", (e) => { window.__done = e.detail.text; });
document.addEventListener("kiosk:error", (e) => { window.__error = e.detail.message; });
"""


def _shown_answer(browser: Any) -> str:
    return str(
        browser.execute_script(
            "const t = document.querySelectorAll('.msg-assistant .text');"
            "return t.length ? t[t.length - 1].textContent : null"
        )
    )


def test_kiosk_page(server: str, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    browser = driver
    browser.get(server + "/" + QUERY)
    _wait(browser, "document.body.dataset.ready === 'true'", 30, "the page to start")
    assert browser.title == browser.execute_script("return kiosk.config.title")
    assert browser.execute_script("return kiosk.config.system_prompt") == "Be brief."
    assert browser.find_element(By.ID, "status").text == "Ready"
    assert browser.execute_script("return document.activeElement.id") == "question"
    # accessibility: a label for the field, a live region for the answers
    assert browser.find_element(By.CSS_SELECTOR, "label[for=question]")
    conversation = browser.find_element(By.ID, "conversation")
    assert conversation.get_attribute("aria-live") == "polite"
    assert conversation.get_attribute("role") == "log"

    # The SSE parser, fed one stream in awkward pieces.
    assert browser.execute_script(SPLIT_CHUNKS_JS) == ['{"a": 1}', "x\ny", "[DONE]"]

    # A question typed and sent: the answer streams in, growing.
    browser.execute_script(LISTEN_JS)
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    answer = _wait(browser, "window.__done", 60, "the streamed answer")
    deltas = browser.execute_script("return __deltas")
    texts = [text for text, _ in deltas]
    assert len(texts) >= 2, texts
    for shorter, longer in itertools.pairwise(texts):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert deltas[-1][1] > deltas[0][1]  # over time, not in one piece
    assert texts[-1] == answer == _shown_answer(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".msg-user .text").text == QUESTION
    assert browser.find_element(By.ID, "send").text == "Send"

    # The same request, not streamed, through the API: the same text (greedy decoding).
    request = browser.execute_script("return kiosk.lastRequest")
    assert request["stream"] is True and request["temperature"] == 0
    assert request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
    ]
    reference = _post(server + "/v1/chat/completions", {**request, "stream": False})
    assert reference["choices"][0]["message"]["content"] == answer

    # A FAQ button answers at once, from config.json.
    buttons = browser.find_elements(By.CSS_SELECTOR, "#faq button")
    faq = json.loads((KIOSK / "config.json").read_text())["faq"]
    assert len(faq) > len(buttons) > 0
    assert [b.text for b in buttons] == [f["question"] for f in faq[: len(buttons)]]
    buttons[0].click()
    assert _shown_answer(browser) == faq[0]["answer"]

    # FAQ search (an embedder is served): a typed FAQ question gets its answer, not the model's.
    assert browser.execute_script("return kiosk.faqSearch")
    browser.execute_script(LISTEN_JS)
    browser.find_element(By.ID, "question").send_keys(faq[-1]["question"])
    browser.find_element(By.ID, "send").click()
    assert _wait(browser, "window.__done", 30, "the FAQ answer") == faq[-1]["answer"]
    assert browser.execute_script("return __deltas.length") == 0  # nothing streamed
    assert _shown_answer(browser) == faq[-1]["answer"]
    tags = browser.find_elements(By.CSS_SELECTOR, ".msg-assistant .tag")
    assert [t.text for t in tags] == ["From the FAQ", "From the FAQ"]
    assert len(browser.execute_script("return kiosk.history")) == 6

    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.find_element(By.ID, "question").send_keys("How late is the café open?")
    browser.save_screenshot(str(SCREENSHOT))

    # Reset: the conversation is gone, the welcome is back, the field has the focus.
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.find_element(By.ID, "welcome").is_displayed()
    assert browser.execute_script("return kiosk.history.length") == 0
    assert browser.find_element(By.ID, "question").get_attribute("value") == ""
    assert browser.execute_script("return document.activeElement.id") == "question"

    # An unreachable server: a clear error, then "Try again" once it is back.
    browser.execute_script(f"kiosk.config.api_base = 'http://127.0.0.1:{_free_port()}'")
    browser.execute_script(LISTEN_JS)
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    error = browser.find_element(By.ID, "error")
    _wait(browser, "window.__error", 30, "the error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert "can't be reached" in error.text
    assert browser.find_element(By.ID, "status").text == "Offline"
    browser.execute_script("kiosk.config.api_base = ''")
    browser.find_element(By.ID, "retry").click()
    assert _wait(browser, "window.__done", 60, "the retried answer") == answer
    assert not error.is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2

    # Stop (the Send button while an answer streams), pressed at the first piece: the
    # answer stays as far as it got and joins the conversation.
    browser.execute_script(
        LISTEN_JS + "document.addEventListener('kiosk:delta',"
        " () => document.getElementById('send').click(), {once: true});"
    )
    browser.find_element(By.ID, "question").send_keys("And the bus?")
    assert browser.find_element(By.ID, "send").text == "Send"
    browser.find_element(By.ID, "send").click()
    _wait(browser, "document.getElementById('send').textContent === 'Send'", 60, "the stop")
    first = browser.execute_script("return __deltas")[0][0]
    assert _shown_answer(browser) == first
    request = browser.execute_script("return kiosk.lastRequest")
    full = _post(server + "/v1/chat/completions", {**request, "stream": False})
    assert full["choices"][0]["message"]["content"].startswith(first)
    assert len(full["choices"][0]["message"]["content"]) > len(first)  # it was cut short
    assert browser.execute_script("return kiosk.history")[-1] == {
        "role": "assistant",
        "content": first,
    }
    assert browser.execute_script("return window.__done") is None

    # Nobody touches the screen: the countdown shows, then the page starts over.
    browser.execute_script("kiosk.config.idle_timeout_s = 3; kiosk.config.idle_warning_s = 2")
    _wait(browser, "!document.getElementById('idle').hidden", 10, "the idle countdown")
    browser.find_element(By.ID, "idle-stay").click()  # "I'm still here"
    assert not browser.find_element(By.ID, "idle").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4
    _wait(browser, "!document.getElementById('idle').hidden", 10, "the idle countdown again")
    _wait(browser, "document.querySelectorAll('.msg').length === 0", 10, "the idle reset")
    assert browser.find_element(By.ID, "idle").is_displayed() is False
