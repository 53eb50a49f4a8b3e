//! Object stores: where build files live.
//!
//! A store holds objects named by `/`-separated keys (`{build}/memfile.zstd`, ...). This module
//! defines the synchronous [`Store`] interface every backend implements (the io_uring engine wraps
//! it later), its error type, and [`open_store`], which turns a store URL into a backend.
//!
//! Supported today: the local directory store ([`FileStore`], `file:///abs/dir` or a bare path)
//! and the simulated store ([`SimStore`], `sim:ttfb=20ms,bw=100MB/s,inner=file:///dir`, see
//! [`sim`]), Google Cloud Storage ([`GcsStore`], `gs://bucket/prefix`, over the HTTP
//! transport of [`http`]) and S3-compatible object storage ([`S3Store`], `s3://bucket/prefix`,
//! see [`s3`]; its multipart upload is the XML protocol of [`multipart`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod file;
pub mod gcs;
pub mod http;
pub mod multipart;
pub mod s3;
pub mod shared_cache;
pub mod sim;

pub use file::FileStore;
pub use gcs::{GcsStore, GcsXmlApi, UploadMode};
pub use s3::S3Store;
pub use sim::SimStore;

/// Custom object metadata attached on upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Custom object metadata. The file store persists only
    /// [`thaw_codec::names::UNCOMPRESSED_SIZE_METADATA`] (as a sidecar file), as e2b's FS backend.
    pub metadata: BTreeMap<String, String>,
}

impl PutOptions {
    /// Options carrying the `uncompressed-size` metadata of a compressed object.
    pub fn with_uncompressed_size(size: u64) -> Self {
        let mut metadata = BTreeMap::new();
        metadata.insert(
            thaw_codec::names::UNCOMPRESSED_SIZE_METADATA.to_owned(),
            size.to_string(),
        );
        Self { metadata }
    }

    /// The `uncompressed-size` metadata value, if present.
    pub fn uncompressed_size(&self) -> Option<&str> {
        self.metadata
            .get(thaw_codec::names::UNCOMPRESSED_SIZE_METADATA)
            .map(String::as_str)
    }
}

/// What [`Store::stat`] reports about an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Stored size in bytes.
    pub size: u64,
    /// e2b's `uncompressed-size` metadata (file store: the sidecar), when present.
    pub uncompressed_size: Option<u64>,
}

impl ObjectInfo {
    /// The logical (uncompressed) size: the `uncompressed-size` metadata when present, else the
    /// stored size (e2b's size lookup order).
    pub fn logical_size(&self) -> u64 {
        self.uncompressed_size.unwrap_or(self.size)
    }
}

/// Stable classification of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The object (or store root) does not exist.
    NotFound,
    /// An I/O error from the backend.
    Io,
    /// The object is shorter than the requested range.
    Truncated,
    /// The object is larger than the caller's limit.
    TooLarge,
    /// The store URL could not be understood.
    InvalidUrl,
    /// The object key is not acceptable (empty segment, `..`, absolute, ...).
    InvalidKey,
    /// The store scheme or operation is not supported (yet).
    Unsupported,
    /// Stored metadata is malformed (e.g. a sidecar that is not a decimal number).
    Corrupt,
    /// The service refused the credentials or their permissions (HTTP 401, 403): permanent,
    /// never retried by the transport or the engine.
    Denied,
}

impl StoreErrorKind {
    /// A short, stable, lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Io => "io",
            Self::Truncated => "truncated",
            Self::TooLarge => "too_large",
            Self::InvalidUrl => "invalid_url",
            Self::InvalidKey => "invalid_key",
            Self::Unsupported => "unsupported",
            Self::Corrupt => "corrupt",
            Self::Denied => "denied",
        }
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store failure: its kind, the store URL and key it concerns, and a detail.
///
/// Display reads `"{url}: {key}: {detail}"` (or `"{url}: {detail}"` without a key); the I/O
/// source, if any, is available through [`std::error::Error::source`].
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    url: String,
    key: String,
    detail: String,
    source: Option<std::io::Error>,
}

impl StoreError {
    /// A new error of `kind` about `key` in the store at `url`.
    pub fn new(
        kind: StoreErrorKind,
        url: impl Into<String>,
        key: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            url: url.into(),
            key: key.into(),
            detail: detail.into(),
            source: None,
        }
    }

    /// An error from an I/O failure; `NotFound` I/O errors get [`StoreErrorKind::NotFound`].
    pub fn io(
        url: impl Into<String>,
        key: impl Into<String>,
        op: &str,
        err: std::io::Error,
    ) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => StoreErrorKind::NotFound,
            std::io::ErrorKind::UnexpectedEof => StoreErrorKind::Truncated,
            _ => StoreErrorKind::Io,
        };
        let detail = match kind {
            StoreErrorKind::NotFound => "not found".to_owned(),
            _ => format!("{op} failed"),
        };
        Self {
            kind,
            url: url.into(),
            key: key.into(),
            detail,
            source: Some(err),
        }
    }

    /// The stable classification.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The URL of the store.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object key (empty when the error is about the store itself).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True for [`StoreErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind == StoreErrorKind::NotFound
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.url, self.detail)
        } else {
            write!(f, "{}: {}: {}", self.url, self.key, self.detail)
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A streaming object writer returned by [`Store::create`].
///
/// Nothing appears under the key until [`ObjectWriter::commit`] succeeds; dropping the writer
/// uncommitted leaves nothing behind.
pub trait ObjectWriter: std::io::Write + Send + fmt::Debug {
    /// Makes the object visible under its key (atomically), with the metadata given at creation.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// Bytes written so far.
    fn written(&self) -> u64;
}

/// A synchronous object store.
pub trait Store: Send + Sync + fmt::Debug {
    /// The store's URL (`file:///abs/dir`, ...), used in messages.
    fn url(&self) -> String;

    /// Reads exactly `buf.len()` bytes of object `key` at `offset`; a short object is an error
    /// ([`StoreErrorKind::Truncated`]), never data.
    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;

    /// [`Store::read_range`], reporting progress as the bytes land.
    ///
    /// Bytes are written into `buf` front to back. `progress(n)` is called with the cumulative
    /// number of leading bytes of `buf` that are final (non-decreasing), at least once at the end
    /// with `n == buf.len()` on success. On error, the bytes already reported stay valid, but the
    /// call fails: the caller decides what to keep (the engine never marks anything present from
    /// a failed fetch of a compressed frame). Nothing is promised about bytes past the last
    /// reported count.
    ///
    /// The default reads the whole range with [`Store::read_range`], then reports `buf.len()`.
    fn read_range_progress(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), StoreError> {
        self.read_range(key, offset, buf)?;
        progress(buf.len());
        Ok(())
    }

    /// Streams the bytes `[offset, offset + len)` of `key` to `sink`, front to back, in pieces
    /// as they arrive (the engine copies or decodes each piece into cache memory and wakes the
    /// readers whose blocks it completed). `sink` may answer [`ControlFlow::Break`] to stop the
    /// transfer early (the rest is not needed any more); the call then returns `Ok` with the
    /// bytes delivered so far. A body that ends early is an error
    /// ([`StoreErrorKind::Truncated`]); the pieces delivered before it are real bytes of the
    /// object, but the call failed.
    ///
    /// The default reads the whole range with [`Store::read_range`] and delivers it at once.
    fn read_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let n = usize::try_from(len).map_err(|_| {
            StoreError::new(
                StoreErrorKind::TooLarge,
                self.url(),
                key,
                format!("range of {len} bytes does not fit in memory"),
            )
        })?;
        let mut buf = vec![0u8; n];
        self.read_range(key, offset, &mut buf)?;
        let _ = sink(&buf);
        Ok(len)
    }

    /// The local file holding object `key`, for stores that are a local directory (the engine
    /// then reads it with io_uring, straight into cache memory). `None` for every other store.
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let _ = key;
        None
    }

    /// Size (and e2b's `uncompressed-size` metadata / file-store sidecar, when present).
    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError>;

    /// Whole object, refusing objects larger than `max_len` before reading
    /// ([`StoreErrorKind::TooLarge`]).
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError>;

    /// Writes a whole object atomically (never a partial object under the final name).
    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError>;

    /// Streaming writer; nothing appears under `key` until `commit()`; dropping it uncommitted
    /// leaves nothing.
    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError>;

    /// Whether object `key` exists.
    fn exists(&self, key: &str) -> Result<bool, StoreError>;
}

/// [`Store::read_range_progress`] for stores whose native read is [`Store::read_stream`] (the
/// HTTP stores): the pieces are copied into `buf` front to back and reported as they land; a
/// stream that delivers fewer bytes than `buf` holds, or more, is
/// [`StoreErrorKind::Truncated`], never data.
pub(crate) fn read_range_from_stream(
    store: &(impl Store + ?Sized),
    key: &str,
    offset: u64,
    buf: &mut [u8],
    progress: &mut dyn FnMut(usize),
) -> Result<(), StoreError> {
    let want = buf.len();
    let len = u64::try_from(want).unwrap_or(u64::MAX);
    let mut at = 0usize;
    let mut overflow = false;
    let got = store.read_stream(key, offset, len, &mut |piece| {
        let Some(dst) = buf.get_mut(at..at.saturating_add(piece.len())) else {
            overflow = true;
            return ControlFlow::Break(());
        };
        dst.copy_from_slice(piece);
        at += piece.len();
        progress(at);
        ControlFlow::Continue(())
    })?;
    if overflow || got != len {
        return Err(StoreError::new(
            StoreErrorKind::Truncated,
            store.url(),
            key,
            format!("read of [{offset}, +{want}) delivered {got} bytes"),
        ));
    }
    if want == 0 {
        progress(0);
    }
    Ok(())
}

/// Opens the store named by `url`.
///
/// - `file:///abs/dir`: the local directory store rooted at `/abs/dir`;
/// - a bare absolute or relative path: the same, for convenience (relative paths are resolved
///   against the current directory);
/// - `sim:PARAMS,inner=URL`: the simulated store ([`SimStore`]) around the store named by `URL`;
///   bad parameters are [`StoreErrorKind::InvalidUrl`];
/// - `gs://bucket/prefix[?params]`: Google Cloud Storage ([`GcsStore`]; parameters, endpoint and
///   credentials in [`gcs`], deadlines and retries in [`http`]);
/// - `s3://bucket/prefix[?params]`: the S3-compatible store ([`S3Store`]; parameters and the
///   environment variables it reads in [`s3`], deadlines and retries in [`http`]);
/// - any other scheme: [`StoreErrorKind::Unsupported`].
///
/// The directory need not exist yet: writes create it, reads report [`StoreErrorKind::NotFound`].
pub fn open_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.is_empty() {
        return Err(StoreError::new(
            StoreErrorKind::InvalidUrl,
            url,
            "",
            "empty store URL",
        ));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(StoreError::new(
                StoreErrorKind::InvalidUrl,
                url,
                "",
                "a file URL needs an absolute path (file:///abs/dir)",
            ));
        }
        return Ok(Arc::new(FileStore::new(PathBuf::from(rest))));
    }
    if url.starts_with("sim:") {
        return Ok(Arc::new(SimStore::open(url)?));
    }
    if url.starts_with("gs://") {
        return Ok(Arc::new(GcsStore::open(url)?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3Store::open(url)?));
    }
    if let Some(scheme) = url_scheme(url) {
        return Err(StoreError::new(
            StoreErrorKind::Unsupported,
            url,
            "",
            format!(
                "the {scheme}: scheme is not supported yet; use file:///abs/dir, a directory \
                 path, gs://bucket/prefix or s3://bucket/prefix"
            ),
        ));
    }
    let path = Path::new(url);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| StoreError::io(url, "", "resolving the current directory", e))?
            .join(path)
    };
    Ok(Arc::new(FileStore::new(abs)))
}

/// The scheme of `url` (`gs` in `gs://b`, `sim` in `sim:...`), if it looks like a URL.
fn url_scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    if first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        Some(scheme)
    } else {
        None
    }
}

/// Joins a `/`-separated object key onto `root`, refusing keys that could name anything outside
/// it: empty keys, absolute keys, NUL bytes, and empty, `.` or `..` segments. The error is the
/// reason, for an [`StoreErrorKind::InvalidKey`] error naming the store and key.
pub(crate) fn join_key(root: &std::path::Path, key: &str) -> Result<std::path::PathBuf, String> {
    if key.is_empty() {
        return Err("empty key".to_string());
    }
    if key.starts_with('/') {
        return Err("absolute keys are refused".to_string());
    }
    if key.contains('\0') {
        return Err("NUL byte in key".to_string());
    }
    let mut path = root.to_path_buf();
    for segment in key.split('/') {
        match segment {
            "" => return Err("empty path segment".to_string()),
            "." | ".." => return Err(format!("path segment {segment:?} is refused")),
            s => path.push(s),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_refused_clearly() {
        for url in ["http://x", "ftp://host/dir"] {
            let err = open_store(url).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Unsupported, "{url}");
            assert!(err.to_string().contains("not supported yet"), "{err}");
            assert!(err.to_string().contains(url), "{err}");
        }
    }

    #[test]
    fn sim_urls_open_or_fail_clearly() {
        let store = open_store("sim:ttfb=20ms,bw=100MB/s,inner=file:///srv/b").unwrap();
        assert_eq!(
            store.url(),
            "sim:ttfb=20ms,bw=100MB/s,chunk=64KiB,inner=file:///srv/b"
        );
        for url in ["sim:ttfb=60ms", "sim:", "sim:colour=blue,inner=/x"] {
            let err = open_store(url).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::InvalidUrl, "{url}");
        }
        assert_eq!(
            open_store("sim:inner=ftp://b").unwrap_err().kind(),
            StoreErrorKind::Unsupported
        );
    }

    #[test]
    fn file_urls_and_paths() {
        assert_eq!(open_store("file:///srv/b").unwrap().url(), "file:///srv/b");
        assert_eq!(open_store("/srv/b").unwrap().url(), "file:///srv/b");
        let rel = open_store("some/dir").unwrap().url();
        assert!(
            rel.starts_with("file:///") && rel.ends_with("/some/dir"),
            "{rel}"
        );
        assert_eq!(
            open_store("file://relative").unwrap_err().kind(),
            StoreErrorKind::InvalidUrl
        );
        assert_eq!(
            open_store("").unwrap_err().kind(),
            StoreErrorKind::InvalidUrl
        );
    }

    #[test]
    fn error_display_names_url_and_key() {
        let e = StoreError::new(
            StoreErrorKind::TooLarge,
            "file:///s",
            "b/memfile",
            "too big",
        );
        assert_eq!(e.to_string(), "file:///s: b/memfile: too big");
        assert_eq!(e.kind().as_str(), "too_large");
    }
}
