#!/usr/bin/env python3
"""Sorts a callgrind_annotate listing into the leaf work of Chitram's request path and prints
instructions per request for each part, as a Markdown table.

    profile-breakdown.py KIND REQUESTS ANNOTATED.txt

callgrind's dumps of a running server list inclusive costs (the threads' frames are active
when the dump is taken), so only leaf functions (hashing, copying, allocating, CRC, byte
search) are summed; everything else is "the rest": parsing, HTTP on both sides, the S3 and
Postgres clients, the runtime. Under valgrind the sha2 crate cannot use the CPU's SHA
instructions (valgrind does not emulate them) and runs its software rounds, about ten times
the instructions of the hardware path that production runs.
"""
import re
import sys

LEAVES = [
    ("SHA-256, software rounds (sha2)", [r"sha2::sha256::"]),
    ("memcpy and memmove", [r"memcpy", r"memmove"]),
    ("memset", [r"memset"]),
    ("allocator (malloc, free)", [r"malloc\.c:", r"arena\.c:"]),
    ("CRC-32 of PNG chunks (crc32fast)", [r"crc32fast::"]),
    ("byte search (memchr: multipart boundaries)", [r"memchr::"]),
]

def main():
    kind, requests, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    line_re = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$")
    total = None
    parts = {name: 0 for name, _ in LEAVES}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = line_re.match(line)
        if not m:
            continue
        cost, function = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in function:
            total = cost
            continue
        for name, patterns in LEAVES:
            if any(re.search(p, function) for p in patterns):
                parts[name] += cost
                break
    if not total:
        sys.exit(f"{path}: no PROGRAM TOTALS line")
    rest = total - sum(parts.values())
    print(f"\n### {kind}: {requests} requests of 1 MiB, {total / requests / 1e6:.1f} M instructions each\n")
    print("| part | M instructions per request | share |")
    print("|---|---:|---:|")
    for name, cost in sorted(parts.items(), key=lambda kv: -kv[1]) + [("the rest (HTTP, parsing, clients, runtime)", rest)]:
        print(f"| {name} | {cost / requests / 1e6:.2f} | {cost / total * 100:.1f}% |")

if __name__ == "__main__":
    main()
