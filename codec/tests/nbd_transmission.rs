#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
//! NBD transmission phase: request parsing and validation (the T cases of the reliability
//! catalogue that make sense without sockets) and reply encoders checked against byte vectors
//! written by hand from the spec.

use thaw_codec::ErrorKind;
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::{
    chunk_header, encode_block_status, encode_error_chunk, encode_error_offset_chunk,
    encode_error_reply, encode_option_reply, none_chunk, offset_data_header, offset_hole_chunk,
    simple_reply,
};
use thaw_codec::nbd::{BlockSize, Command, Errno, Extent, Invalid, Negotiated, Request};

const COOKIE: u64 = 0x0102_0304_0506_0708;
const COOKIE_HEX: &str = "0102030405060708";

/// A read-write 64 MiB export, 4 KiB minimum block, everything advertised, structured replies
/// and base:allocation on.
fn rw() -> Negotiated {
    Negotiated {
        export_index: 0,
        export_name: "rootfs".into(),
        size: 64 << 20,
        transmission_flags: TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_DF
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO,
        block_size: BlockSize {
            min: 4096,
            preferred: 4096,
            max: 32 << 20,
        },
        structured_replies: true,
        base_allocation: Some(1),
        no_zeroes: true,
    }
}

/// Read-only, simple replies, no optional features, default block sizes.
fn ro() -> Negotiated {
    Negotiated {
        transmission_flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
        block_size: BlockSize::default(),
        structured_replies: false,
        base_allocation: None,
        ..rw()
    }
}

fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        command,
        cookie: COOKIE,
        offset,
        length,
    }
}

fn errno(r: Result<(), Invalid>) -> (Errno, u32) {
    match r {
        Err(Invalid::Reply { errno, drain, .. }) => (errno, drain),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hand_written_request() {
        let bytes = hex::decode(
            "25609513".to_owned() + "0001" + "0001" + COOKIE_HEX + "0000000000100000" + "00001000",
        )
        .unwrap();
        let r = Request::parse_slice(&bytes).unwrap();
        assert_eq!(r, req(Command::Write, CMD_FLAG_FUA, 1 << 20, 4096));
        assert_eq!(r.payload_len(), 4096);
        assert_eq!(&r.to_bytes()[..], &bytes[..]);
        assert!(r.has_flag(CMD_FLAG_FUA));
        for t in 0..=9u16 {
            assert_eq!(Command::from_u16(t).as_u16(), t);
        }
        assert_eq!(Command::from_u16(9), Command::Unknown(9));
        assert_eq!(req(Command::Read, 0, 0, 9).payload_len(), 0);
    }

    #[test]
    fn t1_bad_magic_and_truncation() {
        let mut b = req(Command::Read, 0, 0, 512).to_bytes();
        b[0] = 0x26;
        assert_eq!(Request::parse(&b).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(
            Request::parse_slice(&b[..27]).unwrap_err().kind(),
            ErrorKind::Truncated
        );
    }

    #[test]
    fn t2_unknown_command() {
        let n = rw();
        assert_eq!(
            errno(req(Command::Unknown(42), 0, 0, 4096).validate(&n)),
            (Errno::Inval, 0)
        );
    }

    #[test]
    fn t3_flags() {
        let n = rw();
        let cases = [
            (Command::Read, 1 << 9),
            (Command::Read, 1 << 5), // PAYLOAD_LEN: extended headers only
            (Command::Write, CMD_FLAG_DF),
            (Command::Read, CMD_FLAG_REQ_ONE),
            (Command::Write, CMD_FLAG_NO_HOLE),
            (Command::Trim, CMD_FLAG_FAST_ZERO),
        ];
        for (cmd, flags) in cases {
            let (e, drain) = errno(req(cmd, flags, 0, 4096).validate(&n));
            assert_eq!(e, Errno::Inval, "{cmd:?} {flags:#x}");
            assert_eq!(drain, req(cmd, flags, 0, 4096).payload_len());
        }
        // Valid combinations.
        for (cmd, flags) in [
            (Command::Read, CMD_FLAG_DF),
            (Command::Read, CMD_FLAG_FUA),
            (Command::Write, CMD_FLAG_FUA),
            (Command::BlockStatus, CMD_FLAG_REQ_ONE),
            (
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            ),
        ] {
            assert_eq!(req(cmd, flags, 0, 4096).validate(&n), Ok(()), "{cmd:?}");
        }
        // DF without structured replies; FUA without SEND_FUA.
        let mut simple = rw();
        simple.structured_replies = false;
        assert_eq!(
            errno(req(Command::Read, CMD_FLAG_DF, 0, 4096).validate(&simple)).0,
            Errno::Inval
        );
        let mut no_fua = rw();
        no_fua.transmission_flags &= !(TFLAG_SEND_FUA | TFLAG_SEND_FAST_ZERO);
        assert_eq!(
            errno(req(Command::Write, CMD_FLAG_FUA, 0, 4096).validate(&no_fua)),
            (Errno::Inval, 4096)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 4096).validate(&no_fua)).0,
            Errno::Inval
        );
    }

    #[test]
    fn t4_range() {
        let n = rw();
        let end = n.size;
        assert_eq!(req(Command::Read, 0, end - 4096, 4096).validate(&n), Ok(()));
        for cmd in [
            Command::Read,
            Command::Trim,
            Command::Cache,
            Command::BlockStatus,
        ] {
            assert_eq!(
                errno(req(cmd, 0, end, 4096).validate(&n)),
                (Errno::Inval, 0)
            );
            assert_eq!(
                errno(req(cmd, 0, u64::MAX - 4095, 8192).validate(&n)),
                (Errno::Inval, 0)
            );
        }
        assert_eq!(
            errno(req(Command::Write, 0, end - 4096, 8192).validate(&n)),
            (Errno::NoSpc, 8192)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, 0, u64::MAX - 4095, 8192).validate(&n)),
            (Errno::NoSpc, 0)
        );
    }

    #[test]
    fn t5_alignment() {
        let n = rw();
        assert_eq!(
            errno(req(Command::Read, 0, 512, 4096).validate(&n)).0,
            Errno::Inval
        );
        assert_eq!(
            errno(req(Command::Write, 0, 0, 4000).validate(&n)),
            (Errno::Inval, 4000)
        );
        assert_eq!(
            errno(req(Command::Trim, 0, 1, 4096).validate(&n)).0,
            Errno::Inval
        );
        // Default minimum of 1: anything goes.
        assert_eq!(req(Command::Read, 0, 3, 7).validate(&ro()), Ok(()));
    }

    #[test]
    fn t6_zero_length() {
        let n = rw();
        assert_eq!(req(Command::Read, 0, 0, 0).validate(&n), Ok(()));
        assert_eq!(req(Command::Write, 0, n.size, 0).validate(&n), Ok(()));
        assert_eq!(
            errno(req(Command::BlockStatus, 0, 0, 0).validate(&n)).0,
            Errno::Inval
        );
    }

    #[test]
    fn t7_t9_payload_caps() {
        let n = rw();
        let max = n.block_size.max;
        assert_eq!(req(Command::Read, 0, 0, max).validate(&n), Ok(()));
        assert_eq!(
            errno(req(Command::Read, 0, 0, max + 4096).validate(&n)),
            (Errno::Inval, 0)
        );
        assert_eq!(
            errno(req(Command::Read, CMD_FLAG_DF, 0, max + 4096).validate(&n)),
            (Errno::Overflow, 0)
        );
        assert_eq!(
            errno(req(Command::Write, 0, 0, max + 4096).validate(&n)),
            (Errno::Inval, max + 4096)
        );
        assert_eq!(
            errno(req(Command::Write, 0, 0, 2 * max).validate(&n)),
            (Errno::Inval, 2 * max)
        );
        assert!(matches!(
            req(Command::Write, 0, 0, 2 * max + 4096).validate(&n),
            Err(Invalid::Disconnect { .. })
        ));
        assert!(matches!(
            req(Command::Write, 0, 0, u32::MAX).validate(&ro()),
            Err(Invalid::Disconnect { .. })
        ));
        // Trim, zero and block status are not limited by the maximum payload.
        assert_eq!(req(Command::Trim, 0, 0, 48 << 20).validate(&n), Ok(()));
        assert_eq!(
            req(Command::BlockStatus, 0, 0, 48 << 20).validate(&n),
            Ok(())
        );
    }

    #[test]
    fn t8_read_only() {
        let n = ro();
        assert_eq!(
            errno(req(Command::Write, 0, 0, 4096).validate(&n)),
            (Errno::Perm, 4096)
        );
        assert_eq!(
            errno(req(Command::Trim, 0, 0, 4096).validate(&n)),
            (Errno::Perm, 0)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, 0, 0, 4096).validate(&n)),
            (Errno::Perm, 0)
        );
        assert_eq!(req(Command::Read, 0, 0, 4096).validate(&n), Ok(()));
    }

    #[test]
    fn t10_flush() {
        let n = rw();
        assert_eq!(req(Command::Flush, 0, 0, 0).validate(&n), Ok(()));
        assert_eq!(req(Command::Flush, CMD_FLAG_FUA, 0, 0).validate(&n), Ok(()));
        assert_eq!(
            errno(req(Command::Flush, 0, 4096, 0).validate(&n)).0,
            Errno::Inval
        );
        assert_eq!(
            errno(req(Command::Flush, 0, 0, 4096).validate(&n)).0,
            Errno::Inval
        );
        assert_eq!(
            errno(req(Command::Flush, 0, 0, 0).validate(&ro())).0,
            Errno::Inval
        );
    }

    #[test]
    fn t11_block_status_needs_context() {
        let mut n = rw();
        assert_eq!(req(Command::BlockStatus, 0, 0, 4096).validate(&n), Ok(()));
        n.base_allocation = None;
        assert_eq!(
            errno(req(Command::BlockStatus, 0, 0, 4096).validate(&n)).0,
            Errno::Inval
        );
        for cmd in [Command::Trim, Command::WriteZeroes, Command::Cache] {
            let mut plain = ro();
            plain.transmission_flags = TFLAG_HAS_FLAGS;
            assert_eq!(errno(req(cmd, 0, 0, 4096).validate(&plain)).0, Errno::Inval);
        }
    }

    #[test]
    fn disc_always_accepted() {
        assert_eq!(
            req(Command::Disc, 0xffff, u64::MAX, u32::MAX).validate(&ro()),
            Ok(())
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(Errno::from_linux(30, 0), Errno::Perm);
        assert_eq!(Errno::from_linux(1, 0), Errno::Perm);
        assert_eq!(Errno::from_linux(122, 0), Errno::NoSpc);
        assert_eq!(Errno::from_linux(27, 0), Errno::NoSpc);
        assert_eq!(Errno::from_linux(75, 0), Errno::Inval);
        assert_eq!(Errno::from_linux(75, CMD_FLAG_DF), Errno::Overflow);
        assert_eq!(Errno::from_linux(95, 0), Errno::Inval);
        assert_eq!(Errno::from_linux(95, CMD_FLAG_FAST_ZERO), Errno::NotSup);
        assert_eq!(Errno::from_linux(12, 0), Errno::NoMem);
        assert_eq!(Errno::from_linux(108, 0), Errno::Shutdown);
        assert_eq!(Errno::from_linux(110, 0), Errno::Io);
        assert_eq!(Errno::from_linux(-5, 0), Errno::Io);
        for (e, code) in [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ] {
            assert_eq!(e.code(), code);
            assert_eq!(Errno::from_code(code), Some(e));
        }
        assert_eq!(Errno::from_code(2), None);
    }

    #[test]
    fn simple_reply_bytes() {
        assert_eq!(
            hex::encode(simple_reply(COOKIE, NBD_EINVAL)),
            "67446698".to_owned() + "00000016" + COOKIE_HEX
        );
    }

    #[test]
    fn chunk_bytes() {
        assert_eq!(
            hex::encode(none_chunk(COOKIE)),
            "668e33ef".to_owned() + "0001" + "0000" + COOKIE_HEX + "00000000"
        );
        assert_eq!(
            hex::encode(chunk_header(0, REPLY_TYPE_BLOCK_STATUS, COOKIE, 12)),
            "668e33ef".to_owned() + "0000" + "0005" + COOKIE_HEX + "0000000c"
        );
        assert_eq!(
            hex::encode(offset_data_header(COOKIE, 0x1000, 512, true).unwrap()),
            "668e33ef".to_owned() + "0001" + "0001" + COOKIE_HEX + "00000208" + "0000000000001000"
        );
        assert_eq!(
            hex::encode(offset_hole_chunk(COOKIE, 0x2000, 0x10000, false).unwrap()),
            "668e33ef".to_owned()
                + "0000"
                + "0002"
                + COOKIE_HEX
                + "0000000c"
                + "0000000000002000"
                + "00010000"
        );
        assert!(offset_data_header(COOKIE, 0, 0, true).is_err());
        assert!(offset_data_header(COOKIE, 0, u32::MAX - 7, true).is_err());
        assert!(offset_data_header(COOKIE, 0, u32::MAX - 8, true).is_ok());
        assert!(offset_hole_chunk(COOKIE, 0, 0, true).is_err());
    }

    #[test]
    fn error_chunk_bytes() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, COOKIE, NBD_EIO, "bad", true);
        assert_eq!(
            hex::encode(&out),
            "668e33ef".to_owned()
                + "0001"
                + "8001"
                + COOKIE_HEX
                + "00000009"
                + "00000005"
                + "0003"
                + "626164"
        );
        out.clear();
        encode_error_offset_chunk(&mut out, COOKIE, NBD_EIO, "", 0x3000, false);
        assert_eq!(
            hex::encode(&out),
            "668e33ef".to_owned()
                + "0000"
                + "8002"
                + COOKIE_HEX
                + "0000000e"
                + "00000005"
                + "0000"
                + "0000000000003000"
        );
        // Long messages are cut to 4096 bytes on a character boundary.
        out.clear();
        let long = "é".repeat(3000);
        encode_error_chunk(&mut out, COOKIE, NBD_EIO, &long, true);
        let msg_len = usize::from(u16::from_be_bytes([out[24], out[25]]));
        assert_eq!(msg_len, 4096);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
        assert_eq!(out.len(), 26 + 4096);
    }

    #[test]
    fn block_status_bytes() {
        let mut out = Vec::new();
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 0,
                flags: 9,
            },
            Extent {
                length: 1 << 40,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let covered =
            encode_block_status(&mut out, COOKIE, 1, 1 << 20, &extents, false, true).unwrap();
        assert_eq!(covered, 1 << 20);
        assert_eq!(
            hex::encode(&out),
            "668e33ef".to_owned()
                + "0001"
                + "0005"
                + COOKIE_HEX
                + "00000014"
                + "00000001"
                + "00002000"
                + "00000000"
                + "000fe000"
                + "00000003"
        );
        out.clear();
        let covered =
            encode_block_status(&mut out, COOKIE, 1, 1 << 20, &extents[3..], true, true).unwrap();
        assert_eq!(covered, 1 << 20);
        assert_eq!(out.len(), 20 + 4 + 8);
        out.clear();
        let covered =
            encode_block_status(&mut out, COOKIE, 7, 1 << 20, &extents, true, false).unwrap();
        assert_eq!(covered, 8192);
        assert_eq!(
            &out[20..],
            &hex::decode("000000070000200000000000").unwrap()[..]
        );
        out.clear();
        assert!(encode_block_status(&mut out, COOKIE, 1, 0, &extents, false, true).is_err());
        assert!(
            encode_block_status(&mut out, COOKIE, 1, 4096, &extents[2..3], false, true).is_err()
        );
        assert!(out.is_empty());
        // Long alternating lists stop at the per-chunk cap.
        let many: Vec<Extent> = (0..5000)
            .map(|i| Extent {
                length: 512,
                flags: i % 2,
            })
            .collect();
        let covered =
            encode_block_status(&mut out, COOKIE, 1, u32::MAX, &many, false, true).unwrap();
        assert_eq!(covered, 1024 * 512);
        assert_eq!(out.len(), 24 + 8 * 1024);
    }

    #[test]
    fn error_reply_form() {
        let n = rw();
        let mut out = Vec::new();
        encode_error_reply(&mut out, &n, &req(Command::Read, 0, 0, 1), NBD_EINVAL, "x");
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(out[5], 1, "DONE");
        out.clear();
        encode_error_reply(&mut out, &n, &req(Command::Write, 0, 0, 1), NBD_EINVAL, "x");
        assert_eq!(out, simple_reply(COOKIE, NBD_EINVAL));
        out.clear();
        encode_error_reply(&mut out, &ro(), &req(Command::Read, 0, 0, 1), NBD_EIO, "x");
        assert_eq!(out, simple_reply(COOKIE, NBD_EIO));
    }

    #[test]
    fn option_reply_bytes() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"no").unwrap();
        assert_eq!(
            hex::encode(&out),
            "0003e889045565a9".to_owned() + "00000007" + "80000006" + "00000002" + "6e6f"
        );
    }
}
