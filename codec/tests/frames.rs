//! Frame codec tests: round trips (C7), truncation (C2), zip bombs (C3), size mismatches (C4),
//! garbage and zero-length frames (C5), payload bit flips (C1), and interoperability with the
//! reference `zstd` and `lz4` command-line tools in both directions.

// This whole crate is test code; the lint is meant for tests inside library modules.
#![allow(clippy::tests_outside_test_module)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use thaw_codec::frame_table::MAX_FRAME_SIZE;
use thaw_codec::{CompressionType, ErrorKind, FrameDecoder, FrameEncoder};

const MIB: usize = 1024 * 1024;

/// Deterministic test data of `len` bytes, roughly 3x compressible: a seeded mix of random runs,
/// zero runs and repeated short patterns.
fn gen_data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let r = next();
        let run = usize::try_from(r % 8192).unwrap_or(0) + 1;
        let run = run.min(len - out.len());
        match r >> 61 {
            0 | 1 => {
                for _ in 0..run {
                    out.push(next().to_le_bytes()[0]);
                }
            }
            2 | 3 => out.resize(out.len() + run, 0),
            _ => {
                let pat = next().to_le_bytes();
                let plen = usize::try_from(r % 7).unwrap_or(0) + 2;
                for i in 0..run {
                    out.push(pat[i % plen]);
                }
            }
        }
    }
    out
}

fn encode(c: CompressionType, level: i32, data: &[u8]) -> Vec<u8> {
    let mut enc = FrameEncoder::new(c, level).unwrap();
    let mut out = Vec::new();
    let n = enc.encode(data, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

fn decode(c: CompressionType, frame: &[u8], len: usize) -> thaw_codec::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    FrameDecoder::new().decode(c, frame, &mut out)?;
    Ok(out)
}

fn kind(c: CompressionType, frame: &[u8], len: usize) -> ErrorKind {
    match decode(c, frame, len) {
        Ok(_) => panic!(
            "{c:?}: decode of a bad frame ({} bytes into {len}) succeeded",
            frame.len()
        ),
        Err(e) => e.kind(),
    }
}

const CODECS: [(CompressionType, i32); 3] = [
    (CompressionType::Zstd, 1),
    (CompressionType::Lz4, 0),
    (CompressionType::None, 0),
];

fn sizes() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1usize),
        Just(2 * MIB),
        Just(2 * MIB - 1),
        Just(2 * MIB + 1),
        Just(4096usize),
        0usize..=70_000,
        0usize..=(2 * MIB + 4096),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// C7: encode then decode is the identity for every codec and zstd levels 1..=3, with one
    /// encoder and one decoder reused across frames of different sizes.
    #[test]
    fn round_trip(seed in any::<u64>(), len in sizes(), len2 in 0usize..=100_000) {
        let data = gen_data(seed, len);
        let data2 = gen_data(seed.wrapping_add(1), len2);
        let mut dec = FrameDecoder::new();
        for (c, level) in [
            (CompressionType::Zstd, 1),
            (CompressionType::Zstd, 2),
            (CompressionType::Zstd, 3),
            (CompressionType::Lz4, 0),
            (CompressionType::None, 0),
        ] {
            let mut enc = FrameEncoder::new(c, level).unwrap();
            for d in [&data, &data2, &data] {
                let mut frame = vec![7u8; 3];
                let n = enc.encode(d, &mut frame).unwrap();
                prop_assert_eq!(n, frame.len() - 3);
                let mut out = vec![0xEEu8; d.len()];
                dec.decode(c, &frame[3..], &mut out).unwrap();
                prop_assert!(out == *d, "{:?} level {} len {} differs", c, level, d.len());
            }
        }
    }

    /// C5: arbitrary bytes never panic and never decode into a non-empty buffer by accident.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), len in 0usize..2048) {
        let mut dec = FrameDecoder::new();
        for c in [CompressionType::Zstd, CompressionType::Lz4] {
            let mut out = vec![0u8; len];
            let _ = dec.decode(c, &bytes, &mut out);
        }
    }

    /// Arbitrary bytes behind a valid magic number never panic either.
    #[test]
    fn garbage_after_magic_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), len in 0usize..2048) {
        let mut dec = FrameDecoder::new();
        for (c, magic) in [(CompressionType::Zstd, 0xFD2F_B528u32), (CompressionType::Lz4, 0x184D_2204)] {
            let mut frame = magic.to_le_bytes().to_vec();
            frame.extend_from_slice(&bytes);
            let mut out = vec![0u8; len];
            let _ = dec.decode(c, &frame, &mut out);
        }
    }
}

#[test]
fn round_trip_edge_sizes_all_levels() {
    let mut dec = FrameDecoder::new();
    for len in [0, 1, 2, 511, 4096, 65_537, 2 * MIB, 2 * MIB + 3] {
        let data = gen_data(len as u64, len);
        for level in 1..=4 {
            let frame = encode(CompressionType::Zstd, level, &data);
            let mut out = vec![0u8; len];
            dec.decode(CompressionType::Zstd, &frame, &mut out).unwrap();
            assert_eq!(out, data, "zstd level {level} len {len}");
        }
        let frame = encode(CompressionType::Lz4, 0, &data);
        let mut out = vec![0u8; len];
        dec.decode(CompressionType::Lz4, &frame, &mut out).unwrap();
        assert_eq!(out, data, "lz4 len {len}");
    }
}

#[test]
fn compresses_compressible_data() {
    let data = gen_data(1, 2 * MIB);
    let z = encode(CompressionType::Zstd, 1, &data);
    let l = encode(CompressionType::Lz4, 0, &data);
    assert!(
        z.len() < data.len() / 2,
        "zstd {} of {}",
        z.len(),
        data.len()
    );
    assert!(
        l.len() < data.len() / 2,
        "lz4 {} of {}",
        l.len(),
        data.len()
    );
    // Incompressible data still round-trips (LZ4 stores the block uncompressed).
    let mut noise = Vec::with_capacity(MIB);
    let mut x = 1u32;
    for _ in 0..MIB {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x.to_le_bytes()[1]);
    }
    for (c, level) in CODECS {
        let frame = encode(c, level, &noise);
        assert_eq!(decode(c, &frame, noise.len()).unwrap(), noise);
    }
}

/// C2: a frame cut at every byte offset is `Truncated`, never a panic or success.
#[test]
fn truncated_at_every_offset_small_frame() {
    let data = gen_data(2, 20_000);
    for (c, level) in [
        (CompressionType::Zstd, 1),
        (CompressionType::Zstd, 3),
        (CompressionType::Lz4, 0),
    ] {
        let frame = encode(c, level, &data);
        let mut dec = FrameDecoder::new();
        let mut out = vec![0u8; data.len()];
        for cut in 0..frame.len() {
            let err = dec.decode(c, &frame[..cut], &mut out).unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::Truncated,
                "{c:?} cut at {cut}/{}: {err}",
                frame.len()
            );
        }
        dec.decode(c, &frame, &mut out).unwrap();
        assert_eq!(out, data);
    }
}

/// C2 on a full 2 MiB frame, at sampled offsets (including the last few bytes: the checksum
/// and end mark).
#[test]
fn truncated_big_frame_sampled() {
    let data = gen_data(3, 2 * MIB);
    for (c, level) in [(CompressionType::Zstd, 1), (CompressionType::Lz4, 0)] {
        let frame = encode(c, level, &data);
        let mut dec = FrameDecoder::new();
        let mut out = vec![0u8; data.len()];
        let n = frame.len();
        let mut cuts: Vec<usize> = (0..20).chain(n - 20..n).collect();
        cuts.extend((1..64).map(|i| n * i / 64));
        for cut in cuts {
            let err = dec.decode(c, &frame[..cut], &mut out).unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::Truncated,
                "{c:?} cut at {cut}/{n}: {err}"
            );
        }
    }
}

/// A zstd frame header, single segment, with an 8-byte content size and checksum flag, followed
/// by bytes that are not a valid block.
fn zstd_header_with_size(size: u64) -> Vec<u8> {
    let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
    f.push(0xE4); // FCS 8 bytes, single segment, checksum
    f.extend_from_slice(&size.to_le_bytes());
    f.extend_from_slice(&[0xFF; 16]);
    f
}

/// An LZ4 frame header (valid header checksum) declaring `size`, followed by junk.
fn lz4_header_with_size(size: u64) -> Vec<u8> {
    let mut desc = vec![0x60 | 0x10 | 0x08, 0x70]; // v01, independent, block crc, content size; 4 MB
    desc.extend_from_slice(&size.to_le_bytes());
    let hc = twox_hash::XxHash32::oneshot(0, &desc).to_le_bytes()[1];
    let mut f = 0x184D_2204u32.to_le_bytes().to_vec();
    f.extend_from_slice(&desc);
    f.push(hc);
    f.extend_from_slice(&[0xFF; 16]);
    f
}

/// C3: headers declaring more than MAX_FRAME_SIZE are rejected before decoding (the payload
/// behind them is junk: decoding it would fail with `Corrupt`, not `TooLarge`).
#[test]
fn zip_bomb_rejected_before_decoding() {
    let cap = u64::from(MAX_FRAME_SIZE);
    for size in [cap + 1, 1 << 40, u64::MAX - 1] {
        assert_eq!(
            kind(CompressionType::Zstd, &zstd_header_with_size(size), 2 * MIB),
            ErrorKind::TooLarge
        );
        assert_eq!(
            kind(CompressionType::Lz4, &lz4_header_with_size(size), 2 * MIB),
            ErrorKind::TooLarge
        );
    }
    // At the cap the header is acceptable, so the mismatch with dst is what is reported.
    assert_eq!(
        kind(CompressionType::Zstd, &zstd_header_with_size(cap), 2 * MIB),
        ErrorKind::SizeMismatch
    );
    // A declared size equal to dst passes the header checks and then fails on the junk.
    assert_eq!(
        kind(CompressionType::Zstd, &zstd_header_with_size(4096), 4096),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(CompressionType::Lz4, &lz4_header_with_size(4096), 4096),
        ErrorKind::Corrupt
    );

    // A zstd frame without a content size but with a 128 MiB window.
    let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
    f.push(0x04); // no FCS, not single segment, checksum
    f.push((27 - 10) << 3); // window log 27
    f.extend_from_slice(&[0xFF; 16]);
    assert_eq!(
        kind(CompressionType::Zstd, &f, 2 * MIB),
        ErrorKind::TooLarge
    );

    // A real frame of 65 MiB of zeros (a few KiB compressed).
    let len = usize::try_from(cap).unwrap() + MIB;
    let zeros = vec![0u8; len];
    let mut frame = vec![0u8; zstd_safe::compress_bound(len)];
    let n = zstd_safe::compress(&mut frame[..], &zeros, 1).unwrap();
    frame.truncate(n);
    assert!(frame.len() < 64 * 1024);
    assert_eq!(
        kind(CompressionType::Zstd, &frame, 2 * MIB),
        ErrorKind::TooLarge
    );
    // dst itself above the cap.
    let err = FrameDecoder::new()
        .decode(CompressionType::Zstd, &frame, &mut vec![0u8; len])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    // Our encoder refuses to write frames no decoder would accept.
    let err = FrameEncoder::new(CompressionType::Lz4, 0)
        .unwrap()
        .encode(&zeros, &mut Vec::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
}

/// C4: a frame decoded into a buffer one byte shorter or longer is `SizeMismatch`.
#[test]
fn size_mismatch_both_directions() {
    let data = gen_data(4, 300_000);
    for (c, level) in CODECS {
        let frame = encode(c, level, &data);
        for len in [0, 1, data.len() - 1, data.len() + 1, 2 * data.len()] {
            assert_eq!(
                kind(c, &frame, len),
                ErrorKind::SizeMismatch,
                "{c:?} into {len}"
            );
        }
        assert_eq!(decode(c, &frame, data.len()).unwrap(), data);
    }
    // Zero-length frames decoded into a non-empty buffer, and vice versa.
    for (c, level) in CODECS {
        let empty = encode(c, level, &[]);
        assert_eq!(kind(c, &empty, 10), ErrorKind::SizeMismatch, "{c:?}");
        assert_eq!(decode(c, &empty, 0).unwrap(), Vec::<u8>::new());
    }
}

/// C5: zero-length frames are defined (encode gives a valid empty frame, which decodes into an
/// empty buffer); zero-length *input* is `Truncated` for compressed codecs.
#[test]
fn zero_length_frames() {
    let z = encode(CompressionType::Zstd, 1, &[]);
    let l = encode(CompressionType::Lz4, 0, &[]);
    let n = encode(CompressionType::None, 0, &[]);
    assert_eq!(
        z.len(),
        13,
        "magic, descriptor, FCS, empty raw block, checksum"
    );
    assert_eq!(l.len(), 11, "magic, FLG, BD, HC, end mark");
    assert!(n.is_empty());
    for (c, f) in [
        (CompressionType::Zstd, &z),
        (CompressionType::Lz4, &l),
        (CompressionType::None, &n),
    ] {
        FrameDecoder::new().decode(c, f, &mut []).unwrap();
    }
    assert_eq!(kind(CompressionType::Zstd, &[], 0), ErrorKind::Truncated);
    assert_eq!(kind(CompressionType::Lz4, &[], 0), ErrorKind::Truncated);
    assert_eq!(
        kind(CompressionType::None, &[1], 0),
        ErrorKind::SizeMismatch
    );
}

/// C5: garbage, wrong codec, foreign frame kinds.
#[test]
fn garbage_and_wrong_codec() {
    let data = gen_data(5, 10_000);
    let z = encode(CompressionType::Zstd, 1, &data);
    let l = encode(CompressionType::Lz4, 0, &data);
    assert_eq!(
        kind(CompressionType::Lz4, &z, data.len()),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(CompressionType::Zstd, &l, data.len()),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(CompressionType::Zstd, b"definitely not a frame", 10),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(CompressionType::Lz4, b"definitely not a frame", 10),
        ErrorKind::Corrupt
    );
    // Skippable frames and the legacy LZ4 format are valid elsewhere, unsupported here.
    let mut skippable = 0x184D_2A50u32.to_le_bytes().to_vec();
    skippable.extend_from_slice(&4u32.to_le_bytes());
    skippable.extend_from_slice(&[0; 4]);
    assert_eq!(
        kind(CompressionType::Zstd, &skippable, 0),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind(CompressionType::Lz4, &skippable, 0),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind(CompressionType::Lz4, &0x184C_2102u32.to_le_bytes(), 0),
        ErrorKind::Unsupported
    );
}

/// Trailing bytes after a frame, including a second concatenated frame, are `Corrupt`.
#[test]
fn trailing_bytes_rejected() {
    let data = gen_data(6, 50_000);
    for (c, level) in [(CompressionType::Zstd, 1), (CompressionType::Lz4, 0)] {
        let frame = encode(c, level, &data);
        let mut one_more = frame.clone();
        one_more.push(0);
        assert_eq!(kind(c, &one_more, data.len()), ErrorKind::Corrupt, "{c:?}");
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert_eq!(
            kind(c, &two, data.len()),
            ErrorKind::Corrupt,
            "{c:?} two frames"
        );
        assert_eq!(
            kind(c, &two, 2 * data.len()),
            ErrorKind::SizeMismatch,
            "{c:?} two frames, 2x dst"
        );
    }
}

/// C1: flipping any one byte of a frame is detected (checksums, header checks, sizes); flipping
/// one byte in the middle of the payload is a checksum failure (`Corrupt`).
#[test]
fn bit_flips_detected() {
    let data = gen_data(7, 6000);
    for (c, level) in [
        (CompressionType::Zstd, 1),
        (CompressionType::Zstd, 3),
        (CompressionType::Lz4, 0),
    ] {
        let frame = encode(c, level, &data);
        let mut dec = FrameDecoder::new();
        let mut out = vec![0u8; data.len()];
        for i in 0..frame.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = frame.clone();
                bad[i] ^= mask;
                assert!(
                    dec.decode(c, &bad, &mut out).is_err(),
                    "{c:?}: flip {mask:#x} at {i}/{} went undetected",
                    frame.len()
                );
            }
        }
        let mut bad = frame.clone();
        let mid = frame.len() / 2;
        bad[mid] ^= 0x10;
        assert_eq!(kind(c, &bad, data.len()), ErrorKind::Corrupt, "{c:?}");
        // The decoder stays usable after errors.
        dec.decode(c, &frame, &mut out).unwrap();
        assert_eq!(out, data);
    }
}

// ---- interoperability with the reference command-line tools ----

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("thaw-frames-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: `{tool}` not installed; interop test not run");
    }
    ok
}

/// Runs `tool args... <file>` writing to stdout and returns the bytes.
fn run_on_file(tool: &str, args: &[&str], file: &Scratch) -> Vec<u8> {
    let out = Command::new(tool).args(args).arg(&file.0).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `tool args...` with `input` on stdin and returns stdout.
fn run_piped(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn zstd_cli_frames_decode() {
    if !have("zstd") {
        return;
    }
    let mut dec = FrameDecoder::new();
    for len in [0, 1000, 2 * MIB, 2 * MIB + 12_345] {
        let data = gen_data(8 + len as u64, len);
        let file = Scratch::new("zstd-in", &data);
        for args in [
            &["-q", "-c", "-1"][..],
            &["-q", "-c", "-3"],
            &["-q", "-c", "-19"],
            &["-q", "-c", "-1", "--no-check"],
            &["-q", "-c", "-3", "--no-content-size"],
            &["-q", "-c", "--fast=3"],
        ] {
            let frame = run_on_file("zstd", args, &file);
            let mut out = vec![0u8; len];
            dec.decode(CompressionType::Zstd, &frame, &mut out)
                .unwrap_or_else(|e| panic!("zstd {args:?} len {len}: {e}"));
            assert_eq!(out, data, "zstd {args:?} len {len}");
            if len > 0 {
                assert_eq!(
                    kind(CompressionType::Zstd, &frame, len - 1),
                    ErrorKind::SizeMismatch,
                    "{args:?}"
                );
                assert_eq!(
                    kind(CompressionType::Zstd, &frame, len + 1),
                    ErrorKind::SizeMismatch,
                    "{args:?}"
                );
            }
        }
        // Streamed from stdin: no content size in the header.
        let frame = run_piped("zstd", &["-q", "-c", "-1"], &data);
        let mut out = vec![0u8; len];
        dec.decode(CompressionType::Zstd, &frame, &mut out).unwrap();
        assert_eq!(out, data);
    }
}

#[test]
fn lz4_cli_frames_decode() {
    if !have("lz4") {
        return;
    }
    let mut dec = FrameDecoder::new();
    for len in [0, 1000, 2 * MIB, 2 * MIB + 12_345] {
        let data = gen_data(9 + len as u64, len);
        let file = Scratch::new("lz4-in", &data);
        for args in [
            // e2b's shape: 4 MB blocks, block checksums, no content checksum.
            &["-q", "-c", "-1", "-B7", "-BX", "--no-frame-crc"][..],
            // CLI defaults: 4 MB independent blocks, content checksum.
            &["-q", "-c", "-1"],
            // Small linked blocks, with content size and both checksums.
            &["-q", "-c", "-1", "-B4", "-BD", "-BX", "--content-size"],
            &["-q", "-c", "-9", "-B5", "-BD"],
            &["-q", "-c", "-12", "-B6"],
        ] {
            let frame = run_on_file("lz4", args, &file);
            let mut out = vec![0u8; len];
            dec.decode(CompressionType::Lz4, &frame, &mut out)
                .unwrap_or_else(|e| panic!("lz4 {args:?} len {len}: {e}"));
            assert_eq!(out, data, "lz4 {args:?} len {len}");
            if len > 0 {
                assert_eq!(
                    kind(CompressionType::Lz4, &frame, len - 1),
                    ErrorKind::SizeMismatch,
                    "{args:?}"
                );
                assert_eq!(
                    kind(CompressionType::Lz4, &frame, len + 1),
                    ErrorKind::SizeMismatch,
                    "{args:?}"
                );
            }
        }
    }
}

#[test]
fn cli_tools_decode_our_frames() {
    let data = gen_data(10, 2 * MIB + 777);
    if have("zstd") {
        for level in 1..=3 {
            let frame = encode(CompressionType::Zstd, level, &data);
            assert_eq!(
                run_piped("zstd", &["-q", "-d", "-c"], &frame),
                data,
                "level {level}"
            );
        }
    }
    if have("lz4") {
        let frame = encode(CompressionType::Lz4, 0, &data);
        assert_eq!(run_piped("lz4", &["-q", "-d", "-c"], &frame), data);
    }
}
