// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-IOThread statistics.

use serde::{Deserialize, Serialize};

use crate::iothread::IoThreadState;

/// Statistics of one IOThread (see [`IoThreadRegistry::stats`](crate::IoThreadRegistry::stats)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IoThreadStats {
    /// IOThread id.
    pub id: String,
    /// Host thread id.
    pub thread_id: i64,
    /// Life-cycle state of the loop.
    pub state: IoThreadState,
    /// CPU time used by the thread so far (user + system), in ns.
    pub cpu_time_ns: u64,
    /// The event loop's counters (snapshot published by the loop).
    pub poll: aio_poll::Stats,
}
