//! Uptraining: data, optimizer, schedule, recipes and the training loop.

pub mod checkpoint;
pub mod cross_entropy;
pub mod data;
pub mod distill;
pub mod lora;
pub mod optim;
pub mod plot;
pub mod preset;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod transfer;
