//! The local directory store (`file:///abs/dir`), laid out exactly as e2b's FS backend:
//! objects are plain files at their key below the root; a compressed object's
//! `uncompressed-size` metadata is the sidecar `<object>.uncompressed-size` (decimal text),
//! written just before the object itself (see `write_sidecar`).
//!
//! Writes are atomic: data goes to `<final>.tmp.<uuid>` in the same directory, is fsynced and
//! renamed into place, and the directory is fsynced. Reads use positioned reads (`pread`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind};

/// Largest sidecar accepted (a decimal u64 with whitespace).
const MAX_SIDECAR_LEN: u64 = 64;

/// A store rooted at a local directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Step of progressive reads ([`Store::read_range_progress`]): one `pread` and one progress
    /// report per 256 KiB.
    pub const PROGRESS_BATCH: usize = 256 * 1024;

    /// A store rooted at `root` (which should be absolute; it need not exist yet).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn err(&self, kind: StoreErrorKind, key: &str, detail: impl Into<String>) -> StoreError {
        StoreError::new(kind, self.url(), key, detail)
    }

    fn io_err(&self, key: &str, op: &str, e: io::Error) -> StoreError {
        StoreError::io(self.url(), key, op, e)
    }

    /// The path of `key`, after checking it is a relative `/`-separated path with no empty,
    /// `.` or `..` segments.
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        super::join_key(&self.root, key)
            .map_err(|reason| self.err(StoreErrorKind::InvalidKey, key, reason))
    }

    fn open(&self, key: &str) -> Result<File, StoreError> {
        let path = self.path(key)?;
        let file = File::open(&path).map_err(|e| self.io_err(key, "open", e))?;
        let meta = file.metadata().map_err(|e| self.io_err(key, "stat", e))?;
        if !meta.is_file() {
            return Err(self.err(StoreErrorKind::NotFound, key, "not a regular file"));
        }
        Ok(file)
    }

    /// Refuses ranges whose end overflows `u64`.
    fn check_range(&self, key: &str, offset: u64, len: usize) -> Result<(), StoreError> {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        if offset.checked_add(len).is_none() {
            return Err(self.err(
                StoreErrorKind::InvalidKey,
                key,
                format!("range at {offset} of {len} bytes overflows"),
            ));
        }
        Ok(())
    }

    /// The error of a failed read of `[offset, offset + len)`: past the end is
    /// [`StoreErrorKind::Truncated`].
    fn read_err(
        &self,
        file: &File,
        key: &str,
        offset: u64,
        len: usize,
        e: io::Error,
    ) -> StoreError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            let end = offset.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.err(
                StoreErrorKind::Truncated,
                key,
                format!(
                    "range [{offset}, {end}) extends past the end of the object ({size} bytes)"
                ),
            )
        } else {
            self.io_err(key, "read", e)
        }
    }

    /// Writes `data` to `path` atomically (temp file, fsync, rename, fsync dir).
    fn write_atomic(&self, key: &str, path: &Path, data: &[u8]) -> Result<(), StoreError> {
        let mut pending = PendingFile::create(self, key, path)?;
        pending
            .file_mut()
            .write_all(data)
            .map_err(|e| self.io_err(key, "write", e))?;
        pending.finish(self, key)
    }

    /// Before the data object is put in place: writes (or removes a stale) sidecar. Sidecar
    /// first (e2b's FS backend writes it after the data): a plain data object thaw stored with
    /// a header carries `uncompressed-size`, which tells it from a headerless legacy build
    /// ([`crate::layout::load_header`]), so it must never be visible without it. A crash in
    /// between leaves a sidecar without data, which reads as no object.
    fn write_sidecar(&self, key: &str, opts: &PutOptions) -> Result<(), StoreError> {
        let sidecar_key = thaw_codec::names::uncompressed_size_sidecar(key);
        let sidecar = self.path(&sidecar_key)?;
        match opts.uncompressed_size() {
            Some(value) => {
                let value = value.trim();
                if value.parse::<u64>().is_err() {
                    return Err(self.err(
                        StoreErrorKind::Corrupt,
                        key,
                        format!("uncompressed-size metadata {value:?} is not a decimal number"),
                    ));
                }
                self.write_atomic(&sidecar_key, &sidecar, value.as_bytes())
            }
            None => match fs::remove_file(&sidecar) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io_err(&sidecar_key, "removing stale sidecar", e)),
            },
        }
    }
}

impl Store for FileStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.check_range(key, offset, buf.len())?;
        let file = self.open(key)?;
        file.read_exact_at(buf, offset)
            .map_err(|e| self.read_err(&file, key, offset, buf.len(), e))
    }

    /// Reads in [`FileStore::PROGRESS_BATCH`] steps (one `pread` each), reporting after each step.
    fn read_range_progress(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), StoreError> {
        self.check_range(key, offset, buf.len())?;
        let file = self.open(key)?;
        let len = buf.len();
        let mut done = 0usize;
        for batch in buf.chunks_mut(Self::PROGRESS_BATCH) {
            let at = offset.saturating_add(u64::try_from(done).unwrap_or(u64::MAX));
            file.read_exact_at(batch, at)
                .map_err(|e| self.read_err(&file, key, offset, len, e))?;
            done = done.saturating_add(batch.len());
            progress(done);
        }
        if len == 0 {
            progress(0);
        }
        Ok(())
    }

    /// Reads in [`FileStore::PROGRESS_BATCH`] steps (one `pread` each into a reused buffer).
    fn read_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let total = usize::try_from(len).unwrap_or(usize::MAX);
        self.check_range(key, offset, total)?;
        let file = self.open(key)?;
        let mut buf = vec![0u8; Self::PROGRESS_BATCH.min(total)];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(Self::PROGRESS_BATCH as u64))
                .unwrap_or(Self::PROGRESS_BATCH);
            let piece = buf.get_mut(..n).unwrap_or_default();
            file.read_exact_at(piece, offset.saturating_add(done))
                .map_err(|e| self.read_err(&file, key, offset, total, e))?;
            done = done.saturating_add(n as u64);
            if sink(piece).is_break() {
                break;
            }
        }
        Ok(done)
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.path(key).ok()
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let file = self.open(key)?;
        let size = file
            .metadata()
            .map_err(|e| self.io_err(key, "stat", e))?
            .len();
        let sidecar_key = thaw_codec::names::uncompressed_size_sidecar(key);
        let uncompressed_size = match self.get(&sidecar_key, MAX_SIDECAR_LEN) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let value = text.trim().parse::<u64>().map_err(|_| {
                    self.err(
                        StoreErrorKind::Corrupt,
                        &sidecar_key,
                        format!("sidecar {:?} is not a decimal number", text.trim()),
                    )
                })?;
                Some(value)
            }
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        Ok(ObjectInfo {
            size,
            uncompressed_size,
        })
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        let file = self.open(key)?;
        let size = file
            .metadata()
            .map_err(|e| self.io_err(key, "stat", e))?
            .len();
        if size > max_len {
            return Err(self.err(
                StoreErrorKind::TooLarge,
                key,
                format!("object is {size} bytes, more than the limit of {max_len}"),
            ));
        }
        let cap = usize::try_from(size).map_err(|_| {
            self.err(
                StoreErrorKind::TooLarge,
                key,
                "object does not fit in memory",
            )
        })?;
        let mut out = Vec::with_capacity(cap);
        // The object may grow between stat and read: never read more than the limit.
        file.take(max_len.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| self.io_err(key, "read", e))?;
        if u64::try_from(out.len()).unwrap_or(u64::MAX) > max_len {
            return Err(self.err(
                StoreErrorKind::TooLarge,
                key,
                format!("object grew past the limit of {max_len} bytes while read"),
            ));
        }
        Ok(out)
    }

    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.write_sidecar(key, opts)?;
        self.write_atomic(key, &path, data)
    }

    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let path = self.path(key)?;
        // Validate the sidecar key now rather than after the data is written.
        self.path(&thaw_codec::names::uncompressed_size_sidecar(key))?;
        let pending = PendingFile::create(self, key, &path)?;
        Ok(Box::new(FileObjectWriter {
            store: self.clone(),
            key: key.to_owned(),
            opts: opts.clone(),
            pending: Some(pending),
            written: 0,
        }))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_err(key, "stat", e)),
        }
    }
}

/// A temp file `<final>.tmp.<uuid>` that becomes `<final>` on [`PendingFile::finish`] and is
/// removed if dropped before.
#[derive(Debug)]
struct PendingFile {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl PendingFile {
    fn create(store: &FileStore, key: &str, target: &Path) -> Result<Self, StoreError> {
        let dir = target
            .parent()
            .ok_or_else(|| store.err(StoreErrorKind::InvalidKey, key, "key has no parent"))?;
        fs::create_dir_all(dir).map_err(|e| store.io_err(key, "creating directory", e))?;
        let mut tmp_name = target.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp.{}", uuid::Uuid::new_v4()));
        let tmp = dir.join(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| store.io_err(key, "creating temp file", e))?;
        Ok(Self {
            file,
            tmp,
            target: target.to_path_buf(),
            done: false,
        })
    }

    fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// fsync, rename into place, fsync the directory. On failure the temp file is removed when
    /// `self` drops.
    fn finish(&mut self, store: &FileStore, key: &str) -> Result<(), StoreError> {
        if self.done {
            return Err(store.err(StoreErrorKind::Io, key, "writer already finished"));
        }
        self.file
            .sync_all()
            .map_err(|e| store.io_err(key, "fsync", e))?;
        fs::rename(&self.tmp, &self.target).map_err(|e| store.io_err(key, "rename", e))?;
        self.done = true;
        if let Some(dir) = self.target.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| store.io_err(key, "fsync directory", e))?;
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The file store's streaming writer.
#[derive(Debug)]
struct FileObjectWriter {
    store: FileStore,
    key: String,
    opts: PutOptions,
    pending: Option<PendingFile>,
    written: u64,
}

impl Write for FileObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let pending = self
            .pending
            .as_mut()
            .ok_or_else(|| io::Error::other("object writer already committed"))?;
        let n = pending.file_mut().write(buf)?;
        self.written = self
            .written
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.pending.as_mut() {
            Some(p) => p.file_mut().flush(),
            None => Ok(()),
        }
    }
}

impl ObjectWriter for FileObjectWriter {
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let Some(mut pending) = self.pending.take() else {
            return Err(self.store.err(
                StoreErrorKind::Io,
                &self.key,
                "object writer already committed",
            ));
        };
        self.store.write_sidecar(&self.key, &self.opts)?;
        pending.finish(&self.store, &self.key)
    }

    fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().to_path_buf());
        (dir, s)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keys_are_checked() {
        let (_d, s) = store();
        for key in [
            "", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a/./b", "a\0b",
        ] {
            let err = s.path(key).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::InvalidKey, "{key:?}");
        }
        assert!(s.path("b/memfile.zstd").is_ok());
        assert!(s.path("a..b/c").is_ok());
    }

    #[test]
    fn drop_without_commit_leaves_nothing() {
        let (d, s) = store();
        let mut w = s.create("b/obj", &PutOptions::default()).unwrap();
        w.write_all(b"hello").unwrap();
        assert_eq!(w.written(), 5);
        assert_eq!(entries(&d.path().join("b")).len(), 1); // the temp file
        drop(w);
        assert!(entries(&d.path().join("b")).is_empty());
        assert!(!s.exists("b/obj").unwrap());
    }

    #[test]
    fn stale_sidecar_is_removed_on_plain_overwrite() {
        let (_d, s) = store();
        s.put("b/o", b"abc", &PutOptions::with_uncompressed_size(10))
            .unwrap();
        assert_eq!(s.stat("b/o").unwrap().uncompressed_size, Some(10));
        s.put("b/o", b"abcd", &PutOptions::default()).unwrap();
        let info = s.stat("b/o").unwrap();
        assert_eq!((info.size, info.uncompressed_size), (4, None));
    }

    #[test]
    fn corrupt_sidecar_is_an_error() {
        let (d, s) = store();
        s.put("b/o", b"abc", &PutOptions::default()).unwrap();
        fs::write(d.path().join("b/o.uncompressed-size"), "12x").unwrap();
        assert_eq!(s.stat("b/o").unwrap_err().kind(), StoreErrorKind::Corrupt);
    }
}
