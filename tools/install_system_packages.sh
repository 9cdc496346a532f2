#!/bin/sh
# Debian packages the tests use, installed when missing (as root with apt-get, in one apt-get run):
#   chromium, chromium-driver: the chat page's browser test (tests/test_chat_page.py);
#   prometheus: the real Prometheus of tests/test_prometheus.py (scraping the servers, the dashboard's queries).
# Otherwise it says why and exits 0: those tests then skip with the reason. apt-get's output goes to
# build/logs/install_system_packages.log. POSIX sh: `make system-packages` runs it with sh.
set -u
cd "$(dirname "$0")/.." || exit 0

# package:binary it provides
WANTED="chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver prometheus:/usr/bin/prometheus"

missing=""
for entry in $WANTED; do
    package=${entry%%:*}
    binary=${entry#*:}
    [ -x "$binary" ] || missing="$missing $package"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_packages:$missing missing and not root: the tests needing them will skip" \
         "(as root: apt-get install$missing)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_packages:$missing missing and no apt-get: the tests needing them will skip" >&2
    exit 0
fi

mkdir -p build/logs
log=build/logs/install_system_packages.log
echo "install_system_packages: installing$missing with apt-get (log: $log)" >&2
# shellcheck disable=SC2086 (one word per package)
if DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >>"$log" 2>&1; then
    echo "install_system_packages: installed$missing" >&2
else
    echo "install_system_packages: apt-get failed (see $log): the tests needing$missing will skip" >&2
    tail -n 5 "$log" >&2
fi
exit 0
