//! Object names in a store and file names in the shared directory cache, exactly as e2b uses them.
//!
//! A build lives under `{build}/` in a bucket (or below a local directory):
//! `{build}/rootfs.ext4[.zstd|.lz4]`, `{build}/rootfs.ext4.header`, `{build}/memfile[...]`,
//! `{build}/memfile.header`, `{build}/snapfile`, `{build}/metadata.json`.

use std::fmt;
use std::str::FromStr;

use crate::{BuildId, CodecError, CompressionType, ErrorKind, HUGEPAGE_SIZE, PAGE_SIZE};

/// The two build files thaw serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// The disk image, `rootfs.ext4`, served over NBD.
    Rootfs,
    /// The memory image, `memfile`, served through userfaultfd.
    Memfile,
}

impl FileKind {
    /// Both kinds, rootfs first.
    pub const ALL: [FileKind; 2] = [FileKind::Rootfs, FileKind::Memfile];

    /// The object name inside a build: `rootfs.ext4` or `memfile`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rootfs => "rootfs.ext4",
            Self::Memfile => "memfile",
        }
    }

    /// The block size e2b assumes for a legacy headerless build of this kind.
    pub fn legacy_block_size(self) -> u64 {
        match self {
            Self::Rootfs => PAGE_SIZE,
            Self::Memfile => HUGEPAGE_SIZE,
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FileKind {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rootfs.ext4" | "rootfs" => Ok(Self::Rootfs),
            "memfile" => Ok(Self::Memfile),
            other => Err(CodecError::new(
                ErrorKind::InvalidArgument,
                "file kind",
                format!("{other:?} is neither \"rootfs.ext4\" nor \"memfile\""),
            )),
        }
    }
}

/// The data object of `file` in `build`, with the suffix of its compression:
/// `{build}/rootfs.ext4`, `{build}/rootfs.ext4.zstd`, `{build}/memfile.lz4`, ...
pub fn data_object(build: BuildId, file: FileKind, compression: CompressionType) -> String {
    format!("{build}/{}{}", file.name(), compression.suffix())
}

/// The header object of `file` in `build`: `{build}/{file}.header` (same name whether the data is
/// compressed or not).
pub fn header_object(build: BuildId, file: FileKind) -> String {
    format!("{build}/{}.header", file.name())
}

/// The Firecracker snapshot state object: `{build}/snapfile`.
pub fn snapfile_object(build: BuildId) -> String {
    format!("{build}/snapfile")
}

/// The metadata object: `{build}/metadata.json`.
pub fn metadata_object(build: BuildId) -> String {
    format!("{build}/metadata.json")
}

/// The local-directory store's sidecar holding the decimal uncompressed size of a compressed
/// object: `<object>.uncompressed-size`.
pub fn uncompressed_size_sidecar(object: &str) -> String {
    format!("{object}.uncompressed-size")
}

/// The object metadata key carrying the decimal uncompressed size of a compressed object.
pub const UNCOMPRESSED_SIZE_METADATA: &str = "uncompressed-size";

/// Shared-cache file of an uncompressed chunk: `%012d-%d.bin` = `{offset / chunk_size}-{chunk_size}.bin`.
pub fn cache_chunk_file(chunk_index: u64, chunk_size: u64) -> String {
    format!("{chunk_index:012}-{chunk_size}.bin")
}

/// Shared-cache file of a compressed frame: `%016x-%x.frm` = `{StartC}-{SizeC}.frm` in hex.
pub fn cache_frame_file(start_c: u64, size_c: u64) -> String {
    format!("{start_c:016x}-{size_c:x}.frm")
}

/// Shared-cache file holding an object's decimal size.
pub const CACHE_SIZE_FILE: &str = "size.txt";

/// Shared-cache file holding a whole blob (headers, snapfile, metadata.json).
pub const CACHE_CONTENT_FILE: &str = "content.bin";

/// The shared-cache directory of object `object` (e.g. `{build}/rootfs.ext4.zstd`), relative to the
/// cache root: the object path itself.
pub fn cache_dir(object: &str) -> &str {
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_e2b() {
        let b: BuildId = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab".parse().unwrap();
        assert_eq!(
            data_object(b, FileKind::Rootfs, CompressionType::Zstd),
            "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/rootfs.ext4.zstd"
        );
        assert_eq!(
            data_object(b, FileKind::Memfile, CompressionType::None),
            "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/memfile"
        );
        assert_eq!(
            data_object(b, FileKind::Memfile, CompressionType::Lz4),
            "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/memfile.lz4"
        );
        assert_eq!(
            header_object(b, FileKind::Memfile),
            "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/memfile.header"
        );
        assert_eq!(
            uncompressed_size_sidecar("x/memfile.zstd"),
            "x/memfile.zstd.uncompressed-size"
        );
        assert_eq!(cache_chunk_file(4, 4194304), "000000000004-4194304.bin");
        assert_eq!(
            cache_frame_file(0x441000, 0x91234),
            "0000000000441000-91234.frm"
        );
    }

    #[test]
    fn file_kind_parse() {
        assert_eq!("memfile".parse::<FileKind>().unwrap(), FileKind::Memfile);
        assert_eq!("rootfs.ext4".parse::<FileKind>().unwrap(), FileKind::Rootfs);
        assert_eq!(
            "disk".parse::<FileKind>().unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
