//! Frame decoding on arbitrary input never panics, and encoding the input then decoding it is the
//! identity.
//!
//! Input layout: byte 0 picks the codec (and zstd level), bytes 1..3 pick the destination size
//! (little-endian u16, so at most 64 KiB), the rest is the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_codec::{CompressionType, FrameDecoder, FrameEncoder};

fuzz_target!(|data: &[u8]| {
    let [sel, lo, hi, frame @ ..] = data else {
        return;
    };
    let compression = match sel % 3 {
        0 => CompressionType::None,
        1 => CompressionType::Zstd,
        _ => CompressionType::Lz4,
    };
    let level = i32::from(sel / 3 % 3) + 1;
    let dst_len = usize::from(u16::from_le_bytes([*lo, *hi]));

    // Arbitrary frame: any result, no panic. On success with None the bytes are copied as is.
    let mut dec = FrameDecoder::new();
    let mut dst = vec![0u8; dst_len];
    if dec.decode(compression, frame, &mut dst).is_ok() && compression == CompressionType::None {
        assert_eq!(&dst[..], frame);
    }

    // Round trip of the same bytes, reusing the decoder after whatever happened above.
    let mut enc = FrameEncoder::new(compression, level).expect("valid level");
    let mut encoded = Vec::new();
    let n = enc.encode(frame, &mut encoded).expect("encode");
    assert_eq!(n, encoded.len());
    let mut out = vec![0u8; frame.len()];
    dec.decode(compression, &encoded, &mut out).expect("decode of our own frame");
    assert_eq!(&out[..], frame, "round trip differs");

    // The same frame into a buffer one byte longer must be rejected.
    let mut longer = vec![0u8; frame.len() + 1];
    assert!(dec.decode(compression, &encoded, &mut longer).is_err());
});
