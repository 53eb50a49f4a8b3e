#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
//! Arbitrary and hostile byte streams fed to the NBD server handshake (in arbitrary pieces)
//! never panic, respect the `feed` contract, and never allocate beyond the caps: a counting
//! global allocator records, per thread, the largest single allocation made inside `feed`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::encode_option;
use thaw_codec::nbd::{ExportConfig, HandshakeConfig, HandshakeLimits, Progress, ServerHandshake};

struct Counting;

thread_local! {
    // Per thread, so tests running in parallel do not see each other's allocations.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn config() -> HandshakeConfig {
    let mut disk = ExportConfig::new("rootfs", 1 << 20);
    disk.features.base_allocation = true;
    HandshakeConfig::new(vec![disk, ExportConfig::new("memfile", 1 << 20)])
}

/// The largest single allocation `feed` may make: a buffered payload grows (by doubling) up to
/// the declared length, which is at most `max_option_len`.
fn alloc_bound(limits: &HandshakeLimits) -> usize {
    2 * usize::try_from(limits.max_option_len).unwrap() + 1024
}

/// Feeds `stream` in pieces cut at `cuts`, checking the `feed` contract; returns the largest
/// allocation made inside `feed` and the final progress.
fn drive(stream: &[u8], cuts: &[usize]) -> (usize, Progress) {
    let mut h = ServerHandshake::new(config()).unwrap();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut pos = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    let mut progress = Progress::Continue;
    LARGEST.with(|l| l.set(0));
    for cut in cuts {
        if cut < pos {
            continue;
        }
        let piece = &stream[pos..cut];
        out.clear();
        ARMED.with(|a| a.set(true));
        let step = h.feed(piece, &mut out);
        ARMED.with(|a| a.set(false));
        assert!(step.consumed <= piece.len());
        if step.progress == Progress::Continue {
            assert_eq!(step.consumed, piece.len());
            assert!(h.wants() > 0);
        } else {
            assert!(h.is_finished());
            let again = h.feed(&piece[step.consumed..], &mut out);
            assert_eq!(again.consumed, 0);
            progress = step.progress;
            break;
        }
        pos = cut;
    }
    (LARGEST.with(Cell::get), progress)
}

/// An option with an arbitrary declared length and arbitrary (usually shorter) data.
fn option() -> impl Strategy<Value = Vec<u8>> {
    let number = prop_oneof![
        Just(OPT_EXPORT_NAME),
        Just(OPT_ABORT),
        Just(OPT_LIST),
        Just(OPT_STARTTLS),
        Just(OPT_INFO),
        Just(OPT_GO),
        Just(OPT_STRUCTURED_REPLY),
        Just(OPT_LIST_META_CONTEXT),
        Just(OPT_SET_META_CONTEXT),
        Just(OPT_EXTENDED_HEADERS),
        any::<u32>(),
    ];
    let declared = prop_oneof![
        Just(None),
        Just(Some(u32::MAX)),
        Just(Some(16 * 1024)),
        Just(Some(16 * 1024 + 1)),
        Just(Some(1024 * 1024)),
        Just(Some(4097)),
        (0u32..64).prop_map(Some),
        any::<u32>().prop_map(Some),
    ];
    (
        number,
        declared,
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(number, declared, data)| {
            let mut v = Vec::new();
            encode_option(&mut v, number, &data).unwrap();
            if let Some(len) = declared {
                v[12..16].copy_from_slice(&len.to_be_bytes());
            }
            v
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            valid_flags in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut stream = Vec::new();
            if valid_flags {
                stream.extend_from_slice(&3u32.to_be_bytes());
            }
            stream.extend_from_slice(&bytes);
            let (largest, _) = drive(&stream, &cuts);
            prop_assert!(largest <= alloc_bound(&HandshakeLimits::default()), "{largest}");
        }

        #[test]
        fn hostile_options_stay_within_caps(
            options in proptest::collection::vec(option(), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut stream = 3u32.to_be_bytes().to_vec();
            for o in &options {
                stream.extend_from_slice(o);
            }
            let (largest, _) = drive(&stream, &cuts);
            prop_assert!(largest <= alloc_bound(&HandshakeLimits::default()), "{largest}");
        }
    }

    #[test]
    fn maximal_buffered_option_allocates_within_bound() {
        let limits = HandshakeLimits::default();
        for option in [
            OPT_GO,
            OPT_INFO,
            OPT_SET_META_CONTEXT,
            OPT_LIST_META_CONTEXT,
        ] {
            let mut stream = 3u32.to_be_bytes().to_vec();
            let data = vec![0u8; usize::try_from(limits.max_option_len).unwrap()];
            encode_option(&mut stream, option, &data).unwrap();
            // In one piece and in 1000-byte pieces.
            let cuts: Vec<usize> = (0..stream.len()).step_by(1000).collect();
            for c in [&[][..], &cuts[..]] {
                let (largest, progress) = drive(&stream, c);
                assert_eq!(progress, Progress::Continue);
                assert!(largest <= alloc_bound(&limits), "{largest}");
                // The counter sees the payload buffer itself.
                assert!(largest >= data.len(), "{largest}");
            }
        }
    }

    #[test]
    fn declared_huge_lengths_allocate_nothing_large() {
        for len in [u32::MAX, 1 << 20, (1 << 20) + 1, 16 * 1024 + 1] {
            for option in [OPT_GO, OPT_EXPORT_NAME, OPT_SET_META_CONTEXT, 42] {
                let mut stream = 3u32.to_be_bytes().to_vec();
                stream.extend_from_slice(&IHAVEOPT.to_be_bytes());
                stream.extend_from_slice(&option.to_be_bytes());
                stream.extend_from_slice(&len.to_be_bytes());
                stream.extend_from_slice(&[0u8; 100]);
                let (largest, _) = drive(&stream, &[]);
                assert!(largest <= 4096, "option {option} len {len}: {largest}");
            }
        }
    }
}
