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
    /// A system call failed.
    #[error("system call failed")]
    Io(#[source] io::Error),
    /// A polling parameter is out of range (QEMU's message, see [`ParamError`]).
    #[error(transparent)]
    InvalidParam(#[from] ParamError),
    /// A poll algorithm name could not be parsed.
    #[error("unknown poll algorithm {0:?} (expected \"classic\" or \"weighted\")")]
    UnknownAlgorithm(String),
    /// The handler id does not name a registered handler (never added, or already removed).
    #[error("unknown fd handler {0:?}")]
    UnknownHandler(HandlerId),
    /// The operation needs an fd but the handler is poll-only.
    #[error("handler {0:?} has no file descriptor")]
    NoFd(HandlerId),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
