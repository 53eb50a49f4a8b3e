//! The reliability catalogue's NBD cases (`/work/shared/reference` B.5, tables H, T and D) run
//! end to end against the built `thaw serve`: a raw-socket client where libnbd cannot produce
//! the bytes, python3-libnbd / fio / qemu-img where it can. The codec's sans-io tests
//! (`codec/tests/nbd_*.rs`) cover the same cases on the state machine alone; these prove the
//! server's sockets, tasks and data paths honour them. `docs/nbd-server.md` ("Tested") maps
//! each case to its test.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test offsets and lengths are small (devices of a few MiB)"
)]

#[path = "common/nbd.rs"]
mod nbd_common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use nbd_common::{
    AnyReply, Chain, Chunk, NbdCmd, Raw, Serve, go_data, meta_query, request_bytes, run, tally,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::encode_option;

const SIZE: u64 = 8 * 1024 * 1024 + 3 * 4096;
const MIB: u64 = 1 << 20;

/// A 3-layer zstd chain (holes included), shared by the read-only cases.
fn std_chain() -> &'static Chain {
    static C: OnceLock<Chain> = OnceLock::new();
    C.get_or_init(|| Chain::generate(2, SIZE, 7, 0.05, 2 << 20))
}

fn serve(extra: &[&str]) -> Serve {
    let c = std_chain();
    Serve::start_with(&c.store_url(), &c.exports(), extra)
}

/// Where the corrupt frame of [`faulty_chain`] starts.
const BAD: u64 = 6 * MIB;

/// A base-only 8 MiB zstd build in 2 MiB frames whose last frame ([`BAD`]..8 MiB) is damaged in
/// the store (its content checksum flipped): every read touching it fails verification in the
/// engine (EIO), everything before it reads fine.
fn faulty_chain() -> Chain {
    let c = Chain::generate(0, 8 * MIB, 11, 0.0, 2 << 20);
    let object = c.data_object(0);
    let mut bytes = std::fs::read(&object).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();
    c
}

// ---- H: handshake ----

/// H4, H6, H8, H9, H11, H12 over a real server.
#[test]
fn handshake_option_errors_keep_the_session_or_close() {
    let mut s = serve(&["--read-only"]);
    let baseline = s.fd_count();

    // H4: more options than the cap (128): each answered, then the connection closes.
    let mut c = Raw::connect(&s.sock);
    let mut burst = Vec::new();
    for _ in 0..129 {
        encode_option(&mut burst, 42, &[]).unwrap();
    }
    c.s.write_all(&burst).unwrap();
    for _ in 0..128 {
        let (opt, ty, _) = c.reply();
        assert_eq!((opt, ty), (42, REP_ERR_UNSUP));
    }
    assert!(c.closed(), "H4: option 129 must close the connection");
    drop(c);

    let mut c = Raw::connect(&s.sock);
    // H6: GO whose name length runs past the option data.
    let mut bad = go_data("l1", &[]);
    bad[..4].copy_from_slice(&100u32.to_be_bytes());
    c.option(OPT_GO, &bad);
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H6: name length > optlen - 6");
    // A truncated info-request list (3 announced, 1 present).
    let mut bad = go_data("l1", &[INFO_BLOCK_SIZE]);
    let n = bad.len();
    bad[n - 4..n - 2].copy_from_slice(&3u16.to_be_bytes());
    c.option(OPT_INFO, &bad);
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H6: truncated info list");
    // A name over 4096 bytes.
    c.option(OPT_GO, &go_data(&"x".repeat(4097), &[]));
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H6: name over 4096 bytes");
    // H9: LIST and STRUCTURED_REPLY with data.
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H9: LIST with data");
    c.option(OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(
        c.reply().1,
        REP_ERR_INVALID,
        "H9: STRUCTURED_REPLY with data"
    );
    // LIST without data: every export, then ACK.
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = c.reply();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["l0", "l1", "l2"]);
    // H11: EXTENDED_HEADERS is unsupported, STARTTLS refused by policy.
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().1, REP_ERR_UNSUP, "H11: EXTENDED_HEADERS");
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ERR_POLICY, "H11: STARTTLS");
    // The session continues: GO and a read.
    let (size, _) = c.go("l1");
    assert_eq!(size, SIZE);
    c.request(NbdCmd::Read, 1, 8192, 4096, &[]);
    let (err, cookie, data) = c.simple(4096);
    assert_eq!((err, cookie), (0, 1));
    assert!(data == std_chain().flat(1)[8192..12288]);

    drop(c);
    // H8: EXPORT_NAME of an unknown export: closed (there is no way to send an error).
    let mut c = Raw::connect(&s.sock);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed(), "H8: unknown EXPORT_NAME must close");
    drop(c);
    // A known one: size, flags, 124 zero bytes (NO_ZEROES not asked), then transmission.
    let mut c = Raw::connect(&s.sock);
    c.option(OPT_EXPORT_NAME, b"l2");
    let mut r = vec![0u8; 10 + EXPORT_NAME_ZEROES];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(NbdCmd::Read, 2, 0, 512, &[]);
    let (err, _, data) = c.simple(512);
    assert_eq!(err, 0);
    assert!(data == std_chain().flat(2)[..512]);
    drop(c);

    // H12: ABORT with data, then close without reading the ACK; and ABORT read properly.
    for _ in 0..20 {
        let mut c = Raw::connect(&s.sock);
        c.option(OPT_ABORT, &[0xaa; 64]);
        drop(c);
    }
    let mut c = Raw::connect(&s.sock);
    c.option(OPT_ABORT, b"bye");
    assert_eq!(c.reply().1, REP_ACK, "H12: ABORT gets ACK");
    assert!(c.closed());
    s.assert_alive();
    s.wait_fds(baseline, "handshake errors");
}

/// H10: SET_META_CONTEXT before STRUCTURED_REPLY, malformed queries, unknown namespaces; then
/// BLOCK_STATUS works only with the context selected.
#[test]
fn meta_context_negotiation_errors_and_unknown_namespaces() {
    let s = serve(&["--read-only"]);
    let mut c = Raw::connect(&s.sock);
    c.option(OPT_SET_META_CONTEXT, &meta_query("l0", &[BASE_ALLOCATION]));
    assert_eq!(
        c.reply().1,
        REP_ERR_INVALID,
        "H10: SET before STRUCTURED_REPLY"
    );
    c.structured();
    // A query length running past the data.
    let mut bad = meta_query("l0", &[BASE_ALLOCATION]);
    let n = bad.len();
    let qlen_at = n - BASE_ALLOCATION.len() - 4;
    bad[qlen_at..qlen_at + 4].copy_from_slice(&1000u32.to_be_bytes());
    c.option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H10: malformed query length");
    // More queries announced than present.
    let mut bad = meta_query("l0", &[BASE_ALLOCATION]);
    let at = 4 + 2;
    bad[at..at + 4].copy_from_slice(&5u32.to_be_bytes());
    c.option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(c.reply().1, REP_ERR_INVALID, "H10: truncated query list");
    // An unknown namespace is ignored: no context, just ACK.
    c.option(OPT_SET_META_CONTEXT, &meta_query("l0", &["nosuch:thing"]));
    assert_eq!(c.reply().1, REP_ACK, "H10: unknown namespace ignored");
    // LIST_META_CONTEXT with no query lists base:allocation.
    c.option(OPT_LIST_META_CONTEXT, &meta_query("l0", &[]));
    let (_, ty, d) = c.reply();
    assert_eq!(ty, REP_META_CONTEXT);
    assert_eq!(&d[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(c.reply().1, REP_ACK);
    c.go("l0");
    // T11: no context selected (the last SET chose none): BLOCK_STATUS is EINVAL.
    c.request(NbdCmd::BlockStatus, 7, 0, 4096, &[]);
    let r = c.chunks(7);
    assert_eq!(r.len(), 1);
    assert!(r[0].is_error() && r[0].error() == NBD_EINVAL, "T11: {r:?}");
    // With the context selected it answers.
    let mut c = Raw::connect(&s.sock);
    c.structured();
    let id = c.meta_base_allocation("l0");
    c.go("l0");
    c.request(NbdCmd::BlockStatus, 8, 0, 65536, &[]);
    let r = c.chunks(8);
    assert_eq!(r.last().unwrap().kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(u32::from_be_bytes(r[0].data[..4].try_into().unwrap()), id);
}

/// H15 (INFO then GO return the same information) and H16 (valid block sizes on request).
#[test]
fn info_then_go_agree_and_block_sizes_are_valid() {
    let s = serve(&[]);
    for name in ["l0", "l2", ""] {
        let mut c = Raw::connect(&s.sock);
        let infos = [INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 999];
        let info = c.go_replies(OPT_INFO, name, &infos);
        let go = c.go_replies(OPT_GO, name, &infos);
        assert_eq!(info.last().unwrap().0, REP_ACK);
        assert_eq!(info, go, "H15: INFO and GO differ for {name:?}");
        let block = go
            .iter()
            .find(|(ty, d)| *ty == REP_INFO && d[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("H16: BLOCK_SIZE requested but not sent");
        let d = &block.1;
        assert_eq!(d.len(), 14);
        let min = u32::from_be_bytes(d[2..6].try_into().unwrap());
        let pref = u32::from_be_bytes(d[6..10].try_into().unwrap());
        let max = u32::from_be_bytes(d[10..14].try_into().unwrap());
        assert!(min.is_power_of_two() && min <= 65536, "H16: min {min}");
        assert!(
            pref.is_power_of_two() && pref >= min.max(512),
            "H16: preferred {pref}"
        );
        assert!(max >= pref && max >= 1 << 20, "H16: max {max}");
        // Transmission started right after the ACK.
        c.request(NbdCmd::Read, 1, 0, 4096, &[]);
        assert_eq!(c.simple(4096).0, 0);
    }
}

/// H13: EOF at every byte of a complete handshake (and of the first request), with and without
/// a half-close first: every connection ends cleanly, the server survives and keeps no fd.
#[test]
fn eof_at_every_byte_of_a_handshake_closes_cleanly() {
    let mut s = serve(&["--read-only"]);
    let mut script = Vec::new();
    script.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    encode_option(&mut script, OPT_LIST, &[]).unwrap();
    encode_option(&mut script, OPT_STRUCTURED_REPLY, &[]).unwrap();
    encode_option(
        &mut script,
        OPT_SET_META_CONTEXT,
        &meta_query("l1", &[BASE_ALLOCATION]),
    )
    .unwrap();
    encode_option(&mut script, OPT_INFO, &go_data("l1", &[INFO_BLOCK_SIZE])).unwrap();
    encode_option(&mut script, OPT_GO, &go_data("l1", &[INFO_BLOCK_SIZE])).unwrap();
    script.extend_from_slice(&request_bytes(0, NbdCmd::Read, 1, 0, 4096));
    script.extend_from_slice(&request_bytes(0, NbdCmd::Write, 2, 0, 4096));
    script.extend_from_slice(&[0u8; 100]); // part of the write's payload
    // Warm up, then measure.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    let _ = c.write_all(&script[..4]);
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    let baseline = s.fd_count();
    for cut in 0..=script.len() {
        let mut c = UnixStream::connect(&s.sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; GREETING_LEN];
        c.read_exact(&mut g).unwrap();
        c.write_all(&script[..cut]).unwrap();
        if cut % 2 == 0 {
            // Half-close: the server sees EOF with its replies still readable.
            c.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            match c.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) => assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset,
                    "cut {cut}: {e}"
                ),
            }
        }
        drop(c);
    }
    s.assert_alive();
    s.wait_fds(baseline, "EOF sweep");
    // Still serving.
    let mut c = Raw::connect(&s.sock);
    c.go("l1");
    c.request(NbdCmd::Read, 1, 0, 4096, &[]);
    assert_eq!(c.simple(4096).0, 0);
}

// ---- T: transmission ----

/// T3, T5, T6, T7, T9, T10 (T11 above; T1, T2, T4, T8 in nbd_interop.rs).
#[test]
fn transmission_request_errors_keep_the_stream_in_sync() {
    let s = serve(&[]);
    let want = std_chain().flat(0);
    let mut c = Raw::connect(&s.sock);
    let (_, flags) = c.go("l0");
    assert!(flags & TFLAG_READ_ONLY == 0);
    // T3: an unknown flag; REQ_ONE on a read; DF without structured replies; DF on a write (its
    // payload skipped).
    c.request_flags(1 << 9, NbdCmd::Read, 1, 0, 4096, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T3: unknown flag");
    c.request_flags(CMD_FLAG_REQ_ONE, NbdCmd::Read, 2, 0, 4096, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T3: REQ_ONE on a read");
    c.request_flags(CMD_FLAG_DF, NbdCmd::Read, 3, 0, 4096, &[]);
    assert_eq!(
        c.simple(0).0,
        NBD_EINVAL,
        "T3: DF without structured replies"
    );
    c.request_flags(CMD_FLAG_DF, NbdCmd::Write, 4, 0, 4096, &[0xee; 4096]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T3: DF on a write");
    c.request_flags(CMD_FLAG_NO_HOLE, NbdCmd::Write, 5, 0, 512, &[0xee; 512]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T3: NO_HOLE on a write");
    // T5: the advertised minimum block size is 1: odd offsets and lengths are valid.
    c.request(NbdCmd::Read, 6, 4097, 3, &[]);
    let (err, _, d) = c.simple(3);
    assert_eq!(err, 0, "T5");
    assert!(d == want[4097..4100]);
    // T6: a zero-length read succeeds with no data.
    c.request(NbdCmd::Read, 7, 100, 0, &[]);
    assert_eq!(c.simple(0), (0, 7, Vec::new()), "T6");
    // T7: a read above the maximum (32 MiB) is EINVAL.
    c.request(NbdCmd::Read, 8, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T7");
    // T9: a write above the maximum but within the drain cap: the payload is skipped, EINVAL.
    let big = vec![0x77u8; (32 << 20) + 4096];
    c.request(NbdCmd::Write, 9, 0, big.len() as u32, &big);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T9: oversized write");
    // T10: FLUSH with an offset or a length.
    c.request(NbdCmd::Flush, 10, 4096, 0, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T10: FLUSH offset");
    c.request(NbdCmd::Flush, 11, 0, 1, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL, "T10: FLUSH length");
    c.request(NbdCmd::Flush, 12, 0, 0, &[]);
    assert_eq!(c.simple(0).0, 0);
    // Nothing of the refused writes landed, and the stream is in sync.
    c.request(NbdCmd::Read, 13, 0, 8192, &[]);
    let (err, cookie, d) = c.simple(8192);
    assert_eq!((err, cookie), (0, 13));
    assert!(d == want[..8192], "a refused write changed the export");
    // T9 beyond the drain cap (2 x 32 MiB): closed without reading the payload.
    c.request(NbdCmd::Write, 14, 0, (64 << 20) + 4096, &[]);
    assert!(c.closed(), "T9: unskippable write must close");

    // Structured replies: T6 gives one NONE chunk; T7 with DF is EOVERFLOW.
    let mut c = Raw::connect(&s.sock);
    c.structured();
    c.go("l0");
    c.request(NbdCmd::Read, 20, 0, 0, &[]);
    let r = c.chunks(20);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REPLY_TYPE_NONE, "T6 structured: {r:?}");
    c.request_flags(CMD_FLAG_DF, NbdCmd::Read, 21, 0, (32 << 20) + 1, &[]);
    let r = c.chunks(21);
    assert!(
        r[0].is_error() && r[0].error() == NBD_EOVERFLOW,
        "T7 DF: {r:?}"
    );
    c.request_flags(1 << 9, NbdCmd::Read, 22, 0, 4096, &[]);
    let r = c.chunks(22);
    assert!(
        r[0].is_error() && r[0].error() == NBD_EINVAL,
        "T3 structured: {r:?}"
    );

    // The same through libnbd with strict mode off (simple and structured replies).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/strict_off.py");
    let flat = std_chain().flat_path(0).display().to_string();
    let out = run("/usr/bin/python3", &[script, &s.unix_uri("l0"), &flat]);
    assert_eq!(out.trim(), "OK", "{out}");
}

/// Checks one structured READ reply against the image: chunks in range, not overlapping, DONE
/// only on the last, data and holes correct; returns the error values of error chunks. Without
/// an error the chunks must cover the whole range.
fn check_structured_read(chunks: &[Chunk], off: u64, len: u64, want: Option<&[u8]>) -> Vec<u32> {
    let mut covered: Vec<(u64, u64)> = Vec::new();
    let mut errors = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(
            c.done(),
            i == chunks.len() - 1,
            "DONE must be on the last chunk only: {i}"
        );
        match c.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(c.data[..8].try_into().unwrap());
                let n = c.data.len() as u64 - 8;
                assert!(
                    at >= off && at + n <= off + len,
                    "data chunk {at}+{n} outside the request"
                );
                if let Some(want) = want {
                    assert!(
                        c.data[8..] == want[at as usize..(at + n) as usize],
                        "data at {at} differs"
                    );
                }
                covered.push((at, n));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(c.data[..8].try_into().unwrap());
                let n = u64::from(u32::from_be_bytes(c.data[8..12].try_into().unwrap()));
                assert!(at >= off && at + n <= off + len);
                if let Some(want) = want {
                    assert!(want[at as usize..(at + n) as usize].iter().all(|&b| b == 0));
                }
                covered.push((at, n));
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let msg = usize::from(u16::from_be_bytes(c.data[4..6].try_into().unwrap()));
                let tail = if c.kind == REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
                assert_eq!(c.data.len(), 6 + msg + tail, "error chunk length");
                assert!(std::str::from_utf8(&c.data[6..6 + msg]).is_ok());
                errors.push(c.error());
            }
            REPLY_TYPE_NONE => assert!(len == 0 && chunks.len() == 1),
            other => panic!("unexpected chunk type {other}"),
        }
    }
    covered.sort_unstable();
    for w in covered.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "chunks overlap: {covered:?}");
    }
    if errors.is_empty() {
        assert_eq!(
            covered.iter().map(|c| c.1).sum::<u64>(),
            len,
            "chunks do not cover the range"
        );
    }
    errors
}

/// T12 and T13: a backend failure on a READ with simple replies is an error reply with no
/// payload, and the bytes after it are the next reply. The server gathers a READ's data before
/// the first byte of its reply (`conn.rs`, `read_reply`), so the T13 situation (a failure after
/// a simple reply header went out) cannot arise: a read fails as a whole, before its header.
#[test]
fn backend_errors_on_simple_reads_are_error_replies_without_payload() {
    let chain = faulty_chain();
    let want = chain.flat(0);
    let mut s = Serve::start_with(
        &chain.store_url(),
        &chain.exports(),
        &[
            "--read-only",
            "--fetch-retries",
            "0",
            "--metrics",
            "tcp:127.0.0.1:0",
        ],
    );
    let mut c = Raw::connect(&s.sock);
    c.go("l0");
    // The good frames read.
    c.request(NbdCmd::Read, 1, BAD - MIB, MIB as u32, &[]);
    let (err, _, d) = c.simple(MIB as usize);
    assert_eq!(err, 0);
    assert!(d == want[(BAD - MIB) as usize..BAD as usize]);
    // Inside the damaged frame, across the boundary, and pipelined with good reads.
    let cases: [(u64, u64, u32); 6] = [
        (2, BAD + 4096, 4096),
        (3, BAD - 65536, 131_072),
        (4, 0, 65536),
        (5, 8 * MIB - 512, 512),
        (6, 4096, 4096),
        (7, BAD, 2 * MIB as u32),
    ];
    let mut batch = Vec::new();
    for (cookie, off, len) in cases {
        batch.extend_from_slice(&request_bytes(0, NbdCmd::Read, cookie, off, len));
    }
    c.s.write_all(&batch).unwrap();
    let mut seen = Vec::new();
    for _ in 0..cases.len() {
        let (err, cookie, data) = match c.any_reply() {
            AnyReply::Simple(err, cookie) => {
                let (_, off, len) = cases.iter().find(|x| x.0 == cookie).copied().unwrap();
                let mut d = vec![0u8; if err == 0 { len as usize } else { 0 }];
                c.s.read_exact(&mut d).unwrap();
                (err, cookie, (off, d))
            }
            AnyReply::Chunk(ch) => panic!("chunk without structured replies: {ch:?}"),
        };
        let (off, d) = data;
        if cookie == 4 || cookie == 6 {
            assert_eq!(err, 0, "cookie {cookie}");
            assert!(d == want[off as usize..off as usize + d.len()]);
        } else {
            assert_eq!(err, NBD_EIO, "T12: cookie {cookie}");
        }
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, [2, 3, 4, 5, 6, 7]);
    // Still in sync, still failing (never cached), and counted.
    c.request(NbdCmd::Read, 8, BAD + 8192, 4096, &[]);
    assert_eq!(c.simple(0), (NBD_EIO, 8, Vec::new()));
    c.request(NbdCmd::Read, 9, 12345, 1000, &[]);
    let (err, cookie, d) = c.simple(1000);
    assert_eq!((err, cookie), (0, 9));
    assert!(d == want[12345..13345]);
    let body = s.scrape();
    let eio = Serve::metric(
        &body,
        "thaw_nbd_request_errors_total{cmd=\"read\",errno=\"eio\"}",
    );
    assert!(eio.unwrap_or(0.0) >= 5.0, "{body}");
    s.assert_alive();
}

/// T14: a backend failure inside a structured READ: the reply is well formed (chunks inside
/// the request, none overlapping, correct bytes), carries an EIO error chunk and ends with
/// DONE; the connection goes on. (The server never sends part of a READ and then fails: a
/// failing read is one ERROR chunk with DONE.) Also DF and libnbd's view (python3-libnbd).
#[test]
fn backend_errors_in_structured_reads_end_with_an_error_chunk() {
    let chain = faulty_chain();
    let want = chain.flat(0);
    let s = Serve::start_with(
        &chain.store_url(),
        &chain.exports(),
        &["--fetch-retries", "0"],
    );
    let mut c = Raw::connect(&s.sock);
    c.structured();
    c.go("l0");
    let cases: [(u16, u64, u32); 5] = [
        (0, BAD - MIB, 2 * MIB as u32),
        (0, BAD + 4096, 4096),
        (0, BAD - 4096, 8192),
        (CMD_FLAG_DF, BAD - 32768, 65536),
        (CMD_FLAG_DF, BAD + 65536, 65536),
    ];
    for (i, (flags, off, len)) in cases.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request_flags(flags, NbdCmd::Read, cookie, off, len, &[]);
        let chunks = c.chunks(cookie);
        let errors = check_structured_read(&chunks, off, u64::from(len), Some(&want));
        assert_eq!(errors, [NBD_EIO], "T14: case {i}: {chunks:?}");
    }
    // A good read after the failures: full coverage, right bytes.
    c.request(NbdCmd::Read, 200, BAD - 3 * MIB, 3 * MIB as u32, &[]);
    let chunks = c.chunks(200);
    assert!(check_structured_read(&chunks, BAD - 3 * MIB, 3 * MIB, Some(&want)).is_empty());
    // libnbd (strict mode on): EIO from pread on both reply kinds, then good reads.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/backend_errors.py");
    let out = run(
        "/usr/bin/python3",
        &[
            script,
            &s.unix_uri("l0"),
            &chain.flat_path(0).display().to_string(),
            &BAD.to_string(),
        ],
    );
    assert_eq!(out.trim(), "OK", "{out}");
}

/// T15: 1,000 pipelined requests of every kind (reads, writes, flush, cache, errors), 400
/// cookies used twice: every request answered, each cookie as often as it was sent, reads
/// correct, writes landed.
#[test]
fn a_thousand_pipelined_requests_with_duplicate_cookies() {
    let s = serve(&[]);
    let base = std_chain().flat(1);
    let mut c = Raw::connect(&s.sock);
    c.go("l1");
    const WBASE: u64 = 4 * MIB;
    // A request is a function of its cookie, so duplicates are exact repeats.
    let req = |cookie: u64| -> (NbdCmd, u64, u32) {
        match cookie % 10 {
            0..=4 => {
                let len = 512u32 << (cookie % 8);
                let off = (cookie * 7919 * 512) % (WBASE - 65536);
                (NbdCmd::Read, off, len)
            }
            5 | 6 => (NbdCmd::Write, WBASE + cookie * 4096, 4096),
            7 => (NbdCmd::Flush, 0, 0),
            8 => (NbdCmd::Cache, cookie * 4096 % WBASE, 65536),
            _ => (NbdCmd::Read, SIZE - 100, 4096), // past the end: EINVAL
        }
    };
    let cookies: Vec<u64> = (0..1000u64).map(|i| i % 600).collect();
    let mut stream = Vec::new();
    for &ck in &cookies {
        let (cmd, off, len) = req(ck);
        stream.extend_from_slice(&request_bytes(0, cmd, ck, off, len));
        if cmd == NbdCmd::Write {
            stream.extend(std::iter::repeat_n(ck as u8 ^ 0x5a, len as usize));
        }
    }
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || w.write_all(&stream).unwrap());
    let mut answered = Vec::new();
    for _ in 0..cookies.len() {
        let AnyReply::Simple(err, ck) = c.any_reply() else {
            panic!("chunk without structured replies");
        };
        let (cmd, off, len) = req(ck);
        match (cmd, ck % 10) {
            (_, 9) => assert_eq!(err, NBD_EINVAL, "cookie {ck}"),
            (NbdCmd::Read, _) => {
                assert_eq!(err, 0, "cookie {ck}");
                let mut d = vec![0u8; len as usize];
                c.s.read_exact(&mut d).unwrap();
                assert!(
                    d == base[off as usize..off as usize + len as usize],
                    "cookie {ck}"
                );
            }
            _ => assert_eq!(err, 0, "cookie {ck} ({cmd:?})"),
        }
        answered.push(ck);
    }
    sender.join().unwrap();
    assert_eq!(
        tally(answered),
        tally(cookies.iter().copied()),
        "T15: answers per cookie"
    );
    // The writes landed.
    c.request(NbdCmd::Read, 5000, WBASE, (600 * 4096) as u32, &[]);
    let (err, _, d) = c.simple(600 * 4096);
    assert_eq!(err, 0);
    for ck in 0..600u64 {
        let at = (ck * 4096) as usize;
        let got = &d[at..at + 4096];
        if matches!(ck % 10, 5 | 6) {
            assert!(
                got.iter().all(|&b| b == ck as u8 ^ 0x5a),
                "write {ck} missing"
            );
        } else {
            let b = (WBASE + ck * 4096) as usize;
            assert!(got == &base[b..b + 4096], "block {ck} changed");
        }
    }
}

/// T16: DISC while requests are in flight (reads held up by a 100 ms store TTFB): every request
/// before DISC is answered, then the connection closes; the write and read sent after DISC are
/// not processed.
#[test]
fn disc_answers_what_is_in_flight_and_ignores_what_follows() {
    let chain = std_chain();
    let store = format!("sim:ttfb=100ms,inner={}", chain.store_url());
    let s = Serve::start_with(&store, &chain.exports(), &[]);
    let base = chain.flat(2);
    let mut c = Raw::connect(&s.sock);
    c.go("l2");
    let mut stream = Vec::new();
    let mut expect = BTreeMap::new();
    for i in 0..16u64 {
        let off = i * 512 * 1024;
        stream.extend_from_slice(&request_bytes(0, NbdCmd::Read, i, off, 256 * 1024));
        expect.insert(i, Some(off));
    }
    for i in 0..4u64 {
        stream.extend_from_slice(&request_bytes(0, NbdCmd::Write, 100 + i, i * 4096, 4096));
        stream.extend_from_slice(&[0x5a; 4096]);
        expect.insert(100 + i, None);
    }
    stream.extend_from_slice(&request_bytes(0, NbdCmd::Disc, 999, 0, 0));
    stream.extend_from_slice(&request_bytes(0, NbdCmd::Write, 1000, MIB, 4096));
    stream.extend_from_slice(&[0xee; 4096]);
    stream.extend_from_slice(&request_bytes(0, NbdCmd::Read, 1001, 0, 4096));
    c.s.write_all(&stream).unwrap();
    for _ in 0..expect.len() {
        let AnyReply::Simple(err, ck) = c.any_reply() else {
            panic!("chunk")
        };
        assert_eq!(err, 0, "cookie {ck}");
        let read = expect
            .remove(&ck)
            .unwrap_or_else(|| panic!("T16: reply to {ck} after DISC"));
        if let Some(off) = read {
            let mut d = vec![0u8; 256 * 1024];
            c.s.read_exact(&mut d).unwrap();
            assert!(d == base[off as usize..off as usize + d.len()]);
        }
    }
    assert!(c.closed(), "T16: nothing after the in-flight replies");
    // The writes before DISC landed; the one after it did not.
    let mut c = Raw::connect(&s.sock);
    c.go("l2");
    c.request(NbdCmd::Read, 1, 0, 4 * 4096, &[]);
    let (err, _, d) = c.simple(4 * 4096);
    assert_eq!(err, 0);
    assert!(d.iter().all(|&b| b == 0x5a));
    c.request(NbdCmd::Read, 2, MIB, 4096, &[]);
    let (err, _, d) = c.simple(4096);
    assert_eq!(err, 0);
    assert!(
        d == base[MIB as usize..MIB as usize + 4096],
        "T16: a write after DISC landed"
    );
}

/// T17: `qemu-img convert` from the export (unix and TCP) is byte-identical to the image
/// (`nbdcopy`, `nbdinfo --map`, `qemu-img compare` are in nbd_interop.rs; the kernel client in
/// ci/nbd-kernel-guest.sh).
#[test]
fn qemu_img_convert_is_byte_identical() {
    let s = serve(&["--read-only"]);
    for (layer, uri) in [(2, s.unix_uri("l2")), (1, s.tcp_uri("l1"))] {
        let dst = s.dir.path().join(format!("convert-{layer}.raw"));
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &uri,
                &dst.display().to_string(),
            ],
        );
        assert!(
            std::fs::read(&dst).unwrap() == std_chain().flat(layer),
            "layer {layer}"
        );
    }
}

// ---- D: disconnects and lifecycle ----

/// D1: a client with 4 x 2 MiB reads in flight (held up by a 300 ms store TTFB) closes: the
/// server stays up, a connection open meanwhile is unaffected, and the dead connection's fds
/// and in-flight state are released (fd count and `thaw_nbd_connections_active`).
#[test]
fn a_client_dying_with_reads_in_flight_leaves_the_others_alone() {
    let chain = std_chain();
    let store = format!("sim:ttfb=300ms,inner={}", chain.store_url());
    let mut s = Serve::start_with(
        &store,
        &chain.exports(),
        &["--read-only", "--metrics", "tcp:127.0.0.1:0"],
    );
    let mut a = Raw::connect(&s.sock);
    a.go("l0");
    s.wait_active(1.0);
    let baseline = s.fd_count();
    for (round, export) in ["l1", "l2", "l1", "l2"].into_iter().enumerate() {
        let mut b = Raw::connect(&s.sock);
        if round % 2 == 1 {
            b.structured();
        }
        b.go(export);
        for i in 0..4u64 {
            b.request(NbdCmd::Read, i, i * 2 * MIB, 2 << 20, &[]);
        }
        if round >= 2 {
            // Read part of the first reply, then die.
            let mut part = [0u8; 100];
            b.s.read_exact(&mut part).unwrap();
        }
        drop(b);
        // The other connection is served meanwhile.
        let off = round as u64 * MIB;
        a.request(NbdCmd::Read, 10 + round as u64, off, MIB as u32, &[]);
        let (err, _, d) = a.simple(MIB as usize);
        assert_eq!(err, 0);
        assert!(d == chain.flat(0)[off as usize..(off + MIB) as usize]);
    }
    s.assert_alive();
    s.wait_active(1.0);
    s.wait_fds(baseline, "D1");
    a.request(NbdCmd::Disc, 0, 0, 0, &[]);
    assert!(a.closed());
    s.wait_active(0.0);
}

/// D2: TCP clients that reset the connection (close with unread data: the kernel sends RST)
/// while large structured and simple replies are being written: no panic, resources released,
/// others served.
#[test]
fn a_reset_during_a_large_reply_is_handled_quietly() {
    let chain = std_chain();
    let mut s = Serve::start_logged(
        &chain.store_url(),
        &chain.exports(),
        &["--read-only", "--metrics", "tcp:127.0.0.1:0"],
        "thaw_server=debug",
    );
    let want = std_chain().flat(2);
    let mut a = Raw::connect(&s.sock);
    a.go("l2");
    // Touch every frame once (the engine opens what it needs), then measure.
    a.request(NbdCmd::Read, 99, 0, SIZE as u32, &[]);
    assert!(a.simple(SIZE as usize).2 == want);
    s.wait_active(1.0);
    let baseline = s.fd_count();
    for round in 0..12 {
        let mut b = Raw::connect_tcp(s.port);
        if round % 2 == 0 {
            b.structured();
        }
        b.go("l2");
        for i in 0..4u64 {
            b.request(NbdCmd::Read, i, 0, 8 << 20, &[]);
        }
        let mut part = vec![0u8; 1000 + round * 5000];
        b.s.read_exact(&mut part).unwrap();
        // Unread data in the receive queue: close() sends RST instead of FIN.
        drop(b);
        a.request(NbdCmd::Read, round as u64, 4096, 65536, &[]);
        let (err, _, d) = a.simple(65536);
        assert_eq!(err, 0);
        assert!(d == want[4096..4096 + 65536]);
    }
    s.assert_alive();
    s.wait_active(1.0);
    s.wait_fds(baseline, "D2");
    // The resets reached the server, and were logged as a client going away (debug), never
    // as a warning or an error.
    let log = s.log();
    let resets = log
        .lines()
        .filter(|l| l.contains("client went away") && l.contains("reset by peer"))
        .count();
    assert!(
        resets > 0,
        "D2: no connection reset seen by the server:\n{log}"
    );
    for l in log.lines() {
        assert!(
            !(l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panick")),
            "D2: {l}"
        );
    }
}

/// D3 with work in flight: reads held up by a 300 ms store TTFB when SIGTERM arrives are
/// answered (right bytes), then the connection closes and `thaw serve` exits 0. A client that
/// reads none of its (32 MiB of) replies cannot hold the exit past `--drain-timeout`.
#[test]
fn sigterm_answers_reads_in_flight_and_exits_within_the_drain_deadline() {
    let chain = std_chain();
    let store = format!("sim:ttfb=300ms,inner={}", chain.store_url());
    let want = chain.flat(1);
    let mut s = Serve::start_with(
        &store,
        &chain.exports(),
        &["--read-only", "--drain-timeout", "2s"],
    );
    // A client that never reads: 4 x 8 MiB of replies stuck in the socket.
    let mut stuck = Raw::connect(&s.sock);
    stuck.go("l2");
    for i in 0..4u64 {
        stuck.request(NbdCmd::Read, i, 0, 8 << 20, &[]);
    }
    let mut c = Raw::connect(&s.sock);
    c.go("l1");
    for i in 0..8u64 {
        c.request(NbdCmd::Read, i, i * MIB, 65536, &[]);
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    s.sigterm();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (err, ck, d) = c.simple(65536);
        assert_eq!(err, 0, "D3: in-flight read {ck} failed");
        let off = (ck * MIB) as usize;
        assert!(d == want[off..off + 65536], "D3: read {ck}");
        seen.push(ck);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(c.closed(), "D3: not closed after its in-flight work");
    let st = s.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{st}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "D3: exit took {:?} with a 2 s drain deadline",
        t.elapsed()
    );
    drop(stuck);
}

/// D5: 10,000 connect / handshake / disconnect cycles (clean DISC, EOF mid-handshake, a read
/// then DISC, vanishing with a 1 MiB read in flight): the fd count and the resident set size
/// stay flat (measured after 1,000 warm-up cycles; 2 MiB of slack for the allocator), and every
/// connection is gone at the end.
#[test]
fn ten_thousand_connection_cycles_keep_fds_and_memory_flat() {
    let mut s = serve(&["--read-only", "--metrics", "tcp:127.0.0.1:0"]);
    let cycle = |i: u32| match i % 10 {
        0 => drop(UnixStream::connect(&s.sock).unwrap()),
        1 => {
            let c = Raw::connect(&s.sock);
            drop(c);
        }
        2 => {
            let mut c = Raw::connect(&s.sock);
            c.go("l1");
            c.request(NbdCmd::Read, 1, 0, 4096, &[]);
            assert_eq!(c.simple(4096).0, 0);
            c.request(NbdCmd::Disc, 0, 0, 0, &[]);
            assert!(c.closed());
        }
        3 => {
            let mut c = Raw::connect(&s.sock);
            c.go("l2");
            c.request(NbdCmd::Read, 1, 0, 1 << 20, &[]);
            drop(c);
        }
        _ => {
            let mut c = Raw::connect(&s.sock);
            c.go("l0");
            c.request(NbdCmd::Disc, 0, 0, 0, &[]);
            assert!(c.closed());
        }
    };
    for i in 0..1000 {
        cycle(i);
    }
    s.wait_active(0.0);
    let fds = s.fd_count();
    let rss = s.rss_kib();
    for i in 1000..10_000 {
        cycle(i);
    }
    s.assert_alive();
    s.wait_active(0.0);
    s.wait_fds(fds, "D5: 9,000 cycles");
    let rss_end = s.rss_kib();
    eprintln!("D5: VmRSS {rss} KiB after 1,000 cycles, {rss_end} KiB after 10,000; fds {fds}");
    assert!(
        rss_end <= rss + 2048,
        "D5: VmRSS grew from {rss} KiB to {rss_end} KiB over 9,000 cycles"
    );
}

// ---- fuzzing the server loop ----

/// Random but framed request streams (every command and flag bit, in and out of range, write
/// payloads of the declared length) on simple and structured connections to read-only and
/// writable exports: every reply is well formed (magic, a cookie that is outstanding, chunk
/// lengths, DONE ending each structured reply, read data where the export is read-only equal to
/// the image), every request is answered exactly once, and the server survives. Seeded: a
/// failure names its seed (`THAW_FUZZ_SEED` replays one connection).
#[test]
fn random_request_streams_get_well_formed_replies() {
    let s = serve(&[]);
    let images: Vec<Vec<u8>> = (0..3).map(|l| std_chain().flat(l)).collect();
    // THAW_FUZZ_SEED=N replays one connection; THAW_FUZZ_SEEDS=N runs seeds 0..N (a longer
    // local campaign).
    let seeds: Vec<u64> = match (
        std::env::var("THAW_FUZZ_SEED"),
        std::env::var("THAW_FUZZ_SEEDS"),
    ) {
        (Ok(v), _) => vec![v.parse().unwrap()],
        (_, Ok(n)) => (0..n.parse().unwrap()).collect(),
        _ => (0..24).collect(),
    };
    for seed in seeds {
        fuzz_connection(&s, &images, seed);
    }
    // A fresh connection still reads the image.
    let mut c = Raw::connect(&s.sock);
    c.go("l2");
    c.request(NbdCmd::Read, 1, 0, 65536, &[]);
    let (err, _, d) = c.simple(65536);
    assert_eq!(err, 0);
    assert!(d == images[2][..65536]);
}

fn fuzz_connection(s: &Serve, images: &[Vec<u8>], seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let structured = rng.random_bool(0.5);
    let layer = rng.random_range(0..3usize);
    // Exports l0 and l1 may be written by earlier seeds; l2 is only read (writes go to l0/l1).
    let writable = layer != 2;
    let mut c = Raw::connect(&s.sock);
    // A few random options first: each gets a final reply (ACK or an error), nothing else.
    for _ in 0..rng.random_range(0..5) {
        let names = ["l0", "l1", "nope", ""];
        let (opt, data) = match rng.random_range(0..5) {
            0 => (OPT_LIST, Vec::new()),
            1 => {
                let infos: Vec<u16> = (0..rng.random_range(0..4))
                    .map(|_| rng.random_range(0..6))
                    .collect();
                (OPT_INFO, go_data(names[rng.random_range(0..4)], &infos))
            }
            2 => {
                let junk: Vec<u8> = (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect();
                (rng.random_range(12..1000), junk)
            }
            3 => (OPT_LIST_META_CONTEXT, meta_query("l0", &["base:", "x:y"])),
            _ => {
                let junk: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
                (OPT_INFO, junk)
            }
        };
        c.option(opt, &data);
        loop {
            let (o, ty, _) = c.reply();
            assert_eq!(o, opt, "seed {seed}");
            if ty == REP_ACK || ty & REP_FLAG_ERROR != 0 {
                break;
            }
            assert!(
                matches!(ty, REP_SERVER | REP_INFO | REP_META_CONTEXT),
                "seed {seed}: reply {ty:#x}"
            );
        }
    }
    if structured {
        c.structured();
        if rng.random_bool(0.7) {
            c.meta_base_allocation(&format!("l{layer}"));
        }
    }
    c.go(&format!("l{layer}"));
    let n = rng.random_range(50..250usize);
    let mut outstanding: BTreeMap<u64, (NbdCmd, u64, u32)> = BTreeMap::new();
    let mut stream = Vec::new();
    for i in 0..n as u64 {
        let cmd = match rng.random_range(0..20u16) {
            0..=7 => NbdCmd::Read,
            8..=10 => NbdCmd::BlockStatus,
            11 => NbdCmd::Cache,
            12 => NbdCmd::Flush,
            13 if writable => NbdCmd::Write,
            14 if writable => NbdCmd::WriteZeroes,
            15 if writable => NbdCmd::Trim,
            16 => NbdCmd::from_u16(rng.random_range(8..300)),
            _ => NbdCmd::Read,
        };
        let flags = if rng.random_bool(0.2) {
            rng.random::<u16>() & 0x3f
        } else {
            0
        };
        let offset = match rng.random_range(0..10) {
            0 => rng.random::<u64>(),
            1 => SIZE - rng.random_range(0..8192),
            _ => rng.random_range(0..SIZE),
        };
        let length = match rng.random_range(0..10) {
            0 => 0,
            1 => rng.random_range(0..(40u32 << 20)),
            _ => rng.random_range(1..256 * 1024),
        };
        let cmd = if cmd == NbdCmd::Write && length > 1 << 20 {
            NbdCmd::Read
        } else {
            cmd
        };
        stream.extend_from_slice(&request_bytes(flags, cmd, i, offset, length));
        if cmd == NbdCmd::Write {
            let b = rng.random::<u8>();
            stream.extend(std::iter::repeat_n(b, length as usize));
        }
        outstanding.insert(i, (cmd, offset, length));
    }
    // How the stream ends: DISC (below), a request header with a bad magic (T1), or a cut
    // inside a request; either way every request before it is answered, then the server closes.
    let ending = rng.random_range(0..4u8);
    match ending {
        0 => {
            let mut bad = request_bytes(0, NbdCmd::Read, u64::MAX, 0, 4096);
            bad[rng.random_range(0..4)] ^= 1 << rng.random_range(0..8);
            stream.extend_from_slice(&bad);
        }
        1 => {
            let whole = request_bytes(0, NbdCmd::Write, u64::MAX, 0, 4096);
            let cut = rng.random_range(1..REQUEST_LEN + 4096);
            stream.extend_from_slice(&whole[..cut.min(REQUEST_LEN)]);
            stream.extend(std::iter::repeat_n(0u8, cut.saturating_sub(REQUEST_LEN)));
        }
        _ => {}
    }
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        w.write_all(&stream).unwrap();
        if ending == 1 {
            w.shutdown(Shutdown::Write).unwrap();
        }
    });
    let image = &images[layer];
    let mut partial: BTreeMap<u64, Vec<Chunk>> = BTreeMap::new();
    while !outstanding.is_empty() {
        match c.any_reply() {
            AnyReply::Simple(err, ck) => {
                let (cmd, off, len) = outstanding
                    .remove(&ck)
                    .unwrap_or_else(|| panic!("seed {seed}: simple reply to unknown cookie {ck}"));
                assert!(
                    !(structured && matches!(cmd, NbdCmd::Read | NbdCmd::BlockStatus)),
                    "seed {seed}: simple reply to a {cmd:?} with structured replies"
                );
                if cmd == NbdCmd::Read && err == 0 {
                    let mut d = vec![0u8; len as usize];
                    c.s.read_exact(&mut d).unwrap();
                    if !writable {
                        assert!(
                            d == image[off as usize..off as usize + d.len()],
                            "seed {seed}: cookie {ck}"
                        );
                    }
                }
            }
            AnyReply::Chunk(ch) => {
                assert!(structured, "seed {seed}: chunk without structured replies");
                let ck = ch.cookie;
                let &(cmd, off, len) = outstanding
                    .get(&ck)
                    .unwrap_or_else(|| panic!("seed {seed}: chunk for unknown cookie {ck}"));
                assert!(
                    matches!(cmd, NbdCmd::Read | NbdCmd::BlockStatus) || ch.is_error(),
                    "seed {seed}: chunk {ch:?} for {cmd:?}"
                );
                let done = ch.done();
                partial.entry(ck).or_default().push(ch);
                if done {
                    let chunks = partial.remove(&ck).unwrap();
                    outstanding.remove(&ck);
                    if cmd == NbdCmd::Read {
                        let want = (!writable).then_some(image.as_slice());
                        check_structured_read(&chunks, off, u64::from(len), want);
                    } else if !chunks.last().unwrap().is_error() {
                        assert_eq!(chunks.len(), 1, "seed {seed}: block status");
                        assert_eq!(chunks[0].kind, REPLY_TYPE_BLOCK_STATUS);
                    }
                }
            }
        }
    }
    sender.join().unwrap();
    assert!(partial.is_empty());
    if ending > 1 {
        c.request(NbdCmd::Disc, 0, 0, 0, &[]);
    }
    assert!(
        c.closed(),
        "seed {seed}: no close after the stream's end ({ending})"
    );
}

// ---- fio verify on a writable export ----

/// fio's nbd engine writes a writable export with verify headers (crc32c) from 2 jobs at once
/// (4 KiB at QD 16 and mixed 4 KiB-1 MiB at QD 8, 64 MiB each), then reads every block back and
/// verifies it; a second fio run on new connections verifies again (the writes persist in the
/// overlay across connections). Finally the export is copied out with nbdcopy: every 4 KiB
/// block of the 4 KiB job carries fio's header magic, and the regions no job touched still
/// equal the base image.
#[test]
fn fio_verify_workloads_on_a_writable_export() {
    const JOB: u64 = 64 * MIB;
    let chain = Chain::generate(0, 160 * MIB, 5, 0.05, 2 << 20);
    let base = chain.flat(0);
    let s = Serve::start_with(&chain.store_url(), &chain.exports(), &[]);
    let uri = s.unix_uri("l0");
    let job = |verify_only: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "--ioengine=nbd",
            "--rw=randwrite",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=1",
            "--verify_state_save=0",
            "--group_reporting=0",
            "--output-format=terse",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.push(format!("--uri={uri}"));
        if verify_only {
            a.push("--verify_only=1".into());
        }
        for (name, off, extra) in [
            ("small", 0, vec!["--bs=4k", "--iodepth=16"]),
            (
                "mixed",
                80 * MIB,
                vec!["--bssplit=4k/40:16k/30:128k/20:1m/10", "--iodepth=8"],
            ),
        ] {
            a.push(format!("--name={name}"));
            a.push(format!("--offset={off}"));
            a.push(format!("--size={JOB}"));
            a.extend(extra.iter().map(|x| x.to_string()));
        }
        a
    };
    for verify_only in [false, true] {
        let args = job(verify_only);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run("fio", &args);
        assert!(!out.contains("verify: bad"), "{out}");
    }
    let got = nbd_common::nbdcopy_to_vec(&s.unix_uri("l0"), s.dir.path(), &[]);
    assert_eq!(got.len(), base.len());
    for (i, block) in got[..JOB as usize].chunks(4096).enumerate() {
        assert_eq!(
            u16::from_le_bytes([block[0], block[1]]),
            0xacca,
            "block {i} not written by fio"
        );
    }
    for r in [
        JOB as usize..(80 * MIB) as usize,
        (80 * MIB + JOB) as usize..base.len(),
    ] {
        assert!(
            got[r.clone()] == base[r.clone()],
            "untouched region {r:?} changed"
        );
    }
    assert!(
        got[(80 * MIB) as usize..(80 * MIB + JOB) as usize]
            != base[(80 * MIB) as usize..(80 * MIB + JOB) as usize]
    );
}
