#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver) for the browser
# tests (tests/test_browser.py); no browser is ever downloaded by a test tool. Safe to repeat: it
# installs only what is missing. Where it cannot install (no apt-get, not root and no sudo), it
# says so and the browser tests skip, except in CI, where SCALING_SEARCH_REQUIRE_BROWSER fails them.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
say() { echo "browser: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
  say "no apt-get here: install Chromium and ChromeDriver as /usr/bin/chromium and /usr/bin/chromedriver to run the browser tests"
  exit 0
fi
run=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run=(sudo -n)
  else
    say "not root and no password-less sudo: run 'sudo apt-get install chromium chromium-driver' to run the browser tests"
    exit 0
  fi
fi
install() { "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }
say "installing Debian's chromium and chromium-driver"
install || { "${run[@]}" apt-get update -q >/dev/null && install; }
