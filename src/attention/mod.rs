//! Attention kinds. Each file holds one kind's math.

pub mod softmax;
pub mod supra;
