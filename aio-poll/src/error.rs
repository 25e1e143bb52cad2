// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Error type of the crate.

use std::io;

use crate::handler::HandlerId;
use crate::params::ParamError;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors returned by [`AioContext`](crate::AioContext) and its helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed; `op` names it (e.g. `epoll_ctl(EPOLL_CTL_ADD)`).
    #[error("{op} failed")]
    Io {
        /// The operation, e.g. `epoll_ctl(EPOLL_CTL_ADD)` or `timerfd_settime`.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// A polling parameter is out of range (QEMU's message, see [`ParamError`]).
    #[error(transparent)]
    InvalidParam(#[from] ParamError),
    /// A poll algorithm name could not be parsed.
    #[error("unknown poll algorithm {0:?} (expected \"classic\" or \"weighted\")")]
    UnknownAlgorithm(String),
    /// The handler id does not name a registered handler (never added, or already removed).
    #[error("unknown handler {0}")]
    UnknownHandler(HandlerId),
    /// The operation needs an fd but the handler is poll-only.
    #[error("handler {0} has no file descriptor")]
    NoFd(HandlerId),
    /// The handler table is full (more than `u32::MAX` slots).
    #[error("too many handlers")]
    TooManyHandlers,
}

impl Error {
    /// An [`Error::Io`] for `op` from `source`.
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn io_error_names_the_operation_and_keeps_the_cause() {
        let e = Error::io(
            "epoll_ctl(EPOLL_CTL_ADD)",
            io::Error::from_raw_os_error(libc::EBADF),
        );
        assert_eq!(e.to_string(), "epoll_ctl(EPOLL_CTL_ADD) failed");
        let src = e.source().expect("source kept");
        assert!(src.to_string().contains("Bad file descriptor"), "{src}");
    }
}
