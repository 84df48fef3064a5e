//! Evaluation.

pub mod harness;
pub mod perplexity;
