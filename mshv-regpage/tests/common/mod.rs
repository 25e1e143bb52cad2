// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests and the benchmark.

pub mod cpl3_guest;
