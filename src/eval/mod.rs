//! Evaluation.

pub mod harness;
pub mod journal;
pub mod long_context;
pub mod perplexity;
pub mod plot;
pub mod probe;
pub mod recall;
pub mod report;
pub mod tasks;
