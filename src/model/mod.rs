//! The llama-family decoder and its parts.

pub mod expf;
pub mod gemm;
pub mod linear;
pub mod linear_grad;
pub mod llama;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod quant;
pub mod rope;
pub mod spin;
pub mod weights;
