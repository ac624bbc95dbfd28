#!/usr/bin/env bash
# Idempotent: creates .venv-ref with the reference implementations (mlx-lm, mlx-vlm, and the
# Hugging Face processor code through mlx-vlm's transformers dependency), all from PyPI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$ROOT/.venv-ref
REQ=$ROOT/tools/reference/requirements.txt
STAMP=$VENV/.ok-$(sha256sum "$REQ" | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  touch "$STAMP"
fi
echo "$VENV"
