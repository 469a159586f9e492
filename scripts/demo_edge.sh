#!/usr/bin/env bash
# The end of `make demo`: promote the new challenger through the gate, start a local edge server,
# deploy the champion to it, ask it for predictions, stop it.
#   MODEL (default tweets-sentiment), PORT (default 8765), TRANSFLOW_EDGE_TOKEN (default: a random one)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
MODEL="${MODEL:-tweets-sentiment}"
PORT="${PORT:-8765}"
export TRANSFLOW_EDGE_TOKEN="${TRANSFLOW_EDGE_TOKEN:-demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}"

echo "== promote: the gate re-evaluates challenger and champion on the same test split"
"$BIN/transflow" promote "$MODEL" || echo "(gate refused: the champion stays as it was)"

echo "== edge server on 127.0.0.1:$PORT (state in edge-state/)"
"$BIN/transflow-edge" serve --state-dir edge-state --host 127.0.0.1 --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.5
done

echo "== deploy $MODEL@champion"
"$BIN/transflow" deploy "$MODEL@champion" --target "http://127.0.0.1:$PORT"

echo "== predict"
curl -s -X POST "http://127.0.0.1:$PORT/v1/predict" -H 'content-type: application/json' \
  -d '{"inputs": ["@united thanks for the upgrade, best flight ever!", "my bag is lost again, third time this month", "flight 2211 departs at 6pm"]}'
echo
curl -s "http://127.0.0.1:$PORT/v1/model" | .venv/bin/python -c \
  'import json,sys; m=json.load(sys.stdin); print("serving", m["name"], "v" + str(m["version"]), "data", m["data_version"][:12], "bundle", m["bundle_sha256"][:12])'
