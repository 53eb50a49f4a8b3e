//! `FrameTable::parse` on arbitrary bytes never panics; a table that parses writes out bytes that
//! parse back to an equal table, consuming exactly what was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_codec::FrameTable;

fuzz_target!(|data: &[u8]| {
    let Ok((table, used)) = FrameTable::parse(data) else {
        return;
    };
    assert!(used <= data.len(), "consumed {used} of {} bytes", data.len());
    if let Some(first) = table.frames().first() {
        let _ = table.locate(first.start_u);
    }
    let _ = (table.total_u(), table.total_c());
    let mut out = Vec::new();
    table.write(&mut out);
    match FrameTable::parse(&out) {
        Ok((again, used_again)) => {
            assert_eq!(again, table, "table changed across write/parse");
            assert_eq!(used_again, out.len(), "parse did not consume what write wrote");
        }
        Err(e) => panic!("write output does not parse: {e}"),
    }
});
