//! supra: turn pretrained transformer LLMs into linear-attention RNNs (SUPRA, Mercat et al. 2024).

pub mod attention;
pub mod bench;
pub mod config;
pub mod convert;
pub mod eval;
pub mod infer;
pub mod io;
pub mod linearize;
pub mod model;
pub mod plot;
pub mod serve;
pub mod testing;
pub mod train;
