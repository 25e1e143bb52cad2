//! OS-specific code. Contract: every raw system call of the crate lives here,
//! behind a small safe helper that returns `io::Result` (mio's `sys/` layout).
//! Only Linux epoll is supported.

pub(crate) mod epoll;
