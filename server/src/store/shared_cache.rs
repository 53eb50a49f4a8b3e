//! The shared directory cache (`--shared-cache DIR`, an NFS mount in production): e2b's
//! `WrapInNFSCache` file layout and write protocol, as a synchronous module.
//!
//! Several processes and hosts (thaw instances and e2b's Go orchestrators) read and write the
//! same directory, so the file names and the write protocol match e2b's byte for byte:
//!
//! ```text
//! {root}/{object}/                       one directory per object key (created 0700)
//!     {%016x start_c}-{%x size_c}.frm    raw compressed frame (StartC, SizeC in hex)
//!     {%012d index}-{chunk_size}.bin     uncompressed chunk (4 MiB, the last one may be short)
//!     size.txt                           the object's size, decimal text
//!     content.bin                        a whole small object (headers, snapfile, metadata.json)
//! ```
//!
//! Writing a file `F`: create `F.lock` with `O_EXCL` (a lock older than
//! [`SharedCache::stale_lock`] is removed as stale and the create retried once; a fresh lock means
//! another writer is on it, so this one skips); write `F.tmp.{uuid}` (0600) and fsync it;
//! `link(temp, F)`, which never replaces an existing `F`; unlink the temp file and the lock, on
//! every path. Readers therefore only ever see complete files; a file whose size is not the
//! expected one is deleted and reported as a miss.
//!
//! This module only handles files. [`CachedStore`] wraps a [`Store`] with the parts that map
//! cleanly onto whole files (sizes, small blobs, aligned 4 MiB chunks of uncompressed objects);
//! frames of compressed objects are cached by the engine itself through
//! [`SharedCache::get_frame`] / [`SharedCache::put_frame`] / [`SharedCache::evict_frame`],
//! because only the engine knows the frame table and can decode and verify a frame before it is
//! written (or evict one that fails to decode).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use thaw_codec::names::{
    CACHE_CONTENT_FILE, CACHE_SIZE_FILE, cache_chunk_file, cache_dir, cache_frame_file,
};

use super::{ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind};

/// e2b's uncompressed chunk size (`MemoryChunkSize`, 4 MiB): the unit of `.bin` files.
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// e2b's stale-lock age: a `.lock` file older than this is considered abandoned.
pub const DEFAULT_STALE_LOCK: Duration = Duration::from_secs(10);

/// Largest `size.txt` accepted (a decimal u64 with some whitespace).
const MAX_SIZE_FILE_LEN: u64 = 64;

/// What a write to the cache did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file was written (and is now visible under its final name).
    Written,
    /// The final file already existed; it was left untouched (never overwritten).
    AlreadyPresent,
    /// Another writer holds a fresh lock on the file; nothing was written.
    Skipped,
}

/// A snapshot of the cache counters (see [`SharedCache::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedCacheStats {
    /// Lookups served from a cache file.
    pub hits: u64,
    /// Lookups that found no usable file (absent, corrupt, or too large for the caller).
    pub misses: u64,
    /// Files written (linked into place) by this process.
    pub writes: u64,
    /// Writes skipped because another writer held a fresh lock.
    pub skipped: u64,
    /// Writes that found the final file already present.
    pub already_present: u64,
    /// Files removed by [`SharedCache::evict_frame`] / [`SharedCache::evict_chunk`].
    pub evictions: u64,
    /// Corrupt files found on lookup (wrong size, unparsable `size.txt`) and deleted.
    pub corrupt: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    skipped: AtomicU64,
    already_present: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The shared directory cache rooted at a directory.
#[derive(Debug)]
pub struct SharedCache {
    root: PathBuf,
    stale_lock: Duration,
    counters: Counters,
    fail_before_link: AtomicBool,
}

/// Result of trying to take a file's lock.
enum LockAttempt {
    Acquired(LockGuard),
    Held,
}

/// An owned `.lock` file, removed on drop (only if it is still ours: same device and inode).
struct LockGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %self.path.display(), error = %e, "shared cache: removing lock file failed");
                }
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "shared cache: our lock was taken over as stale; leaving the new one");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "shared cache: checking lock file failed");
            }
        }
    }
}

/// A temporary file, removed on drop (after a successful link, the final name keeps the data).
struct TempGuard {
    path: PathBuf,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "shared cache: removing temp file failed");
        }
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Result of reading a small whole cache file.
enum Small {
    Missing,
    TooLarge,
    Data(Vec<u8>),
}

/// Result of reading a cache file that must have an exact length.
enum Lookup {
    Hit(Vec<u8>),
    Miss,
}

impl SharedCache {
    /// A cache rooted at `root` with the default stale-lock age (10 s). The directory need not
    /// exist yet: writes create it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_stale_lock(root, DEFAULT_STALE_LOCK)
    }

    /// A cache rooted at `root` whose locks go stale after `stale_lock`.
    pub fn with_stale_lock(root: impl Into<PathBuf>, stale_lock: Duration) -> Self {
        Self {
            root: root.into(),
            stale_lock,
            counters: Counters::default(),
            fail_before_link: AtomicBool::new(false),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stale-lock age.
    pub fn stale_lock(&self) -> Duration {
        self.stale_lock
    }

    /// A name for messages: `shared-cache:{root}`.
    pub fn url(&self) -> String {
        format!("shared-cache:{}", self.root.display())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SharedCacheStats {
        let c = &self.counters;
        SharedCacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            already_present: c.already_present.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
        }
    }

    /// Fault injection for tests: while set, every write fails with an I/O error after the
    /// temp file is written and fsynced, just before the `link` (the cleanup paths still run).
    #[doc(hidden)]
    pub fn set_fail_before_link(&self, fail: bool) {
        self.fail_before_link.store(fail, Ordering::Relaxed);
    }

    fn err(&self, kind: StoreErrorKind, key: &str, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, self.url(), key, detail)
    }

    fn io_err(&self, key: &str, op: &str, e: io::Error) -> StoreError {
        StoreError::io(self.url(), key, op, e)
    }

    /// The cache directory of object `key`, after the same checks as the file store: a relative
    /// `/`-separated path with no empty, `.` or `..` segments and no NUL byte.
    pub fn object_dir(&self, key: &str) -> Result<PathBuf, StoreError> {
        super::join_key(&self.root, cache_dir(key))
            .map_err(|reason| self.err(StoreErrorKind::InvalidKey, key, reason))
    }

    /// Path of the frame file `{root}/{object}/{%016x start_c}-{%x size_c}.frm`.
    pub fn frame_path(
        &self,
        object: &str,
        start_c: u64,
        size_c: u64,
    ) -> Result<PathBuf, StoreError> {
        Ok(self
            .object_dir(object)?
            .join(cache_frame_file(start_c, size_c)))
    }

    /// Path of the chunk file `{root}/{object}/{%012d chunk_index}-{chunk_size}.bin`.
    pub fn chunk_path(
        &self,
        object: &str,
        chunk_index: u64,
        chunk_size: u64,
    ) -> Result<PathBuf, StoreError> {
        Ok(self
            .object_dir(object)?
            .join(cache_chunk_file(chunk_index, chunk_size)))
    }

    /// The compressed frame `[start_c, +size_c)` of `object`, if cached. A file of any other
    /// length is deleted (logged) and reported as a miss.
    pub fn get_frame(
        &self,
        object: &str,
        start_c: u64,
        size_c: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.frame_path(object, start_c, size_c)?;
        self.lookup_exact(object, &path, size_c)
    }

    /// Caches the compressed frame starting at `start_c` (its size is `bytes.len()`). Call it only
    /// with bytes that decoded and verified.
    pub fn put_frame(
        &self,
        object: &str,
        start_c: u64,
        bytes: &[u8],
    ) -> Result<WriteOutcome, StoreError> {
        let size_c = self.len_u64(object, bytes)?;
        let path = self.frame_path(object, start_c, size_c)?;
        self.write_file(object, &path, bytes)
    }

    /// Deletes the cached frame (the caller found that it does not decode or verify). Returns
    /// whether a file was removed.
    pub fn evict_frame(&self, object: &str, start_c: u64, size_c: u64) -> Result<bool, StoreError> {
        let path = self.frame_path(object, start_c, size_c)?;
        self.evict(object, &path)
    }

    /// The uncompressed chunk `chunk_index` (of `chunk_size` bytes, normally [`CHUNK_SIZE`]) of
    /// `object`, if cached with exactly `expected_len` bytes (`chunk_size`, or less for the last
    /// chunk of the object). A file of any other length is deleted (logged) and a miss.
    pub fn get_chunk(
        &self,
        object: &str,
        chunk_index: u64,
        chunk_size: u64,
        expected_len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_chunk_len(object, chunk_size, expected_len)?;
        let path = self.chunk_path(object, chunk_index, chunk_size)?;
        self.lookup_exact(object, &path, expected_len)
    }

    /// Caches uncompressed chunk `chunk_index` of `object` (`bytes` is the whole chunk: exactly
    /// `chunk_size` bytes, or fewer for the object's last chunk).
    pub fn put_chunk(
        &self,
        object: &str,
        chunk_index: u64,
        chunk_size: u64,
        bytes: &[u8],
    ) -> Result<WriteOutcome, StoreError> {
        let len = self.len_u64(object, bytes)?;
        self.check_chunk_len(object, chunk_size, len)?;
        let path = self.chunk_path(object, chunk_index, chunk_size)?;
        self.write_file(object, &path, bytes)
    }

    /// Deletes a cached chunk. Returns whether a file was removed.
    pub fn evict_chunk(
        &self,
        object: &str,
        chunk_index: u64,
        chunk_size: u64,
    ) -> Result<bool, StoreError> {
        let path = self.chunk_path(object, chunk_index, chunk_size)?;
        self.evict(object, &path)
    }

    /// The cached size of `object` (`size.txt`, decimal text, surrounding whitespace allowed).
    ///
    /// Anything else is deleted and a miss, except the two-number form `"{virt} {raw}"` that
    /// some e2b versions write: that is a miss but left in place (it is valid for them).
    pub fn get_size(&self, object: &str) -> Result<Option<u64>, StoreError> {
        let path = self.object_dir(object)?.join(CACHE_SIZE_FILE);
        let bytes = match self.read_small(object, &path, MAX_SIZE_FILE_LEN)? {
            Small::Data(bytes) => bytes,
            Small::Missing => {
                bump(&self.counters.misses);
                return Ok(None);
            }
            Small::TooLarge => Vec::new(), // not a size: deleted below
        };
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        let trimmed = text.trim_ascii();
        if is_decimal(trimmed)
            && let Ok(size) = trimmed.parse::<u64>()
        {
            bump(&self.counters.hits);
            return Ok(Some(size));
        }
        let mut parts = trimmed.split_ascii_whitespace();
        if let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next())
            && is_decimal(a)
            && is_decimal(b)
        {
            tracing::debug!(path = %path.display(), "shared cache: size.txt in e2b's two-number form; not used");
            bump(&self.counters.misses);
            return Ok(None);
        }
        tracing::warn!(path = %path.display(), "shared cache: size.txt is not a decimal number; deleting it");
        self.discard_corrupt(&path);
        Ok(None)
    }

    /// Caches the size of `object` in `size.txt` (decimal text, no newline, as e2b writes it).
    pub fn put_size(&self, object: &str, size: u64) -> Result<WriteOutcome, StoreError> {
        let path = self.object_dir(object)?.join(CACHE_SIZE_FILE);
        self.write_file(object, &path, size.to_string().as_bytes())
    }

    /// The whole cached object (`content.bin`), if present and at most `max_len` bytes (a larger
    /// file is a miss and is left in place: it is not wrong, just too large for this caller).
    pub fn get_blob(&self, object: &str, max_len: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.object_dir(object)?.join(CACHE_CONTENT_FILE);
        match self.read_small(object, &path, max_len)? {
            Small::Data(bytes) => {
                bump(&self.counters.hits);
                Ok(Some(bytes))
            }
            Small::Missing | Small::TooLarge => {
                bump(&self.counters.misses);
                Ok(None)
            }
        }
    }

    /// Caches the whole object in `content.bin`.
    pub fn put_blob(&self, object: &str, bytes: &[u8]) -> Result<WriteOutcome, StoreError> {
        let path = self.object_dir(object)?.join(CACHE_CONTENT_FILE);
        self.write_file(object, &path, bytes)
    }

    fn len_u64(&self, object: &str, bytes: &[u8]) -> Result<u64, StoreError> {
        u64::try_from(bytes.len()).map_err(|_| {
            self.err(
                StoreErrorKind::TooLarge,
                object,
                "buffer length exceeds u64",
            )
        })
    }

    fn check_chunk_len(&self, object: &str, chunk_size: u64, len: u64) -> Result<(), StoreError> {
        if chunk_size == 0 {
            return Err(self.err(StoreErrorKind::InvalidKey, object, "chunk size 0"));
        }
        if len > chunk_size {
            return Err(self.err(
                StoreErrorKind::TooLarge,
                object,
                format!("chunk of {len} bytes is larger than the chunk size {chunk_size}"),
            ));
        }
        Ok(())
    }

    /// Opens `path` for reading; `None` when it does not exist.
    fn open_existing(&self, object: &str, path: &Path) -> Result<Option<File>, StoreError> {
        match File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(object, "opening a cache file", e)),
        }
    }

    /// Reads `path`, which must hold exactly `expected` bytes; otherwise it is deleted (a miss).
    fn lookup_exact(
        &self,
        object: &str,
        path: &Path,
        expected: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.read_exact_len(object, path, expected)? {
            Lookup::Hit(bytes) => {
                bump(&self.counters.hits);
                Ok(Some(bytes))
            }
            Lookup::Miss => Ok(None),
        }
    }

    fn read_exact_len(
        &self,
        object: &str,
        path: &Path,
        expected: u64,
    ) -> Result<Lookup, StoreError> {
        let Some(file) = self.open_existing(object, path)? else {
            bump(&self.counters.misses);
            return Ok(Lookup::Miss);
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_err(object, "stat of a cache file", e))?;
        if !meta.is_file() {
            tracing::warn!(path = %path.display(), "shared cache: not a regular file; ignored");
            bump(&self.counters.misses);
            return Ok(Lookup::Miss);
        }
        if meta.len() != expected {
            tracing::warn!(
                path = %path.display(),
                len = meta.len(),
                expected,
                "shared cache: cached file has the wrong size; deleting it"
            );
            self.discard_corrupt(path);
            return Ok(Lookup::Miss);
        }
        let cap = usize::try_from(expected)
            .map_err(|_| self.err(StoreErrorKind::TooLarge, object, "cache file too large"))?;
        let mut buf = Vec::with_capacity(cap);
        // Read one byte more than expected to notice a file that changed length under us.
        let limit = expected.saturating_add(1);
        file.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| self.io_err(object, "reading a cache file", e))?;
        if buf.len() != cap {
            tracing::warn!(
                path = %path.display(),
                read = buf.len(),
                expected,
                "shared cache: cached file changed size while read; deleting it"
            );
            self.discard_corrupt(path);
            return Ok(Lookup::Miss);
        }
        Ok(Lookup::Hit(buf))
    }

    /// Reads a whole file of at most `max_len` bytes. Counts nothing: callers do.
    fn read_small(&self, object: &str, path: &Path, max_len: u64) -> Result<Small, StoreError> {
        let Some(file) = self.open_existing(object, path)? else {
            return Ok(Small::Missing);
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_err(object, "stat of a cache file", e))?;
        if !meta.is_file() {
            tracing::warn!(path = %path.display(), "shared cache: not a regular file; ignored");
            return Ok(Small::Missing);
        }
        if meta.len() > max_len {
            return Ok(Small::TooLarge);
        }
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.take(max_len.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| self.io_err(object, "reading a cache file", e))?;
        if u64::try_from(buf.len()).map_or(true, |n| n > max_len) {
            return Ok(Small::TooLarge);
        }
        Ok(Small::Data(buf))
    }

    /// Deletes a corrupt file (counted as corrupt and as a miss).
    fn discard_corrupt(&self, path: &Path) {
        bump(&self.counters.corrupt);
        bump(&self.counters.misses);
        if let Err(e) = fs::remove_file(path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "shared cache: deleting a corrupt file failed");
        }
    }

    fn evict(&self, object: &str, path: &Path) -> Result<bool, StoreError> {
        match fs::remove_file(path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "shared cache: evicted a cached file that failed verification");
                bump(&self.counters.evictions);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_err(object, "evicting a cache file", e)),
        }
    }

    /// Creates `lock` with `O_EXCL`; a lock older than the stale age is removed and the create
    /// retried once.
    fn try_lock(&self, object: &str, lock: &Path) -> Result<LockAttempt, StoreError> {
        for attempt in 0..2 {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(lock)
            {
                Ok(file) => {
                    let meta = file
                        .metadata()
                        .map_err(|e| self.io_err(object, "stat of a lock file", e))?;
                    return Ok(LockAttempt::Acquired(LockGuard {
                        path: lock.to_path_buf(),
                        dev: meta.dev(),
                        ino: meta.ino(),
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if attempt > 0 {
                        break;
                    }
                    let age = match fs::symlink_metadata(lock) {
                        Ok(meta) => meta
                            .modified()
                            .ok()
                            .and_then(|m| SystemTime::now().duration_since(m).ok())
                            .unwrap_or(Duration::ZERO),
                        // Released between our create and this stat: just retry.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(self.io_err(object, "stat of a lock file", e)),
                    };
                    if age <= self.stale_lock {
                        break;
                    }
                    tracing::warn!(path = %lock.display(), age_ms = age.as_millis(), "shared cache: removing a stale lock");
                    match fs::remove_file(lock) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(self.io_err(object, "removing a stale lock", e)),
                    }
                }
                Err(e) => return Err(self.io_err(object, "creating a lock file", e)),
            }
        }
        Ok(LockAttempt::Held)
    }

    /// e2b's write protocol (see the module documentation).
    fn write_file(
        &self,
        object: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<WriteOutcome, StoreError> {
        let outcome = self.write_file_inner(object, path, bytes);
        match &outcome {
            Ok(WriteOutcome::Written) => bump(&self.counters.writes),
            Ok(WriteOutcome::AlreadyPresent) => bump(&self.counters.already_present),
            Ok(WriteOutcome::Skipped) => bump(&self.counters.skipped),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "shared cache: write failed");
            }
        }
        outcome
    }

    fn write_file_inner(
        &self,
        object: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<WriteOutcome, StoreError> {
        if fs::symlink_metadata(path).is_ok() {
            return Ok(WriteOutcome::AlreadyPresent);
        }
        if let Some(dir) = path.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| self.io_err(object, "creating the cache directory", e))?;
        }
        let _lock = match self.try_lock(object, &with_suffix(path, ".lock"))? {
            LockAttempt::Acquired(guard) => guard,
            LockAttempt::Held => return Ok(WriteOutcome::Skipped),
        };
        let temp = TempGuard {
            path: with_suffix(path, &format!(".tmp.{}", uuid::Uuid::new_v4())),
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp.path)
            .map_err(|e| self.io_err(object, "creating a temp file", e))?;
        file.write_all(bytes)
            .map_err(|e| self.io_err(object, "writing a temp file", e))?;
        file.sync_all()
            .map_err(|e| self.io_err(object, "fsync of a temp file", e))?;
        drop(file);
        if self.fail_before_link.load(Ordering::Relaxed) {
            return Err(self.io_err(
                object,
                "linking a temp file",
                io::Error::other("injected failure"),
            ));
        }
        match fs::hard_link(&temp.path, path) {
            Ok(()) => Ok(WriteOutcome::Written),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(WriteOutcome::AlreadyPresent),
            Err(e) => Err(self.io_err(object, "linking a temp file", e)),
        }
        // `temp` then `_lock` are removed here, on every path.
    }
}

/// Digits only, at least one.
fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `key` names a compressed data object (`.zstd` / `.lz4` suffix): its cache entries are
/// frames, written by the engine, never `.bin` chunks or `size.txt` through [`CachedStore`].
fn is_compressed_object(key: &str) -> bool {
    key.ends_with(".zstd") || key.ends_with(".lz4")
}

/// A [`Store`] that consults a [`SharedCache`] before an inner store, for the operations that map
/// onto whole cache files:
///
/// - [`Store::stat`]: `size.txt`, else the inner stat, written back (the stored size). Compressed
///   data objects (`.zstd`, `.lz4`) pass straight through: `size.txt` holds a single number and
///   their [`ObjectInfo`] needs two.
/// - [`Store::get`]: `content.bin`, else the inner get, written back.
/// - [`Store::read_range`]: only a read of exactly one 4 MiB-aligned chunk of an uncompressed
///   object (or of its short last chunk, checked against the object size) uses the `.bin` file;
///   every other range, and every range of a compressed object, goes straight to the inner store.
/// - `put`, `create`, `exists`: straight to the inner store.
///
/// Write-back happens only after the inner read completed fully; a failed read writes nothing.
/// Cache failures (I/O errors on the cache directory) are logged and never fail a read: the
/// inner store is the source of truth.
#[derive(Debug)]
pub struct CachedStore {
    cache: Arc<SharedCache>,
    inner: Arc<dyn Store>,
}

impl CachedStore {
    /// `inner` behind `cache`.
    pub fn new(cache: Arc<SharedCache>, inner: Arc<dyn Store>) -> Self {
        Self { cache, inner }
    }

    /// The cache (for its counters, and for the engine's frame calls).
    pub fn cache(&self) -> &Arc<SharedCache> {
        &self.cache
    }

    /// The inner store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// A cache lookup whose errors become misses (logged).
    fn soft<T>(&self, key: &str, r: Result<Option<T>, StoreError>) -> Option<T> {
        match r {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(key, error = %e, "shared cache: lookup failed; using the store");
                None
            }
        }
    }

    /// Logs a failed write-back (never an error for the caller).
    fn write_back(&self, key: &str, r: Result<WriteOutcome, StoreError>) {
        if let Err(e) = r {
            tracing::debug!(key, error = %e, "shared cache: write-back failed");
        }
    }

    /// The chunk a read maps onto: `Some((index, len))` when `[offset, +len)` is exactly one
    /// aligned chunk, or the object's short last chunk.
    fn chunk_of(&self, key: &str, offset: u64, len: usize) -> Option<(u64, u64)> {
        if is_compressed_object(key) || !offset.is_multiple_of(CHUNK_SIZE) {
            return None;
        }
        let len = u64::try_from(len).ok()?;
        if len == 0 || len > CHUNK_SIZE {
            return None;
        }
        let index = offset / CHUNK_SIZE;
        if len == CHUNK_SIZE {
            return Some((index, len));
        }
        // A short read is a chunk only if it ends exactly at the end of the object.
        let size = self.stat(key).ok()?.size;
        (offset.checked_add(len)? == size).then_some((index, len))
    }
}

impl Store for CachedStore {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let Some((index, len)) = self.chunk_of(key, offset, buf.len()) else {
            return self.inner.read_range(key, offset, buf);
        };
        if let Some(bytes) = self.soft(key, self.cache.get_chunk(key, index, CHUNK_SIZE, len))
            && bytes.len() == buf.len()
        {
            buf.copy_from_slice(&bytes);
            return Ok(());
        }
        self.inner.read_range(key, offset, buf)?;
        self.write_back(key, self.cache.put_chunk(key, index, CHUNK_SIZE, buf));
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        if is_compressed_object(key) {
            return self.inner.stat(key);
        }
        if let Some(size) = self.soft(key, self.cache.get_size(key)) {
            return Ok(ObjectInfo {
                size,
                uncompressed_size: None,
            });
        }
        let info = self.inner.stat(key)?;
        // One number fits `size.txt`: only when it is unambiguous.
        if info.uncompressed_size.is_none() {
            self.write_back(key, self.cache.put_size(key, info.size));
        }
        Ok(info)
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        if let Some(bytes) = self.soft(key, self.cache.get_blob(key, max_len)) {
            return Ok(bytes);
        }
        let bytes = self.inner.get(key, max_len)?;
        self.write_back(key, self.cache.put_blob(key, &bytes));
        Ok(bytes)
    }

    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        self.inner.put(key, data, opts)
    }

    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.inner.create(key, opts)
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key)
    }
}
