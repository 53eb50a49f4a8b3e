//! Huge declared counts are rejected without a matching allocation: a counting global
//! allocator records the largest single allocation while hostile headers are parsed. One test
//! in this binary, so nothing else allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use thaw_codec::{ErrorKind, Header};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn header(version: u64, size: u64, declared_len: Option<u32>, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [version, 4096, size, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&[0x11; 32]);
    out.push(0);
    let len = declared_len.unwrap_or(u32::try_from(block.len()).unwrap());
    out.extend_from_slice(&len.to_le_bytes());
    let info = lz4_flex::frame::FrameInfo::new()
        .block_size(lz4_flex::frame::BlockSize::Max64KB)
        .block_checksums(true)
        .content_checksum(true);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
    enc.write_all(block).unwrap();
    enc.finish().unwrap()
}

fn le(parts: &[u32]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_counts_allocate_little() {
        let mut build_head = vec![0x22u8; 16];
        build_head.extend_from_slice(&0i64.to_le_bytes());
        build_head.extend_from_slice(&[0; 32]);
        let mut n_frames = build_head.clone();
        n_frames.extend_from_slice(&le(&[1, 1 << 20]));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "body length at the cap",
                header(4, 4096, Some(256 << 20), &le(&[0, 0])),
            ),
            ("numBuilds", header(4, 4096, None, &le(&[65_535, 0, 0]))),
            (
                "nFrames",
                header(4, 4096, None, &[le(&[1]), n_frames].concat()),
            ),
            (
                "numMappings",
                header(4, 4096, None, &le(&[0, 8 << 20, 0, 0])),
            ),
            ("V5 M", header(5, 4096, None, &le(&[0, 65_535, 0]))),
            (
                "V5 N",
                header(5, 1 << 40, None, &le(&[0, 0, 8 << 20, 0, 0])),
            ),
            (
                "V3 records",
                [header(3, 4096, None, &[])[..64].to_vec(), vec![0; 39]].concat(),
            ),
        ];
        // Parsing the small hostile inputs may allocate the LZ4 decoder's block buffers (bounded by
        // the 4 MB maximum block size) but never anything sized by the declared counts.
        const LIMIT: usize = 9 << 20;
        for (name, input) in cases {
            LARGEST.store(0, Ordering::Relaxed);
            let err = Header::parse(&input).unwrap_err();
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::TooLarge | ErrorKind::Truncated | ErrorKind::SizeMismatch
                ),
                "{name}: {err}"
            );
            assert!(largest < LIMIT, "{name}: allocated {largest} bytes");
        }
    }
}
