#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
//! The NBD server handshake, driven with raw client bytes: every option path, and the H1-H16
//! cases of the reliability catalogue that make sense without sockets.

use thaw_codec::ErrorKind;
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::encode_option;
use thaw_codec::nbd::{
    BASE_ALLOCATION_ID, BlockSize, ExportConfig, ExportFeatures, HandshakeConfig, Negotiated,
    Progress, RejectReason, ServerHandshake, Step,
};

fn all_features() -> ExportFeatures {
    ExportFeatures {
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
    }
}

fn exports() -> Vec<ExportConfig> {
    let mut disk = ExportConfig::new("rootfs", 64 << 20);
    disk.description = "root filesystem".into();
    disk.block_size = BlockSize {
        min: 4096,
        preferred: 4096,
        max: 32 << 20,
    };
    disk.features = all_features();
    let mut mem = ExportConfig::new("memfile", 2 << 20);
    mem.read_only = true;
    vec![disk, mem]
}

fn config() -> HandshakeConfig {
    HandshakeConfig::new(exports())
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_option(&mut v, option, data).unwrap();
    v
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        d.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    option: u32,
    rtype: u32,
    data: Vec<u8>,
}

/// Splits option replies, checking every magic and length.
fn replies(mut out: &[u8]) -> Vec<Reply> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "short reply header");
        assert_eq!(
            u64::from_be_bytes(out[0..8].try_into().unwrap()),
            REPLY_MAGIC
        );
        let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let rtype = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = usize::try_from(u32::from_be_bytes(out[16..20].try_into().unwrap())).unwrap();
        v.push(Reply {
            option,
            rtype,
            data: out[20..20 + len].to_vec(),
        });
        out = &out[20 + len..];
    }
    v
}

/// A handshake past the client flags (FIXED_NEWSTYLE | NO_ZEROES).
fn started(config: HandshakeConfig) -> ServerHandshake {
    let mut h = ServerHandshake::new(config).unwrap();
    let mut out = Vec::new();
    let s = h.feed(&3u32.to_be_bytes(), &mut out);
    assert_eq!(s.progress, Progress::Continue);
    assert!(out.is_empty());
    h
}

fn feed(h: &mut ServerHandshake, bytes: &[u8]) -> (Step, Vec<Reply>) {
    let mut out = Vec::new();
    let s = h.feed(bytes, &mut out);
    (s, replies(&out))
}

fn types(r: &[Reply]) -> Vec<u32> {
    r.iter().map(|r| r.rtype).collect()
}

fn go(step: Step) -> Negotiated {
    match step.progress {
        Progress::Go(n) => *n,
        other => panic!("expected Go, got {other:?}"),
    }
}

fn reject(step: Step) -> RejectReason {
    match step.progress {
        Progress::Reject(r) => r,
        other => panic!("expected Reject, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let h = ServerHandshake::new(config()).unwrap();
        assert_eq!(
            hex::encode(h.greeting()),
            "4e42444d41474943".to_owned() + "49484156454f5054" + "0003"
        );
        let mut c = config();
        c.advertise_no_zeroes = false;
        let h = ServerHandshake::new(c).unwrap();
        assert_eq!(&h.greeting()[16..], &[0, 1]);
    }

    #[test]
    fn h1_client_flags() {
        for (flags, advertise, expect) in [
            (0x4u32, true, "unknown_client_flags"),
            (0x8000_0001, true, "unknown_client_flags"),
            (0x3, false, "unknown_client_flags"),
            (0x0, true, "not_fixed_newstyle"),
            (0x2, true, "not_fixed_newstyle"),
        ] {
            let mut c = config();
            c.advertise_no_zeroes = advertise;
            let mut h = ServerHandshake::new(c).unwrap();
            let (s, r) = feed(&mut h, &flags.to_be_bytes());
            assert!(r.is_empty());
            assert_eq!(s.consumed, 4);
            let reason = reject(s);
            assert_eq!(reason.as_str(), expect, "flags {flags:#x}");
            assert_eq!(reason.kind(), ErrorKind::Unsupported);
            assert!(h.is_finished());
        }
        // FIXED_NEWSTYLE alone is fine.
        let mut h = ServerHandshake::new(config()).unwrap();
        assert_eq!(
            feed(&mut h, &1u32.to_be_bytes()).0.progress,
            Progress::Continue
        );
    }

    #[test]
    fn h2_bad_option_magic() {
        let mut h = started(config());
        let mut bad = opt(OPT_LIST, &[]);
        bad[0] ^= 0x80;
        let (s, r) = feed(&mut h, &bad);
        assert!(r.is_empty());
        let reason = reject(s);
        assert!(matches!(reason, RejectReason::BadOptionMagic { .. }));
        assert_eq!(reason.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn h3_huge_option_length_closes_before_reading() {
        for option in [OPT_GO, 42, OPT_EXPORT_NAME, OPT_LIST] {
            let mut h = started(config());
            let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
            hdr.extend_from_slice(&option.to_be_bytes());
            hdr.extend_from_slice(&u32::MAX.to_be_bytes());
            hdr.extend_from_slice(&[0; 64]);
            let (s, r) = feed(&mut h, &hdr);
            assert!(r.is_empty());
            assert_eq!(s.consumed, 16);
            let reason = reject(s);
            assert_eq!(reason.kind(), ErrorKind::TooLarge, "{reason}");
        }
        // EXPORT_NAME above 4096 bytes closes at the header too.
        let mut h = started(config());
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hdr.extend_from_slice(&4097u32.to_be_bytes());
        assert_eq!(
            reject(feed(&mut h, &hdr).0),
            RejectReason::ExportNameTooLong { len: 4097 }
        );
    }

    #[test]
    fn oversized_buffered_option_is_too_big_and_skipped() {
        let mut h = started(config());
        let big = vec![0u8; 20_000];
        let mut stream = opt(OPT_GO, &big);
        stream.extend(opt(OPT_LIST, &[]));
        let (s, r) = feed(&mut h, &stream);
        assert_eq!(s.progress, Progress::Continue);
        assert_eq!(s.consumed, stream.len());
        assert_eq!(
            types(&r),
            [REP_ERR_TOO_BIG, REP_SERVER, REP_SERVER, REP_ACK]
        );
        assert_eq!(r[0].option, OPT_GO);
    }

    #[test]
    fn total_option_data_is_capped() {
        let mut h = started(config());
        let chunk = vec![0u8; 1 << 20];
        let mut last = Progress::Continue;
        for _ in 0..5 {
            let (s, _) = feed(&mut h, &opt(42, &chunk));
            last = s.progress;
            if last != Progress::Continue {
                break;
            }
        }
        assert_eq!(last, Progress::Reject(RejectReason::TooMuchOptionData));
    }

    #[test]
    fn h4_too_many_options() {
        let mut h = started(config());
        for _ in 0..128 {
            let (s, r) = feed(&mut h, &opt(42, &[]));
            assert_eq!(s.progress, Progress::Continue);
            assert_eq!(types(&r), [REP_ERR_UNSUP]);
        }
        assert_eq!(
            reject(feed(&mut h, &opt(OPT_LIST, &[])).0),
            RejectReason::TooManyOptions
        );
    }

    #[test]
    fn h5_unknown_option_payload_skipped_next_parses() {
        let mut stream = opt(42, &[0xab; 100]);
        stream.extend(opt(OPT_LIST, &[]));
        // Whole, and one byte at a time: the same replies.
        let mut h = started(config());
        let (s, whole) = feed(&mut h, &stream);
        assert_eq!(s.consumed, stream.len());
        let mut h = started(config());
        let mut out = Vec::new();
        for b in &stream {
            let s = h.feed(std::slice::from_ref(b), &mut out);
            assert_eq!((s.consumed, s.progress), (1, Progress::Continue));
        }
        let bytewise = replies(&out);
        assert_eq!(whole, bytewise);
        assert_eq!(whole[0].option, 42);
        assert_eq!(whole[0].rtype, REP_ERR_UNSUP);
        assert_eq!(types(&whole[1..]), [REP_SERVER, REP_SERVER, REP_ACK]);
    }

    #[test]
    fn h6_malformed_info_go_then_session_continues() {
        let mut name_too_long = info_data("rootfs", &[]);
        name_too_long[3] = 200; // name length 200 > optlen - 6
        let mut truncated_list = info_data("rootfs", &[INFO_NAME, INFO_BLOCK_SIZE]);
        truncated_list.truncate(truncated_list.len() - 1);
        let mut count_too_big = info_data("rootfs", &[INFO_NAME]);
        let n = count_too_big.len();
        count_too_big[n - 3] = 9;
        let long_name = info_data(&"x".repeat(5000), &[]);
        let no_count = {
            let mut d = info_data("rootfs", &[]);
            d.truncate(d.len() - 2);
            d
        };
        let mut non_utf8 = info_data("ab", &[]);
        non_utf8[4] = 0xff;
        for (i, bad) in [
            name_too_long,
            truncated_list,
            count_too_big,
            long_name,
            no_count,
            non_utf8,
            vec![0, 0],
        ]
        .into_iter()
        .enumerate()
        {
            for option in [OPT_INFO, OPT_GO] {
                let mut h = started(config());
                let (s, r) = feed(&mut h, &opt(option, &bad));
                assert_eq!(s.progress, Progress::Continue, "case {i}");
                assert_eq!(types(&r), [REP_ERR_INVALID], "case {i}");
                let (s, r) = feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[])));
                assert_eq!(types(&r), [REP_INFO, REP_ACK]);
                assert_eq!(go(s).export_name, "rootfs");
            }
        }
    }

    #[test]
    fn h7_go_unknown_export_then_valid_go() {
        let mut h = started(config());
        let (s, r) = feed(&mut h, &opt(OPT_GO, &info_data("nope", &[INFO_NAME])));
        assert_eq!(s.progress, Progress::Continue);
        assert_eq!(types(&r), [REP_ERR_UNKNOWN]);
        let (s, r) = feed(&mut h, &opt(OPT_GO, &info_data("memfile", &[])));
        assert_eq!(types(&r), [REP_INFO, REP_ACK]);
        let n = go(s);
        assert_eq!((n.export_index, n.size), (1, 2 << 20));
        assert!(n.read_only());
    }

    #[test]
    fn h8_export_name_unknown_closes() {
        let mut h = started(config());
        let (s, r) = feed(&mut h, &opt(OPT_EXPORT_NAME, b"nope"));
        assert!(r.is_empty());
        assert_eq!(
            reject(s),
            RejectReason::UnknownExport {
                name: "nope".into()
            }
        );
    }

    #[test]
    fn export_name_success_with_and_without_zeroes() {
        for (flags, zeroes) in [(1u32, true), (3, false)] {
            let mut h = ServerHandshake::new(config()).unwrap();
            let mut stream = flags.to_be_bytes().to_vec();
            stream.extend(opt(OPT_EXPORT_NAME, b"rootfs"));
            stream.extend_from_slice(&[0x25, 0x60]); // first transmission bytes
            let mut out = Vec::new();
            let s = h.feed(&stream, &mut out);
            assert_eq!(s.consumed, stream.len() - 2);
            let n = go(s);
            assert_eq!(n.no_zeroes, !zeroes);
            assert!(!n.structured_replies);
            let mut expect = (64u64 << 20).to_be_bytes().to_vec();
            expect.extend_from_slice(&0x0d6du16.to_be_bytes());
            if zeroes {
                expect.extend_from_slice(&[0; 124]);
            }
            assert_eq!(out, expect);
            // Nothing more is consumed once finished.
            let s = h.feed(&[1, 2, 3], &mut out);
            assert_eq!(s.consumed, 0);
            assert_eq!(reject(s), RejectReason::Finished);
        }
    }

    #[test]
    fn export_name_empty_selects_default() {
        let mut h = started(config());
        let mut out = Vec::new();
        let n = go(h.feed(&opt(OPT_EXPORT_NAME, b""), &mut out));
        assert_eq!(n.export_name, "rootfs");
        let mut c = config();
        c.default_export = None;
        let mut h = started(c);
        assert!(matches!(
            reject(h.feed(&opt(OPT_EXPORT_NAME, b""), &mut out)),
            RejectReason::UnknownExport { .. }
        ));
    }

    #[test]
    fn h9_list_and_structured_reply_with_data() {
        let mut h = started(config());
        let (_, r) = feed(&mut h, &opt(OPT_LIST, b"xyz"));
        assert_eq!(types(&r), [REP_ERR_INVALID]);
        let (_, r) = feed(&mut h, &opt(OPT_STRUCTURED_REPLY, b"x"));
        assert_eq!(types(&r), [REP_ERR_INVALID]);
        assert!(!h.structured_replies());
    }

    #[test]
    fn structured_reply_twice_is_invalid() {
        let mut h = started(config());
        let (_, r) = feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(types(&r), [REP_ACK]);
        assert_eq!(r[0].option, OPT_STRUCTURED_REPLY);
        let (_, r) = feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(types(&r), [REP_ERR_INVALID]);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert!(n.structured_replies);
        assert!(n.has_flag(TFLAG_SEND_DF));
    }

    #[test]
    fn list_bytes() {
        let mut c = config();
        c.exports.truncate(1);
        let mut h = started(c);
        let mut out = Vec::new();
        h.feed(&opt(OPT_LIST, &[]), &mut out);
        let expect = "0003e889045565a9".to_owned()
            + "00000003"
            + "00000002"
            + "0000000a"
            + "00000006"
            + &hex::encode("rootfs")
            + "0003e889045565a9"
            + "00000003"
            + "00000001"
            + "00000000";
        assert_eq!(hex::encode(out), expect);
    }

    #[test]
    fn list_policy() {
        let mut c = config();
        c.allow_list = false;
        let mut h = started(c);
        let (_, r) = feed(&mut h, &opt(OPT_LIST, &[]));
        assert_eq!(types(&r), [REP_ERR_POLICY]);
    }

    #[test]
    fn h10_meta_context_rules() {
        // SET and LIST before structured replies.
        let mut h = started(config());
        for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
            let (_, r) = feed(
                &mut h,
                &opt(option, &meta_data("rootfs", &[BASE_ALLOCATION])),
            );
            assert_eq!(types(&r), [REP_ERR_INVALID]);
        }
        feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        // Malformed lengths.
        let mut bad_query_len = meta_data("rootfs", &[BASE_ALLOCATION]);
        let at = 4 + 6 + 4 + 3;
        bad_query_len[at] = 200;
        let mut bad_count = meta_data("rootfs", &[BASE_ALLOCATION]);
        bad_count[4 + 6 + 3] = 2;
        let mut trailing = meta_data("rootfs", &[BASE_ALLOCATION]);
        trailing.push(0);
        let mut bad_name_len = meta_data("rootfs", &[]);
        bad_name_len[3] = 99;
        let huge_count = {
            let mut d = meta_data("rootfs", &[]);
            d[4 + 6..4 + 6 + 4].copy_from_slice(&u32::MAX.to_be_bytes());
            d
        };
        for (i, bad) in [
            bad_query_len,
            bad_count,
            trailing,
            bad_name_len,
            huge_count,
            meta_data("rootfs", &["allocation"]),
            meta_data("rootfs", &[":allocation"]),
            vec![0, 0, 0],
        ]
        .into_iter()
        .enumerate()
        {
            for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
                let (s, r) = feed(&mut h, &opt(option, &bad));
                assert_eq!(s.progress, Progress::Continue);
                assert_eq!(types(&r), [REP_ERR_INVALID], "case {i} option {option}");
            }
        }
        // Unknown namespace: ignored, zero contexts, ACK.
        let (_, r) = feed(
            &mut h,
            &opt(
                OPT_SET_META_CONTEXT,
                &meta_data("rootfs", &["qemu:dirty-bitmap:x", "x-thaw:foo"]),
            ),
        );
        assert_eq!(types(&r), [REP_ACK]);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, None);
    }

    #[test]
    fn set_meta_context_selects_base_allocation() {
        let mut h = started(config());
        feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        let mut out = Vec::new();
        h.feed(
            &opt(
                OPT_SET_META_CONTEXT,
                &meta_data("rootfs", &[BASE_ALLOCATION, "base:allocation"]),
            ),
            &mut out,
        );
        let expect = "0003e889045565a9".to_owned()
            + "0000000a"
            + "00000004"
            + "00000013"
            + "00000001"
            + &hex::encode("base:allocation")
            + "0003e889045565a9"
            + "0000000a"
            + "00000001"
            + "00000000";
        assert_eq!(hex::encode(&out), expect);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[test]
    fn meta_context_binds_to_export_and_resets() {
        let sr = opt(OPT_STRUCTURED_REPLY, &[]);
        let set = |name: &str, q: &[&str]| opt(OPT_SET_META_CONTEXT, &meta_data(name, q));
        // Selected for "" (the default export, rootfs), used by GO rootfs.
        let mut h = started(config());
        feed(&mut h, &sr);
        let (_, r) = feed(&mut h, &set("", &[BASE_ALLOCATION]));
        assert_eq!(types(&r), [REP_META_CONTEXT, REP_ACK]);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, Some(1));
        // Selected for rootfs, then GO memfile: not active.
        let mut h = started(config());
        feed(&mut h, &sr);
        feed(&mut h, &set("rootfs", &[BASE_ALLOCATION]));
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("memfile", &[]))).0);
        assert_eq!(n.base_allocation, None);
        // A later SET with no queries clears the selection.
        let mut h = started(config());
        feed(&mut h, &sr);
        feed(&mut h, &set("rootfs", &[BASE_ALLOCATION]));
        let (_, r) = feed(&mut h, &set("rootfs", &[]));
        assert_eq!(types(&r), [REP_ACK]);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, None);
        // A later invalid SET clears it too.
        let mut h = started(config());
        feed(&mut h, &sr);
        feed(&mut h, &set("rootfs", &[BASE_ALLOCATION]));
        let (_, r) = feed(&mut h, &set("rootfs", &["nonamespace"]));
        assert_eq!(types(&r), [REP_ERR_INVALID]);
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, None);
        // Unknown export; export without the context.
        let mut h = started(config());
        feed(&mut h, &sr);
        let (_, r) = feed(&mut h, &set("nope", &[BASE_ALLOCATION]));
        assert_eq!(types(&r), [REP_ERR_UNKNOWN]);
        let (_, r) = feed(&mut h, &set("memfile", &[BASE_ALLOCATION]));
        assert_eq!(types(&r), [REP_ACK]);
        // EXPORT_NAME keeps a selection made for the same export.
        let mut h = started(config());
        feed(&mut h, &sr);
        feed(&mut h, &set("rootfs", &[BASE_ALLOCATION]));
        let n = go(h.feed(&opt(OPT_EXPORT_NAME, b"rootfs"), &mut Vec::new()));
        assert_eq!(n.base_allocation, Some(1));
        assert!(n.has_flag(TFLAG_SEND_DF));
    }

    #[test]
    fn list_meta_context() {
        let mut h = started(config());
        feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        for queries in [&[][..], &["base:"][..], &[BASE_ALLOCATION][..]] {
            let (_, r) = feed(
                &mut h,
                &opt(OPT_LIST_META_CONTEXT, &meta_data("rootfs", queries)),
            );
            assert_eq!(types(&r), [REP_META_CONTEXT, REP_ACK], "{queries:?}");
            let mut expect = 0u32.to_be_bytes().to_vec();
            expect.extend_from_slice(BASE_ALLOCATION.as_bytes());
            assert_eq!(r[0].data, expect);
        }
        let (_, r) = feed(
            &mut h,
            &opt(OPT_LIST_META_CONTEXT, &meta_data("rootfs", &["base:other"])),
        );
        assert_eq!(types(&r), [REP_ACK]);
        // LIST does not change the selection.
        let n = go(feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[]))).0);
        assert_eq!(n.base_allocation, None);
        // SET with "base:" alone selects nothing.
        let mut h = started(config());
        feed(&mut h, &opt(OPT_STRUCTURED_REPLY, &[]));
        let (_, r) = feed(
            &mut h,
            &opt(OPT_SET_META_CONTEXT, &meta_data("rootfs", &["base:"])),
        );
        assert_eq!(types(&r), [REP_ACK]);
    }

    #[test]
    fn h11_starttls_and_extended_headers() {
        let mut h = started(config());
        let (_, r) = feed(&mut h, &opt(OPT_STARTTLS, &[]));
        assert_eq!(types(&r), [REP_ERR_POLICY]);
        let (_, r) = feed(&mut h, &opt(OPT_EXTENDED_HEADERS, &[]));
        assert_eq!(types(&r), [REP_ERR_UNSUP]);
        let (s, _) = feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[])));
        assert!(matches!(s.progress, Progress::Go(_)));
    }

    #[test]
    fn h12_abort_with_data() {
        let mut h = started(config());
        let mut stream = opt(OPT_ABORT, b"ignored data");
        stream.extend(opt(OPT_LIST, &[]));
        let (s, r) = feed(&mut h, &stream);
        assert_eq!(s.progress, Progress::Abort);
        assert_eq!(s.consumed, 16 + 12);
        assert_eq!(
            r,
            [Reply {
                option: OPT_ABORT,
                rtype: REP_ACK,
                data: vec![]
            }]
        );
    }

    #[test]
    fn h13_eof_at_every_offset() {
        let mut stream = 3u32.to_be_bytes().to_vec();
        stream.extend(opt(42, &[1; 10]));
        stream.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        stream.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data("rootfs", &[BASE_ALLOCATION]),
        ));
        stream.extend(opt(OPT_GO, &info_data("rootfs", &[INFO_BLOCK_SIZE])));
        for cut in 0..stream.len() {
            let mut h = ServerHandshake::new(config()).unwrap();
            let mut out = Vec::new();
            let s = h.feed(&stream[..cut], &mut out);
            assert_eq!(
                (s.consumed, s.progress),
                (cut, Progress::Continue),
                "cut {cut}"
            );
            assert!(h.wants() > 0);
            replies(&out);
            // The rest completes the handshake exactly.
            let s = h.feed(&stream[cut..], &mut out);
            assert_eq!(s.consumed, stream.len() - cut);
            assert_eq!(go(s).base_allocation, Some(1));
        }
    }

    #[test]
    fn h15_info_then_go_same_answers() {
        let reqs = [INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 77];
        let mut h = started(config());
        let (s, info) = feed(&mut h, &opt(OPT_INFO, &info_data("rootfs", &reqs)));
        assert_eq!(s.progress, Progress::Continue);
        let (s, gor) = feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &reqs)));
        let n = go(s);
        assert_eq!(info.len(), gor.len());
        for (a, b) in info.iter().zip(&gor) {
            assert_eq!((a.rtype, &a.data), (b.rtype, &b.data));
        }
        assert_eq!(
            types(&gor),
            [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
        );
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"rootfs");
        let mut desc = INFO_DESCRIPTION.to_be_bytes().to_vec();
        desc.extend_from_slice(b"root filesystem");
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&n.size.to_be_bytes());
        export.extend_from_slice(&n.transmission_flags.to_be_bytes());
        let infos: Vec<&[u8]> = gor[..4].iter().map(|r| &r.data[..]).collect();
        assert!(infos.contains(&&name[..]));
        assert!(infos.contains(&&desc[..]));
        assert!(infos.contains(&&export[..]));
        assert_eq!(n.transmission_flags, 0x0d6d);
    }

    #[test]
    fn h16_block_size_values() {
        let mut h = started(config());
        let (_, r) = feed(
            &mut h,
            &opt(OPT_GO, &info_data("memfile", &[INFO_BLOCK_SIZE])),
        );
        let bs = r
            .iter()
            .find(|r| r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("BLOCK_SIZE sent when requested");
        assert_eq!(bs.data.len(), 14);
        let field =
            |i: usize| u32::from_be_bytes(bs.data[2 + 4 * i..6 + 4 * i].try_into().unwrap());
        let (min, pref, max) = (field(0), field(1), field(2));
        assert!(min.is_power_of_two() && min <= 65536);
        assert!(pref.is_power_of_two() && pref >= 512.max(min));
        assert!(max >= pref);
        assert_eq!((min, pref, max), (1, 4096, 32 << 20));
        // Not requested: not sent; the export info is always there.
        let mut h = started(config());
        let (_, r) = feed(&mut h, &opt(OPT_GO, &info_data("rootfs", &[])));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].data[..2], INFO_EXPORT.to_be_bytes());
    }

    #[test]
    fn go_leaves_transmission_bytes() {
        let mut h = started(config());
        let mut stream = opt(OPT_GO, &info_data("rootfs", &[]));
        let n_opt = stream.len();
        stream.extend_from_slice(&[9; 28]);
        let (s, _) = feed(&mut h, &stream);
        assert_eq!(s.consumed, n_opt);
        go(s);
        assert_eq!(h.wants(), 0);
    }

    #[test]
    fn shutdown_mode() {
        let mut h = started(config());
        h.shutdown();
        for o in [
            opt(OPT_GO, &info_data("rootfs", &[])),
            opt(OPT_INFO, &info_data("rootfs", &[])),
            opt(OPT_LIST, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(42, &[1, 2, 3]),
        ] {
            let (s, r) = feed(&mut h, &o);
            assert_eq!(s.progress, Progress::Continue);
            assert_eq!(types(&r), [REP_ERR_SHUTDOWN]);
        }
        let (s, r) = feed(&mut h, &opt(OPT_ABORT, &[]));
        assert_eq!(s.progress, Progress::Abort);
        assert_eq!(types(&r), [REP_ACK]);

        let mut h = started(config());
        h.shutdown();
        assert_eq!(
            reject(feed(&mut h, &opt(OPT_EXPORT_NAME, b"rootfs")).0),
            RejectReason::ShuttingDown
        );

        // Shutdown arriving while an EXPORT_NAME is half read.
        let mut h = started(config());
        let o = opt(OPT_EXPORT_NAME, b"rootfs");
        feed(&mut h, &o[..18]);
        h.shutdown();
        let mut out = Vec::new();
        assert_eq!(
            reject(h.feed(&o[18..], &mut out)),
            RejectReason::ShuttingDown
        );
        assert!(out.is_empty());

        // Shutdown arriving while a payload is half read.
        let mut h = started(config());
        let o = opt(OPT_GO, &info_data("rootfs", &[]));
        feed(&mut h, &o[..20]);
        h.shutdown();
        let (s, r) = feed(&mut h, &o[20..]);
        assert_eq!(s.progress, Progress::Continue);
        assert_eq!(types(&r), [REP_ERR_SHUTDOWN]);
    }

    #[test]
    fn wants_tracks_the_current_step() {
        let mut h = ServerHandshake::new(config()).unwrap();
        assert_eq!(h.wants(), 4);
        let mut out = Vec::new();
        h.feed(&[0, 0], &mut out);
        assert_eq!(h.wants(), 2);
        h.feed(&[0, 3], &mut out);
        assert_eq!(h.wants(), 16);
        let o = opt(42, &[0; 100]);
        h.feed(&o[..16], &mut out);
        assert_eq!(h.wants(), 100);
        assert_eq!(h.options_seen(), 1);
    }

    #[test]
    fn config_validation() {
        let mut c = config();
        c.exports.push(ExportConfig::new("rootfs", 4096));
        assert_eq!(
            ServerHandshake::new(c).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let mut c = config();
        c.default_export = Some("nope".into());
        assert!(ServerHandshake::new(c).is_err());
        let mut c = config();
        c.limits.max_option_len = 100;
        assert!(ServerHandshake::new(c).is_err());
        let mut c = config();
        c.exports[0].block_size.min = 3;
        assert!(ServerHandshake::new(c).is_err());
        let reason: thaw_codec::CodecError = RejectReason::TooManyOptions.into();
        assert_eq!(reason.kind(), ErrorKind::TooLarge);
    }
}
