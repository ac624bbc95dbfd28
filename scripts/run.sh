#!/usr/bin/env bash
# The main job on a fresh machine, with embedded defaults: set up, build, make the bundled tiny
# model and dev certificates, serve it with mTLS on loopback, then walk the operator's loop —
# probes, a short canary burn-in with its report, the kill switch engaged and released, status.
# Everything printed comes from the real binaries. State lives in .run/ (gitignored).
#   PORT=1337 (default)   KEEP_RUNNING=1 leaves the runtime up at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${PORT:-1337}
RUN=$ROOT/.run
BIN=$ROOT/target/debug

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "setup and build"
bash scripts/setup.sh
cargo build --bins
mkdir -p "$RUN"

step "tiny model (deterministic, seed 0)"
"$BIN/cathedral" tiny-model --out "$RUN/model"   # deterministic: same bytes every run
ls -l "$RUN/model"

step "dev certificates: a CA, the server (localhost, 127.0.0.1), clients 'operator' (admin) and 'canary'"
[ -f "$RUN/certs/ca.pem" ] || "$BIN/cathedralctl" certs init --out "$RUN/certs" \
  --server-name localhost --server-name 127.0.0.1 --client operator --client canary
CERTS=$RUN/certs
ADMIN=(--cert "$CERTS/clients/operator.pem" --key "$CERTS/clients/operator.key" --ca "$CERTS/ca.pem")
CANARY=(--cert "$CERTS/clients/canary.pem" --key "$CERTS/clients/canary.key" --ca "$CERTS/ca.pem")
TARGET=https://127.0.0.1:$PORT

step "runtime: cathedral serve on 127.0.0.1:$PORT (mTLS only, vision on)"
"$BIN/cathedral" serve --model "$RUN/model" --listen "127.0.0.1:$PORT" \
  --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --client-ca "$CERTS/ca.pem" \
  --admin-identity operator --vision-enabled --kill-switch "$RUN/kill-switch.json" --no-plain \
  > "$RUN/runtime.log" 2>&1 &
PID=$!
stop() { [ "${KEEP_RUNNING:-0}" = 1 ] || { kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; } || true; }
trap stop EXIT
for _ in $(seq 1 120); do
  grep -q "listening" "$RUN/runtime.log" && break
  kill -0 "$PID" 2>/dev/null || { cat "$RUN/runtime.log"; exit 1; }
  sleep 0.5
done
grep -E "model loaded|listening" "$RUN/runtime.log" | sed 's/\x1b\[[0-9;]*m//g'

step "probes over mTLS: text, then the built-in image"
"$BIN/cathedralctl" probe --target "$TARGET" "${CANARY[@]}" --text
"$BIN/cathedralctl" probe --target "$TARGET" "${CANARY[@]}" --builtin-image

step "canary: 12 s of probes (interval 1 s, window 4 s), then the burn-in report"
rm -rf "$RUN/canary"
"$BIN/cathedralctl" canary watch --target "$TARGET" "${CANARY[@]}" --admin-cert "$CERTS/clients/operator.pem" \
  --admin-key "$CERTS/clients/operator.key" --interval 1s --window 4s --run-for 12s --state "$RUN/canary"
"$BIN/cathedralctl" canary report --state "$RUN/canary" --since 1h --out "$RUN/canary/report"

step "kill switch: engage through the admin route; vision answers 503, text still 200"
"$BIN/cathedralctl" killswitch --target "$TARGET" "${ADMIN[@]}" engage --reason "operator drill"
"$BIN/cathedralctl" killswitch --target "$TARGET" "${ADMIN[@]}" status
"$BIN/cathedralctl" probe --target "$TARGET" "${CANARY[@]}" --builtin-image || echo "(vision refused, as expected)"
"$BIN/cathedralctl" probe --target "$TARGET" "${CANARY[@]}" --text

step "kill switch: release; vision answers again"
"$BIN/cathedralctl" killswitch --target "$TARGET" "${ADMIN[@]}" release
"$BIN/cathedralctl" probe --target "$TARGET" "${CANARY[@]}" --builtin-image

step "status"
"$BIN/cathedralctl" killswitch --target "$TARGET" "${ADMIN[@]}" status
echo
echo "runtime log: $RUN/runtime.log   canary report: $RUN/canary/report"
