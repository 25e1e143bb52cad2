// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crate's error type.

use std::fmt;
use std::io;

use crate::holder::IoThreadHolder;
use crate::mapping::MappingError;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in this crate.
///
/// Messages follow QEMU's wording where QEMU has an equivalent error, so that a
/// QMP front end can forward them unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The id is not a valid object id (letter first, then letters, digits, `-`, `.`, `_`).
    #[error("Parameter 'id' expects an identifier: '{id}' {reason}")]
    InvalidId {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: IdError,
    },
    /// An IOThread with this id already exists.
    #[error("an IOThread with id '{id}' already exists")]
    AlreadyExists {
        /// The duplicate id.
        id: String,
    },
    /// No IOThread with this id exists.
    #[error("Cannot find iothread {id}")]
    NotFound {
        /// The unknown id.
        id: String,
    },
    /// The IOThread still has holders and cannot be deleted.
    #[error("IOThread '{id}' is in use by {}", HolderList(.holders))]
    InUse {
        /// The IOThread that was to be deleted.
        id: String,
        /// Its holders, in registration order.
        holders: Vec<IoThreadHolder>,
    },
    /// The holder does not hold this IOThread.
    #[error("{holder} does not hold IOThread '{id}'")]
    NotHeld {
        /// The IOThread.
        id: String,
        /// The holder that was to be released.
        holder: IoThreadHolder,
    },
    /// No property with this name exists on an IOThread (feature `qemu`).
    #[cfg(feature = "qemu")]
    #[error("Property 'iothread.{name}' not found")]
    InvalidProperty {
        /// The unknown property name.
        name: String,
    },
    /// A parameter value is out of range; aio-poll's check and QEMU's message
    /// (`poll-weight value must be in range [0, 63]`).
    #[error(transparent)]
    InvalidValue(#[from] aio_poll::ParamError),
    /// A blocking call was made from the IOThread it would wait for.
    #[error("waiting for IOThread '{id}' from inside that IOThread would deadlock")]
    WouldDeadlock {
        /// The IOThread.
        id: String,
    },
    /// The IOThread's event loop is no longer running (stopped or panicked).
    #[error("IOThread '{id}' is not running")]
    ThreadGone {
        /// The IOThread.
        id: String,
    },
    /// The OS thread could not be spawned.
    #[error("failed to spawn IOThread thread")]
    Spawn(#[source] io::Error),
    /// The registry's spawn hook failed (or panicked) on the new IOThread; the thread
    /// ended without running its loop.
    #[error("the spawn hook failed for IOThread '{id}'")]
    SpawnHook {
        /// The IOThread.
        id: String,
        /// What the hook reported.
        #[source]
        source: crate::iothread::SpawnHookError,
    },
    /// The event loop reported an error.
    #[error("event loop error")]
    Poll(#[source] aio_poll::Error),
    /// An `iothread-vq-mapping` failed validation.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A CPU number in an affinity list is not available on this host.
    #[error("CPU {cpu} is not available (available CPUs: {available:?})")]
    InvalidCpu {
        /// The rejected CPU number.
        cpu: usize,
        /// CPUs this process may run on.
        available: Vec<usize>,
    },
    /// An empty CPU list was given for an affinity.
    #[error("the CPU list for IOThread '{id}' must not be empty")]
    EmptyCpuList {
        /// The IOThread.
        id: String,
    },
    /// An operating-system call on the IOThread's thread failed.
    #[error("{op} failed for IOThread '{id}'")]
    Os {
        /// The IOThread.
        id: String,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why an id was rejected (see [`Error::InvalidId`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    Empty,
    /// The first character is not an ASCII letter.
    FirstNotLetter,
    /// A character other than letters, digits, `-`, `.`, `_` was found.
    BadChar {
        /// Byte offset of the character.
        offset: usize,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => f.write_str("is empty"),
            IdError::FirstNotLetter => f.write_str("must start with a letter"),
            IdError::BadChar { offset } => write!(
                f,
                "has an invalid character at offset {offset} (allowed: letters, digits, '-', '.', '_')"
            ),
        }
    }
}

/// Formats a holder list as `qom-object /a, block-node b`.
struct HolderList<'a>(&'a [IoThreadHolder]);

impl fmt::Display for HolderList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{h}")?;
        }
        Ok(())
    }
}
