//! Text generation.

pub mod generate;
pub mod sampler;
pub mod state;
