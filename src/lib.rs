//! supra: turn pretrained transformer LLMs into linear-attention RNNs (SUPRA, Mercat et al. 2024).

// The test helpers (tests/common/testing.rs) name the crate `supra`, inside it as outside.
extern crate self as supra;

pub mod attention;
pub mod bench;
pub mod config;
pub mod convert;
pub mod eval;
pub mod fuzz;
pub mod heap;
pub mod infer;
pub mod io;
pub mod linearize;
pub mod model;
pub mod plot;
pub mod serve;
pub mod train;

/// Tiny random models for the unit tests; integration tests include the same file.
#[cfg(test)]
#[path = "../tests/common/testing.rs"]
#[allow(dead_code)]
pub(crate) mod testing;
