//! The V3 body (versions 1, 2, 3): 40-byte mapping records back to back until the end of the
//! object, no count.

use std::collections::BTreeMap;

use super::cursor::Cursor;
use super::{Header, MAPPING_RECORD_LEN, MAX_MAPPINGS, Mapping, Metadata, default_mappings};
use crate::{CodecError, Result};

const WHAT: &str = "V3 body";

/// Parses the records after the metadata. A partial trailing record is
/// [`crate::ErrorKind::Truncated`]; more than [`MAX_MAPPINGS`] records is
/// [`crate::ErrorKind::TooLarge`] (checked before allocating).
pub(super) fn parse(metadata: Metadata, body: &[u8]) -> Result<Header> {
    let count = body.len() / MAPPING_RECORD_LEN;
    let partial = body.len() % MAPPING_RECORD_LEN;
    if partial != 0 {
        return Err(CodecError::truncated(
            WHAT,
            MAPPING_RECORD_LEN as u64,
            partial as u64,
        ));
    }
    if count as u64 > u64::from(MAX_MAPPINGS) {
        return Err(CodecError::too_large(
            "V3 record count",
            count as u64,
            u64::from(MAX_MAPPINGS),
        ));
    }
    let mappings = if count == 0 {
        default_mappings(&metadata)?
    } else {
        let mut c = Cursor::new(body, WHAT);
        let mut mappings = Vec::with_capacity(count);
        for _ in 0..count {
            mappings.push(Mapping::read_record(&mut c)?);
        }
        mappings
    };
    Ok(Header {
        metadata,
        incomplete: false,
        builds: BTreeMap::new(),
        mappings,
    })
}

/// Metadata followed by one record per mapping.
pub(super) fn write(header: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(Metadata::LEN + header.mappings.len() * MAPPING_RECORD_LEN);
    header.metadata.write(&mut out);
    for m in &header.mappings {
        m.write_record(&mut out);
    }
    out
}
