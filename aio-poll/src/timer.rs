// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Timers: one-shot and periodic, ns deadlines on the context clock, run in
//! deadline order (ties in creation order).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::bh::BhFn;

/// Opaque id of a timer.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(pub(crate) u64);

struct Entry {
    deadline: u64,
    period: Option<u64>,
    /// `None` while the callback runs.
    cb: Option<BhFn>,
}

/// The timer list of a context.
#[derive(Default)]
pub(crate) struct Timers {
    next_id: u64,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    /// A `BTreeMap`, not a `HashMap`: `RandomState` seeds itself with the
    /// `getrandom` system call once per thread, which a seccomp allow-list
    /// of the loop's system calls would otherwise have to include.
    entries: BTreeMap<u64, Entry>,
}

impl Timers {
    pub(crate) fn add(&mut self, deadline: u64, period: Option<u64>, cb: BhFn) -> TimerId {
        let id = self.next_id;
        self.next_id += 1;
        let period = period.filter(|p| *p > 0);
        self.entries.insert(
            id,
            Entry {
                deadline,
                period,
                cb: Some(cb),
            },
        );
        self.heap.push(Reverse((deadline, id)));
        TimerId(id)
    }

    pub(crate) fn cancel(&mut self, id: TimerId) -> bool {
        // Stale heap items are skipped lazily.
        self.entries.remove(&id.0).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The next deadline, dropping stale heap heads.
    pub(crate) fn next_deadline(&mut self) -> Option<u64> {
        while let Some(Reverse((deadline, id))) = self.heap.peek().copied() {
            match self.entries.get(&id) {
                Some(e) if e.deadline == deadline && e.cb.is_some() => return Some(deadline),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// The next id that [`add`](Self::add) will hand out.
    pub(crate) fn id_limit(&self) -> u64 {
        self.next_id
    }

    /// Takes the callback of the earliest timer due at `now` created before
    /// `id_limit` (so that a callback adding an expired timer cannot make the
    /// run unbounded). One-shot timers are removed at this point.
    pub(crate) fn take_expired(&mut self, now: u64, id_limit: u64) -> Option<(TimerId, BhFn)> {
        let deadline = self.next_deadline()?;
        if deadline > now {
            return None;
        }
        let Reverse((_, id)) = self.heap.peek().copied()?;
        if id >= id_limit {
            return None;
        }
        self.heap.pop();
        let entry = self.entries.get_mut(&id)?;
        let cb = entry.cb.take()?;
        if entry.period.is_none() {
            self.entries.remove(&id);
        }
        Some((TimerId(id), cb))
    }

    /// Re-arms a periodic timer after its callback ran (unless it was
    /// cancelled meanwhile). Missed periods are skipped, never replayed.
    pub(crate) fn finish(&mut self, id: TimerId, cb: BhFn, now: u64) {
        let Some(entry) = self.entries.get_mut(&id.0) else {
            return;
        };
        let Some(period) = entry.period else {
            return;
        };
        let mut next = entry.deadline.saturating_add(period);
        if next <= now {
            next = now.saturating_add(period);
        }
        entry.deadline = next;
        entry.cb = Some(cb);
        self.heap.push(Reverse((next, id.0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nop() -> BhFn {
        Box::new(|_| {})
    }

    #[test]
    fn order_and_ties() {
        let mut t = Timers::default();
        let c = t.add(30, None, nop());
        let a = t.add(10, None, nop());
        let b = t.add(10, None, nop());
        assert_eq!(t.next_deadline(), Some(10));
        let lim = t.id_limit();
        let got: Vec<TimerId> =
            std::iter::from_fn(|| t.take_expired(100, lim).map(|x| x.0)).collect();
        assert_eq!(got, vec![a, b, c]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn cancel_and_periodic() {
        let mut t = Timers::default();
        let a = t.add(10, None, nop());
        let p = t.add(5, Some(10), nop());
        assert!(t.cancel(a));
        assert!(!t.cancel(a));
        let lim = t.id_limit();
        let (id, cb) = t.take_expired(7, lim).unwrap();
        assert_eq!(id, p);
        assert!(t.take_expired(7, lim).is_none());
        t.finish(id, cb, 7);
        assert_eq!(t.next_deadline(), Some(15));
        // Far behind: skip missed periods.
        let (id, cb) = t.take_expired(100, lim).unwrap();
        t.finish(id, cb, 100);
        assert_eq!(t.next_deadline(), Some(110));
        assert!(t.cancel(p));
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn new_timers_wait_for_next_run() {
        let mut t = Timers::default();
        let lim = t.id_limit();
        t.add(0, None, nop());
        assert!(t.take_expired(10, lim).is_none());
        assert!(t.take_expired(10, t.id_limit()).is_some());
    }
}
