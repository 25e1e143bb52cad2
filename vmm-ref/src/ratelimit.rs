//! Rate limiting for log lines the guest can trigger at will.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows at most `burst` events per `period`; counts the suppressed ones.
pub struct RateLimiter {
    period: Duration,
    burst: u32,
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter allowing `burst` events per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        RateLimiter {
            period,
            burst,
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// Returns `Some(suppressed_since_last_allowed)` when this event may be logged.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if expired {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window < self.burst {
            s.in_window += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reopens() {
        let rl = RateLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), None);
        assert_eq!(rl.check_at(t0), None);
        assert_eq!(rl.check_at(t0 + Duration::from_secs(11)), Some(2));
    }
}
