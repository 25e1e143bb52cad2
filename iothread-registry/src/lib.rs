#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod assignment;
mod error;
mod holder;
mod id;
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
pub use info::{format_info_iothreads, IoThreadInfo};
pub use iothread::IoThreadState;
pub use mapping::{assign_vqs, IoThreadVqMapping, MappingError};
pub use params::{
    IoThreadParams, Property, DEFAULT_AIO_MAX_BATCH, DEFAULT_POLL_GROW, DEFAULT_POLL_MAX_NS,
    DEFAULT_POLL_SHRINK, DEFAULT_POLL_WEIGHT, MAX_POLL_WEIGHT,
};
pub use registry::IoThreadRegistry;
pub use remote::HolderGuard;
pub use stats::IoThreadStats;
