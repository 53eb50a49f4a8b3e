#!/usr/bin/python3
"""First-read latency of a cold NBD export (bench/nbd_bench.sh, cold part).

    nbd_first_reads.py URI --size BYTES --region 4194304 --count 64 --seed 1 [--verify RAW]

Reads 4 KiB, one request at a time (QD1), at a random 4 KiB-aligned offset inside each of
`count` distinct `region`-sized regions of the export, visited in a random order (a region is
never read twice, so with a region of at least one frame or chunk every read is the first read
of its frame or chunk). Prints the latency of each read in microseconds, one a line, in the
order they were made. With --verify, every 4 KiB read is compared with the same bytes of the
raw image file and a mismatch fails the run (exit 1): the benchmark never times wrong bytes.
Needs python3-libnbd (Debian's, so /usr/bin/python3).
"""

import argparse
import random
import sys
import time

import nbd

BLOCK = 4096


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--region", type=int, default=4 << 20)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verify")
    a = ap.parse_args()

    regions = a.size // a.region
    if regions < 1 or a.region % BLOCK:
        sys.exit("region must be a multiple of 4096 and at most the size")
    rng = random.Random(a.seed)
    order = list(range(regions))
    rng.shuffle(order)
    offsets = [r * a.region + rng.randrange(a.region // BLOCK) * BLOCK
               for r in order[:a.count]]

    raw = open(a.verify, "rb") if a.verify else None
    h = nbd.NBD()
    h.connect_uri(a.uri)
    if h.get_size() != a.size:
        sys.exit(f"export size {h.get_size()} != --size {a.size}")
    out = []
    for off in offsets:
        t0 = time.perf_counter_ns()
        data = h.pread(BLOCK, off)
        t1 = time.perf_counter_ns()
        out.append((t1 - t0) / 1000)
        if raw is not None:
            raw.seek(off)
            if raw.read(BLOCK) != data:
                sys.exit(f"wrong bytes at offset {off}")
    h.shutdown()
    for us in out:
        print(f"{us:.1f}")


if __name__ == "__main__":
    main()
