// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Operating-system helpers (Linux only).
//!
//! Contract: every function returns `io::Result` with the OS error on failure and
//! never panics; all `unsafe` of the crate lives here. Thread ids are host TIDs as
//! returned by `gettid(2)`; `pthread_t` values passed in must belong to threads that
//! have not been joined yet (the caller holds their `JoinHandle`).

mod linux;

pub(crate) use linux::{available_cpus, get_affinity, gettid, set_affinity, thread_cpu_time_ns};
