#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test pattern bytes wrap on purpose"
)]
//! Progressive frame decoding (`StreamDecoder`) agrees with the one-shot decoder and refuses
//! the same bad frames.

use thaw_codec::{CompressionType, ErrorKind, FrameEncoder, StreamDecoder};

fn data(len: usize) -> Vec<u8> {
    // ~3x compressible: runs of repeated bytes mixed with a counter.
    (0..len)
        .map(|i| {
            if (i / 64) % 3 == 0 {
                (i % 251) as u8
            } else {
                (i / 4096) as u8
            }
        })
        .collect()
}

fn encode(c: CompressionType, src: &[u8]) -> Vec<u8> {
    let mut enc = FrameEncoder::new(c, if c == CompressionType::Zstd { 2 } else { 0 }).unwrap();
    let mut out = Vec::new();
    enc.encode(src, &mut out).unwrap();
    out
}

fn stream(c: CompressionType, frame: &[u8], dst: &mut [u8], step: usize) -> thaw_codec::Result<()> {
    let mut dec = StreamDecoder::new();
    dec.begin(c);
    for piece in frame.chunks(step.max(1)) {
        dec.feed(piece, dst)?;
    }
    dec.finish(dst)
}

const CODECS: [CompressionType; 3] = [
    CompressionType::Zstd,
    CompressionType::Lz4,
    CompressionType::None,
];

#[test]
fn streamed_equals_source_at_every_step_size() {
    let src = data(2 << 20);
    for c in CODECS {
        let frame = encode(c, &src);
        for step in [1usize, 7, 4096, 65_536, 1 << 20, frame.len()] {
            if step == 1 && frame.len() > 200_000 {
                continue;
            }
            let mut dst = vec![0u8; src.len()];
            stream(c, &frame, &mut dst, step).unwrap_or_else(|e| panic!("{c:?} step {step}: {e}"));
            assert!(dst == src, "{c:?} step {step}");
        }
    }
    // Byte-at-a-time on a small zstd frame exercises the header hold-back.
    let small = data(100_000);
    let frame = encode(CompressionType::Zstd, &small);
    let mut dst = vec![0u8; small.len()];
    stream(CompressionType::Zstd, &frame, &mut dst, 1).unwrap();
    assert_eq!(dst, small);
}

#[test]
fn truncated_frames_fail_at_finish() {
    let src = data(1 << 20);
    for c in CODECS {
        let frame = encode(c, &src);
        for cut in [0usize, 3, 17, frame.len() / 2, frame.len() - 1] {
            let mut dst = vec![0u8; src.len()];
            let err = stream(c, &frame[..cut], &mut dst, 65_536).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::Truncated | ErrorKind::SizeMismatch | ErrorKind::Corrupt
                ),
                "{c:?} cut {cut}: {err}"
            );
        }
    }
}

#[test]
fn corrupt_frames_are_refused() {
    let src = data(1 << 20);
    for c in [CompressionType::Zstd, CompressionType::Lz4] {
        let frame = encode(c, &src);
        for at in [frame.len() / 3, frame.len() / 2, frame.len() - 2] {
            let mut bad = frame.clone();
            bad[at] ^= 0x5a;
            let mut dst = vec![0u8; src.len()];
            assert!(
                stream(c, &bad, &mut dst, 65_536).is_err(),
                "{c:?} flip at {at}"
            );
        }
    }
}

#[test]
fn wrong_sizes_and_trailing_bytes_are_refused() {
    let src = data(1 << 20);
    for c in CODECS {
        let frame = encode(c, &src);
        let mut short = vec![0u8; src.len() - 4096];
        assert!(
            stream(c, &frame, &mut short, 65_536).is_err(),
            "{c:?} short dst"
        );
        let mut long = vec![0u8; src.len() + 4096];
        assert!(
            stream(c, &frame, &mut long, 65_536).is_err(),
            "{c:?} long dst"
        );
        if c != CompressionType::None {
            let mut trailing = frame.clone();
            trailing.extend_from_slice(&frame[..64]);
            let mut dst = vec![0u8; src.len()];
            assert!(
                stream(c, &trailing, &mut dst, 65_536).is_err(),
                "{c:?} trailing"
            );
        }
    }
}

#[test]
fn a_decoder_is_reusable_after_a_failure() {
    let src = data(1 << 20);
    let frame = encode(CompressionType::Zstd, &src);
    let mut dec = StreamDecoder::new();
    let mut dst = vec![0u8; src.len()];
    dec.begin(CompressionType::Zstd);
    dec.feed(&frame[..frame.len() / 2], &mut dst).unwrap();
    dec.begin(CompressionType::Zstd);
    for piece in frame.chunks(10_000) {
        dec.feed(piece, &mut dst).unwrap();
    }
    dec.finish(&mut dst).unwrap();
    assert_eq!(dst, src);
}
