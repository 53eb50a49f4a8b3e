//! `Header::parse` on arbitrary bytes never panics; a header that parses serializes to bytes that
//! parse back to an equal header (or serialization fails with an error).
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_codec::Header;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    let _ = header.validate();
    let Ok(bytes) = header.to_bytes() else {
        return;
    };
    match Header::parse(&bytes) {
        Ok(again) => assert_eq!(again, header, "header changed across to_bytes/parse"),
        Err(e) => panic!("to_bytes output does not parse: {e}"),
    }
});
