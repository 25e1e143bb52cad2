//! `poll_algorithm`: arbitrary parameters and `block_ns`/dispatch sequences through
//! `aio_poll::unstable::Adaptive`, checking its invariants after every step, and the
//! polling window the loop would run with the resulting `poll_ns` through
//! `aio_poll::unstable::PollWindow` (issue #16: whatever the parameters, a polling
//! phase hands control back to the fds, timers and idle handlers at least every
//! `POLL_CHECK_INTERVAL_NS`).
//!
//! Format: one byte (bit 0: algorithm, bits 1..: handler count 1..=8), four raw `i64`
//! parameters (`max_ns`, `grow`, `shrink`, `weight`, unvalidated), then steps. A step is a
//! tag byte: `0..=0xfd` = one iteration where bit `i` of the tag says whether handler `i`
//! was dispatched, followed by an `i64` `block_ns`; `0xfe` = new raw parameters (four
//! `i64`s) applied at run time; `0xff` = reset. At most [`MAX_STEPS`] steps.

use aio_poll::unstable::{weighted_ewma, Adaptive, PollStep, PollWindow, POLL_CHECK_INTERVAL_NS};
use aio_poll::{PollAlgorithm, PollParams};

use crate::bytes::{Reader, Writer};

/// Upper bound on the steps taken from one input.
pub const MAX_STEPS: usize = 4096;

/// One step of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// An iteration: which handlers were dispatched (bit mask) and the measured `block_ns`.
    Iteration {
        /// Bit `i` set: handler `i` was dispatched.
        dispatched: u8,
        /// The iteration's `block_ns` (any value, including negative).
        block_ns: i64,
    },
    /// A run-time parameter change (raw, may be invalid).
    SetParams([i64; 4]),
    /// Reset of the adaptive state.
    Reset,
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The algorithm.
    pub algorithm: PollAlgorithm,
    /// Handlers on the poll list (1..=8).
    pub handlers: usize,
    /// Raw `max_ns`, `grow`, `shrink`, `weight`.
    pub params: [i64; 4],
    /// The sequence.
    pub steps: Vec<Step>,
}

fn params(raw: [i64; 4], algorithm: PollAlgorithm) -> PollParams {
    PollParams::default()
        .with_max_ns(raw[0])
        .with_grow_shrink(raw[1], raw[2])
        .with_weight(raw[3])
        .with_algorithm(algorithm)
}

fn read_params(r: &mut Reader<'_>) -> [i64; 4] {
    [r.i64(), r.i64(), r.i64(), r.i64()]
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Input {
        let mut r = Reader::new(data);
        let head = r.u8();
        let algorithm = if head & 1 == 0 {
            PollAlgorithm::Weighted
        } else {
            PollAlgorithm::Classic
        };
        let handlers = 1 + usize::from(head >> 1) % 8;
        let params = read_params(&mut r);
        let mut steps = Vec::new();
        while !r.is_empty() && steps.len() < MAX_STEPS {
            steps.push(match r.u8() {
                0xff => Step::Reset,
                0xfe => Step::SetParams(read_params(&mut r)),
                dispatched => Step::Iteration {
                    dispatched,
                    block_ns: r.i64(),
                },
            });
        }
        Input {
            algorithm,
            handlers,
            params,
            steps,
        }
    }

    /// Encodes (the inverse of [`Input::decode`] for inputs it produced).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let algo = u8::from(self.algorithm == PollAlgorithm::Classic);
        let count = u8::try_from(self.handlers.clamp(1, 8) - 1).unwrap_or(0);
        w.u8(algo | (count << 1));
        for p in self.params {
            w.i64(p);
        }
        for step in &self.steps {
            match *step {
                Step::Iteration {
                    dispatched,
                    block_ns,
                } => {
                    w.u8(dispatched.min(0xfd)).i64(block_ns);
                }
                Step::SetParams(p) => {
                    w.u8(0xfe);
                    for v in p {
                        w.i64(v);
                    }
                }
                Step::Reset => {
                    w.u8(0xff);
                }
            }
        }
        w.finish()
    }
}

/// Simulates the polling phase the loop runs with window `poll_ns`, observing
/// the clock at pseudo-random steps derived from `seed`, and checks that it
/// never keeps polling past a due check nor past the window, and that checks
/// are never more frequent than the interval (saturated clocks aside).
fn check_window(poll_ns: i64, seed: i64) {
    let window = u64::try_from(poll_ns).unwrap_or(0);
    let mut x = seed.unsigned_abs() | 1;
    let start = x.rotate_left(17) / 2;
    let mut w = PollWindow::new(start, window);
    let (mut now, mut last_check) = (start, start);
    for _ in 0..64 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        now = now.saturating_add(x % (3 * POLL_CHECK_INTERVAL_NS));
        match w.step(now) {
            PollStep::Expired => {
                assert!(now - start >= window, "window ended early");
                return;
            }
            PollStep::Check => {
                assert!(
                    now - last_check >= POLL_CHECK_INTERVAL_NS || now == u64::MAX,
                    "checks more often than the interval"
                );
                last_check = now;
            }
            PollStep::Poll => {
                assert!(now - start < window, "polled past the window");
                assert!(
                    now - last_check < POLL_CHECK_INTERVAL_NS,
                    "polled past a due check: fds, timers and idle handlers starve (issue #16)"
                );
            }
        }
    }
}

/// Runs an input and panics (a fuzzer finding) on any broken invariant:
/// validation accepts exactly the documented ranges, effective values are never 0,
/// `0 <= poll_ns <= max_ns`, every handler `ns` stays in `[0, max_ns]` for the weighted
/// algorithm, the EWMA stays between its inputs, the polling window of the resulting
/// `poll_ns` checks the fds at least every `POLL_CHECK_INTERVAL_NS` whatever its size
/// (issue #16), and nothing overflows (the crate is built with overflow checks in the
/// fuzz profile).
pub fn check(input: &Input) {
    let mut state: Option<Adaptive> = None;
    apply_params(&mut state, input.params, input.algorithm);
    let mut ns = vec![0i64; input.handlers];
    for step in &input.steps {
        match *step {
            Step::SetParams(raw) => {
                if apply_params(&mut state, raw, input.algorithm) {
                    ns.iter_mut().for_each(|n| *n = 0);
                }
            }
            Step::Reset => {
                if let Some(a) = state.as_mut() {
                    a.reset(ns.iter_mut());
                    assert_eq!(a.poll_ns(), 0);
                }
            }
            Step::Iteration {
                dispatched,
                block_ns,
            } => {
                let Some(a) = state.as_mut() else { continue };
                let before: Vec<i64> = ns.clone();
                let p = a.params();
                a.update(
                    block_ns,
                    ns.iter_mut()
                        .enumerate()
                        .map(|(i, n)| (n, dispatched & (1 << i) != 0)),
                );
                assert!(
                    a.poll_ns() >= 0 && a.poll_ns() <= p.max_ns,
                    "poll_ns out of range"
                );
                check_window(a.poll_ns(), block_ns);
                if p.max_ns == 0 {
                    assert_eq!(a.poll_ns(), 0);
                    assert_eq!(ns, before, "max_ns == 0 must not touch handlers");
                }
                for (i, (&n, &old)) in ns.iter().zip(&before).enumerate() {
                    assert!(n >= 0, "handler ns negative");
                    assert!(n <= p.max_ns.max(old), "handler ns grew above max_ns");
                    if p.algorithm == PollAlgorithm::Weighted {
                        assert!(n <= p.max_ns, "handler ns above max_ns");
                        if p.max_ns > 0 && dispatched & (1 << i) != 0 && n != 0 {
                            let b = block_ns.max(0);
                            let e = weighted_ewma(old, b, p.weight);
                            assert_eq!(n, e, "dispatched handler ns is not the EWMA");
                            if old != 0 {
                                assert!(e <= old.max(b) && e >= old.min(b).saturating_sub(1));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Validates and applies raw parameters; returns whether they were accepted.
fn apply_params(state: &mut Option<Adaptive>, raw: [i64; 4], algorithm: PollAlgorithm) -> bool {
    let p = params(raw, algorithm);
    let expect_ok = raw.iter().all(|v| *v >= 0) && raw[3] <= 63;
    let result = match state.as_mut() {
        Some(a) => a.set_params(p).map(|()| a.params()),
        None => Adaptive::new(p).map(|a| {
            let eff = a.params();
            *state = Some(a);
            eff
        }),
    };
    match result {
        Ok(eff) => {
            assert!(expect_ok, "invalid parameters accepted: {raw:?}");
            assert_eq!(eff.max_ns, raw[0]);
            assert!(
                eff.grow >= 1 && eff.shrink >= 1,
                "0 must select the default"
            );
            assert!((1..=63).contains(&eff.weight), "weight out of range");
            if let Some(a) = state.as_ref() {
                assert_eq!(a.poll_ns(), 0, "a parameter change must reset poll_ns");
            }
            true
        }
        Err(e) => {
            assert!(!expect_ok, "valid parameters rejected: {raw:?}: {e}");
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// Canonical cases for the seed corpus: the design note's defaults under steady,
/// bursty and sporadic loads for both algorithms, parameter changes and resets.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let defaults = [32768, 2, 2, 3];
    let steady: Vec<Step> = (0..64)
        .map(|i| Step::Iteration {
            dispatched: 1,
            block_ns: 8_000 + (i % 5) * 500,
        })
        .collect();
    let bursty: Vec<Step> = (0..64)
        .map(|i| Step::Iteration {
            dispatched: if i % 8 == 0 { 0b10 } else { 0b01 },
            block_ns: if i % 8 == 0 { 200_000 } else { 2_000 },
        })
        .collect();
    let mut changes = steady.clone();
    changes.insert(10, Step::SetParams([100_000, 4, 4, 1]));
    changes.insert(20, Step::SetParams([-1, 0, 0, 64]));
    changes.insert(30, Step::Reset);
    changes.push(Step::SetParams([0, 2, 2, 3]));
    changes.push(Step::Iteration {
        dispatched: 1,
        block_ns: i64::MAX,
    });
    // Issue #16: poll-max-ns and poll-grow at i64::MAX saturate the window on the
    // second grow step; lengthening intervals make the smoothed value grow.
    let live_lock: Vec<Step> = (0..32)
        .map(|i| Step::Iteration {
            dispatched: 1,
            block_ns: 10_000 << (i % 16),
        })
        .collect();
    let mut out = Vec::new();
    for (algorithm, name) in [
        (PollAlgorithm::Weighted, "weighted"),
        (PollAlgorithm::Classic, "classic"),
    ] {
        let input = Input {
            algorithm,
            handlers: 2,
            params: [i64::MAX, i64::MAX, 2, 3],
            steps: live_lock.clone(),
        };
        out.push((format!("{name}-issue16-huge-grow-and-max"), input.encode()));
    }
    for (algorithm, name) in [
        (PollAlgorithm::Weighted, "weighted"),
        (PollAlgorithm::Classic, "classic"),
    ] {
        for (load, steps, handlers) in [
            ("steady", &steady, 1),
            ("bursty", &bursty, 2),
            ("changes", &changes, 3),
        ] {
            let input = Input {
                algorithm,
                handlers,
                params: defaults,
                steps: steps.clone(),
            };
            out.push((format!("{name}-{load}"), input.encode()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_and_pass() {
        for (name, bytes) in seeds() {
            let input = Input::decode(&bytes);
            assert_eq!(input.encode(), bytes, "{name}");
            check(&input);
        }
    }

    #[test]
    fn issue16_window_saturates_and_still_checks() {
        let mut a = Adaptive::new(
            PollParams::default()
                .with_max_ns(i64::MAX)
                .with_grow_shrink(i64::MAX, 2)
                .with_algorithm(PollAlgorithm::Weighted),
        )
        .unwrap();
        let mut ns = [0i64];
        for block_ns in [20_000, 40_000] {
            a.update(block_ns, ns.iter_mut().map(|n| (n, true)));
        }
        assert_eq!(a.poll_ns(), i64::MAX);
        for seed in 0..64 {
            check_window(a.poll_ns(), seed);
        }
    }

    #[test]
    fn any_prefix_decodes_and_passes() {
        for (_, bytes) in seeds() {
            for len in (0..bytes.len()).step_by(7) {
                check(&Input::decode(&bytes[..len]));
            }
        }
    }
}
