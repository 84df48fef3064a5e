//! Evaluation.

pub mod harness;
pub mod perplexity;
pub mod report;
pub mod tasks;
