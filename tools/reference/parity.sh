#!/usr/bin/env bash
# Recomputes runtime/tests/fixtures/parity/ from the reference implementations.
# Needs network once (tools/reference/setup.sh installs the references); CI never runs this.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SEED=${SEED:-0}
VENV=$(bash "$ROOT/tools/reference/setup.sh")
cargo build -q -p cathedral-runtime --bin cathedral --manifest-path "$ROOT/Cargo.toml"
BIN=$ROOT/target/debug/cathedral
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" tiny-model --out "$WORK/f32" --seed "$SEED" --dtype f32
"$BIN" tiny-model --out "$WORK/bf16" --seed "$SEED" --dtype bf16
"$VENV/bin/python" "$ROOT/tools/reference/parity.py" --seed "$SEED" \
  --f32 "$WORK/f32" --bf16 "$WORK/bf16" --q4 "$WORK/q4" \
  --out "$ROOT/runtime/tests/fixtures/parity"
ls -la "$ROOT/runtime/tests/fixtures/parity"
