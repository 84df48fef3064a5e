//! Evaluation.

pub mod perplexity;
