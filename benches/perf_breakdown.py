#!/usr/bin/env python3
"""Where the stack's added time goes: `perf` samples of the success path, grouped.

BENCHMARKS.md's time breakdown of the full stack comes from this script. It reads
one `perf record` file per variant of `benches/stack_overhead.rs` (bare service,
tower composition, Backstop), groups each variant's samples by what the sampled
function does (moving bytes, the allocator, the layers' own code ...), and scales
each group to nanoseconds per request with that variant's measured time per request
(criterion's estimate from the same machine), since sampling itself slows the
program down evenly. Linux only (`perf`).

    cargo bench -p backstop --bench stack_overhead --no-run
    BIN=$(ls -t target/release/deps/stack_overhead-* | grep -v '\\.d$' | head -1)
    for v in bare tower backstop; do
      STACK_OVERHEAD_CALLS="$v 1000000" perf record -e cpu-clock -F 10000 \\
        -o /tmp/perf_$v.data "$BIN"
    done
    python3 benches/perf_breakdown.py \\
      bare=/tmp/perf_bare.data:603 tower=/tmp/perf_tower.data:857 \\
      backstop=/tmp/perf_backstop.data:2502

Each argument is `name=perf-file:ns-per-request`; the first is the baseline the
"added" column is measured against, the last the variant it describes.
"""

import collections
import re
import subprocess
import sys

# First match wins; a function's name says what it spends its time on.
GROUPS = [
    ("moving bytes (memmove/memcpy)", r"memmove|memcpy"),
    ("allocator (malloc/free)", r"malloc|_int_free|cfree|free@|__rust_alloc|__rust_dealloc|__rdl_|realloc|unlink_chunk|tcache"),
    ("clock reads", r"clock_gettime|Timespec>::now|Instant>::now"),
    ("model scan and rewrite", r"backstop_fallback::rewrite::"),
    ("extension maps (hashbrown, AnyClone)", r"hashbrown|http::extensions|AnyClone|type_id"),
    ("header maps", r"http::header|HeaderMap|HeaderValue|HeaderName"),
    ("building the request (harness)", r"Builder::and_then|Uri::from_shared|PathAndQuery|Request<\(\)>::post|http::uri::|Scheme|Authority|static_to_vec|copy_from_slice"),
    ("bytes reference counts", r"bytes::bytes::"),
    ("runtime and oneshot (harness)", r"tokio::|block_on|[Oo]neshot|Scoped"),
    ("drop glue", r"drop_in_place"),
    ("the layers' own code", r"backstop|stack_overhead"),
]


def group(symbol):
    for name, pattern in GROUPS:
        if re.search(pattern, symbol):
            return name
    return "other"


def samples(path):
    out = subprocess.run(
        ["perf", "report", "-i", path, "--no-children", "--sort", "symbol",
         "--stdio", "-F", "sample,symbol"],
        capture_output=True, text=True, check=True,
    ).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s+(\d+)\s+\[.\]\s+(.*)", line)
        if m:
            counts[group(m.group(2))] += int(m.group(1))
    return counts


def main(args):
    variants = []
    for arg in args:
        name, rest = arg.split("=", 1)
        path, ns = rest.rsplit(":", 1)
        counts = samples(path)
        total = sum(counts.values())
        per_request = {g: n / total * float(ns) for g, n in counts.items()}
        variants.append((name, per_request))
    base, last = variants[0], variants[-1]
    names = sorted(last[1], key=lambda g: -(last[1][g] - base[1].get(g, 0.0)))
    header = "| group | " + " | ".join(f"{v} (ns)" for v, _ in variants)
    print(header + f" | {last[0]} − {base[0]} (ns) |")
    print("|---" * (len(variants) + 2) + "|")
    for g in names:
        cells = " | ".join(f"{p.get(g, 0.0):.0f}" for _, p in variants)
        print(f"| {g} | {cells} | {last[1][g] - base[1].get(g, 0.0):+.0f} |")
    totals = " | ".join(f"{sum(p.values()):.0f}" for _, p in variants)
    print(f"| total | {totals} | {sum(last[1].values()) - sum(base[1].values()):+.0f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
