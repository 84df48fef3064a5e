//! Evaluation.

pub mod harness;
pub mod journal;
pub mod perplexity;
pub mod report;
pub mod tasks;
