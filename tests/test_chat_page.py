"""The chat page (llmserve/gateway/static/) in a real browser: Debian's headless Chromium driven by
Selenium, against the `gateway` fixture (the front end before a real tritonserver).

Skips, with the reason, where the browser or Selenium is missing (`make system-packages`, `make install`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from llmserve.paths import REPO_ROOT
from llmserve.triton.launcher import metric

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_FILE = REPO_ROOT / "llmserve" / "gateway" / "static" / "index.html"

_MISSING = [f"{path} not found: run make system-packages" for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING))]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: run make install")
from selenium.common.exceptions import WebDriverException  # noqa: E402 (after the skip)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

# The last assistant message: [how many there are, its data-state, its text's length].
_LAST_ANSWER = """
const all = document.querySelectorAll('.message.assistant');
const last = all[all.length - 1];
return last ? [all.length, last.dataset.state, last.querySelector('.content').textContent.length]
            : [0, null, 0];
"""


# Resolves once the first assistant message has at least arguments[0] characters.
_WAIT_FOR_TEXT = """
const [min, done] = arguments;
const check = () => {
  const content = document.querySelector('.message.assistant .content');
  if (content && content.textContent.length >= min) { done(true); return true; }
  return false;
};
if (!check()) {
  new MutationObserver((_, observer) => { if (check()) observer.disconnect(); })
    .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}
"""


def _settled(metrics_url: str, timeout: float = 15) -> float:
    """The generated-token counter once no sequence runs and it stood still for a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(metrics_url, "llm_active_sequences") == 0:
            count = metric(metrics_url, "llm_generated_tokens_total")
            time.sleep(1.0)  # the counters are flushed at most every 50 ms
            if metric(metrics_url, "llm_active_sequences") == 0 and metric(
                    metrics_url, "llm_generated_tokens_total") == count:
                return count
        time.sleep(0.05)
    raise AssertionError(f"the server was still generating after {timeout} s")


def _cancelled(metrics_url: str) -> float:
    try:
        return metric(metrics_url, "llm_requests_finished_total", reason="cancelled")
    except KeyError:  # none yet
        return 0.0


def _wait(condition, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:
        pytest.skip(f"headless {CHROMIUM} did not start: {exc.msg}")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


class ChatPage:
    """The page as a person uses it: settings, typing, Send / Enter, Stop, New chat."""

    def __init__(self, driver, url: str | None) -> None:
        self.driver = driver
        if url is not None:  # None: the page the driver is on
            driver.get(url)
        _wait(lambda: self.text("#model") != "loading model…", 10, what="the model name")

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def settings(self, *, max_tokens: int | None = None, ignore_eos: bool | None = None,
                 temperature: float | None = None) -> None:
        if not self.find("#settings").is_displayed():
            self.find("#settings-toggle").click()
        if max_tokens is not None:
            box = self.find("#max-tokens")
            box.clear()
            box.send_keys(str(max_tokens))
        if ignore_eos is not None and self.find("#ignore-eos").is_selected() != ignore_eos:
            self.find("#ignore-eos").click()
        if temperature is not None:  # a range input: set as its own input event would
            self.driver.execute_script("const t = document.getElementById('temperature'); t.value = arguments[0];"
                                       "t.dispatchEvent(new Event('input'));", str(temperature))

    def type(self, text: str) -> None:
        self.find("#prompt").send_keys(text)

    def last_answer(self) -> tuple[int, str | None, int]:
        count, state, length = self.driver.execute_script(_LAST_ANSWER)
        return count, state, length

    def wait_answered(self, count: int, timeout: float = 60) -> str:
        """Wait until answer number `count` is no longer streaming; its data-state."""
        def finished():
            n, state, _ = self.last_answer()
            return state if n == count and state not in (None, "streaming") else None
        return _wait(finished, timeout, what=f"answer {count} to finish")


def test_sse_parser_takes_events_split_anywhere(browser):
    """The page's SSE parser gives the same events however the stream is cut into reads: inside a
    line, between \\r and \\n, char by char; comments skipped, multi-line data joined."""
    browser.get(PAGE_FILE.as_uri())
    stream = ('data: {"a": 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: {"b":\ndata: 2}\n\n'
              'data:{"c": "é\\u00e9"}\r\rdata: [DONE]\n\n')
    results = browser.execute_script("""
        const stream = arguments[0];
        const parse = (pieces) => {
          const events = [];
          const parser = new window.chatPage.SSEParser((data) => events.push(data));
          for (const piece of pieces) parser.push(piece);
          parser.end();
          return JSON.stringify(events);
        };
        const out = [parse([stream]), parse([...stream])];
        for (let i = 0; i <= stream.length; i++) out.push(parse([stream.slice(0, i), stream.slice(i)]));
        return out;
    """, stream)
    expected = '["{\\"a\\": 1}","{\\"b\\":\\n2}","{\\"c\\": \\"é\\\\u00e9\\"}","[DONE]"]'
    assert set(results) == {expected}
    # An unterminated last event still counts once the stream ends.
    assert browser.execute_script("""
        const events = [];
        const parser = new window.chatPage.SSEParser((data) => events.push(data));
        parser.push('data: [DONE]');
        parser.end();
        return events;""") == ["[DONE]"]


def test_an_answer_streams_with_time_to_first_token_and_tokens_per_second(browser, gateway):
    page = ChatPage(browser, gateway.url)
    assert page.text("#model") == "default"
    page.settings(max_tokens=300, ignore_eos=True, temperature=0.7)
    page.type("Tell me a story about a little cat")
    page.find("#send").click()

    lengths = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        count, state, length = page.last_answer()
        if count == 1:
            lengths.append(length)
            if state != "streaming":
                break
        time.sleep(0.005)
    assert state == "done", f"the answer ended {state!r}: {page.text('#error')}"
    grown = sorted(set(n for n in lengths if n))
    assert len(grown) >= 3, f"text did not stream: lengths seen {grown}"
    assert lengths == sorted(lengths)  # only ever grows

    answer = page.find(".message.assistant")
    assert answer.get_attribute("data-completion-tokens") == "300"  # usage, from include_usage
    assert answer.get_attribute("data-finish-reason") == "length"
    assert re.fullmatch(r"\d+", page.text("#ttft")), page.text("#ttft")
    assert float(page.text("#tps")) > 0
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s · 300 tokens · length", answer.text)
    assert page.find("#stop").get_attribute("disabled") and page.find("#send").is_enabled()


def test_stop_ends_the_generation_on_the_server(browser, gateway):
    """Stop, pressed once some text has arrived, ends the generation on the server: no sequence
    left, the generated-token counter stands still far below max_tokens, and the engine counts the
    request as cancelled. The model writes hundreds of tokens a second and a WebDriver click can
    take a second on a loaded machine: an attempt whose click came late is tried again."""
    metrics_url = gateway.triton.metrics_url
    max_tokens = 1000
    for attempt in range(1, 4):
        page = ChatPage(browser, gateway.url)
        page.settings(max_tokens=max_tokens, ignore_eos=True)
        stop = page.find("#stop")
        before = _settled(metrics_url)
        cancelled_before = _cancelled(metrics_url)
        page.type("Once upon a time")
        page.find("#send").click()
        browser.execute_async_script(_WAIT_FOR_TEXT, 20)
        stop.click()
        state = page.wait_answered(1, timeout=30)
        if state == "done" and attempt < 3:
            continue  # the whole answer was in before the click
        assert state == "stopped"
        assert page.find("#send").is_enabled() and stop.get_attribute("disabled")
        assert "stopped" in page.text(".message.assistant .meta")
        shown = page.last_answer()[2]

        generated = _settled(metrics_url) - before
        assert _cancelled(metrics_url) == cancelled_before + 1  # the engine ended it: cancelled
        assert page.last_answer()[2] == shown  # nothing arrived after Stop
        if generated >= max_tokens // 2 and attempt < 3:
            continue  # the click came late
        assert 0 < generated < max_tokens // 2, f"{generated} tokens generated of {max_tokens}"
        return


def test_a_second_turn_sends_the_whole_conversation(browser, gateway):
    page = ChatPage(browser, gateway.url)
    page.settings(max_tokens=24, ignore_eos=True)
    page.type("Hello <b>cat</b> & <img src=x onerror=alert(1)>")
    page.find("#send").click()
    assert page.wait_answered(1) == "done"
    page.type("What did the cat do next, and where did it go after that?")
    page.find("#prompt").send_keys(Keys.ENTER)  # Enter sends
    assert page.wait_answered(2) == "done"

    users = browser.find_elements(By.CSS_SELECTOR, ".message.user")
    answers = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
    assert len(users) == 2 and len(answers) == 2
    assert users[0].find_element(By.CSS_SELECTOR, ".content").text == "Hello <b>cat</b> & <img src=x onerror=alert(1)>"
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img")  # text, never HTML
    # The second request carried the first turn: its prompt holds the first prompt and answer.
    first_prompt = int(answers[0].get_attribute("data-prompt-tokens"))
    first_answer = int(answers[0].get_attribute("data-completion-tokens"))
    second_prompt = int(answers[1].get_attribute("data-prompt-tokens"))
    assert second_prompt > first_prompt + first_answer, (first_prompt, first_answer, second_prompt)

    page.find("#new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    assert browser.execute_script("return window.chatPage.state.conversation.length") == 0


def test_shift_enter_is_a_new_line_and_server_errors_are_shown(browser, gateway):
    page = ChatPage(browser, gateway.url)
    page.settings(max_tokens=5000)  # more than the model's context: the server refuses it
    prompt = page.find("#prompt")
    prompt.send_keys("first line")
    prompt.send_keys(Keys.SHIFT, Keys.ENTER)
    prompt.send_keys("second line")
    assert prompt.get_attribute("value") == "first line\nsecond line"
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")  # Shift+Enter did not send
    prompt.send_keys(Keys.ENTER)
    assert page.wait_answered(1) == "error"
    error = page.find("#error")
    assert error.is_displayed() and "max_tokens" in error.text, error.text
    assert "max_tokens" in page.text(".message.assistant .error-text")
    assert prompt.get_attribute("value") == "first line\nsecond line"  # given back to retry
    assert browser.execute_script("return window.chatPage.state.conversation.length") == 0


@pytest.fixture(scope="module")
def keyed_gateway(triton_server, gateway_process, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway-page-key") / "gateway.log"
    with gateway_process(triton_server.grpc_url, triton_server, log_path=log,
                         extra_args=["--api-key", "sk-page-key-1"]) as server:
        yield server


def test_the_page_asks_for_the_api_key_once(browser, keyed_gateway):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_gateway.url)
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).dismiss()  # no key: refused
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#model").text == "model unavailable", 10,
          what="the refusal shown")
    browser.get(keyed_gateway.url)
    alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    assert "API key" in alert.text
    alert.send_keys("sk-page-key-1")
    alert.accept()
    page = ChatPage(browser, None)
    assert page.text("#model") == "default"
    page.settings(max_tokens=8, ignore_eos=True)
    page.type("Hello")
    page.find("#send").click()
    assert page.wait_answered(1) == "done", page.text("#error")
    assert page.find(".message.assistant").get_attribute("data-completion-tokens") == "8"
    browser.refresh()  # the key is kept for the tab: no second question
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#model").text == "default", 10, what="the model name")
    browser.execute_script("sessionStorage.clear()")
