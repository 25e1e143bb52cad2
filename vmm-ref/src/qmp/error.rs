//! Errors of the QMP server: [`QmpError`] for starting the server, [`CommandError`] for
//! the `{"error": {"class", "desc"}}` replies sent to clients.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// Why the QMP server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// Something other than a socket (file, directory, symlink...) is at the path.
    #[error("QMP socket path {path:?} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The requested socket path.
        path: PathBuf,
    },
    /// A live server already accepts connections on the path.
    #[error("QMP socket {path:?} is in use by a running server")]
    InUse {
        /// The requested socket path.
        path: PathBuf,
    },
    /// The path could not be inspected.
    #[error("cannot inspect QMP socket path {path:?}")]
    Inspect {
        /// The requested socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove stale QMP socket {path:?}")]
    RemoveStale {
        /// The requested socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// socket/bind/chmod/listen failed.
    #[error("cannot create QMP socket {path:?}")]
    Bind {
        /// The requested socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The wake-up eventfd could not be created.
    #[error("cannot create the QMP wake-up eventfd")]
    EventFd(#[source] io::Error),
    /// The server thread could not be spawned.
    #[error("cannot spawn the QMP server thread")]
    Spawn(#[source] io::Error),
}

/// QMP error classes (QEMU `QapiErrorClass`) used by this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Every error without a more specific class.
    GenericError,
    /// Unknown command, or a command not allowed in the current mode.
    CommandNotFound,
    /// `qom-get`/`qom-set` on a path that does not resolve (as QEMU).
    DeviceNotFound,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        })
    }
}

/// An error reply: serialised as `{"class": ..., "desc": ...}` inside `{"error": ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct CommandError {
    /// The QMP error class.
    pub class: ErrorClass,
    /// Human-readable description (QEMU wording where QEMU has one).
    pub desc: String,
}

impl CommandError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` error with `desc`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound` error with `desc`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }

    /// A `GenericError` whose desc is `err` followed by its whole `source()` chain.
    pub fn from_error(err: &dyn std::error::Error) -> Self {
        let mut desc = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !desc.contains(&text) {
                desc.push_str(": ");
                desc.push_str(&text);
            }
            source = cause.source();
        }
        CommandError::generic(desc)
    }
}
