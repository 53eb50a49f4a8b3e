#!/usr/bin/python3
"""export_dirty.py URI RAW FRACTION SEED OUT: dirties FRACTION of the 4 KiB blocks of the NBD
export at URI (runs of 1-16 blocks at random places, filled with blocks copied from other places
of the base image RAW, so the data compresses like the image does) and writes the dirty blocks,
in device order, to OUT (what the packed diff of a snapshot holds). Prints the dirty bytes."""
import random, sys
import nbd

uri, raw, fraction, seed, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
B = 4096
rng = random.Random(seed)
img = open(raw, 'rb').read()
blocks = len(img) // B
want = int(blocks * fraction)
dirty = bytearray(blocks)  # 1 = dirty
count = 0
while count < want:
    run = rng.randint(1, 16)
    start = rng.randrange(0, blocks - run)
    for b in range(start, start + run):
        if not dirty[b]:
            dirty[b] = 1
            count += 1
h = nbd.NBD()
h.connect_uri(uri)
content = {}
b = 0
while b < blocks:
    if not dirty[b]:
        b += 1
        continue
    e = b
    while e < blocks and dirty[e]:
        e += 1
    data = bytearray()
    for _ in range(b, e):
        src = rng.randrange(0, blocks) * B
        blk = bytearray(img[src:src + B])
        blk[0] ^= 0xFF  # never identical to the base, never all zero
        data += blk
    h.pwrite(bytes(data), b * B)
    content[b] = bytes(data)
    b = e
h.flush()
h.shutdown()
with open(out, 'wb') as f:
    for k in sorted(content):
        f.write(content[k])
print(count * B)
