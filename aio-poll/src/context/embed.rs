//! Embedding in another event loop (glib-style prepare / check+dispatch).

use std::time::Duration;

use super::AioContext;

impl AioContext {
    // ----- embedding -----

    /// Embedding, step 1 (glib `prepare`): call before the outer loop waits on
    /// [`as_raw_fd`](Self::as_raw_fd). From now on `notify()` writes the
    /// eventfd so the epoll fd becomes readable. Returns the longest time the
    /// outer loop may sleep (`None` = no limit; timers need it). If work is
    /// already pending, the eventfd is made readable as well, so an outer loop
    /// that ignores the returned timeout still wakes up at once.
    pub fn prepare(&mut self) -> Option<Duration> {
        self.apply_pending_params();
        let pending = self.shared.notifier.set_external();
        let now = self.clock.now_ns();
        let timeout = if pending {
            Some(0)
        } else {
            self.compute_timeout(now)
        };
        if timeout == Some(0) {
            self.shared.notifier.self_kick();
        }
        timeout.map(Duration::from_nanos)
    }

    /// Embedding, step 2 (glib `check` + `dispatch`): the outer loop woke up
    /// (our fd readable or its timeout expired). Runs one non-blocking
    /// iteration. Call [`prepare`](Self::prepare) again before the outer loop
    /// sleeps.
    pub fn check_and_dispatch(&mut self) -> bool {
        self.shared.notifier.clear_external();
        // Accept before processing (a non-blocking poll does not), so that
        // `prepare` does not see the old notification again.
        self.shared.notifier.accept();
        self.poll(false)
    }
}
