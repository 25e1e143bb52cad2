// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

/// The event loop every IOThread runs (re-exported so that a VMM needs one
/// dependency and one version of it).
pub use aio_poll;

mod assignment;
mod error;
mod holder;
mod id;
#[cfg(feature = "qemu")]
mod info;
mod iothread;
mod mapping;
mod params;
mod registry;
mod remote;
mod stats;
mod sys;

pub use assignment::VqAssignment;
pub use error::{Error, IdError, Result};
pub use holder::IoThreadHolder;
pub use id::validate_id;
#[cfg(feature = "qemu")]
pub use info::{format_info_iothreads, IoThreadInfo};
pub use iothread::{IoThreadState, SpawnHookError, SpawnInfo};
pub use mapping::{assign_vqs, IoThreadVqMapping, MappingError};
#[cfg(feature = "qemu")]
pub use params::Property;
pub use params::{IoThreadParams, DEFAULT_AIO_MAX_BATCH};
pub use registry::IoThreadRegistry;
pub use remote::HolderGuard;
pub use stats::IoThreadStats;
