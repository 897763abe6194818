#!/usr/bin/env bash
# Where Chitram's CPU goes per request, in instructions (callgrind counts them repeatably,
# whatever else the machine is doing). Runs the e2e bench's `profile` phase with the RF=1
# server under callgrind: 1 MiB uploads one at a time, then downloads, with the counts dumped
# between them; then sorts each dump's self cost into the parts of the request path.
#
#   scripts/profile-requests.sh [requests of each kind, default 50]
#
# Needs valgrind (Debian's package) and Postgres, as the e2e bench does. Takes a few minutes
# (a release build first, if there is none). Output: target/profile/, and a table on stdout
# (BENCHMARKS.md, "Where an upload's CPU goes").
set -euo pipefail
cd "$(dirname "$0")/.."
ops="${1:-50}"
out="$PWD/target/profile"
rm -rf "$out" && mkdir -p "$out"
CHITRAM_BENCH_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.%p" \
    CHITRAM_BENCH_PHASES=profile CHITRAM_BENCH_SECS=0.1 CHITRAM_BENCH_PROFILE_OPS="$ops" \
    cargo bench --locked --bench e2e >"$out/bench.txt"
# Each server wrote one file per dump; the RF=1 server's are the ones labelled by the phase.
for kind in uploads downloads; do
    dump=$(grep -l "^desc: Trigger: dump $kind\$" "$out"/callgrind.* | head -n1)
    callgrind_annotate --inclusive=no --auto=no --threshold=100 "$dump" >"$out/$kind.txt"
    python3 scripts/profile-breakdown.py "$kind" "$ops" "$out/$kind.txt"
done
