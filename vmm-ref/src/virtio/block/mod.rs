//! virtio-blk: request parsing, disk backends and engines.

pub mod backend;
pub mod raw;
pub mod request;
pub mod sync_engine;
pub mod uring;

#[cfg(test)]
pub(crate) mod testing;
