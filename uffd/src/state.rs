//! Per-page state of the memory file, one atomic byte per page.

use std::sync::atomic::{AtomicU8, Ordering};

/// What the handler knows about one page of the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Never installed.
    NotPresent = 0,
    /// A fetch is in flight; further faults on the page wait for its install.
    Fetching = 1,
    /// Installed as zeros (a nil mapping in the source, or a fault after a REMOVE).
    Zero = 2,
    /// Zapped by the guest (`UFFD_EVENT_REMOVE`, e.g. balloon) and not faulted since: the next
    /// fault installs zeros without a fetch.
    Removed = 3,
    /// Installed from the source and not written since (as far as write-protection can tell).
    Clean = 4,
    /// Written by the guest: a write fault installed it, or a write-protect fault unprotected it.
    Dirty = 5,
}

impl PageState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Fetching,
            2 => Self::Zero,
            3 => Self::Removed,
            4 => Self::Clean,
            5 => Self::Dirty,
            _ => Self::NotPresent,
        }
    }
}

/// The state table: `len` pages, all [`PageState::NotPresent`] at first.
#[derive(Debug)]
pub(crate) struct PageStates {
    states: Box<[AtomicU8]>,
}

impl PageStates {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            states: (0..len).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    pub(crate) fn get(&self, idx: usize) -> PageState {
        PageState::from_u8(self.states[idx].load(Ordering::Acquire))
    }

    pub(crate) fn set(&self, idx: usize, s: PageState) {
        self.states[idx].store(s as u8, Ordering::Release);
    }

    /// Moves `idx` from `from` to `to`; false if the page was not in `from`.
    pub(crate) fn transition(&self, idx: usize, from: PageState, to: PageState) -> bool {
        self.states[idx]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Indexes of the pages whose state satisfies `pred`, in order.
    pub(crate) fn select(&self, pred: impl Fn(PageState) -> bool) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&i| pred(self.get(i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_select() {
        let s = PageStates::new(4);
        assert_eq!(s.get(3), PageState::NotPresent);
        assert!(s.transition(1, PageState::NotPresent, PageState::Fetching));
        assert!(!s.transition(1, PageState::NotPresent, PageState::Clean));
        s.set(2, PageState::Dirty);
        s.set(3, PageState::Removed);
        assert_eq!(s.get(1), PageState::Fetching);
        assert_eq!(s.select(|p| p == PageState::Dirty), vec![2]);
        assert_eq!(
            s.select(|p| matches!(p, PageState::Removed | PageState::Fetching)),
            vec![1, 3]
        );
        for v in 0..=5u8 {
            assert_eq!(PageState::from_u8(v) as u8, v);
        }
    }
}
