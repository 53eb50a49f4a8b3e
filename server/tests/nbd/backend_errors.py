# Catalogue T12/T14 through libnbd (python3-libnbd), run by server/tests/nbd_catalogue.rs:
#   /usr/bin/python3 backend_errors.py URI FLAT_IMAGE BAD
# URI names an export whose data from byte BAD to the end fails in the backend (a damaged
# frame); everything before BAD equals FLAT_IMAGE. With simple and with structured replies,
# reads touching the damaged range fail with EIO (libnbd accepts the reply: it is well formed)
# and the connection stays usable: reads before BAD return the image's bytes. Prints "OK".
import errno
import sys

import nbd

uri, flat_path, bad = sys.argv[1], sys.argv[2], int(sys.argv[3])
want = open(flat_path, "rb").read()

for structured in (False, True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    for off, n in ((bad, 4096), (bad - 65536, 131072), (len(want) - 512, 512)):
        try:
            h.pread(n, off)
        except nbd.Error as e:
            assert e.errnum == errno.EIO, (structured, off, n, e)
        else:
            raise AssertionError(f"read at {off}+{n} over the damaged frame succeeded")
        got = h.pread(65536, 4096)
        assert got == want[4096:4096 + 65536], (structured, "good read after a failure")
    if structured:
        # The chunk callback sees only well-formed chunks, and the error surfaces as EIO.
        seen = []

        def chunk(subbuf, offset, status, err):
            seen.append((offset, len(subbuf), status, err))
            return 0

        try:
            h.pread_structured(1 << 20, bad - 65536, chunk)
        except nbd.Error as e:
            assert e.errnum == errno.EIO, e
        else:
            raise AssertionError("structured read over the damaged frame succeeded")
        for offset, length, status, err in seen:
            assert bad - 65536 <= offset and offset + length <= bad - 65536 + (1 << 20), seen
    h.shutdown()
print("OK")
