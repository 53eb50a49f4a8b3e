#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small; the tests run on 64-bit Linux"
)]
//! Prefaults (pages installed ahead of the guest's touch) and owned staging pages, against a real
//! userfaultfd registered on memory of this process.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use thaw_uffd::{PageState, Prefault, ioctl};

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_page(vm: &Vm, page: usize) {
    let ps = vm.source.page_size as usize;
    assert!(
        vm.mem.read(page * ps, ps) == vm.source.expected(page),
        "page {page} differs"
    );
}

#[test]
fn prefaulted_pages_never_fault_and_are_installed_once() {
    // Pages 0..8 present, 8..12 nil, 12..16 missing.
    let source = TestSource::new(
        16,
        PAGE,
        |p| p < 8,
        |p| (8..12).contains(&p),
        FetchMode::Immediate,
    );
    let vm = start(source, Opts::default()).unwrap();
    let pf = vm.handler.prefaulter();
    for p in 0..12u64 {
        assert_eq!(
            pf.prefault(p * PAGE).unwrap(),
            Prefault::Installed,
            "page {p}"
        );
    }
    assert_eq!(pf.prefault(12 * PAGE).unwrap(), Prefault::NotReady);
    // Twice: the second finds the page installed.
    assert_eq!(
        pf.prefault(3 * PAGE).unwrap(),
        Prefault::Skipped(PageState::Clean)
    );
    assert_eq!(
        pf.prefault(9 * PAGE).unwrap(),
        Prefault::Skipped(PageState::Zero)
    );
    assert!(pf.prefault(PAGE + 1).is_err(), "misaligned");
    assert!(pf.prefault(16 * PAGE).is_err(), "past the end");
    for p in 0..16 {
        assert_page(&vm, p);
    }
    wait_for("fetches", || vm.handler.metrics().copies == 4);
    let m = vm.handler.metrics();
    // Only the four missing pages faulted; the prefaulted ones were already there.
    assert_eq!(m.faults_missing, 4, "{m:?}");
    assert_eq!(m.prefaults, 12);
    assert_eq!(m.prefault_bytes, 8 * PAGE);
    assert_eq!(m.prefault_skipped, 2);
    assert_eq!(m.zero_installs, 0);
    assert_eq!(vm.source.total_fetches(), 4);
    // After a fault installed page 13, a prefault leaves it alone.
    assert_eq!(
        pf.prefault(13 * PAGE).unwrap(),
        Prefault::Skipped(PageState::Clean)
    );
}

#[test]
fn prefaults_racing_faults_install_each_page_once() {
    let pages = 512usize;
    let source = TestSource::new(pages, PAGE, |_| true, |p| p % 7 == 0, FetchMode::Immediate);
    let vm = Arc::new(start(source, Opts::default()).unwrap());
    let barrier = Arc::new(Barrier::new(3));
    let pf = vm.handler.prefaulter();
    let prefaulter = {
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            barrier.wait();
            (0..pages as u64)
                .filter(|&p| pf.prefault(p * PAGE).unwrap() == Prefault::Installed)
                .count()
        })
    };
    let touchers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|t| {
            let (vm, barrier) = (Arc::clone(&vm), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                // One toucher goes backwards, one forwards (writes on odd pages).
                let order: Vec<usize> = if t == 0 {
                    (0..pages).rev().collect()
                } else {
                    (0..pages).collect()
                };
                for p in order {
                    if p % 2 == 1 && t == 1 {
                        let v = vm.mem.read_byte(p * PAGE as usize);
                        assert_eq!(v, vm.source.expected(p)[0], "page {p}");
                    } else {
                        assert_page(&vm, p);
                    }
                }
            })
        })
        .collect();
    for t in touchers {
        t.join().unwrap();
    }
    let prefaulted = prefaulter.join().unwrap() as u64;
    for p in 0..pages {
        assert_page(&vm, p);
    }
    let settled = || {
        let m = vm.handler.metrics();
        m.copies + m.zero_installs + m.prefaults
    };
    wait_for("installs", || settled() == pages as u64);
    let m = vm.handler.metrics();
    // Every page was written into guest memory exactly once, by one side or the other; the
    // loser of a race saw EEXIST (or skipped).
    assert_eq!(m.prefaults, prefaulted, "{m:?}");
    assert_eq!(
        m.copies + m.zero_installs + m.prefaults,
        pages as u64,
        "{m:?}"
    );
}

#[test]
fn owned_staging_pages_are_installed_like_pointers() {
    for page_size in [PAGE, HUGE] {
        let pages = if page_size == PAGE { 32 } else { 4 };
        let source = TestSource::new(
            pages,
            page_size,
            |p| p % 2 == 0,
            |_| false,
            FetchMode::Immediate,
        );
        source.owned.store(true, Ordering::SeqCst);
        let opts = Opts {
            page_size,
            ..Opts::default()
        };
        let vm = start(source, opts).unwrap();
        let pf = vm.handler.prefaulter();
        assert_eq!(pf.prefault(0).unwrap(), Prefault::Installed);
        for p in 0..pages {
            assert_page(&vm, p);
        }
        wait_for("installs", || {
            let m = vm.handler.metrics();
            m.copies + m.prefaults == pages as u64
        });
    }
}

#[test]
fn prefaults_are_write_protected_when_the_peer_tracks_writes() {
    let opts = Opts {
        features: ioctl::FEATURE_EVENT_REMOVE | ioctl::FEATURE_PAGEFAULT_FLAG_WP,
        mode: ioctl::REGISTER_MODE_MISSING | ioctl::REGISTER_MODE_WP,
        ..Opts::default()
    };
    let source = TestSource::new(4, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let vm = start(source, opts).unwrap();
    let pf = vm.handler.prefaulter();
    assert_eq!(pf.prefault(2 * PAGE).unwrap(), Prefault::Installed);
    assert_eq!(vm.handler.write_protect_tracking(), Some(true));
    // The first write to the prefaulted page is a write-protect fault: the page becomes dirty.
    vm.mem.write_byte(2 * PAGE as usize + 5, 0);
    wait_for("dirty", || {
        vm.handler.page_state(2 * PAGE) == Some(PageState::Dirty)
    });
    assert_eq!(vm.handler.dirty_pages(), vec![2 * PAGE]);
    assert_eq!(vm.handler.metrics().faults_missing, 0);
}
