#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small; the tests run on 64-bit Linux"
)]
//! The fault loop against a real userfaultfd registered on memory of this process, with the
//! handshake done over a real unix socket by a fake Firecracker thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use thaw_uffd::{Exit, HandlerConfig, PageState, ioctl};

/// Waits (bounded) for `cond`; the bound only turns a hang into a failure, it is not a speed check.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn check_page(vm: &Vm, page: usize) {
    let ps = vm.source.page_size as usize;
    let got = vm.mem.read(page * ps, ps);
    let want = vm.source.expected(page);
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!(
            "page {page}: byte {first} is {:#x}, expected {:#x}",
            got[first], want[first]
        );
    }
}

#[test]
fn every_byte_matches_the_source_from_concurrent_threads() {
    let pages = 256;
    let source = TestSource::new(pages, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let vm = start(source, Opts::default()).unwrap();
    let vm = Arc::new(vm);
    // Four threads touch interleaved pages, then every page is compared byte for byte.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || {
                for p in (t..pages).step_by(4) {
                    check_page(&vm, p);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for p in 0..pages {
        check_page(&vm, p);
        assert_eq!(
            vm.handler.page_state(p as u64 * PAGE),
            Some(PageState::Clean)
        );
    }
    // Counters are bumped just after the ioctl that woke the faulting thread: let them settle.
    wait_for("copy count", || vm.handler.metrics().copies == pages as u64);
    let m = vm.handler.metrics();
    assert_eq!(m.bytes_copied, pages as u64 * PAGE);
    assert_eq!(m.faults_missing, pages as u64);
    assert_eq!(vm.source.total_fetches(), 0);
    // MISSING-only registration: the first WP copy got EINVAL and the handler fell back.
    assert_eq!(vm.handler.write_protect_tracking(), Some(false));
    assert!(vm.handler.dirty_pages().is_empty());
}

#[test]
fn write_faults_install_writable_pages_and_mark_them_dirty() {
    let source = TestSource::new(8, PAGE, |_| true, |p| p == 5, FetchMode::Immediate);
    let vm = start(source, Opts::default()).unwrap();
    vm.mem.write_byte(2 * PAGE as usize + 10, 0xAB);
    vm.mem.write_byte(5 * PAGE as usize, 0xCD); // zero page, written
    assert_eq!(vm.mem.read_byte(2 * PAGE as usize + 10), 0xAB);
    assert_eq!(
        vm.mem.read_byte(2 * PAGE as usize + 11),
        pattern(2 * PAGE + 11)
    );
    assert_eq!(vm.mem.read_byte(5 * PAGE as usize + 1), 0);
    check_page(&vm, 3);
    assert_eq!(vm.handler.dirty_pages(), vec![2 * PAGE, 5 * PAGE]);
    assert_eq!(vm.handler.page_state(3 * PAGE), Some(PageState::Clean));
    assert_eq!(vm.handler.metrics().faults_write, 2);
}

#[test]
fn zero_pages_are_installed_without_fetching() {
    let source = TestSource::new(
        16,
        PAGE,
        |p| p % 2 == 0,
        |p| p % 2 == 1,
        FetchMode::Fail(u32::MAX),
    );
    let vm = start(source, Opts::default()).unwrap();
    for p in 0..16 {
        check_page(&vm, p);
    }
    for p in (1..16).step_by(2) {
        assert!(
            vm.mem
                .read(p * PAGE as usize, PAGE as usize)
                .iter()
                .all(|&b| b == 0)
        );
    }
    assert_eq!(vm.source.total_fetches(), 0);
    let zeros: Vec<u64> = (1..16).step_by(2).map(|p| p * PAGE).collect();
    assert_eq!(vm.handler.zero_or_removed_pages(), zeros);
    wait_for("zero installs", || vm.handler.metrics().zero_installs == 8);
}

#[test]
fn missing_pages_are_fetched_once_and_installed_by_the_completion() {
    // A small fault storm: 8 threads walk 256 missing pages in different orders (so hot pages are
    // shared), with fetches completing on other threads after a delay.
    let pages = 256;
    let threads = 8;
    let source = TestSource::new(
        pages,
        PAGE,
        |_| false,
        |_| false,
        FetchMode::Delayed(Duration::from_millis(1)),
    );
    let vm = Arc::new(start(source, Opts::default()).unwrap());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || {
                // Page order: a different stride per thread (odd, so it visits every page).
                let stride = 2 * t + 1;
                for i in 0..pages {
                    check_page(&vm, (i * stride + t * 17) % pages);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for p in 0..pages {
        assert_eq!(
            vm.source.fetch_count(p),
            1,
            "page {p} fetched more than once"
        );
    }
    // Each page installed exactly once: one copy per page, no second write.
    wait_for("copy count", || vm.handler.metrics().copies == pages as u64);
    let m = vm.handler.metrics();
    assert_eq!(m.fetch_latency_count(), pages as u64, "{m:?}");
    assert_eq!(m.zero_installs, 0);
}

#[test]
fn a_slow_fetch_does_not_hold_up_other_faults() {
    // Page 0's fetch waits for a gate; faults on the other pages must be served meanwhile.
    let source = TestSource::new(64, PAGE, |p| p != 0, |_| false, FetchMode::Gated);
    let vm = Arc::new(start(source, Opts::default()).unwrap());
    let blocked: Vec<_> = (0..2)
        .map(|i| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || {
                // Two threads on page 0 (dedupe: one fetch).
                vm.mem.read(i * 100, 8)
            })
        })
        .collect();
    wait_for("the fetch of page 0", || vm.source.fetch_count(0) == 1);
    for p in 1..64 {
        check_page(&vm, p);
    }
    // The other pages were served while page 0's fetch is still held at the gate.
    assert!(blocked.iter().all(|t| !t.is_finished()));
    assert_eq!(vm.handler.page_state(0), Some(PageState::Fetching));
    vm.source.open_gate();
    for (i, t) in blocked.into_iter().enumerate() {
        let got = t.join().unwrap();
        let want: Vec<u8> = (i as u64 * 100..i as u64 * 100 + 8).map(pattern).collect();
        assert_eq!(got, want);
    }
    check_page(&vm, 0);
    assert_eq!(vm.source.fetch_count(0), 1);
}

#[test]
fn a_removed_page_reads_as_zeros_without_a_fetch() {
    let source = TestSource::new(8, PAGE, |_| true, |_| false, FetchMode::Fail(u32::MAX));
    let vm = start(source, Opts::default()).unwrap();
    check_page(&vm, 3);
    check_page(&vm, 4);
    let lookups = vm.source.lookups.load(Ordering::SeqCst);
    // MADV_DONTNEED raises UFFD_EVENT_REMOVE (madvise waits until the handler reads it).
    vm.mem
        .madvise(3 * PAGE as usize, 2 * PAGE as usize, libc::MADV_DONTNEED)
        .unwrap();
    // madvise returns once the handler has read the event; its bookkeeping follows at once.
    wait_for("the remove event", || {
        vm.handler.metrics().remove_events == 1
            && vm.handler.page_state(4 * PAGE) == Some(PageState::Removed)
    });
    assert_eq!(vm.handler.page_state(3 * PAGE), Some(PageState::Removed));
    assert!(
        vm.mem
            .read(3 * PAGE as usize, PAGE as usize)
            .iter()
            .all(|&b| b == 0)
    );
    vm.mem.write_byte(4 * PAGE as usize, 9);
    assert_eq!(vm.mem.read_byte(4 * PAGE as usize + 1), 0);
    // No lookup, no fetch: the source was never asked about the removed pages.
    assert_eq!(vm.source.lookups.load(Ordering::SeqCst), lookups);
    assert_eq!(vm.source.total_fetches(), 0);
    assert_eq!(vm.handler.page_state(3 * PAGE), Some(PageState::Zero));
    assert_eq!(vm.handler.page_state(4 * PAGE), Some(PageState::Dirty));
    assert_eq!(vm.handler.zero_or_removed_pages(), vec![3 * PAGE]);
    check_page(&vm, 5);
}

#[test]
fn removes_racing_faults_never_hang_or_corrupt() {
    // A balloon-like storm: one thread zaps pages while others fault on them. Every read must
    // be the page's data or zeros (after a remove), and everything must finish.
    let pages = 64;
    let source = TestSource::new(pages, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let vm = Arc::new(start(source, Opts::default()).unwrap());
    let zapper = {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || {
            for round in 0..20 {
                for p in (round % 4..pages).step_by(4) {
                    vm.mem
                        .madvise(p * PAGE as usize, PAGE as usize, libc::MADV_DONTNEED)
                        .unwrap();
                }
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || {
                for _ in 0..20 {
                    for p in 0..pages {
                        let got = vm.mem.read(p * PAGE as usize, PAGE as usize);
                        let zero = got.iter().all(|&b| b == 0);
                        assert!(zero || got == vm.source.expected(p), "page {p} corrupt");
                    }
                }
            })
        })
        .collect();
    zapper.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    wait_for("every remove event", || {
        vm.handler.metrics().remove_events == 20 * 16
    });
    let m = vm.handler.metrics();
    eprintln!("remove storm: {m:?}");
    assert!(!vm.handler.is_finished());
}

#[test]
fn write_protect_faults_mark_pages_dirty() {
    let features = ioctl::FEATURE_EVENT_REMOVE | ioctl::FEATURE_PAGEFAULT_FLAG_WP;
    let opts = Opts {
        features,
        mode: ioctl::REGISTER_MODE_MISSING | ioctl::REGISTER_MODE_WP,
        ..Opts::default()
    };
    let source = TestSource::new(8, PAGE, |p| p != 6, |p| p == 6, FetchMode::Immediate);
    let vm = start(source, opts).unwrap();
    // Read faults install write-protected pages (data and zeros)...
    for p in 0..8 {
        check_page(&vm, p);
    }
    assert_eq!(vm.handler.write_protect_tracking(), Some(true));
    assert!(vm.handler.dirty_pages().is_empty());
    // ...so the first write to each is a write-protect fault, which unprotects and marks Dirty.
    vm.mem.write_byte(PAGE as usize + 7, 0x11);
    vm.mem.write_byte(6 * PAGE as usize, 0x22);
    assert_eq!(vm.mem.read_byte(PAGE as usize + 7), 0x11);
    assert_eq!(vm.mem.read_byte(6 * PAGE as usize), 0x22);
    assert_eq!(vm.mem.read_byte(6 * PAGE as usize + 1), 0);
    assert_eq!(vm.handler.dirty_pages(), vec![PAGE, 6 * PAGE]);
    assert_eq!(vm.handler.metrics().faults_wp, 2);
    // A second write to an unprotected page is no fault at all.
    vm.mem.write_byte(PAGE as usize + 8, 0x12);
    assert_eq!(vm.handler.metrics().faults_wp, 2);
    assert_eq!(vm.handler.page_state(2 * PAGE), Some(PageState::Clean));
    // A zapped write-protected page, then written: zeros plus the write, never the source data.
    vm.mem
        .madvise(3 * PAGE as usize, PAGE as usize, libc::MADV_DONTNEED)
        .unwrap();
    wait_for("the remove", || {
        vm.handler.page_state(3 * PAGE) == Some(PageState::Removed)
    });
    vm.mem.write_byte(3 * PAGE as usize + 5, 0x33);
    let page = vm.mem.read(3 * PAGE as usize, PAGE as usize);
    assert_eq!(page[5], 0x33);
    assert!(page.iter().enumerate().all(|(i, &b)| i == 5 || b == 0));
    assert_eq!(vm.handler.page_state(3 * PAGE), Some(PageState::Dirty));
    eprintln!("write after remove: {:?}", vm.handler.metrics());
}

#[test]
fn fetch_failures_are_retried_within_the_budget() {
    let opts = Opts {
        config: HandlerConfig {
            fetch_attempts: 3,
            fetch_backoff: Duration::from_millis(1),
            kill_peer_on_failure: false,
            ..HandlerConfig::default()
        },
        ..Opts::default()
    };
    // Two failures per page, then success: within a budget of 3 attempts.
    let source = TestSource::new(4, PAGE, |_| false, |_| false, FetchMode::Fail(2));
    let vm = start(source, opts).unwrap();
    for p in 0..4 {
        check_page(&vm, p);
        assert_eq!(vm.source.fetch_count(p), 3);
    }
    let m = vm.handler.metrics();
    assert_eq!(m.fetch_failures, 8);
    assert_eq!(m.fetch_retries, 8);
}

#[test]
fn peer_hang_up_ends_the_handler_quietly() {
    let source = TestSource::new(4, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let vm = start(source, Opts::default()).unwrap();
    check_page(&vm, 1);
    let Vm {
        handler, client, ..
    } = vm;
    drop(client);
    assert_eq!(handler.join().unwrap(), Exit::PeerGone);
}

#[test]
fn stop_ends_the_handler() {
    let source = TestSource::new(4, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let vm = start(source, Opts::default()).unwrap();
    vm.handler.stop();
    let Vm { handler, .. } = vm;
    assert_eq!(handler.join().unwrap(), Exit::Stopped);
}

/// Raises vm.nr_hugepages (root) so `n` free 2 MiB huge pages exist, and puts the old value
/// back when dropped.
struct HugePages {
    restore: Option<u64>,
    pub ok: bool,
}

impl HugePages {
    fn reserve(n: u64) -> Self {
        let meminfo = |k: &str| -> u64 {
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find(|l| l.starts_with(k))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0)
        };
        if meminfo("HugePages_Free:") >= n {
            return Self {
                restore: None,
                ok: true,
            };
        }
        let total = meminfo("HugePages_Total:");
        let wrote = std::fs::write("/proc/sys/vm/nr_hugepages", (total + n).to_string()).is_ok();
        Self {
            restore: wrote.then_some(total),
            ok: meminfo("HugePages_Free:") >= n,
        }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(total) = self.restore {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
        }
    }
}

#[test]
fn two_mib_pages_are_copied_whole() {
    let pages = 3;
    let opts_huge = Opts {
        page_size: HUGE,
        features: ioctl::FEATURE_EVENT_REMOVE | ioctl::FEATURE_MISSING_HUGETLBFS,
        mmap_flags: libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT),
        ..Opts::default()
    };
    let source = TestSource::new(pages, HUGE, |p| p != 1, |p| p == 1, FetchMode::Immediate);
    let huge = HugePages::reserve(pages as u64);
    let vm = match huge.ok.then(|| start(Arc::clone(&source), opts_huge)) {
        Some(Some(vm)) => {
            eprintln!("2 MiB test: hugetlbfs pages");
            vm
        }
        _ => {
            // No hugetlb pages: THP-eligible anonymous memory, still served in 2 MiB copies.
            eprintln!(
                "2 MiB test: no hugetlb pages available; using 2 MiB-aligned anonymous memory"
            );
            let opts = Opts {
                page_size: HUGE,
                ..Opts::default()
            };
            start(source, opts).unwrap()
        }
    };
    // Touch the middle of each page: the handler installs the whole 2 MiB page.
    for p in 0..pages {
        assert_eq!(
            vm.mem.read_byte(p * HUGE as usize + 12345),
            if p == 1 {
                0
            } else {
                pattern(p as u64 * HUGE + 12345)
            }
        );
    }
    for p in 0..pages {
        check_page(&vm, p);
    }
    wait_for("installs", || {
        let m = vm.handler.metrics();
        m.copies == 2 && m.zero_installs == 1
    });
    let m = vm.handler.metrics();
    assert_eq!(m.faults_missing, pages as u64, "{m:?}");
    assert_eq!(m.bytes_copied, 2 * HUGE);
    assert_eq!(m.zero_installs, 1);
    assert_eq!(vm.handler.page_size(), HUGE);
    drop(vm);
    drop(huge);
}
