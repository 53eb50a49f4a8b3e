//! Atomic block bitmaps: [`Presence`] (which blocks hold final bytes) and the crate-private
//! [`Bitmap`] it is built on, which `ChunkCache` also uses for its "filling" claims.
//!
//! Memory orderings:
//! - presence bits are set with `Release` (`fetch_or`) after the block's bytes were written and
//!   read with `Acquire`, so a reader that sees a bit also sees the bytes;
//! - claim bits are taken with an `Acquire` compare-exchange and released with a `Release`
//!   `fetch_and`. Every store to a bitmap word is a read-modify-write, so each release heads a
//!   release sequence that any later successful claim reads from: the next writer of a block
//!   happens-after everything the previous claim holder did (its writes and its commits).
//!
//! Bookkeeping: one bit per block, in `u64` words: 32 KiB per GiB at 4 KiB blocks, 64 bytes
//! per GiB at 2 MiB blocks (plus one word of rounding and a few fields).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CacheError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// Bits per bitmap word.
const WORD_BITS: u64 = u64::BITS as u64;

/// Mask with bits `lo..hi` set, for `lo < hi <= 64`.
#[inline]
fn mask(lo: u64, hi: u64) -> u64 {
    let below_hi = if hi >= WORD_BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    let below_lo = (1u64 << (lo % WORD_BITS)) - 1;
    below_hi & !below_lo
}

/// A fixed-length bitmap of atomic words.
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the words: a 1 TiB file has 2^22 of them.
        f.debug_struct("Bitmap")
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// The words that cover a validated, non-empty bit range, each with the mask of its bits.
struct Words<'a> {
    words: std::slice::Iter<'a, AtomicU64>,
    /// Index of the next word.
    index: u64,
    first: u64,
    last: u64,
    range: Range<u64>,
}

impl<'a> Iterator for Words<'a> {
    /// (bit number of the word's bit 0, the word, the mask of the range's bits in it)
    type Item = (u64, &'a AtomicU64, u64);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let word = self.words.next()?;
        let w = self.index;
        self.index = w.saturating_add(1);
        let lo = if w == self.first {
            self.range.start % WORD_BITS
        } else {
            0
        };
        let hi = if w == self.last {
            (self.range.end - 1) % WORD_BITS + 1
        } else {
            WORD_BITS
        };
        Some((w * WORD_BITS, word, mask(lo, hi)))
    }
}

impl Bitmap {
    /// A bitmap of `bits` zero bits.
    pub(crate) fn new(bits: u64) -> Result<Self, CacheError> {
        let n =
            usize::try_from(bits.div_ceil(WORD_BITS)).map_err(|_| CacheError::TooLarge(bits))?;
        Ok(Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        })
    }

    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.bits
    }

    /// Heap bytes used by the words.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[AtomicU64]>(&self.words)
    }

    /// Checks that `r` is a non-empty range inside the bitmap.
    pub(crate) fn check(&self, r: &Range<u64>) -> Result<(), CacheError> {
        if r.start >= r.end {
            return Err(CacheError::EmptyRange {
                start: r.start,
                end: r.end,
            });
        }
        if r.end > self.bits {
            return Err(CacheError::OutOfRange {
                start: r.start,
                end: r.end,
                blocks: self.bits,
            });
        }
        Ok(())
    }

    /// The words covering `r`, or `None` if `r` is empty or out of range.
    #[inline]
    fn words(&self, r: &Range<u64>) -> Option<Words<'_>> {
        if r.start >= r.end || r.end > self.bits {
            return None;
        }
        let first = r.start / WORD_BITS;
        let last = (r.end - 1) / WORD_BITS;
        let words = self
            .words
            .get(usize::try_from(first).ok()?..=usize::try_from(last).ok()?)?;
        Some(Words {
            words: words.iter(),
            index: first,
            first,
            last,
            range: r.clone(),
        })
    }

    /// The word holding `bit` and the bit's mask, if `bit` is in range.
    #[inline]
    fn word_of(&self, bit: u64) -> Option<(&AtomicU64, u64)> {
        if bit >= self.bits {
            return None;
        }
        let word = self.words.get(usize::try_from(bit / WORD_BITS).ok()?)?;
        Some((word, 1u64 << (bit % WORD_BITS)))
    }

    /// Whether `bit` is set (`Acquire`). Out of range: `false`.
    #[inline]
    pub(crate) fn test(&self, bit: u64) -> bool {
        self.word_of(bit)
            .is_some_and(|(word, m)| word.load(Ordering::Acquire) & m != 0)
    }

    /// Whether every bit of `r` is set (`Acquire` loads). Empty or out of range: `false`.
    /// A range inside one word costs one load.
    #[inline]
    pub(crate) fn all_set(&self, r: &Range<u64>) -> bool {
        match self.words(r) {
            Some(mut words) => words.all(|(_, word, m)| word.load(Ordering::Acquire) & m == m),
            None => false,
        }
    }

    /// The first set bit of `r` (`Acquire`), `None` if none is set or `r` is invalid.
    pub(crate) fn first_set(&self, r: &Range<u64>) -> Option<u64> {
        self.words(r)?.find_map(|(base, word, m)| {
            let hit = word.load(Ordering::Acquire) & m;
            (hit != 0).then(|| base + u64::from(hit.trailing_zeros()))
        })
    }

    /// The first clear bit of `r` (`Acquire`), `None` if all are set or `r` is invalid.
    pub(crate) fn first_clear(&self, r: &Range<u64>) -> Option<u64> {
        self.words(r)?.find_map(|(base, word, m)| {
            let miss = !word.load(Ordering::Acquire) & m;
            (miss != 0).then(|| base + u64::from(miss.trailing_zeros()))
        })
    }

    /// Sets every bit of `r` (`Release`); returns how many were clear before. Invalid `r`: 0.
    pub(crate) fn set(&self, r: &Range<u64>) -> u64 {
        self.words(r).map_or(0, |words| {
            words
                .map(|(_, word, m)| {
                    u64::from((m & !word.fetch_or(m, Ordering::Release)).count_ones())
                })
                .sum()
        })
    }

    /// Clears every bit of `r` (`Release`). Invalid `r`: nothing.
    pub(crate) fn clear(&self, r: &Range<u64>) {
        if let Some(words) = self.words(r) {
            for (_, word, m) in words {
                word.fetch_and(!m, Ordering::Release);
            }
        }
    }

    /// Sets every bit of `r` iff all of them were clear, word by word in ascending order with an
    /// `Acquire` compare-exchange; on a conflict, clears the words already taken and returns
    /// `false`. Within one word the claim is all-or-nothing; across words it is not atomic, so
    /// a claim that overlaps another in-flight claim may fail even if that one later fails too
    /// (a spurious `Busy`). Two claims can never both hold the same bit. Invalid `r`: `false`.
    pub(crate) fn try_claim(&self, r: &Range<u64>) -> bool {
        let Some(words) = self.words(r) else {
            return false;
        };
        let mut claimed_to = r.start;
        for (base, word, m) in words {
            let mut cur = word.load(Ordering::Relaxed);
            loop {
                if cur & m != 0 {
                    if claimed_to > r.start {
                        self.clear(&(r.start..claimed_to));
                    }
                    return false;
                }
                match word.compare_exchange_weak(cur, cur | m, Ordering::Acquire, Ordering::Relaxed)
                {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
            claimed_to = base.saturating_add(WORD_BITS).min(r.end);
        }
        true
    }

    /// Clears all bits (exclusive access, so plain stores).
    pub(crate) fn reset(&mut self) {
        for word in &mut self.words {
            *word.get_mut() = 0;
        }
    }
}

/// Which blocks of a file hold final bytes: one bit per block in `AtomicU64` words.
///
/// Block size is a power of two from 4 KiB to 2 MiB. Bits are only ever set (with `Release`)
/// except by [`Presence::reset`], which needs `&mut self`. Queries use `Acquire`. Every method
/// accepts any input: empty or out-of-range ranges answer `false`/`None`/an error, never panic.
///
/// Bookkeeping: one bit per block (32 KiB per GiB at 4 KiB blocks; 64 bytes per GiB at 2 MiB).
#[derive(Debug)]
pub struct Presence {
    bits: Bitmap,
    shift: u32,
    present: AtomicU64,
}

impl Presence {
    /// An all-absent bitmap of `blocks` blocks of `block_size` bytes.
    ///
    /// # Errors
    /// [`CacheError::BlockSize`] if the block size is not a power of two in 4 KiB..=2 MiB,
    /// [`CacheError::TooLarge`] if the block count overflows the address space.
    pub fn new(blocks: u64, block_size: u64) -> Result<Self, CacheError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(CacheError::BlockSize(block_size));
        }
        // The byte capacity must fit in u64 so byte <-> block arithmetic cannot overflow.
        blocks
            .checked_mul(block_size)
            .ok_or(CacheError::TooLarge(blocks))?;
        Ok(Self {
            bits: Bitmap::new(blocks)?,
            shift: block_size.trailing_zeros(),
            present: AtomicU64::new(0),
        })
    }

    /// A bitmap covering `size` bytes (the last block may be partial).
    ///
    /// # Errors
    /// As [`Presence::new`].
    pub fn for_size(size: u64, block_size: u64) -> Result<Self, CacheError> {
        if !block_size.is_power_of_two() {
            return Err(CacheError::BlockSize(block_size));
        }
        Self::new(size.div_ceil(block_size), block_size)
    }

    /// Block size in bytes.
    #[must_use]
    pub fn block_size(&self) -> u64 {
        1u64 << self.shift
    }

    /// Number of blocks.
    #[must_use]
    pub fn blocks(&self) -> u64 {
        self.bits.len()
    }

    /// Bytes of heap memory used by the bitmap.
    #[must_use]
    pub fn bookkeeping_bytes(&self) -> usize {
        self.bits.heap_bytes()
    }

    /// The blocks touched by the byte range `offset..offset + len`; `None` if `len` is 0, the
    /// end overflows, or the range reaches past the last block.
    #[inline]
    #[must_use]
    pub fn blocks_of(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        if len == 0 {
            return None;
        }
        let last_byte = offset.checked_add(len - 1)?;
        let r = (offset >> self.shift)..(last_byte >> self.shift).checked_add(1)?;
        (r.end <= self.bits.len()).then_some(r)
    }

    /// The byte range `start * block_size..end * block_size` of a block range (unchecked
    /// against the bitmap, but never overflowing: `None` if it would).
    #[must_use]
    pub fn bytes_of(&self, blocks: &Range<u64>) -> Option<Range<u64>> {
        let bs = self.block_size();
        Some(blocks.start.checked_mul(bs)?..blocks.end.checked_mul(bs)?)
    }

    /// Whether `block` is present (one `Acquire` load). Out of range: `false`.
    #[inline]
    #[must_use]
    pub fn is_present(&self, block: u64) -> bool {
        self.bits.test(block)
    }

    /// Whether every block touched by the byte range `offset..offset + len` is present. A
    /// range within one block (or within 64 blocks sharing a word) is one `Acquire` load.
    /// Zero length, overflow or out of range: `false`.
    #[inline]
    #[must_use]
    pub fn all_present(&self, offset: u64, len: u64) -> bool {
        self.blocks_of(offset, len)
            .is_some_and(|r| self.bits.all_set(&r))
    }

    /// Whether every block of `blocks` is present. Empty or out of range: `false`.
    #[inline]
    #[must_use]
    pub fn all_present_blocks(&self, blocks: Range<u64>) -> bool {
        self.bits.all_set(&blocks)
    }

    /// The first absent block of `blocks`; `None` if all are present or the range is empty or
    /// out of range.
    #[must_use]
    pub fn first_missing(&self, blocks: Range<u64>) -> Option<u64> {
        self.bits.first_clear(&blocks)
    }

    /// The first present block of `blocks`; `None` if none is, or the range is empty or out of
    /// range.
    #[must_use]
    pub fn first_present(&self, blocks: Range<u64>) -> Option<u64> {
        self.bits.first_set(&blocks)
    }

    /// Marks `blocks` present (`Release`), returning how many were newly marked. Call only after
    /// the blocks' bytes are written: readers that see the bit read the bytes.
    ///
    /// # Errors
    /// [`CacheError::EmptyRange`] or [`CacheError::OutOfRange`]; nothing is marked then.
    pub fn mark_present(&self, blocks: Range<u64>) -> Result<u64, CacheError> {
        self.bits.check(&blocks)?;
        let newly = self.bits.set(&blocks);
        self.present.fetch_add(newly, Ordering::Relaxed);
        Ok(newly)
    }

    /// Number of present blocks (a `Relaxed` counter: exact once writers are quiescent).
    #[must_use]
    pub fn present_count(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// Marks every block absent. Needs exclusive access, so no reader can be relying on a bit.
    pub fn reset(&mut self) {
        self.bits.reset();
        *self.present.get_mut() = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 4 << 10;
    const M2: u64 = 2 << 20;

    #[test]
    fn mask_edges() {
        assert_eq!(mask(0, 64), u64::MAX);
        assert_eq!(mask(0, 1), 1);
        assert_eq!(mask(63, 64), 1 << 63);
        assert_eq!(mask(3, 5), 0b11000);
    }

    #[test]
    fn block_size_validation() {
        assert!(Presence::new(1, K4).is_ok());
        assert!(Presence::new(1, M2).is_ok());
        for bad in [0, 1, 512, 4095, 6 << 10, 4 << 20, u64::MAX] {
            assert!(
                matches!(Presence::new(1, bad), Err(CacheError::BlockSize(_))),
                "{bad}"
            );
        }
        assert!(Presence::new(u64::MAX, K4).is_err());
        assert!(matches!(
            Presence::for_size(u64::MAX, K4),
            Err(CacheError::TooLarge(_))
        ));
    }

    #[test]
    fn mark_query_count() {
        let p = Presence::new(200, K4).unwrap();
        assert_eq!(p.present_count(), 0);
        assert!(!p.is_present(0));
        assert_eq!(p.mark_present(10..70).unwrap(), 60);
        assert_eq!(p.mark_present(60..130).unwrap(), 60);
        assert_eq!(p.present_count(), 120);
        assert!(p.is_present(10) && p.is_present(129) && !p.is_present(9) && !p.is_present(130));
        assert!(p.all_present_blocks(10..130));
        assert!(!p.all_present_blocks(9..130));
        assert!(!p.all_present_blocks(10..131));
        assert_eq!(p.first_missing(10..200), Some(130));
        assert_eq!(p.first_missing(0..200), Some(0));
        assert_eq!(p.first_missing(10..130), None);
        assert_eq!(p.first_present(0..200), Some(10));
        assert_eq!(p.first_present(130..200), None);
        // Byte ranges.
        assert!(p.all_present(10 * K4, 1));
        assert!(p.all_present(10 * K4, 120 * K4));
        assert!(!p.all_present(10 * K4 - 1, 2));
        assert!(!p.all_present(10 * K4, 120 * K4 + 1));
    }

    #[test]
    fn edge_inputs_never_panic() {
        let p = Presence::new(100, K4).unwrap();
        p.mark_present(0..100).unwrap();
        assert!(!p.is_present(100));
        assert!(!p.is_present(u64::MAX));
        assert!(!p.all_present(0, 0));
        assert!(!p.all_present(u64::MAX, 1));
        assert!(!p.all_present(u64::MAX - 10, 20));
        assert!(!p.all_present(0, u64::MAX));
        assert!(p.all_present(0, 100 * K4));
        assert!(!p.all_present(0, 100 * K4 + 1));
        assert!(!p.all_present_blocks(5..5));
        #[expect(clippy::reversed_empty_ranges, reason = "testing bad input")]
        let reversed = 7..5;
        assert!(!p.all_present_blocks(reversed.clone()));
        assert!(!p.all_present_blocks(0..u64::MAX));
        assert_eq!(p.first_missing(reversed.clone()), None);
        assert_eq!(p.first_missing(0..101), None);
        assert!(matches!(
            p.mark_present(5..5),
            Err(CacheError::EmptyRange { .. })
        ));
        assert!(matches!(
            p.mark_present(reversed),
            Err(CacheError::EmptyRange { .. })
        ));
        assert!(matches!(
            p.mark_present(99..101),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.mark_present(u64::MAX - 1..u64::MAX),
            Err(CacheError::OutOfRange { .. })
        ));
        assert_eq!(p.blocks_of(0, 0), None);
        assert_eq!(p.blocks_of(u64::MAX, 2), None);
        assert_eq!(p.bytes_of(&(0..u64::MAX)), None);
        let empty = Presence::new(0, K4).unwrap();
        assert!(!empty.is_present(0));
        assert!(!empty.all_present(0, 1));
        assert_eq!(empty.first_missing(0..1), None);
        assert!(empty.mark_present(0..1).is_err());
    }

    #[test]
    fn huge_blocks() {
        let p = Presence::for_size(5 * M2 + 1, M2).unwrap();
        assert_eq!(p.blocks(), 6);
        assert_eq!(p.blocks_of(M2 - 1, 2), Some(0..2));
        assert_eq!(p.blocks_of(M2, M2), Some(1..2));
        p.mark_present(1..2).unwrap();
        assert!(p.all_present(M2, M2));
        assert!(!p.all_present(M2, M2 + 1));
        assert!(p.all_present(M2 + 4096, 4096));
    }

    #[test]
    fn bookkeeping_is_32k_per_gib_at_4k() {
        let p = Presence::for_size(1 << 30, K4).unwrap();
        assert_eq!(p.bookkeeping_bytes(), 32 << 10);
        let p = Presence::for_size(1 << 30, M2).unwrap();
        assert_eq!(p.bookkeeping_bytes(), 64);
    }

    #[test]
    fn claim_is_exclusive_and_rolls_back() {
        let b = Bitmap::new(300).unwrap();
        assert!(b.try_claim(&(10..200)));
        assert!(!b.try_claim(&(199..250)));
        assert!(!b.try_claim(&(0..11)));
        // The failed claims rolled back whatever they took.
        assert_eq!(b.first_set(&(0..10)), None);
        assert_eq!(b.first_set(&(200..300)), None);
        assert!(b.try_claim(&(200..300)));
        assert!(b.try_claim(&(0..10)));
        // A claim failing in a later word releases the earlier words it took.
        b.clear(&(0..10));
        b.clear(&(10..200));
        assert!(b.try_claim(&(150..151)));
        assert!(!b.try_claim(&(0..160)));
        assert_eq!(b.first_set(&(0..300)), Some(150));
        assert!(!b.try_claim(&(0..0)));
        assert!(!b.try_claim(&(0..301)));
    }

    #[test]
    fn reset_clears() {
        let mut p = Presence::new(64, K4).unwrap();
        p.mark_present(0..64).unwrap();
        p.reset();
        assert_eq!(p.present_count(), 0);
        assert_eq!(p.first_present(0..64), None);
    }
}
