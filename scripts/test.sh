#!/usr/bin/env bash
# Installs what the tests need into .venv (and Debian's chromium for the browser test), then runs them.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian chromium for the browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium; the browser test will be skipped" >&2
fi
export TEST_ARTIFACTS_DIR=${TEST_ARTIFACTS_DIR:-$PWD/test-artifacts}
.venv/bin/ruff check .
.venv/bin/python -m pytest -ra "$@"
echo "test artifacts (screenshots): $TEST_ARTIFACTS_DIR"
