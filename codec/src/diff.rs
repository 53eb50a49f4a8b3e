//! The child header built at pause from a parent header plus the dirty and empty block sets
//! (e2b `ToDiffHeader`).
//!
//! Dirty blocks go to the new build at packed offsets (the k-th dirty block in device order is at
//! `k * block_size` of the new data file); empty blocks become nil mappings; the result is merged
//! over the parent's mappings (the diff wins), then adjacent runs of the same build are merged
//! when storage-contiguous (nil runs always merge).

use std::ops::Range;

use crate::{BuildId, Header, Result};

/// The blocks a pause changed, in units of `block_size` (4 KiB for rootfs, the page size for
/// memfile). Ranges are block indices, sorted and non-overlapping within each set; a block in
/// both sets counts as dirty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffMetadata {
    /// Block size of the ranges (a multiple of 4096).
    pub block_size: u64,
    /// Blocks with new data, in device order.
    pub dirty: Vec<Range<u64>>,
    /// Blocks that now read as zeros.
    pub empty: Vec<Range<u64>>,
}

impl DiffMetadata {
    /// Number of dirty blocks (= the packed diff's size / block_size).
    pub fn dirty_blocks(&self) -> u64 {
        todo!()
    }
}

/// Builds the child header of `parent` for `new_build`: generation + 1, build id `new_build`,
/// base build id and version copied from the parent, builds section carried over for builds the
/// merged mappings still reference (V4/V5), mappings merged as described in the module docs.
pub fn child_header(parent: &Header, new_build: BuildId, diff: &DiffMetadata) -> Result<Header> {
    let _ = (parent, new_build, diff);
    todo!()
}
