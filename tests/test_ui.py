"""The web playground (serving/api/ui.py, serving/ui/): headers and routing in-process, then the page itself in
headless Chromium against a real server process that wants an API key.

The browser test needs Debian's `chromium` and `chromium-driver` (`make test` installs them when run as root, as CI
does); without them it fails saying so, never skips. Screenshots go to $PYTEST_SCREENSHOT_DIR, else a pytest
temporary directory; the path is printed.
"""

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver import ActionChains
from selenium.webdriver.chrome.service import Service

from serving.api import ui
from serving.api.app import create_app
from serving.api.middleware import OPEN_PATHS
from serving.config import EngineConfig, Settings
from serving_helpers import FAKE_INFO, ServerProcess, fake_parts, fake_settings, make_tiny_model

KEY = "ui-test-key"


# ---- in-process: routes and headers ---------------------------------------------------------------------------

@contextlib.contextmanager
def serve(**overrides):
    s = fake_settings(**overrides)
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))
    with TestClient(create_app(s, loader=loader, model_info=FAKE_INFO)) as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        yield client


def test_page_and_files_are_served_with_a_strict_policy():
    with serve() as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert 'data-auth="none"' in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        head = c.head("/")
        assert head.status_code == 200 and head.content == b""
        for path, (_, media_type) in ui.ASSETS.items():
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"] == media_type, path
            assert r.headers["x-content-type-options"] == "nosniff"
        # TGI's compatibility route on the same path still generates.
        r = c.post("/", json={"inputs": "abc", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and len(r.json()["generated_text"]) == 3
        # The page is no API operation.
        assert "get" not in c.get("/openapi.json").json()["paths"].get("/", {})


def test_with_an_api_key_the_page_loads_but_the_api_does_not():
    with serve(api_key=KEY) as c:
        r = c.get("/")
        assert r.status_code == 200 and 'data-auth="bearer"' in r.text
        assert c.head("/").status_code == 200
        for path in ui.ASSETS:
            assert c.get(path).status_code == 200, path
        # Only GET and HEAD of "/" are open: POST / generates and needs the key.
        assert c.post("/", json={"inputs": "abc"}).status_code == 401
        assert c.post("/", json={"inputs": "abc"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/info").status_code == 401


def test_no_ui_turns_the_page_off():
    assert Settings.from_sources(["--no-ui"], environ={}).ui is False
    assert Settings.from_sources([], environ={"GPT2_UI": "0"}).ui is False
    assert Settings.from_sources([], environ={}).ui is True
    with serve(ui=False) as c:
        assert c.get("/").status_code == 405  # only TGI's POST / is left
        assert c.get("/ui/app.js").status_code == 404
        assert c.post("/", json={"inputs": "abc", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_the_page_loads_nothing_from_elsewhere():
    assert set(ui.ASSETS) <= OPEN_PATHS
    files = {p.name: p.read_text() for p in ui.UI_DIR.iterdir()}
    assert set(files) == {"index.html"} | {name for name, _ in ui.ASSETS.values()}
    for name, text in files.items():
        # Any absolute URL (the SVG's XML namespace aside) would be a request to another machine.
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text.replace('xmlns="http://www.w3.org/2000/svg"', ""))
        assert urls == [], (name, urls)
    # Model output reaches the page as text only.
    assert "innerHTML" not in files["app.js"] and "insertAdjacentHTML" not in files["app.js"]


# ---- the page in headless Chromium against a real server ------------------------------------------------------

def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("tests/test_ui.py needs Chromium and its driver: `apt-get install chromium chromium-driver` "
                    "(`make test` does it when run as root)")
    return browser, driver


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    # 1,024 positions: a long generation (~1,000 tokens, seconds on 2 cores) to stop half-way. Spread logits: the
    # model's own greedy text scores near 0 and other text far below, so the score view shows several colors.
    model = make_tiny_model(tmp_path_factory.mktemp("ui-model") / "tiny", **{"n-positions": 1024, "init-std": 0.5})
    logs = tmp_path_factory.mktemp("ui-logs")
    s = ServerProcess(model, "--max-batch-size", "2", "--prefill-chunk", "64", log_path=logs / "server.log",
                      env={"GPT2_API_KEY": KEY})
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1000", "--no-first-run", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    where = os.environ.get("PYTEST_SCREENSHOT_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(condition, timeout=30.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            if s.name + (f"{{{labels}}}" if labels else "") == name:
                return s.value
    return 0.0


def text_of(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def set_value(driver, element_id: str, value) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def no_sideways_scroll(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")


# Records (ms, generated text length, finish) on every change of the output, from inside the page.
RECORD_GROWTH = """
window.__growth = [];
const record = () => window.__growth.push([performance.now(),
  document.getElementById('out-text').textContent.length, document.getElementById('stat-finish').textContent]);
new MutationObserver(record).observe(document.getElementById('output'), {childList: true, subtree: true,
  characterData: true});
"""

FINISHED = ("length", "eos_token", "stop_sequence")


@pytest.mark.slow
def test_playground_in_a_browser(browser, key_server, shots, capsys):
    url, d = key_server.url, browser
    d.get(url + "/")

    # The page loads without the key and asks for it; the API refuses requests without it.
    wait_for(lambda: d.find_element("id", "key-view").is_displayed(), what="the key form")
    assert not d.find_element("tag name", "main").is_displayed()
    d.save_screenshot(str(shots / "key.png"))
    assert httpx.post(url + "/", json={"inputs": "x"}, timeout=30).status_code == 401
    set_value(d, "key-input", KEY)
    d.find_element("id", "key-submit").click()
    wait_for(lambda: text_of(d, "model"), what="/info")
    assert d.execute_script("return sessionStorage.getItem('gpt2-api-key')") == KEY
    assert d.execute_script("return localStorage.length + document.cookie.length") == 0
    # The server's limits are on the inputs.
    info = httpx.get(url + "/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert d.find_element("id", "max_new_tokens").get_attribute("max") == str(info["max_total_tokens"] - 1)
    assert d.find_element("id", "top_n").get_attribute("max") == str(info["max_top_n_tokens"])
    assert d.find_element("id", "stop").get_attribute("data-max") == str(info["max_stop_sequences"])

    # A generation streams in: the text grows over several updates before the finish reason appears.
    set_value(d, "prompt", "ROMEO.\nBut soft, what light")
    set_value(d, "max_new_tokens", 60)
    set_value(d, "seed", 18446744073709551615)  # 2^64 - 1: past what a JavaScript number holds exactly
    d.execute_script(RECORD_GROWTH)
    d.find_element("id", "generate").click()
    wait_for(lambda: text_of(d, "stat-finish") in FINISHED, what="the finish reason")
    growth = d.execute_script("return window.__growth")
    streaming = [(t, n) for t, n, finish in growth if finish == "..." and n > 0]
    assert len({n for _, n in streaming}) >= 3, growth
    assert streaming[-1][0] > streaming[0][0]
    assert text_of(d, "stat-finish") == "length" and text_of(d, "stat-tokens") == "60"
    assert text_of(d, "stat-seed") == "18446744073709551615"
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", text_of(d, "stat-ttft")), text_of(d, "stat-ttft")
    assert float(text_of(d, "stat-rate")) > 0
    assert text_of(d, "out-prompt") == "ROMEO.\nBut soft, what light" and text_of(d, "out-text")
    d.save_screenshot(str(shots / "generate.png"))

    # Stop aborts the request on the server: the aborted counter goes up and nothing runs any more.
    aborted = metric(url, 'gpt2_request_failure_total{reason=aborted}')
    set_value(d, "max_new_tokens", info["max_total_tokens"] - 10)
    set_value(d, "seed", 1)
    d.find_element("id", "generate").click()
    wait_for(lambda: len(text_of(d, "out-text")) >= 20, what="the long generation's first tokens")
    assert metric(url, "gpt2_requests_running") == 1
    d.find_element("id", "stop-button").click()
    wait_for(lambda: text_of(d, "stat-finish") == "stopped", what="stopped")
    wait_for(lambda: metric(url, 'gpt2_request_failure_total{reason=aborted}') == aborted + 1, 10, "the abort")
    wait_for(lambda: metric(url, "gpt2_requests_running") == 0, 10, "no running request")
    length = len(text_of(d, "out-text"))
    time.sleep(0.3)
    assert len(text_of(d, "out-text")) == length
    assert int(text_of(d, "stat-tokens")) < info["max_total_tokens"] - 10
    assert d.find_element("id", "generate").is_enabled() and not d.find_element("id", "stop-button").is_enabled()

    # Scoring colors every token by its logprob; hovering shows the value and the alternatives.
    auth = {"Authorization": f"Bearer {KEY}"}
    prompt = "Good morrow, my lord.\nHow fares your grace?"
    greedy = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 12,
                        "do_sample": False}}, headers=auth, timeout=30).json()["generated_text"]
    text = prompt + greedy
    d.find_element("id", "tab-score").click()
    set_value(d, "score-text", text)
    set_value(d, "top_n", 3)
    d.find_element("id", "score-button").click()
    wait_for(lambda: d.find_elements("css selector", "#score-out .tok"), what="scored tokens")
    expected = httpx.post(url + "/score", json={"texts": [text], "add_bos": True, "top_n": 3}, headers=auth,
                          timeout=30).json()["results"][0]
    colors = d.execute_script(
        "return [...document.querySelectorAll('#score-out .tok')].map(e => getComputedStyle(e).backgroundColor)")
    assert len(colors) == len(expected["tokens"]) and len(set(colors)) >= 2
    assert all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colors)
    assert text_of(d, "score-out").replace("↵", "") == "".join(t["text"] for t in expected["tokens"])
    assert text_of(d, "stat-ppl") == f"{expected['perplexity']:.2f}"
    token = d.find_elements("css selector", "#score-out .tok")[2]
    ActionChains(d).move_to_element(token).perform()
    wait_for(lambda: d.find_element("id", "tip").is_displayed(), what="the tooltip")
    assert f"logprob {expected['tokens'][2]['logprob']:.3f}" in text_of(d, "tip")
    assert len(d.find_elements("css selector", "#tip tr")) == 3
    d.save_screenshot(str(shots / "score.png"))

    # A narrow screen: no sideways scrolling in either view, and a generation there (parameters folded).
    d.set_window_size(400, 900)
    assert no_sideways_scroll(d)
    d.save_screenshot(str(shots / "score-narrow.png"))
    d.get(url + "/")  # a load, not a hash change: the page starts narrow
    wait_for(lambda: text_of(d, "model"), what="/info")
    assert not d.find_element("id", "params").get_attribute("open")
    set_value(d, "prompt", "ROMEO.\nBut soft, what light")
    d.find_element("id", "generate").click()
    wait_for(lambda: text_of(d, "stat-finish") in FINISHED, what="the narrow generation")
    assert no_sideways_scroll(d)
    d.save_screenshot(str(shots / "generate-narrow.png"))
    d.set_window_size(1200, 1000)

    # No console errors, and every request went to this server.
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    requested = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                 for e in d.get_log("performance") if '"Network.requestWillBeSent"' in e["message"]]
    assert requested and all(u.startswith(url + "/") for u in requested), requested

    # Model output is text, never markup.
    d.find_element("id", "tab-score").click()
    set_value(d, "score-text", '<img src="/x" onerror="window.__pwned=1"><script>window.__pwned=1</script>')
    d.find_element("id", "score-button").click()
    wait_for(lambda: "<img" in text_of(d, "score-out").replace("↵", ""), what="the markup as text")
    assert d.find_elements("css selector", "#score-out img, #score-out script") == []
    assert d.execute_script("return window.__pwned === undefined")

    # A key the server refuses is forgotten and asked for again.
    d.execute_script("sessionStorage.setItem('gpt2-api-key', 'wrong')")
    d.refresh()
    wait_for(lambda: d.find_element("id", "key-view").is_displayed(), what="the key form again")
    assert "refused" in text_of(d, "key-message")
    assert d.execute_script("return sessionStorage.getItem('gpt2-api-key')") is None

    with capsys.disabled():
        print(f"\nplayground screenshots: {shots}/{{key,generate,score,generate-narrow,score-narrow}}.png")
