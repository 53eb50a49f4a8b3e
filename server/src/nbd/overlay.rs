//! The copy-on-write overlay of a writable export: the client's writes land in a local sparse
//! file, never in the layered image.
//!
//! - One state per block (the export's block size, 4 KiB for a rootfs): *base* (read from the
//!   layered image), *data* (the overlay file holds the block) or *zero* (reads as zeros; the
//!   overlay file has a hole there). Two atomic bitmaps hold it ([`Overlay::dirty_blocks`],
//!   [`Overlay::zero_blocks`]: what a pause/export turns into a diff layer).
//! - Writes are serialised by one mutex (they are `pwrite`s into the page cache); a write that
//!   covers a block partially merges it with the block's current contents (read-modify-write;
//!   the caller supplies the base bytes of such blocks, fetched beforehand without the lock).
//!   An all-zero block is not written: its range is punched (`FALLOC_FL_PUNCH_HOLE`) and the
//!   block becomes *zero*.
//! - Reads take no lock: a block's bytes are written before its state bit is published
//!   (Release / Acquire), so a reader that sees *data* reads the new bytes.
//! - [`Overlay::flush`] is `fdatasync`: FLUSH and FUA are durable once it returns. The block
//!   states themselves live in memory: the overlay is a per-process session (a restarted server
//!   starts from the image again), which is what pause/export consumes.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use rustix::fs::{FallocateFlags, fallocate};

/// State of one overlay block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Not written: read from the layered image.
    Base,
    /// Written: the overlay file holds it.
    Data,
    /// Zeroed (an all-zero write, WRITE_ZEROES or TRIM): reads as zeros, a hole in the file.
    Zero,
}

/// A fixed-size atomic bitmap.
#[derive(Debug)]
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(n: u64) -> Self {
        let words = usize::try_from(n.div_ceil(64)).unwrap_or(0);
        Self((0..words).map(|_| AtomicU64::new(0)).collect())
    }
    fn word(&self, b: u64) -> Option<(&AtomicU64, u64)> {
        let w = usize::try_from(b / 64).ok()?;
        Some((self.0.get(w)?, 1u64 << (b % 64)))
    }
    fn get(&self, b: u64) -> bool {
        self.word(b)
            .is_some_and(|(w, m)| w.load(Ordering::Acquire) & m != 0)
    }
    fn set(&self, b: u64, on: bool) {
        if let Some((w, m)) = self.word(b) {
            if on {
                w.fetch_or(m, Ordering::Release);
            } else {
                w.fetch_and(!m, Ordering::Release);
            }
        }
    }
    fn any(&self) -> bool {
        self.0.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }
    fn ones(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let bit = u64::from(v.trailing_zeros());
                v &= v - 1;
                let b = i as u64 * 64 + bit;
                match runs.last_mut() {
                    Some(r) if r.end == b => r.end = b + 1,
                    _ => runs.push(b..b + 1),
                }
            }
        }
        runs
    }
}

/// The overlay of one export. See the module docs.
#[derive(Debug)]
pub struct Overlay {
    file: File,
    path: PathBuf,
    size: u64,
    block: u64,
    dirty: Bits,
    zero: Bits,
    write_lock: Mutex<()>,
    /// Bumped by every write, write-zeroes and trim (see [`Overlay::generation`]).
    generation: AtomicU64,
}

/// Base contents of the blocks a write covers partially, fetched by the caller before
/// [`Overlay::write`] (block index, `block_size` bytes).
pub type BaseBlocks = Vec<(u64, Vec<u8>)>;

impl Overlay {
    /// A new, empty overlay of `size` bytes with `block`-byte blocks, in a new file `name`
    /// under `dir` (created; removed when the overlay is dropped).
    ///
    /// # Errors
    /// The file cannot be created or sized; `block` is not a power of two >= 512.
    pub fn create(dir: &Path, name: &str, size: u64, block: u64) -> io::Result<Self> {
        if !block.is_power_of_two() || block < 512 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay block size {block} is not a power of two >= 512"),
            ));
        }
        std::fs::create_dir_all(dir)?;
        // At most 64 characters of the name: the file name stays within NAME_MAX.
        let safe: String = name
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("overlay-{safe}-{}.raw", uuid::Uuid::new_v4()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(size)?;
        let blocks = size.div_ceil(block);
        Ok(Self {
            file,
            path,
            size,
            block,
            dirty: Bits::new(blocks),
            zero: Bits::new(blocks),
            write_lock: Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// Device size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state of block `b`.
    pub fn state(&self, b: u64) -> BlockState {
        if self.dirty.get(b) {
            BlockState::Data
        } else if self.zero.get(b) {
            BlockState::Zero
        } else {
            BlockState::Base
        }
    }

    /// A counter bumped by every mutation (write, write-zeroes, trim), whether or not it changed
    /// a block's state: an export that reads the same value before and after ran with no write
    /// in between.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// [`generation`](Self::generation) read after the mutations in progress have finished (it
    /// takes the write lock for a moment): what an export compares with after its last read.
    pub fn settled_generation(&self) -> u64 {
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.generation.load(Ordering::Acquire)
    }

    /// Whether any block was ever written or zeroed.
    pub fn is_touched(&self) -> bool {
        self.dirty.any() || self.zero.any()
    }

    /// Runs of blocks whose data lives in the overlay file.
    pub fn dirty_blocks(&self) -> Vec<Range<u64>> {
        self.dirty.ones()
    }

    /// Runs of blocks zeroed in the overlay.
    pub fn zero_blocks(&self) -> Vec<Range<u64>> {
        self.zero.ones()
    }

    /// Blocks touched by `offset..offset + len` (empty for `len == 0`).
    pub fn blocks_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.block..(offset + len).div_ceil(self.block)
    }

    /// Consecutive runs of equal state covering `offset..offset + len`, as byte ranges clipped
    /// to the request.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(Range<u64>, BlockState)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(Range<u64>, BlockState)> = Vec::new();
        for b in self.blocks_of(offset, end.saturating_sub(offset)) {
            let s = self.state(b);
            let r = (b * self.block).max(offset)..((b + 1) * self.block).min(end);
            match out.last_mut() {
                Some((last, st)) if *st == s && last.end == r.start => last.end = r.end,
                _ => out.push((r, s)),
            }
        }
        out
    }

    /// Whether any block of the range is not *base*.
    pub fn touches(&self, offset: u64, len: u64) -> bool {
        self.blocks_of(offset, len)
            .any(|b| self.dirty.get(b) || self.zero.get(b))
    }

    /// Blocks a write of `offset..offset + len` covers only partly and that are *base* now:
    /// the caller fetches their base bytes for [`write`](Self::write).
    pub fn partial_base_blocks(&self, offset: u64, len: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        let end = offset + len;
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        for b in [first, last] {
            let bstart = b * self.block;
            let bend = (bstart + self.block).min(self.size);
            let whole = bstart >= offset && bend <= end;
            if !whole && self.state(b) == BlockState::Base && !out.contains(&b) {
                out.push(b);
            }
        }
        out
    }

    /// Reads `buf.len()` bytes at `offset` from the overlay's view of *data* and *zero* blocks
    /// (the caller reads *base* blocks from the image).
    ///
    /// # Errors
    /// I/O errors of the overlay file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset` (inside the device). `base` holds the base bytes of the blocks
    /// [`partial_base_blocks`](Self::partial_base_blocks) named.
    ///
    /// # Errors
    /// I/O errors; [`io::ErrorKind::InvalidInput`] when a needed base block is missing.
    pub fn write(&self, offset: u64, data: &[u8], base: &BaseBlocks) -> io::Result<()> {
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let len = data.len() as u64;
        let end = offset + len;
        let bs = usize::try_from(self.block).map_err(io::Error::other)?;
        let mut block_buf = vec![0u8; bs];
        for b in self.blocks_of(offset, len) {
            let bstart = b * self.block;
            let bend = (bstart + self.block).min(self.size);
            let blen = usize::try_from(bend - bstart).map_err(io::Error::other)?;
            let content: &[u8] = if bstart >= offset && bend <= end {
                let from = usize::try_from(bstart - offset).map_err(io::Error::other)?;
                &data[from..from + blen]
            } else {
                // Partial block: merge with its current contents.
                let cur = &mut block_buf[..blen];
                match self.state(b) {
                    BlockState::Data => self.file.read_exact_at(cur, bstart)?,
                    BlockState::Zero => cur.fill(0),
                    BlockState::Base => {
                        let Some((_, bytes)) = base.iter().find(|(i, _)| *i == b) else {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!("base bytes of block {b} missing"),
                            ));
                        };
                        let n = blen.min(bytes.len());
                        cur[..n].copy_from_slice(&bytes[..n]);
                    }
                }
                let lo = offset.max(bstart);
                let hi = end.min(bend);
                let dst = usize::try_from(lo - bstart).map_err(io::Error::other)?;
                let src = usize::try_from(lo - offset).map_err(io::Error::other)?;
                let n = usize::try_from(hi - lo).map_err(io::Error::other)?;
                cur[dst..dst + n].copy_from_slice(&data[src..src + n]);
                cur
            };
            self.put_block(b, bstart, content, false)?;
        }
        Ok(())
    }

    /// Stores one whole block (already merged): zeros become a hole unless `no_hole`.
    fn put_block(&self, b: u64, at: u64, content: &[u8], no_hole: bool) -> io::Result<()> {
        if !no_hole && content.iter().all(|&x| x == 0) {
            self.punch(at, content.len() as u64)?;
            self.zero.set(b, true);
            self.dirty.set(b, false);
        } else {
            self.file.write_all_at(content, at)?;
            self.dirty.set(b, true);
            self.zero.set(b, false);
        }
        Ok(())
    }

    fn punch(&self, at: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            at,
            len,
        )
        .map_err(io::Error::from)
    }

    /// Makes `offset..offset + len` read as zeros: whole blocks become *zero* (a hole), or
    /// allocated zero data with `no_hole`; partial blocks are merged (`base` as for
    /// [`write`](Self::write)).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        base: &BaseBlocks,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let mut head_tail = Vec::new();
        let mut whole: Option<Range<u64>> = None;
        for b in self.blocks_of(offset, len) {
            let bstart = b * self.block;
            let bend = (bstart + self.block).min(self.size);
            if bstart >= offset && bend <= end {
                whole = Some(match whole {
                    Some(r) => r.start..b + 1,
                    None => b..b + 1,
                });
            } else {
                head_tail.push(b);
            }
        }
        for b in head_tail {
            let bstart = b * self.block;
            let lo = offset.max(bstart);
            let hi = end.min(bstart + self.block);
            let zeros = vec![0u8; usize::try_from(hi - lo).map_err(io::Error::other)?];
            self.write(lo, &zeros, base)?;
        }
        if let Some(r) = whole {
            let _g = self
                .write_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.generation.fetch_add(1, Ordering::AcqRel);
            let at = r.start * self.block;
            let stop = (r.end * self.block).min(self.size);
            if no_hole {
                fallocate(
                    &self.file,
                    FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                    at,
                    stop - at,
                )
                .or_else(|_| {
                    // Filesystems without ZERO_RANGE: write the zeros.
                    let zeros = vec![0u8; usize::try_from(self.block).unwrap_or(4096)];
                    let mut p = at;
                    while p < stop {
                        let n = (stop - p).min(self.block);
                        self.file
                            .write_all_at(&zeros[..usize::try_from(n).unwrap_or(0)], p)?;
                        p += n;
                    }
                    Ok::<(), io::Error>(())
                })?;
                for b in r {
                    self.dirty.set(b, true);
                    self.zero.set(b, false);
                }
            } else {
                self.punch(at, stop - at)?;
                for b in r {
                    self.zero.set(b, true);
                    self.dirty.set(b, false);
                }
            }
        }
        Ok(())
    }

    /// TRIM: the whole blocks inside the range become *zero* (reads after a trim may return
    /// anything; zeros are the cheapest answer that keeps the device consistent). Partial blocks
    /// are left as they are.
    ///
    /// # Errors
    /// I/O errors.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let first = offset.div_ceil(self.block);
        let end = offset.saturating_add(len);
        let last = if end >= self.size {
            self.size.div_ceil(self.block)
        } else {
            end / self.block
        };
        if last <= first {
            return Ok(());
        }
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let at = first * self.block;
        let stop = (last * self.block).min(self.size);
        self.punch(at, stop - at)?;
        for b in first..last {
            self.zero.set(b, true);
            self.dirty.set(b, false);
        }
        Ok(())
    }

    /// `fdatasync` of the overlay file: every write that returned before is durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "overlay: removing the file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov(size: u64) -> (tempfile::TempDir, Overlay) {
        let d = tempfile::tempdir().unwrap();
        let o = Overlay::create(d.path(), "t", size, 4096).unwrap();
        (d, o)
    }

    #[test]
    fn whole_and_partial_writes_merge() {
        let (_d, o) = ov(64 * 1024);
        assert!(!o.is_touched());
        let data = vec![7u8; 8192];
        o.write(4096, &data, &Vec::new()).unwrap();
        assert_eq!(o.state(1), BlockState::Data);
        assert_eq!(o.state(2), BlockState::Data);
        assert_eq!(o.dirty_blocks(), vec![1..3]);
        // Partial write into a base block: needs its base bytes.
        assert_eq!(o.partial_base_blocks(100, 10), vec![0]);
        assert!(o.write(100, &[1; 10], &Vec::new()).is_err());
        o.write(100, &[1; 10], &vec![(0, vec![9u8; 4096])]).unwrap();
        let mut b = vec![0u8; 4096];
        o.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..100], &[9u8; 100][..]);
        assert_eq!(&b[100..110], &[1u8; 10][..]);
        assert_eq!(&b[110..], &[9u8; 3986][..]);
        // Partial write into a data block needs nothing.
        assert!(o.partial_base_blocks(4096 + 5, 3).is_empty());
        o.write(4096 + 5, &[2; 3], &Vec::new()).unwrap();
        o.read_at(4096, &mut b).unwrap();
        assert_eq!(&b[5..8], &[2u8; 3][..]);
        assert_eq!(b[4], 7);
    }

    #[test]
    fn zeros_become_holes() {
        let (_d, o) = ov(64 * 1024);
        o.write(0, &vec![5u8; 16384], &Vec::new()).unwrap();
        o.write(4096, &vec![0u8; 4096], &Vec::new()).unwrap();
        assert_eq!(o.state(1), BlockState::Zero);
        assert_eq!(o.zero_blocks(), vec![1..2]);
        assert_eq!(o.dirty_blocks(), vec![0..1, 2..4]);
        o.write_zeroes(8192, 8192, false, &Vec::new()).unwrap();
        assert_eq!(o.zero_blocks(), vec![1..4]);
        o.write_zeroes(0, 4096, true, &Vec::new()).unwrap();
        assert_eq!(o.state(0), BlockState::Data);
        let mut b = vec![1u8; 4096];
        o.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        o.trim(4096 * 4 + 1, 4096 * 3).unwrap();
        assert_eq!(o.state(4), BlockState::Base);
        assert_eq!(o.state(5), BlockState::Zero);
        assert_eq!(o.state(6), BlockState::Zero);
        assert_eq!(o.state(7), BlockState::Base);
        o.flush().unwrap();
        let runs = o.runs(0, 64 * 1024);
        assert_eq!(runs[0], (0..4096, BlockState::Data));
        assert_eq!(runs[1], (4096..16384, BlockState::Zero));
    }

    #[test]
    fn file_removed_on_drop() {
        let (_d, o) = ov(8192);
        let p = o.path().to_path_buf();
        assert!(p.exists());
        drop(o);
        assert!(!p.exists());
    }
}
