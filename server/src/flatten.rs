//! The reference reader: resolves a whole build file through its header, the simple and
//! obviously-correct way. It is the test oracle for the real (lazy, cached, parallel) engine.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use anyhow::{Context, bail};
use thaw_codec::{BuildId, FileKind};

use crate::layout::{DataSource, SourceReader, load_header, resolve_source};
use crate::store::Store;

/// Largest device [`read_flat`] materialises in memory.
pub const MAX_FLAT_SIZE: u64 = 16 * 1024 * 1024 * 1024;

/// Reads the whole device of `file` of `build`: every mapping of its header (or of the legacy
/// synthetic header) resolved to zeros or to the referenced build's data, decoding frames as
/// needed (e2b §3.3/§3.4 semantics). Returns exactly `metadata.size` bytes.
pub fn read_flat(store: &dyn Store, build: BuildId, file: FileKind) -> anyhow::Result<Vec<u8>> {
    let loaded = load_header(store, build, file)?
        .with_context(|| format!("{}: build {build} has no {file}", store.url()))?;
    let header = loaded.header;
    let size = header.metadata.size;
    if size > MAX_FLAT_SIZE {
        bail!("device of {size} bytes is larger than read_flat's limit of {MAX_FLAT_SIZE}");
    }
    let mut out = vec![0u8; usize::try_from(size)?];
    let mut sources: HashMap<BuildId, DataSource> = HashMap::new();
    let mut reader = SourceReader::new();
    for (i, m) in header.mappings.iter().enumerate() {
        if m.is_nil() || m.offset >= size {
            continue;
        }
        let end = m.end().min(size);
        let len = end - m.offset;
        let src = match sources.entry(m.build_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(
                resolve_source(store, file, &header, m.build_id)
                    .with_context(|| format!("resolving build {} for mapping #{i}", m.build_id))?,
            ),
        };
        let start = usize::try_from(m.offset)?;
        let stop = usize::try_from(end)?;
        reader
            .read(store, src, m.build_storage_offset, &mut out[start..stop])
            .with_context(|| {
                format!(
                    "mapping #{i} [{}, +{len}) -> build {} offset {}",
                    m.offset, m.build_id, m.build_storage_offset
                )
            })?;
    }
    Ok(out)
}
