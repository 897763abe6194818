#!/usr/bin/env bash
# Contract fuzzing: schemathesis generates requests from the live server's /openapi.json and
# checks every answer against it (status codes, content types, headers, schemas, 5xx, methods).
# Runs a debug `chitram serve` on a free loopback port with a throwaway data dir.
#
#   scripts/contract-fuzz.sh            # builds the binary if needed
#   FUZZ_MAX_EXAMPLES=50 FUZZ_TIME_LIMIT=300 scripts/contract-fuzz.sh
#   FUZZ_SEED=random scripts/contract-fuzz.sh   # explore: a new seed each run (printed at the end)
#
# CI runs one fixed seed, so that a failure there can be replayed here with the same requests;
# run it with FUZZ_SEED=random now and then to explore further.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-30}"
TIME_LIMIT="${FUZZ_TIME_LIMIT:-240}"
SEED="${FUZZ_SEED:-20261123}"
seed_args=()
[ "$SEED" = random ] || seed_args=(--seed "$SEED")
VENV="$PWD/target/contract-fuzz/venv"

if [ ! -x "$VENV/bin/schemathesis" ] || ! "$VENV/bin/schemathesis" --version | grep -q "$SCHEMATHESIS_VERSION"; then
    # --clear: a venv whose checkout was moved keeps scripts that name the old path.
    python3 -m venv --clear "$VENV"
    "$VENV/bin/pip" install --quiet -c scripts/contract-fuzz-constraints.txt "schemathesis==$SCHEMATHESIS_VERSION"
fi

# The binary the integration tests use: after `cargo test` this builds nothing, where
# `cargo build --bin chitram` (other dependency features) would rebuild every dependency.
cargo test --locked --no-run --quiet
data=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
cat > "$data/chitram.toml" <<TOML
[server]
bind = "127.0.0.1:$port"
max_upload_bytes = 1048576
spool_dir = "$data/spool"

[database]
url = "sqlite://$data/chitram.db"

[auth]
admin_token_file = "$data/admin-token"
open_registration = true

# The fuzzer sends bursts no client should; the limits themselves are tested in tests/ratelimit.rs.
[rate_limits]
enabled = false

[[shards]]
name = "a"
kind = "fs"
path = "$data/shards/a"

[[shards]]
name = "b"
kind = "fs"
path = "$data/shards/b"
TOML
mkdir -p "$data/spool"

target/debug/chitram --config "$data/chitram.toml" serve > "$data/server.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT

for _ in $(seq 1 60); do
    curl -fsS "$base/health" > /dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$data/server.log"; exit 1; }
    sleep 0.5
done
curl -fsS "$base/health" > /dev/null
# The first start wrote the first admin's key: the fuzzer calls every route as that admin.
admin_key=$(cat "$data/admin-token")

started=$(date +%s)
status=0
# Two documented departures from schemathesis' defaults, everything else must hold:
# - A request the schema allows may still be refused for what no schema can say (bytes that are
#   not an image: 400 or 413; an id or cursor that names nothing: 404 or 400).
# - Accounts: a login with made-up credentials is 401, a made-up username may be taken (409), and
#   what a made-up request may not do is 403; each is documented on its route.
# - A batch answers 200 with one result per file whatever the files hold (README): a part that
#   is not an image is a failed item in that 200, not a failed request.
# (All checks are on in the file, not with --checks all, which would override the second.)
cat > "$data/schemathesis.toml" <<TOML
[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "400", "401", "403", "404", "409", "413"]

[[operations]]
include-path = "/api/v1/images/batch"
checks.negative_data_rejection.enabled = false
TOML
# From the data directory, where schemathesis leaves its own files.
(cd "$data" && timeout "$((TIME_LIMIT + 60))" "$VENV/bin/schemathesis" --config-file "$data/schemathesis.toml" run "$base/openapi.json" \
    --url "$base" \
    --header "Authorization: Bearer $admin_key" \
    --max-examples "$MAX_EXAMPLES" \
    --phases examples,coverage,fuzzing,stateful \
    --request-timeout 10 \
    --max-failures 10 \
    "${seed_args[@]}" \
    --no-color 2>&1 | tee "$data/schemathesis.out") || status=$?
echo "contract fuzzing took $(( $(date +%s) - started )) s"
if [ "$status" -ne 0 ] || grep -q "panicked" "$data/server.log"; then
    # CI keeps only the end of what a run prints: the server's warnings first, then the
    # fuzzer's own verdict, so the cause is the last thing on the screen.
    echo "--- server log: warnings, errors and panics (last 40)"
    grep -E " (WARN|ERROR) |panicked" "$data/server.log" | tail -n 40 || true
    echo "--- schemathesis (last 60 lines)"; tail -n 60 "$data/schemathesis.out"
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"
