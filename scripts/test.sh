#!/usr/bin/env bash
# The test command: set up (idempotent), then run every crate's tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
# Build the binaries first: integration tests of the controller and the canary drive the
# real `cathedral` and `cathedralctl` executables.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
