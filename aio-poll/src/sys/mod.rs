// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! OS-specific code. Contract: every raw system call of the crate lives here
//! (and in `clock.rs`), behind a small safe helper that returns `io::Result`
//! (mio's `sys/` layout). Only Linux epoll is supported. The full list of
//! system calls the loop makes is in the README (seccomp section) and is
//! checked by `tests/seccomp.rs`.

pub(crate) mod epoll;
pub(crate) mod timerfd;
