# Catalogue T3/T6/T7/T11 through libnbd with strict mode off (python3-libnbd), run by
# server/tests/nbd_catalogue.rs:
#   /usr/bin/python3 strict_off.py URI FLAT_IMAGE
# URI names a writable export equal to FLAT_IMAGE. libnbd's own checks are off, so the server,
# not the client, refuses: each bad request fails with the errno the spec asks for, and a good
# read right after it returns the image's bytes (the connection stays usable). Prints "OK".
import errno
import sys

import nbd

uri, flat_path = sys.argv[1], sys.argv[2]
want = open(flat_path, "rb").read()

for structured in (False, True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    # No meta context: BLOCK_STATUS must be refused by the server (T11).
    h.connect_uri(uri)
    h.set_strict_mode(0)
    assert h.get_strict_mode() == 0

    def refused(what, expect, fn):
        try:
            fn()
        except nbd.Error as e:
            assert e.errnum == expect, (structured, what, e)
        else:
            raise AssertionError(f"{what} succeeded (structured={structured})")
        got = h.pread(4096, 8192)
        assert got == want[8192:12288], (structured, what, "good read after")

    refused("unknown flag on a read", errno.EINVAL, lambda: h.pread(4096, 0, 1 << 9))
    refused("REQ_ONE on a read", errno.EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE))
    refused("DF on a write", errno.EINVAL, lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF))
    refused("read over the maximum", errno.EINVAL, lambda: h.pread((32 << 20) + 4096, 0))
    refused("read past the end", errno.EINVAL, lambda: h.pread(8192, len(want) - 4096))
    refused("block status without a context", errno.EINVAL,
            lambda: h.block_status(4096, 0, lambda *a: 0))
    if not structured:
        refused("DF without structured replies", errno.EINVAL,
                lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF))
    # T6: a zero-length read is a success with no data.
    assert h.pread(0, 4096) == b"", structured
    # Nothing refused changed the export.
    assert h.pread(65536, 0) == want[:65536], structured
    h.shutdown()
print("OK")
