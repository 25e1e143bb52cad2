//! Input formats and checks shared by the fuzz targets (`fuzz_targets/*.rs`) and by
//! the unit tests that produce their seed corpora.
//!
//! Every format is a plain byte language with a decoder that accepts any input (missing
//! bytes read as zero) and an encoder used by the seed-producing tests, so that the
//! seeds are the owning crates' canonical cases rather than random bytes. Run
//! `FUZZ_SEED_DIR=<dir> cargo test` in this directory to write `<dir>/<target>/`.

#![deny(missing_docs)]

pub mod bytes;
pub mod iothread_mapping;
pub mod poll_algorithm;
pub mod qmp;
pub mod qmp_parse;
pub mod regpage;
pub mod seeds;
pub mod vhost_user;
pub mod virtio_blk_request;
pub mod virtio_mmio;
