"""Screenshot of the chat page with a finished two-turn conversation (docs/images/chat-page.png).

Starts tritonserver and the gateway on free ports (or uses a running gateway: --url), opens the
page in Debian's headless Chromium, asks two questions, waits for both answers and saves the PNG.

Usage: python tools/screenshot_chat_page.py [--url http://127.0.0.1:9000] [--out PATH] [--dark]
Needs /usr/bin/chromium and /usr/bin/chromedriver (`make system-packages`) and selenium (`make install`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "chat-page.png"
QUESTIONS = ("Hello!", "What is the capital of France?")


@contextlib.contextmanager
def served_gateway(log_dir: Path):
    """tritonserver and the gateway on free ports, stopped on exit; yields the gateway's URL."""
    from llmserve.triton.launcher import GatewayServer, TritonServer, model_env

    with TritonServer(env=model_env(), log_path=log_dir / "triton.log") as triton:
        with GatewayServer(triton.grpc_url, log_path=log_dir / "gateway.log") as gateway:
            yield gateway.url


def _wait_answered(driver, count: int, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "const a = document.querySelectorAll('.message.assistant');"
            "return a.length === arguments[0] ? a[a.length - 1].dataset.state : null;", count)
        if state not in (None, "streaming"):
            return state
        time.sleep(0.05)
    raise TimeoutError(f"answer {count} did not finish in {timeout} s")


def screenshot(url: str, out: Path, *, dark: bool = False, width: int = 1000, max_tokens: int = 60) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", f"--window-size={width},600", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    if dark:
        options.add_argument("--blink-settings=preferredColorScheme=0")  # prefers-color-scheme: dark
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        time.sleep(0.5)  # GET /v1/models
        driver.find_element(By.ID, "settings-toggle").click()
        box = driver.find_element(By.ID, "max-tokens")
        box.clear()
        box.send_keys(str(max_tokens))
        driver.find_element(By.ID, "system-prompt").send_keys("You are a friendly storyteller.")
        for number, question in enumerate(QUESTIONS, start=1):
            prompt = driver.find_element(By.ID, "prompt")
            prompt.send_keys(question)
            prompt.send_keys(Keys.ENTER)
            state = _wait_answered(driver, number)
            if state != "done":
                raise RuntimeError(f"answer {number} ended {state!r}: {driver.find_element(By.ID, 'error').text}")
        driver.find_element(By.ID, "settings-toggle").click()  # closed again: the conversation shows
        driver.find_element(By.ID, "prompt").send_keys("And then?")  # a draft in the composer
        # The whole page in one picture: the window as tall as the document.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        chrome = driver.get_window_size()["height"] - driver.execute_script("return window.innerHeight")
        driver.set_window_size(width, height + chrome)
        driver.execute_script("window.scrollTo(0, 0)")
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "messages")).perform()  # no hover
        time.sleep(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running gateway (default: start tritonserver and the gateway)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dark", action="store_true", help="prefers-color-scheme: dark")
    parser.add_argument("--width", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.url:
        screenshot(args.url, args.out, dark=args.dark, width=args.width)
    else:
        with tempfile.TemporaryDirectory() as logs, served_gateway(Path(logs)) as url:
            screenshot(url, args.out, dark=args.dark, width=args.width)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
