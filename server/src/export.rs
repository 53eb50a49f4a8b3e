//! Export at pause: the blocks a guest changed become a new layer (e2b's pause upload, reference
//! §6.3, §7.5, §8).
//!
//! The input is the parent build's header plus a [`ChangeSet`]: the dirty blocks (new data, read
//! from wherever the guest's bytes live: the NBD overlay file, the UFFD handler's memory) and the
//! zero blocks (they now read as zeros). The output is a new build in a store:
//!
//! 1. the child header, built by [`thaw_codec::diff::child_header`] with e2b's merge rules (dirty
//!    blocks go to the new build at packed offsets in device order, zero blocks become nil, the
//!    rest keeps the parent's mapping, adjacent storage-contiguous runs of one build merge);
//! 2. the packed diff (the dirty blocks in device order), streamed block run by block run from the
//!    source into [`store_build_file`], which frames and compresses it in parallel, computes the
//!    SHA-256 of the uncompressed diff on the fly, writes the data object and only then the
//!    header (V4/V5: self entry plus ancestor entries with trimmed frame tables).
//!
//! **Crash safety.** The parent is never written. The header is the last object written, so an
//! export interrupted at any point leaves either nothing readable under the new build id or a
//! data object without a header (which no reader opens). **Idempotence.** Exporting the same
//! change set again under the same new build id finds the stored header and compares it with the
//! header it would write (mappings, and the SHA-256 of the packed diff in the self entry): equal
//! is success without writing anything, different is an error (a build id is never reused for
//! other contents).

use std::io::{self, Read};
use std::ops::Range;

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{BuildId, FileKind, Header};

use crate::layout::{read_stored_header, self_entry};
use crate::nbd::Overlay;
use crate::store::Store;
use crate::writer::{StoredFile, WriteOptions, store_build_file};

/// Where the bytes of dirty blocks come from.
pub trait BlockSource {
    /// Reads `buf.len()` bytes at device offset `offset` (whole blocks of dirty runs).
    ///
    /// # Errors
    /// Whatever the source fails with; the export fails and stores no header.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl BlockSource for Overlay {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Overlay::read_at(self, offset, buf)
    }
}

/// The blocks a session changed, in units of `block_size` (sorted, non-overlapping runs; a
/// block in both sets counts as dirty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeSet {
    /// Block size of the runs: 4 KiB for a rootfs, the guest page size for a memfile.
    pub block_size: u64,
    /// Blocks with new data.
    pub dirty: Vec<Range<u64>>,
    /// Blocks that read as zeros now.
    pub zero: Vec<Range<u64>>,
}

impl ChangeSet {
    /// The overlay's current sets. The caller keeps writes out while the export runs (the
    /// export checks [`Overlay::generation`] before and after, and fails if a write slipped in).
    pub fn of_overlay(overlay: &Overlay) -> Self {
        let dirty = overlay.dirty_blocks();
        // A block is dirty or zero, never both, in the overlay; keep the sets disjoint anyway.
        let zero = overlay.zero_blocks();
        Self {
            block_size: overlay.block_size(),
            dirty,
            zero,
        }
    }

    /// Number of dirty blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.iter().map(|r| r.end - r.start).sum()
    }

    /// Bytes of the packed diff.
    pub fn diff_len(&self) -> u64 {
        self.dirty_blocks() * self.block_size
    }

    fn diff_metadata(&self) -> DiffMetadata {
        DiffMetadata {
            block_size: self.block_size,
            dirty: self.dirty.clone(),
            empty: self.zero.clone(),
        }
    }
}

/// What [`export_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exported {
    /// The new layer was stored.
    Stored(StoredFile),
    /// The store already held exactly this layer under the new build id (a repeated request).
    AlreadyStored(Header),
}

impl Exported {
    /// The header of the new layer, as stored.
    pub fn header(&self) -> &Header {
        match self {
            Self::Stored(s) => &s.header,
            Self::AlreadyStored(h) => h,
        }
    }
}

/// Stores `changes` over `parent` as build `new_build`'s `file` in `store`. See the module docs
/// for the order of writes, crash safety and idempotence.
///
/// # Errors
/// Invalid change sets (blocks past the device, a block size that differs from the parent's),
/// a `new_build` already holding other contents, source read errors and store errors; the error
/// names the build, the file and the step.
pub fn export_layer(
    store: &dyn Store,
    file: FileKind,
    parent: &Header,
    new_build: BuildId,
    changes: &ChangeSet,
    source: &dyn BlockSource,
    opts: &WriteOptions,
) -> anyhow::Result<Exported> {
    let what = || {
        format!(
            "exporting {file} of build {new_build} over {}",
            parent.metadata.build_id
        )
    };
    ensure!(
        changes.block_size == parent.metadata.block_size,
        "{}: the change set's block size {} differs from the parent header's {}",
        what(),
        changes.block_size,
        parent.metadata.block_size
    );
    let child = child_header(parent, new_build, &changes.diff_metadata())
        .with_context(|| format!("{}: building the child header", what()))?;
    let diff_len = changes.diff_len();

    if let Some(stored) = read_stored_header(store, new_build, file)
        .with_context(|| format!("{}: looking for an earlier export", what()))?
    {
        let sha = diff_sha256(changes, source)
            .with_context(|| format!("{}: hashing the diff", what()))?;
        return match same_layer(&stored, &child, diff_len, &sha) {
            Ok(()) => {
                tracing::info!(build = %new_build, %file, "export: the layer is already stored");
                Ok(Exported::AlreadyStored(stored))
            }
            Err(why) => bail!(
                "{}: {} already holds a different layer ({why}); build ids are never reused",
                what(),
                store.url()
            ),
        };
    }

    let mut reader = PackedDiff::new(changes, source);
    let stored = store_build_file(store, file, &child, &mut reader, diff_len, opts)
        .with_context(|| format!("{}: storing the layer", what()))?;
    Ok(Exported::Stored(stored))
}

/// [`export_layer`] of an NBD export's overlay over its parent build. The caller keeps writes
/// out while it runs (new writes wait or are refused); a write that slips in anyway fails the
/// export before anything readable is stored (the header is written last, after the check).
///
/// # Errors
/// As [`export_layer`]; a write during the export.
pub fn export_overlay(
    store: &dyn Store,
    file: FileKind,
    parent: &Header,
    new_build: BuildId,
    overlay: &Overlay,
    opts: &WriteOptions,
) -> anyhow::Result<Exported> {
    let (changes, source) = OverlaySnapshot::take(overlay)
        .with_context(|| format!("exporting {file} of build {new_build}"))?;
    export_layer(store, file, parent, new_build, &changes, &source, opts)
}

/// An overlay's change set and a [`BlockSource`] over it that fails every read once the overlay
/// has changed since the set was taken. The last read of the packed diff happens before the
/// header is written, so a diff that mixes two states never gets a header.
#[derive(Debug)]
pub struct OverlaySnapshot<'a> {
    overlay: &'a Overlay,
    generation: u64,
}

impl<'a> OverlaySnapshot<'a> {
    /// The overlay's change set, taken after the mutations in progress finished.
    ///
    /// # Errors
    /// A write changed the overlay while its block sets were read.
    pub fn take(overlay: &'a Overlay) -> anyhow::Result<(ChangeSet, Self)> {
        let generation = overlay.settled_generation();
        let changes = ChangeSet::of_overlay(overlay);
        ensure!(
            overlay.generation() == generation,
            "the overlay changed while its block sets were read (a write was not held back)"
        );
        Ok((
            changes,
            Self {
                overlay,
                generation,
            },
        ))
    }
}

impl BlockSource for OverlaySnapshot<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.overlay.read_at(offset, buf)?;
        if self.overlay.generation() != self.generation {
            return Err(io::Error::other(
                "the overlay changed during the export (a write was not held back)",
            ));
        }
        Ok(())
    }
}

/// Whether `stored` is the layer `child` describes (same mappings and sizes; for V4/V5 the same
/// diff checksum and size in the self entry).
fn same_layer(
    stored: &Header,
    child: &Header,
    diff_len: u64,
    sha: &[u8; 32],
) -> Result<(), String> {
    if stored.mappings != child.mappings {
        return Err("its mappings differ".into());
    }
    if stored.metadata.size != child.metadata.size
        || stored.metadata.block_size != child.metadata.block_size
        || stored.metadata.generation != child.metadata.generation
        || stored.metadata.base_build_id != child.metadata.base_build_id
    {
        return Err("its metadata differs".into());
    }
    if let Some(own) = self_entry(stored) {
        if own.size != diff_len {
            return Err(format!("its diff has {} bytes, not {diff_len}", own.size));
        }
        if &own.checksum != sha {
            return Err("its diff checksum differs".into());
        }
    }
    Ok(())
}

/// SHA-256 of the packed diff of `changes`, read from `source`.
fn diff_sha256(changes: &ChangeSet, source: &dyn BlockSource) -> anyhow::Result<[u8; 32]> {
    let mut reader = PackedDiff::new(changes, source);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// The packed diff as a [`Read`]: the dirty runs in device order, read from the source in pieces
/// of at most the caller's buffer (never the whole diff in memory).
struct PackedDiff<'a> {
    source: &'a dyn BlockSource,
    runs: std::vec::IntoIter<Range<u64>>,
    /// Byte range of the device still to read in the current run.
    current: Range<u64>,
}

impl<'a> PackedDiff<'a> {
    fn new(changes: &ChangeSet, source: &'a dyn BlockSource) -> Self {
        let bs = changes.block_size;
        let runs: Vec<Range<u64>> = changes
            .dirty
            .iter()
            .map(|r| r.start * bs..r.end * bs)
            .collect();
        Self {
            source,
            runs: runs.into_iter(),
            current: 0..0,
        }
    }
}

impl Read for PackedDiff<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.runs.next() {
                Some(r) => self.current = r,
                None => return Ok(0),
            }
        }
        let left = self.current.end - self.current.start;
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        self.source.read_at(self.current.start, &mut buf[..n])?;
        self.current.start += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern;
    impl BlockSource for Pattern {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) / 4096).to_le_bytes()[0];
            }
            Ok(())
        }
    }

    #[test]
    fn the_packed_diff_is_the_dirty_runs_in_device_order() {
        let changes = ChangeSet {
            block_size: 4096,
            dirty: vec![1..3, 7..8],
            zero: std::iter::once(4..5).collect(),
        };
        let mut out = Vec::new();
        let mut r = PackedDiff::new(&changes, &Pattern);
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
        }
        assert_eq!(out.len() as u64, changes.diff_len());
        let blocks: Vec<u8> = out.chunks(4096).map(|c| c[0]).collect();
        assert_eq!(blocks, vec![1, 2, 7]);
        assert!(out.chunks(4096).all(|c| c.iter().all(|&b| b == c[0])));
    }
}
