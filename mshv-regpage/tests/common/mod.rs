//! Helpers shared by the integration tests and the benchmark.

pub mod cpl3_guest;
