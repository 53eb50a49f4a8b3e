//! A bounds-checked little-endian reader and the varint codecs (Go `encoding/binary`
//! compatible) used by the header bodies.

use crate::{BuildId, CodecError, Result};

/// Longest varint accepted (a full `u64` needs 10 bytes).
pub(crate) const MAX_VARINT_LEN: usize = 10;

/// Reads fields from a byte slice; every read checks the bytes left first.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`; errors name structure `what`.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    /// Switches the structure name used in errors.
    pub(crate) fn set_what(&mut self, what: &'static str) {
        self.what = what;
    }

    /// The structure name used in errors.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The unread bytes.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Skips `n` bytes (already checked by the caller through [`Cursor::rest`]).
    pub(crate) fn advance(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(CodecError::truncated(
                self.what,
                n as u64,
                self.remaining() as u64,
            )),
        }
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    pub(crate) fn i64(&mut self) -> Result<i64> {
        self.array().map(i64::from_le_bytes)
    }

    pub(crate) fn uuid(&mut self) -> Result<BuildId> {
        self.array().map(BuildId::from_bytes)
    }

    /// Go `binary.ReadUvarint`: at most 10 bytes; a value past `u64::MAX` is corrupt.
    pub(crate) fn uvarint(&mut self) -> Result<u64> {
        let mut x: u64 = 0;
        let mut shift = 0u32;
        for i in 0..MAX_VARINT_LEN {
            let b = self.u8()?;
            if b < 0x80 {
                if i == MAX_VARINT_LEN - 1 && b > 1 {
                    return Err(self.overflow());
                }
                return Ok(x | (u64::from(b) << shift));
            }
            x |= u64::from(b & 0x7f) << shift;
            shift += 7;
        }
        Err(self.overflow())
    }

    /// Go `binary.ReadVarint` (zigzag).
    pub(crate) fn varint(&mut self) -> Result<i64> {
        let ux = self.uvarint()?;
        let x = (ux >> 1).cast_signed();
        Ok(if ux & 1 != 0 { !x } else { x })
    }

    fn overflow(&self) -> CodecError {
        CodecError::corrupt(self.what, "varint overflows 64 bits")
    }
}

/// Appends Go `binary.PutUvarint(v)`.
pub(crate) fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v.to_le_bytes()[0] & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

/// Appends Go `binary.PutVarint(v)` (zigzag).
pub(crate) fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut ux = v.cast_unsigned() << 1;
    if v < 0 {
        ux = !ux;
    }
    put_uvarint(out, ux);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn uvarint_matches_go_encoding() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(v, bytes) in cases {
            let mut out = Vec::new();
            put_uvarint(&mut out, v);
            assert_eq!(out, bytes, "encode {v}");
            let mut c = Cursor::new(bytes, "t");
            assert_eq!(c.uvarint().unwrap(), v, "decode {v}");
            assert_eq!(c.remaining(), 0);
        }
    }

    #[test]
    fn varint_zigzag_matches_go_encoding() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (-2, &[0x03]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (
                i64::MIN,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(v, bytes) in cases {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes, "encode {v}");
            assert_eq!(Cursor::new(bytes, "t").varint().unwrap(), v, "decode {v}");
        }
    }

    #[test]
    fn uvarint_overflow_and_truncation() {
        // 10th byte > 1 overflows.
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(
            Cursor::new(&over, "t").uvarint().unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        // 11 continuation bytes.
        let long = [0x80u8; 11];
        assert_eq!(
            Cursor::new(&long, "t").uvarint().unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            Cursor::new(&[0x80, 0x80], "t")
                .uvarint()
                .unwrap_err()
                .kind(),
            ErrorKind::Truncated
        );
    }
}
