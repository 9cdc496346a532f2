#!/bin/sh
# Debian's Chromium and ChromeDriver for the chat page's browser test (tests/test_chat_page.py).
# Installs them when they are missing and this is root with apt-get; otherwise says why and exits 0
# (the test then skips with the reason). apt-get's output goes to build/logs/install_browser.log.
# POSIX sh: `make browser` runs it with sh.
set -u
cd "$(dirname "$0")/.." || exit 0

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: $CHROMIUM or $CHROMEDRIVER missing and not root: the browser test will skip" \
         "(as root: apt-get install chromium chromium-driver)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: $CHROMIUM or $CHROMEDRIVER missing and no apt-get: the browser test will skip" >&2
    exit 0
fi

mkdir -p build/logs
log=build/logs/install_browser.log
echo "install_browser: installing chromium and chromium-driver with apt-get (log: $log)" >&2
if DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver \
       >>"$log" 2>&1; then
    echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null)" >&2
else
    echo "install_browser: apt-get failed (see $log): the browser test will skip" >&2
    tail -n 5 "$log" >&2
fi
exit 0
