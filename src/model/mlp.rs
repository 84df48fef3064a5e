//! SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)).

use crate::attention::Exec;
use crate::model::linear::Linear;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x, exec)?)?;
        self.down.forward(&(g * self.up.forward(x, exec)?)?, exec)
    }
}
