//! [`LayeredFile`]: a build file as its header sees it: every read resolved through the
//! mappings into segments (zeros for nil mappings, which fetch nothing, or a range of some
//! build's data), served from that build's cache, fetching what is missing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use anyhow::Context;
use thaw_codec::{BuildId, FileKind, HUGEPAGE_SIZE, Header};

use super::build::{BuildFile, Waits, wait_all, wait_all_blocking, wait_all_untimed};
use super::callback::spawn_with_callback;
use super::pool::Priority;
use super::{ReadError, Shared, bump};
use crate::layout::{load_header, resolve_source};

/// Zeros to borrow for nil mappings (one 2 MiB page).
const ZEROS_LEN: usize = 2 << 20;
const _: () = assert!(ZEROS_LEN as u64 == HUGEPAGE_SIZE);
static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];

/// One piece of a read.
#[derive(Debug, Clone)]
pub enum Segment {
    /// A nil mapping: reads as zeros, fetches nothing.
    Zeros {
        /// Device offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A range of a build's data.
    Data {
        /// Device offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The build.
        build: BuildId,
        /// Offset in that build's data file.
        build_offset: u64,
    },
}

/// The bytes of a read: borrowed from the cache memory when the read lies inside one mapping
/// (zero copy), else assembled.
#[derive(Debug)]
pub enum ReadBuf<'a> {
    /// Borrowed from the cache memory (present bytes never change while borrowed).
    Cache(&'a [u8]),
    /// A nil mapping: zeros.
    Zeros(usize),
    /// Assembled from several segments.
    Owned(Vec<u8>),
}

impl ReadBuf<'_> {
    /// The bytes. Zeros longer than 2 MiB are not borrowable: they come back as `Owned`.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Cache(s) => s,
            Self::Zeros(n) => ZEROS.get(..*n).unwrap_or_default(),
            Self::Owned(v) => v,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Cache(s) => s.len(),
            Self::Zeros(n) => *n,
            Self::Owned(v) => v.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A referenced build, opened on first use.
#[derive(Debug)]
struct Slot {
    build: BuildId,
    opened: OnceLock<Arc<BuildFile>>,
    opening: Mutex<()>,
}

/// A build file of a layered image (header + the caches of the builds it references).
#[derive(Debug)]
pub struct LayeredFile {
    shared: Arc<Shared>,
    header: Arc<Header>,
    file: FileKind,
    legacy: bool,
    size: u64,
    slots: Vec<Slot>,
    /// Per mapping: the index of its build in `slots`, `None` for nil mappings.
    mapping_slot: Vec<Option<usize>>,
    /// The mapping of the last lookup that needed a search (reads cluster: most lookups hit
    /// it and skip the binary search). Written only when it changes.
    hint: AtomicUsize,
}

impl LayeredFile {
    pub(crate) fn open(
        shared: Arc<Shared>,
        build: BuildId,
        file: FileKind,
    ) -> anyhow::Result<Self> {
        let loaded = load_header(shared.meta.as_ref(), build, file)?
            .with_context(|| format!("{}: build {build} has no {file}", shared.meta.url()))?;
        let header = loaded.header;
        let mut slots: Vec<Slot> = Vec::new();
        let mut mapping_slot = Vec::with_capacity(header.mappings.len());
        for m in &header.mappings {
            if m.is_nil() {
                mapping_slot.push(None);
                continue;
            }
            let idx = match slots.iter().position(|s| s.build == m.build_id) {
                Some(i) => i,
                None => {
                    slots.push(Slot {
                        build: m.build_id,
                        opened: OnceLock::new(),
                        opening: Mutex::new(()),
                    });
                    slots.len() - 1
                }
            };
            mapping_slot.push(Some(idx));
        }
        Ok(Self {
            size: header.metadata.size,
            header: Arc::new(header),
            shared,
            file,
            legacy: loaded.legacy,
            slots,
            mapping_slot,
            hint: AtomicUsize::new(0),
        })
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Block size (the header's).
    pub fn block_size(&self) -> u64 {
        self.header.metadata.block_size
    }

    /// True when the header was synthesised for a headerless (legacy) build.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// The file kind.
    pub fn file(&self) -> FileKind {
        self.file
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ReadError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ReadError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Calls `f(mapping index, device offset, len, build offset)` for each segment of the
    /// range, in order (the range must be inside the device).
    fn walk(&self, offset: u64, len: u64, mut f: impl FnMut(usize, u64, u64, u64) -> bool) -> bool {
        let end = offset + len;
        let maps = &self.header.mappings;
        let Some(mut i) = self.mapping_index(offset) else {
            return false;
        };
        let mut pos = offset;
        while pos < end {
            let Some(m) = maps.get(i) else {
                return false;
            };
            if pos < m.offset || pos >= m.end() {
                return false;
            }
            let n = m.end().min(end) - pos;
            let build_off = m.build_storage_offset.saturating_add(pos - m.offset);
            if !f(i, pos, n, build_off) {
                return false;
            }
            pos += n;
            i += 1;
        }
        true
    }

    /// The segments of `offset..offset + len`.
    ///
    /// # Errors
    /// [`ReadError::OutOfRange`].
    pub fn segments(&self, offset: u64, len: u64) -> Result<Vec<Segment>, ReadError> {
        self.check(offset, len)?;
        let mut out = Vec::new();
        self.walk(offset, len, |i, pos, n, build_offset| {
            out.push(match self.mapping_slot.get(i).copied().flatten() {
                None => Segment::Zeros {
                    offset: pos,
                    len: n,
                },
                Some(s) => Segment::Data {
                    offset: pos,
                    len: n,
                    build: self.slots[s].build,
                    build_offset,
                },
            });
            true
        });
        Ok(out)
    }

    /// The open build file of slot `s` (lock-free once open).
    fn slot_file(&self, s: usize) -> Result<&Arc<BuildFile>, ReadError> {
        let slot = &self.slots[s];
        if let Some(f) = slot.opened.get() {
            return Ok(f);
        }
        let _opening = slot.opening.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = slot.opened.get() {
            return Ok(f);
        }
        let opened = resolve_source(
            self.shared.meta.as_ref(),
            self.file,
            &self.header,
            slot.build,
        )
        .and_then(|source| self.shared.build_file(source, self.block_size()))
        .map_err(|e| ReadError::Open {
            build: slot.build,
            file: self.file,
            cause: format!("{e:#}"),
        })?;
        Ok(slot.opened.get_or_init(|| opened))
    }

    /// Opens every build the header references now (each at most one metadata request to the
    /// store), so that later [`request`](Self::request)s do no store I/O on the calling thread:
    /// the UFFD fault thread calls `request` and must not wait for the store.
    ///
    /// # Errors
    /// [`ReadError::Open`] for a build whose data cannot be found or described.
    pub fn open_all(&self) -> Result<(), ReadError> {
        for s in 0..self.slots.len() {
            self.slot_file(s)?;
        }
        Ok(())
    }

    /// Zero-copy hit: the bytes if the range lies inside one mapping and is present (or nil).
    /// No lock, no allocation. `None` otherwise (a miss, or several mappings).
    #[inline]
    pub fn try_get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.try_get_inner(offset, len, true)
    }

    /// Like [`try_get`](Self::try_get), but `None` for a nil mapping too: the bytes of a range
    /// inside one data mapping, present in the cache (the NBD server's READ fast path, which
    /// leaves holes to the slow path so that structured replies still report them as holes).
    #[inline]
    pub fn try_get_data(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.try_get_inner(offset, len, false)
    }

    #[inline]
    fn try_get_inner(&self, offset: u64, len: usize, nil_as_zeros: bool) -> Option<&[u8]> {
        let len64 = u64::try_from(len).ok()?;
        self.check(offset, len64).ok()?;
        let i = self.mapping_index(offset)?;
        let m = self.header.mappings.get(i)?;
        if offset.checked_add(len64)? > m.end() {
            return None;
        }
        match self.mapping_slot.get(i).copied().flatten() {
            None if nil_as_zeros => ZEROS.get(..len),
            None => None,
            Some(s) => {
                let f = self.slots[s].opened.get()?;
                f.cache
                    .get(m.build_storage_offset + (offset - m.offset), len)
            }
        }
    }

    /// The index of the mapping holding device byte `offset`: the hint if it holds it, else a
    /// binary search (which updates the hint).
    #[inline]
    fn mapping_index(&self, offset: u64) -> Option<usize> {
        let maps = &self.header.mappings;
        let hint = self.hint.load(Ordering::Relaxed);
        if let Some(m) = maps.get(hint)
            && m.offset <= offset
            && offset < m.end()
        {
            return Some(hint);
        }
        let i = maps
            .partition_point(|m| m.offset <= offset)
            .checked_sub(1)?;
        self.hint.store(i, Ordering::Relaxed);
        Some(i)
    }

    /// Copies what is present; returns whether the whole range was.
    fn copy_present(&self, offset: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        self.walk(offset, buf.len() as u64, |i, _pos, n, build_off| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let Some(dst) = buf.get_mut(done..done.saturating_add(n)) else {
                return false;
            };
            done += n;
            match self.mapping_slot.get(i).copied().flatten() {
                None => {
                    dst.fill(0);
                    true
                }
                Some(s) => self.slots[s]
                    .opened
                    .get()
                    .is_some_and(|f| f.cache.copy_to(build_off, dst)),
            }
        })
    }

    /// Starts the fetches of everything missing in the range (segments concurrently).
    fn start(&self, offset: u64, len: u64, priority: Priority) -> Result<Waits, ReadError> {
        let mut pieces = Vec::new();
        self.walk(offset, len, |i, _pos, n, build_off| {
            if let Some(s) = self.mapping_slot.get(i).copied().flatten() {
                pieces.push((s, build_off, n));
            }
            true
        });
        let mut waits = Vec::new();
        for (s, build_off, n) in pieces {
            let f = self.slot_file(s)?;
            if f.cache.all_present(build_off, n) {
                continue;
            }
            waits.extend(f.start(build_off, n, priority)?);
        }
        Ok(waits)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.shared.config.fetch_deadline
    }

    /// Reads `buf.len()` bytes at `offset`, blocking the calling thread on misses.
    ///
    /// # Errors
    /// [`ReadError`]: out of range, a build that cannot be opened, a failed fetch.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.check(offset, buf.len() as u64)?;
        if self.copy_present(offset, buf) {
            return Ok(());
        }
        bump(&self.shared.counters.misses, 1);
        let deadline = self.deadline();
        loop {
            let waits = self.start(offset, buf.len() as u64, Priority::Demand)?;
            wait_all_blocking(&waits, deadline)?;
            if self.copy_present(offset, buf) {
                return Ok(());
            }
        }
    }

    /// [`read_at`](Self::read_at) for async callers (NBD connections on the workers): waits
    /// without blocking the thread.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.check(offset, buf.len() as u64)?;
        if self.copy_present(offset, buf) {
            return Ok(());
        }
        bump(&self.shared.counters.misses, 1);
        let deadline = self.deadline();
        loop {
            let waits = self.start(offset, buf.len() as u64, Priority::Demand)?;
            wait_all(waits, deadline).await?;
            if self.copy_present(offset, buf) {
                return Ok(());
            }
        }
    }

    /// Makes the range present (fetching what is missing) and returns its bytes: borrowed from
    /// the cache when the range lies inside one mapping (zero copy), else assembled.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub async fn read_ref(&self, offset: u64, len: usize) -> Result<ReadBuf<'_>, ReadError> {
        let len64 = len as u64;
        self.check(offset, len64)?;
        if let Some(b) = self.borrow(offset, len) {
            return Ok(b);
        }
        if self.segments_count(offset, len64) == 1 {
            bump(&self.shared.counters.misses, 1);
            let deadline = self.deadline();
            loop {
                let waits = self.start(offset, len64, Priority::Demand)?;
                wait_all(waits, deadline).await?;
                if let Some(b) = self.borrow(offset, len) {
                    return Ok(b);
                }
            }
        }
        let mut v = vec![0u8; len];
        self.read(offset, &mut v).await?;
        Ok(ReadBuf::Owned(v))
    }

    /// Blocking [`read_ref`](Self::read_ref).
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub fn read_ref_blocking(&self, offset: u64, len: usize) -> Result<ReadBuf<'_>, ReadError> {
        let len64 = len as u64;
        self.check(offset, len64)?;
        if let Some(b) = self.borrow(offset, len) {
            return Ok(b);
        }
        if self.segments_count(offset, len64) == 1 {
            bump(&self.shared.counters.misses, 1);
            let deadline = self.deadline();
            loop {
                let waits = self.start(offset, len64, Priority::Demand)?;
                wait_all_blocking(&waits, deadline)?;
                if let Some(b) = self.borrow(offset, len) {
                    return Ok(b);
                }
            }
        }
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(ReadBuf::Owned(v))
    }

    fn borrow(&self, offset: u64, len: usize) -> Option<ReadBuf<'_>> {
        let i = self.mapping_index(offset)?;
        let m = self.header.mappings.get(i)?;
        if offset.checked_add(len as u64)? > m.end() {
            return None;
        }
        match self.mapping_slot.get(i).copied().flatten() {
            None => Some(ReadBuf::Zeros(len)).filter(|_| len <= ZEROS.len()),
            Some(s) => {
                let f = self.slots[s].opened.get()?;
                f.cache
                    .get(m.build_storage_offset + (offset - m.offset), len)
                    .map(ReadBuf::Cache)
            }
        }
    }

    fn segments_count(&self, offset: u64, len: u64) -> usize {
        let mut n = 0;
        self.walk(offset, len, |_, _, _, _| {
            n += 1;
            true
        });
        n
    }

    /// Warms `offset..offset + len` at prefetch priority, blocking until present. Demand reads
    /// queued meanwhile run first.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub fn prefetch_blocking(&self, offset: u64, len: u64) -> Result<(), ReadError> {
        self.check(offset, len)?;
        let deadline = self.deadline();
        let waits = self.start(offset, len, Priority::Prefetch)?;
        wait_all_blocking(&waits, deadline)?;
        Ok(())
    }

    /// Starts fetching whatever `offset..offset + len` misses and calls `done` once it is
    /// present (or failed), on this thread when nothing is missing, else on the fetch thread
    /// that completed it. Never blocks: the UFFD fault thread keeps serving other faults. The
    /// transfers' deadlines bound the wait (the reader-side deadline of
    /// [`read_at`](Self::read_at) needs a timer this path does not have).
    pub fn request(
        &self,
        offset: u64,
        len: u64,
        done: impl FnOnce(Result<(), ReadError>) + Send + 'static,
    ) {
        if let Err(e) = self.check(offset, len) {
            done(Err(e));
            return;
        }
        match self.start(offset, len, Priority::Demand) {
            Err(e) => done(Err(e)),
            Ok(waits) if waits.is_empty() => done(Ok(())),
            Ok(waits) => {
                bump(&self.shared.counters.misses, 1);
                spawn_with_callback(wait_all_untimed(waits), move |r| {
                    done(r.map_err(ReadError::from));
                });
            }
        }
    }

    /// Whether every byte of the range is present (or nil). Out of range: `false`.
    pub fn is_present(&self, offset: u64, len: u64) -> bool {
        if self.check(offset, len).is_err() {
            return false;
        }
        self.walk(offset, len, |i, _pos, n, build_off| {
            match self.mapping_slot.get(i).copied().flatten() {
                None => true,
                Some(s) => self.slots[s]
                    .opened
                    .get()
                    .is_some_and(|f| f.cache.all_present(build_off, n)),
            }
        })
    }

    /// The open build files (those touched so far), for metrics and tests.
    pub fn open_builds(&self) -> Vec<Arc<BuildFile>> {
        self.slots
            .iter()
            .filter_map(|s| s.opened.get().cloned())
            .collect()
    }

    /// Bytes of bookkeeping of the open build caches (presence and claim bitmaps).
    pub fn bookkeeping_bytes(&self) -> usize {
        self.open_builds()
            .iter()
            .map(|f| f.cache.bookkeeping_bytes())
            .sum()
    }
}
