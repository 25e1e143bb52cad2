// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A downstream VMM's use of the *packaged* library crates, one module per crate.
//!
//! Built (and its tests run) by `ci/downstream.sh` against the `.crate` files that
//! `cargo package` produces, unpacked in `packages/` — never against the workspace
//! sources. If a packaged crate misses a file, leaks a type a consumer cannot name, or
//! needs a feature only the workspace enables, this crate or one of the packaged examples
//! fails to build.
#![deny(missing_docs)]

pub mod aio;
pub mod iothreads;
#[cfg(target_arch = "x86_64")]
pub mod mshv;
