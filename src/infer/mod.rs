//! Text generation.

pub mod generate;
pub mod sampler;
