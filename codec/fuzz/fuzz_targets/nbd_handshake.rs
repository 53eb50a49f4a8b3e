//! The NBD server handshake on arbitrary client bytes never panics and keeps its `feed`
//! contract; every reply it produces during option haggling is a well-formed option reply; once
//! it reaches transmission, the remaining bytes are parsed as requests, validated against the
//! negotiated parameters and their payloads skipped as a server would.
//!
//! Input layout: byte 0 bits 0-5 pick the piece size the stream is fed in (1..=64 bytes, 0 =
//! all at once); bit 6 prepends valid client flags (FIXED_NEWSTYLE | NO_ZEROES) so the fuzzer
//! starts in option haggling; bit 7 puts the server in shutdown mode after the first piece.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_codec::nbd::consts::{REPLY_MAGIC, REQUEST_LEN};
use thaw_codec::nbd::{
    BlockSize, ExportConfig, ExportFeatures, HandshakeConfig, Invalid, Progress, Request,
    ServerHandshake,
};

fn config() -> HandshakeConfig {
    let mut disk = ExportConfig::new("rootfs", 64 << 20);
    disk.description = "root".into();
    disk.block_size = BlockSize {
        min: 4096,
        preferred: 4096,
        max: 1 << 20,
    };
    disk.features = ExportFeatures {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        multi_conn: true,
        rotational: false,
        df: true,
        base_allocation: true,
    };
    let mut mem = ExportConfig::new("memfile", 2 << 20);
    mem.read_only = true;
    HandshakeConfig::new(vec![disk, mem])
}

/// Checks that `out` is a sequence of complete option replies.
fn check_replies(mut out: &[u8]) {
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply header");
        assert_eq!(out[..8], REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(
            out.len() >= 20 + len,
            "option reply data shorter than its length"
        );
        out = &out[20 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let piece = match usize::from(mode & 0x3f) {
        0 => usize::MAX,
        n => n,
    };
    let mut stream = Vec::with_capacity(rest.len() + 4);
    if mode & 0x40 != 0 {
        stream.extend_from_slice(&3u32.to_be_bytes());
    }
    stream.extend_from_slice(rest);

    let mut h = ServerHandshake::new(config()).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut negotiated = None;
    let mut first = true;
    while pos < stream.len() {
        let end = pos.saturating_add(piece).min(stream.len());
        out.clear();
        let step = h.feed(&stream[pos..end], &mut out);
        assert!(step.consumed <= end - pos);
        if first && mode & 0x80 != 0 {
            h.shutdown();
        }
        first = false;
        match step.progress {
            Progress::Continue => {
                assert_eq!(step.consumed, end - pos);
                assert!(h.wants() > 0);
                check_replies(&out);
                pos = end;
            }
            Progress::Go(n) => {
                pos += step.consumed;
                negotiated = Some(n);
                break;
            }
            Progress::Abort | Progress::Reject(_) => {
                assert!(h.is_finished());
                assert_eq!(h.feed(&stream[pos..], &mut out).consumed, 0);
                return;
            }
        }
    }
    let Some(n) = negotiated else {
        return;
    };
    // Transmission: parse, validate, skip write payloads.
    while let Some(header) = stream.get(pos..pos + REQUEST_LEN) {
        pos += REQUEST_LEN;
        let Ok(req) = Request::parse_slice(header) else {
            return; // bad magic: hard close
        };
        let _ = req.to_bytes();
        let skip = match req.validate(&n) {
            Ok(()) => req.payload_len(),
            Err(Invalid::Reply { drain, .. }) => {
                assert_eq!(drain, req.payload_len());
                drain
            }
            Err(Invalid::Disconnect { .. }) => return,
        };
        pos = pos.saturating_add(skip as usize);
    }
});
