#!/usr/bin/env python3
"""bench/rate_proxy.py: a bandwidth-limited TCP proxy for the object-store benchmarks.

    rate_proxy.py --upstream 127.0.0.1:PORT --rate 100MiB [--burst 256KiB]

Listens on an ephemeral loopback port (printed on stdout as `PORT`, one line, then it runs
until killed) and forwards every connection to the upstream. The bytes coming back from the
upstream (the downloads) go through ONE token bucket shared by all connections: the proxy is a
link of `--rate` bytes per second, however many connections a client opens, so the wire is the
bottleneck as it is against the real service. Requests (client to upstream) are not limited.
"""

import argparse
import asyncio
import re
import sys
import time

PIECE = 64 << 10


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[0]]
    return int(float(m.group(1)) * scale)


class Bucket:
    """A token bucket of `rate` bytes/s holding at most `burst` bytes; waiters are served in
    arrival order (the lock is fair)."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe(reader, writer, bucket):
    try:
        while True:
            data = await reader.read(PIECE)
            if not data:
                break
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    ap.add_argument("--rate", required=True, type=parse_size, help="bytes/s (100MiB, 50M, ...)")
    ap.add_argument("--burst", default=256 << 10, type=parse_size, help="bucket depth")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    if args.burst < PIECE:
        sys.exit(f"--burst must be at least {PIECE} bytes (one piece)")
    bucket = Bucket(args.rate, args.burst)

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, None), pipe(up_r, client_w, bucket))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
