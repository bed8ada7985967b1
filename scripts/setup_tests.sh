#!/usr/bin/env bash
# scripts/setup.sh, then what only the tests need: the system Chromium and chromedriver that
# the browser tests (pytest -m ui) drive. Without them those tests skip (a failure under
# RECSAE_REQUIRE_BROWSER=1). As root with apt they are installed, refreshing the package
# lists only if needed; RECSAE_SKIP_BROWSER=1 skips that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

apt_install_browser() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    chromium chromium-driver >/dev/null
}
BROWSER_HINT="browser tests will be skipped; enable them with: apt-get install -y chromium chromium-driver"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ -z "${RECSAE_SKIP_BROWSER:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup_tests: installing chromium and chromium-driver for the browser tests (RECSAE_SKIP_BROWSER=1 skips this)"
    apt_install_browser || { apt-get update -q >/dev/null && apt_install_browser; } ||
      echo "setup_tests: apt-get could not install chromium; $BROWSER_HINT" >&2
  else
    echo "setup_tests: no /usr/bin/chromium or /usr/bin/chromedriver: $BROWSER_HINT"
  fi
fi
