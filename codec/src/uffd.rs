//! Firecracker's UFFD region JSON (`Vec<GuestRegionUffdMapping>`) and its validation.
//!
//! Firecracker sends this array in the same `sendmsg` as the userfaultfd. Each element is
//! `{base_host_virt_addr, size, offset, page_size, page_size_kib}`:
//! - `offset` is the region's offset in the memory file;
//! - `page_size` is in bytes; the deprecated `page_size_kib` holds the *same value in bytes*
//!   despite its name. Older Firecracker versions send only `page_size_kib`, and the oldest send
//!   neither (then the page size is 4 KiB). Both are accepted; if both are present they must agree.
//!
//! [`RegionMap::parse`] validates everything before the handler touches memory: page size 4 KiB
//! or 2 MiB and the same in every region, page-aligned addresses, sizes and offsets, no overlap in
//! host addresses or in file offsets, every region inside the memory file, and the regions covering
//! the memory file exactly. Errors carry the whole mapping so a log line is enough to diagnose.

use std::fmt;

use serde::Deserialize;

use crate::{CodecError, ErrorKind, HUGEPAGE_SIZE, PAGE_SIZE};

/// The largest region JSON accepted (Firecracker sends a few hundred bytes; e2b reads ≤ 1024).
pub const MAX_JSON_LEN: usize = 64 * 1024;

/// The most regions accepted (Firecracker has a handful: one per guest memory slot).
pub const MAX_REGIONS: usize = 1024;

const WHAT: &str = "UFFD regions";

/// One guest memory region as Firecracker describes it, with the page size resolved to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UffdRegion {
    /// Host virtual address of the region's first byte in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Region length in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub offset: u64,
    /// Page size in bytes (4096 or 2 MiB).
    pub page_size: u64,
}

impl UffdRegion {
    /// One past the last host address of the region (callers check overflow via validation).
    pub fn end_addr(&self) -> u64 {
        self.base_host_virt_addr.saturating_add(self.size)
    }

    /// Whether `addr` lies inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr < self.end_addr()
    }
}

impl fmt::Display for UffdRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}..{:#x} -> file {:#x}, page {}]",
            self.base_host_virt_addr,
            self.end_addr(),
            self.offset,
            self.page_size
        )
    }
}

/// The wire form: every field Firecracker may send. Unknown fields are ignored (forward
/// compatibility with newer Firecracker versions).
#[derive(Debug, Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    /// Deprecated and misnamed: bytes, not KiB.
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// A validated set of regions, sorted by host address, all with one page size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionMap {
    regions: Vec<UffdRegion>,
    page_size: u64,
}

/// Formats a list of regions as one line (used in every error).
struct Mapping<'a>(&'a [UffdRegion]);

impl fmt::Display for Mapping<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mapping ")?;
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{r}")?;
        }
        if self.0.is_empty() {
            f.write_str("(empty)")?;
        }
        Ok(())
    }
}

fn err(kind: ErrorKind, detail: impl fmt::Display, regions: &[UffdRegion]) -> CodecError {
    CodecError::new(kind, WHAT, format!("{detail}; {}", Mapping(regions)))
}

impl RegionMap {
    /// Parses Firecracker's JSON and validates it against a memory file of `memfile_size` bytes.
    pub fn parse(json: &[u8], memfile_size: u64) -> Result<Self, CodecError> {
        if json.len() > MAX_JSON_LEN {
            return Err(CodecError::too_large(
                WHAT,
                json.len() as u64,
                MAX_JSON_LEN as u64,
            ));
        }
        let wire: Vec<WireRegion> = serde_json::from_slice(json).map_err(|e| {
            CodecError::corrupt(
                WHAT,
                format!(
                    "malformed JSON ({e}): {:?}",
                    String::from_utf8_lossy(&json[..json.len().min(256)])
                ),
            )
        })?;
        if wire.len() > MAX_REGIONS {
            return Err(CodecError::too_large(
                WHAT,
                wire.len() as u64,
                MAX_REGIONS as u64,
            ));
        }
        let mut regions = Vec::with_capacity(wire.len());
        let mut conflict = None;
        for (i, w) in wire.iter().enumerate() {
            let page_size = match (w.page_size, w.page_size_kib) {
                (Some(a), Some(b)) if a != b => {
                    conflict.get_or_insert((i, a, b));
                    a
                }
                (Some(a), _) | (None, Some(a)) => a,
                // Firecracker before #4449 sent no page size: 4 KiB pages.
                (None, None) => PAGE_SIZE,
            };
            regions.push(UffdRegion {
                base_host_virt_addr: w.base_host_virt_addr,
                size: w.size,
                offset: w.offset,
                page_size,
            });
        }
        if let Some((i, a, b)) = conflict {
            return Err(err(
                ErrorKind::Corrupt,
                format_args!("region {i}: page_size {a} disagrees with page_size_kib {b}"),
                &regions,
            ));
        }
        Self::new(regions, memfile_size)
    }

    /// Validates regions (in any order) against a memory file of `memfile_size` bytes.
    pub fn new(mut regions: Vec<UffdRegion>, memfile_size: u64) -> Result<Self, CodecError> {
        let Some(first) = regions.first() else {
            return Err(err(ErrorKind::InvalidArgument, "no regions", &regions));
        };
        let page_size = first.page_size;
        if page_size != PAGE_SIZE && page_size != HUGEPAGE_SIZE {
            return Err(err(
                ErrorKind::Unsupported,
                format_args!("page size {page_size} is neither 4096 nor 2097152"),
                &regions,
            ));
        }
        for (i, r) in regions.iter().enumerate() {
            if r.page_size != page_size {
                return Err(err(
                    ErrorKind::Unsupported,
                    format_args!(
                        "region {i} has page size {} but region 0 has {page_size}",
                        r.page_size
                    ),
                    &regions,
                ));
            }
            if r.size == 0 {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format_args!("region {i} is empty"),
                    &regions,
                ));
            }
            if !r.base_host_virt_addr.is_multiple_of(page_size)
                || !r.size.is_multiple_of(page_size)
                || !r.offset.is_multiple_of(page_size)
            {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format_args!("region {i} is not aligned to its page size {page_size}"),
                    &regions,
                ));
            }
            if r.base_host_virt_addr.checked_add(r.size).is_none() {
                return Err(err(
                    ErrorKind::OutOfBounds,
                    format_args!("region {i} wraps the address space"),
                    &regions,
                ));
            }
            match r.offset.checked_add(r.size) {
                Some(end) if end <= memfile_size => {}
                _ => {
                    return Err(err(
                        ErrorKind::OutOfBounds,
                        format_args!(
                            "region {i} (file {:#x}+{:#x}) ends beyond the memory file of {memfile_size} bytes",
                            r.offset, r.size
                        ),
                        &regions,
                    ));
                }
            }
        }
        // Overlap in file offsets (checked on a copy sorted by offset).
        let mut by_offset: Vec<&UffdRegion> = regions.iter().collect();
        by_offset.sort_by_key(|r| r.offset);
        for pair in by_offset.windows(2) {
            if pair[0].offset + pair[0].size > pair[1].offset {
                let (a, b) = (*pair[0], *pair[1]);
                return Err(err(
                    ErrorKind::Corrupt,
                    format_args!("regions {a} and {b} overlap in the memory file"),
                    &regions,
                ));
            }
        }
        regions.sort_by_key(|r| r.base_host_virt_addr);
        for pair in regions.windows(2) {
            if pair[0].end_addr() > pair[1].base_host_virt_addr {
                let (a, b) = (pair[0], pair[1]);
                return Err(err(
                    ErrorKind::Corrupt,
                    format_args!("regions {a} and {b} overlap in host memory"),
                    &regions,
                ));
            }
        }
        // No overlap and every region inside the file: the sizes add up to the file size exactly
        // when the regions cover it.
        let total: u64 = regions.iter().map(|r| r.size).sum();
        if total != memfile_size {
            return Err(err(
                ErrorKind::InvalidArgument,
                format_args!(
                    "regions cover {total} bytes but the memory file has {memfile_size} bytes"
                ),
                &regions,
            ));
        }
        Ok(Self { regions, page_size })
    }

    /// The page size shared by every region, in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The regions, sorted by host address.
    pub fn regions(&self) -> &[UffdRegion] {
        &self.regions
    }

    /// Total bytes covered (equal to the memory file size).
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The index of the region containing host address `addr`.
    pub fn find(&self, addr: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.base_host_virt_addr <= addr);
        let i = i.checked_sub(1)?;
        self.regions[i].contains(addr).then_some(i)
    }

    /// Translates a faulting host address: the page-aligned host address of its page and the file
    /// offset of that page, or `None` if the address is in no region.
    pub fn translate(&self, addr: u64) -> Option<PageAddr> {
        let r = &self.regions[self.find(addr)?];
        let page = addr & !(self.page_size - 1);
        Some(PageAddr {
            host: page,
            file_offset: page - r.base_host_virt_addr + r.offset,
        })
    }
}

impl fmt::Display for RegionMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Mapping(&self.regions).fmt(f)
    }
}

/// A page located by [`RegionMap::translate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageAddr {
    /// Page-aligned host virtual address.
    pub host: u64,
    /// Offset of the page in the memory file.
    pub file_offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn json(regions: &[(u64, u64, u64, u64)]) -> String {
        let items: Vec<String> = regions
            .iter()
            .map(|&(base, size, offset, page)| {
                format!(
                    r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{page},"page_size_kib":{page}}}"#
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    #[test]
    fn parses_firecracker_json() {
        // Exactly what Firecracker 1.x sends for a two-slot VM (both page size fields).
        let j = json(&[
            (0x7f00_0000_0000, 128 * MIB, 0, 4096),
            (0x7e00_0000_0000, 64 * MIB, 128 * MIB, 4096),
        ]);
        let m = RegionMap::parse(j.as_bytes(), 192 * MIB).unwrap();
        assert_eq!(m.page_size(), 4096);
        assert_eq!(m.total_size(), 192 * MIB);
        // Sorted by host address.
        assert_eq!(m.regions()[0].base_host_virt_addr, 0x7e00_0000_0000);
        let p = m.translate(0x7f00_0000_1234).unwrap();
        assert_eq!(p.host, 0x7f00_0000_1000);
        assert_eq!(p.file_offset, 0x1000);
        let p = m.translate(0x7e00_0000_0000 + 64 * MIB - 1).unwrap();
        assert_eq!(p.file_offset, 192 * MIB - 4096);
        assert_eq!(m.translate(0x7e00_0000_0000 + 64 * MIB), None);
        assert_eq!(m.translate(0x7f00_0000_0000 + 128 * MIB), None);
        assert_eq!(m.translate(0), None);
    }

    #[test]
    fn accepts_either_page_size_field_or_none() {
        let only_kib = r#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]"#;
        let m = RegionMap::parse(only_kib.as_bytes(), 4 * MIB).unwrap();
        assert_eq!(m.page_size(), HUGEPAGE_SIZE);
        let only_new =
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"x":1}]"#;
        assert_eq!(
            RegionMap::parse(only_new.as_bytes(), 8192)
                .unwrap()
                .page_size(),
            4096
        );
        let neither = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        assert_eq!(
            RegionMap::parse(neither.as_bytes(), 8192)
                .unwrap()
                .page_size(),
            4096
        );
    }

    #[test]
    fn hugepage_translation_aligns_down_to_2mib() {
        let j = json(&[
            (0x4000_0000, 4 * MIB, 2 * MIB, HUGEPAGE_SIZE),
            (0x8000_0000, 2 * MIB, 0, HUGEPAGE_SIZE),
        ]);
        let m = RegionMap::parse(j.as_bytes(), 6 * MIB).unwrap();
        let p = m.translate(0x4000_0000 + 3 * MIB + 17).unwrap();
        assert_eq!(p.host, 0x4000_0000 + 2 * MIB);
        assert_eq!(p.file_offset, 4 * MIB);
    }

    fn parse_err(j: &str, size: u64) -> CodecError {
        RegionMap::parse(j.as_bytes(), size).unwrap_err()
    }

    #[test]
    fn rejects_malformed_json() {
        for bad in [
            "",
            "{",
            "[",
            "{}",
            "null",
            r#"[{"size":4096,"offset":0}]"#,
            r#"[{"base_host_virt_addr":-1,"size":4096,"offset":0}]"#,
            r#"[{"base_host_virt_addr":"4096","size":4096,"offset":0}]"#,
            "[1,2]",
        ] {
            let e = parse_err(bad, 4096);
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad:?}: {e}");
            assert!(e.to_string().contains("malformed JSON"), "{e}");
        }
        let e = parse_err("[]", 4096);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let huge = " ".repeat(MAX_JSON_LEN + 1);
        assert_eq!(parse_err(&huge, 4096).kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn rejects_bad_page_sizes() {
        for page in [0, 1024, 8192, 4095, MIB, 1 << 30] {
            let j = json(&[(0x40_0000_0000, 4 * MIB, 0, page)]);
            let e = parse_err(&j, 4 * MIB);
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{page}: {e}");
            assert!(e.to_string().contains("neither 4096 nor 2097152"), "{e}");
        }
        let mixed = json(&[
            (0x40_0000_0000, 2 * MIB, 0, 4096),
            (0x50_0000_0000, 2 * MIB, 2 * MIB, HUGEPAGE_SIZE),
        ]);
        assert_eq!(parse_err(&mixed, 4 * MIB).kind(), ErrorKind::Unsupported);
        let disagree = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#;
        let e = parse_err(disagree, 4096);
        assert!(e.to_string().contains("disagrees"), "{e}");
    }

    #[test]
    fn rejects_misalignment_overlap_and_bad_coverage() {
        type Case = (
            &'static [(u64, u64, u64, u64)],
            u64,
            ErrorKind,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                &[(0x1001, 4096, 0, 4096)],
                4096,
                ErrorKind::InvalidArgument,
                "not aligned",
            ),
            (
                &[(0x1000, 4097, 0, 4096)],
                4097,
                ErrorKind::InvalidArgument,
                "not aligned",
            ),
            (
                &[(0x1000, 4096, 1, 4096)],
                8192,
                ErrorKind::InvalidArgument,
                "not aligned",
            ),
            (
                &[(0x20_0000, 2 * MIB, 4096, HUGEPAGE_SIZE)],
                4 * MIB,
                ErrorKind::InvalidArgument,
                "not aligned",
            ),
            (
                &[(0x1000, 0, 0, 4096)],
                0,
                ErrorKind::InvalidArgument,
                "empty",
            ),
            (
                &[(u64::MAX - 4095, 8192, 0, 4096)],
                8192,
                ErrorKind::OutOfBounds,
                "wraps",
            ),
            (
                &[(0x1000, 8192, 0, 4096)],
                4096,
                ErrorKind::OutOfBounds,
                "beyond the memory file",
            ),
            (
                &[(0x1000, 4096, u64::MAX - 4095, 4096)],
                4096,
                ErrorKind::OutOfBounds,
                "beyond",
            ),
            (
                &[(0x1000, 8192, 0, 4096), (0x2000, 4096, 8192, 4096)],
                12288,
                ErrorKind::Corrupt,
                "overlap in host memory",
            ),
            (
                &[(0x1000, 8192, 0, 4096), (0x10000, 4096, 4096, 4096)],
                12288,
                ErrorKind::Corrupt,
                "overlap in the memory file",
            ),
            (
                &[(0x1000, 4096, 0, 4096)],
                8192,
                ErrorKind::InvalidArgument,
                "cover 4096 bytes",
            ),
            (
                &[(0x1000, 4096, 4096, 4096)],
                8192,
                ErrorKind::InvalidArgument,
                "cover",
            ),
        ];
        for &(regions, size, kind, needle) in cases {
            let e = parse_err(&json(regions), size);
            assert_eq!(e.kind(), kind, "{regions:x?}: {e}");
            let text = e.to_string();
            assert!(text.contains(needle), "{text}");
            // The whole mapping is in the message.
            assert!(text.starts_with("UFFD regions: "), "{text}");
            assert!(text.contains("mapping ["), "{text}");
        }
    }

    #[test]
    fn find_handles_gaps_and_edges() {
        let m = RegionMap::new(
            vec![
                UffdRegion {
                    base_host_virt_addr: 0x10000,
                    size: 0x2000,
                    offset: 0x2000,
                    page_size: 4096,
                },
                UffdRegion {
                    base_host_virt_addr: 0x1000,
                    size: 0x2000,
                    offset: 0,
                    page_size: 4096,
                },
            ],
            0x4000,
        )
        .unwrap();
        assert_eq!(m.find(0xfff), None);
        assert_eq!(m.find(0x1000), Some(0));
        assert_eq!(m.find(0x2fff), Some(0));
        assert_eq!(m.find(0x3000), None);
        assert_eq!(m.find(0xffff), None);
        assert_eq!(m.find(0x10000), Some(1));
        assert_eq!(m.find(0x11fff), Some(1));
        assert_eq!(m.find(0x12000), None);
        assert_eq!(m.translate(0x11fff).unwrap().file_offset, 0x3000);
        assert!(
            m.to_string()
                .contains("[0x1000..0x3000 -> file 0x0, page 4096]")
        );
    }
}
