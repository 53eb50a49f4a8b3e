//! Frame decoding never panics on any input; our own frames round-trip; a truncated frame is
//! always an error; a damaged frame never decodes to other bytes than the original without an
//! error being possible to tell apart (it is either rejected or, for `none`, copied as is).
//!
//! Input layout: byte 0 picks the mode (bits 6-7), the codec and zstd level (bits 0-5);
//! bytes 1-2 a destination size (LE u16), bytes 3-4 an edit position (LE u16), byte 5 an edit
//! value; the rest is the payload.
//! - mode 0: decode the payload as a frame into a buffer of the chosen size;
//! - mode 1: encode the payload, XOR one byte of the frame with the edit value, decode;
//! - mode 2: encode the payload, cut the frame at the edit position, decode: must fail;
//! - mode 3: encode the payload, decode: must round-trip; into a longer buffer: must fail.
//!
//! Encoders and the decoder are reused across inputs (as in production), which also exercises
//! context reuse after errors.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use thaw_codec::{CompressionType, FrameDecoder, FrameEncoder};

thread_local! {
    static DECODER: RefCell<FrameDecoder> = RefCell::new(FrameDecoder::new());
    // Index: codec * 3 + level - 1.
    static ENCODERS: RefCell<Vec<Option<FrameEncoder>>> = RefCell::new((0..9).map(|_| None).collect());
}

fn encode(compression: CompressionType, level: i32, idx: usize, payload: &[u8]) -> Vec<u8> {
    ENCODERS.with(|encs| {
        let mut encs = encs.borrow_mut();
        let enc = encs[idx]
            .get_or_insert_with(|| FrameEncoder::new(compression, level).expect("valid level"));
        let mut out = Vec::new();
        let n = enc.encode(payload, &mut out).expect("encode");
        assert_eq!(n, out.len());
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let [sel, lo, hi, plo, phi, edit, payload @ ..] = data else {
        return;
    };
    let codec_sel = (sel & 0x3F) % 9;
    let compression = match codec_sel / 3 {
        0 => CompressionType::None,
        1 => CompressionType::Zstd,
        _ => CompressionType::Lz4,
    };
    let level = i32::from(codec_sel % 3) + 1;
    let idx = usize::from(codec_sel);
    let dst_len = usize::from(u16::from_le_bytes([*lo, *hi]));
    let pos = usize::from(u16::from_le_bytes([*plo, *phi]));

    DECODER.with(|dec| {
        let mut dec = dec.borrow_mut();
        match sel >> 6 {
            0 => {
                let mut dst = vec![0u8; dst_len];
                if dec.decode(compression, payload, &mut dst).is_ok()
                    && compression == CompressionType::None
                {
                    assert_eq!(&dst[..], payload);
                }
            }
            1 => {
                let mut frame = encode(compression, level, idx, payload);
                if frame.is_empty() {
                    return;
                }
                let at = pos % frame.len();
                frame[at] ^= *edit;
                let mut out = vec![0u8; payload.len()];
                let res = dec.decode(compression, &frame, &mut out);
                if *edit == 0 {
                    res.expect("an undamaged frame decodes");
                    assert_eq!(&out[..], payload);
                }
            }
            2 => {
                let frame = encode(compression, level, idx, payload);
                if frame.is_empty() {
                    return;
                }
                let cut = pos % frame.len();
                let mut out = vec![0u8; payload.len()];
                assert!(
                    dec.decode(compression, &frame[..cut], &mut out).is_err(),
                    "a frame cut at {cut} of {} decoded",
                    frame.len()
                );
            }
            _ => {
                let frame = encode(compression, level, idx, payload);
                let mut out = vec![0u8; payload.len()];
                dec.decode(compression, &frame, &mut out)
                    .expect("decode of our own frame");
                assert_eq!(&out[..], payload, "round trip differs");
                let mut longer = vec![0u8; payload.len() + 1];
                assert!(dec.decode(compression, &frame, &mut longer).is_err());
            }
        }
    });
});
