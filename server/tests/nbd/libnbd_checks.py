# libnbd (python3-libnbd) checks of `thaw serve`, run by server/tests/nbd_interop.rs:
#   /usr/bin/python3 libnbd_checks.py URI FLAT_IMAGE
# URI names a *writable* export whose contents equal FLAT_IMAGE. Prints "OK" at the end; any
# failed assertion or libnbd error exits non-zero.
import errno
import sys

import nbd

uri, flat_path = sys.argv[1], sys.argv[2]
want = bytearray(open(flat_path, "rb").read())
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == len(want), (size, len(want))
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_df() and h.can_cache() and h.can_fast_zero() and h.can_trim()

STEP = 1 << 20


def structured_read(off, n, flags=0):
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(n, off, chunk, flags)
    return bytes(buf), sorted(chunks)


# Structured reads: chunks tile the request exactly, holes read as zeros, data matches.
holes = 0
for off in range(0, size, STEP):
    n = min(STEP, size - off)
    got, chunks = structured_read(off, n)
    assert got == bytes(want[off:off + n]), f"data differs at {off}"
    pos = off
    for c_off, c_len, status in chunks:
        assert c_off == pos, (off, chunks)
        assert status in (nbd.READ_DATA, nbd.READ_HOLE), status
        if status == nbd.READ_HOLE:
            holes += 1
            assert not any(want[c_off:c_off + c_len]), f"hole at {c_off} is not zero"
        pos += c_len
    assert pos == off + n
assert holes > 0, "no OFFSET_HOLE chunk for nil mappings"

# DF: one data chunk for the whole (64 KiB) range, even across holes.
for off in range(0, size - 65536, 7 * 65536):
    got, chunks = structured_read(off, 65536, nbd.CMD_FLAG_DF)
    assert len(chunks) == 1 and chunks[0] == (off, 65536, nbd.READ_DATA), chunks
    assert got == bytes(want[off:off + 65536])

# Block status: extents tile the request, holes are zero; REQ_ONE gives one extent.
def extents(off, n, flags=0):
    out = []

    def cb(metacontext, offset, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        for i in range(0, len(entries), 2):
            out.append((entries[i], entries[i + 1]))
        return 0

    h.block_status(n, off, cb, flags)
    return out

pos = 0
while pos < size:
    ext = extents(pos, size - pos)
    assert ext, pos
    for length, flags in ext:
        if flags & nbd.STATE_HOLE:
            assert flags & nbd.STATE_ZERO
            assert not any(want[pos:pos + length]), f"hole extent at {pos} is not zero"
        pos += length
assert pos == size
one = extents(0, size, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1, one

# CACHE succeeds in range.
h.cache(size, 0)

# Writes, FAST_ZERO write-zeroes, trim, FUA, flush: read back through the overlay.
h.pwrite(b"\x5a" * 5000, 12345)
want[12345:12345 + 5000] = b"\x5a" * 5000
h.zero(3 * 65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
want[65536:4 * 65536] = bytes(3 * 65536)
h.pwrite(b"\x01" * 4096, 8 * 65536, nbd.CMD_FLAG_FUA)
want[8 * 65536:8 * 65536 + 4096] = b"\x01" * 4096
h.trim(10 * 4096, 20 * 4096)
want[20 * 4096:30 * 4096] = bytes(10 * 4096)
h.flush()
assert bytes(h.pread(size, 0)) == bytes(want), "writes did not read back"
ext = extents(65536, 3 * 65536)
assert ext[0][0] >= 3 * 65536 and ext[0][1] & nbd.STATE_HOLE, ext

# Simple replies, every range read twice: the second read of a cached range is answered by the
# server's READ fast path (a cache hit inside one data mapping). A write over a cached range must
# be seen by the next read of it, on this connection and on the structured one.
s = nbd.NBD()
s.set_request_structured_replies(False)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
for _ in range(2):
    for off in range(0, size, 65536):
        n = min(65536, size - off)
        assert bytes(s.pread(n, off)) == bytes(want[off:off + n]), f"simple read differs at {off}"
off = (size // 2) & ~4095
assert bytes(s.pread(4096, off)) == bytes(want[off:off + 4096])
assert bytes(h.pread(4096, off)) == bytes(want[off:off + 4096])
s.pwrite(b"\xa5" * 4096, off)
want[off:off + 4096] = b"\xa5" * 4096
assert bytes(s.pread(4096, off)) == bytes(want[off:off + 4096]), "a write over a hit not seen"
assert bytes(h.pread(4096, off)) == bytes(want[off:off + 4096]), "a write over a hit not seen"
s.shutdown()

# With strict mode off, the server (not libnbd) rejects bad requests.
h.set_strict_mode(0)
for call in (lambda: h.pread(8192, size - 4096), lambda: h.cache(8192, size - 4096),
             lambda: h.block_status(8192, size - 4096, lambda *a: 0)):
    try:
        call()
        raise AssertionError("out-of-range request succeeded")
    except nbd.Error as e:
        assert e.errno in (errno.EINVAL, "EINVAL"), e
try:
    h.pwrite(b"x" * 10, size - 5)
    raise AssertionError("write past the end succeeded")
except nbd.Error as e:
    assert e.errno in (errno.ENOSPC, "ENOSPC"), e
# Still in sync.
assert bytes(h.pread(100, 12345)) == bytes(want[12345:12445])
h.shutdown()
print("OK")
