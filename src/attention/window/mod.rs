//! Sliding-window softmax + linear attention in one layer (LoLCATs, Zhang et al. 2024,
//! arXiv 2410.10254, with StreamingLLM's attention sinks).
//!
//! Token n attends exactly (softmax over q·k/√d with the teacher's RoPE'd q and k) to the last
//! w tokens (itself included) and to the first s tokens of the sequence, and through a linear
//! state to every other earlier token. [`naive`] spells the sums out. Two ways to combine them
//! ([`Mix`]): one shared normaliser, the linear branch's weights scaled by α_h = sigmoid(θ_h);
//! or each branch normalised on its own (the linear one GroupNorm'd, as SUPRA) and blended by a
//! gate g_h = sigmoid(θ_h). Either way one parameter θ per head, the linear branch's share.
//!
//! The sinks keep the RoPE of positions 0..s. Scored with q_n, a query far into a long input
//! sees them at distances n − j past any the teacher was trained on, and the window breaks
//! there (measured: perplexity 877 at 16k-32k on SmolLM2's 8k context). With cache positions
//! ([`SinkPositions::Cache`], StreamingLLM's) they are scored with q̃_n, the query RoPE'd at
//! min(n, s + w − 1): as if they sat just before the window, so no exact distance ever passes
//! s + w − 1. Up to that position q̃ is q, and the two settings agree.
//!
//! φ reads the RoPE'd q and k with either feature map, so the linear branch's weights
//! φ(q)·φ(k) are never negative and can share a normaliser with exp-scores (RoPE after a ReLU
//! map, SUPRA's order, would make them signed).
//!
//! The linear state decays per head as SUPRA's does (fixed, none or learned γ); it holds what
//! has left the window, S = Σ γ^(n−w−m) φ(k_m) v_mᵀ/√d' and z = Σ γ^(n−w−m) φ(k_m)/√d' (the
//! scale as SUPRA's state has it; α absorbs it).
//!
//! With the delta rule ([`LinearRule::Delta`], gated mix only) the state takes in each key
//! leaving the window by [`crate::attention::delta`]'s overwrite instead of the sum, β read
//! from the key's features, which the state keeps anyway; S is then d' × d (no z).
//!
//! The state is s + w keys, values and key features per key/value head and S, z per head:
//! constant in the context. Forms side by side: [`naive`] (f64 definition), [`chunk`]
//! (training; its exact part as one op with its own backward in [`fused`]), [`scan`] (prefill
//! and step on slices).

pub mod chunk;
pub mod fused;
pub mod naive;
pub mod scan;

use crate::attention::feature_map::{FeatureMap, Role};
use crate::attention::softmax::SoftmaxAttention;
use crate::attention::supra::{Dims, HeadDecays};
use crate::attention::{split_heads, Exec, Projections};
use crate::config::{LinearRule, Mix, SinkPositions};
use crate::model::rope::{Rope, Rotation};
use crate::model::spin;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
pub use scan::{StateDims, WindowState};

/// ε of the shared normaliser: keeps a row with no exact key and a zero linear part at 0.
pub const EPS: f64 = 1e-12;

/// Which earlier tokens a query reaches exactly and which through the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// w: the query itself and the w − 1 tokens before it.
    pub window: usize,
    /// s: the first s tokens (attention sinks).
    pub sinks: usize,
    /// Where queries see the sinks for RoPE ([`Span::sink_query_position`]).
    pub sink_positions: SinkPositions,
}

impl Span {
    /// A span whose sinks sit at their own positions.
    pub const fn absolute(window: usize, sinks: usize) -> Self {
        Self {
            window,
            sinks,
            sink_positions: SinkPositions::Absolute,
        }
    }

    /// The position whose RoPE query n scores the sinks with: its own, or with cache positions
    /// at most s + w − 1, where the window has just left the sinks. The sink logits then read
    /// q̃_n = R(p − n) q_n, at distance p − j from sink j, never past the teacher's distances.
    pub fn sink_query_position(self, n: usize) -> usize {
        match self.sink_positions {
            SinkPositions::Absolute => n,
            SinkPositions::Cache => n.min((self.sinks + self.window).saturating_sub(1)),
        }
    }

    /// Whether some query among the first `len` scores the sinks away from its own position.
    pub fn moves_sinks(self, len: usize) -> bool {
        self.sinks > 0 && len > 0 && self.sink_query_position(len - 1) != len - 1
    }

    /// Whether query n attends exactly to key m.
    pub fn exact(self, n: usize, m: usize) -> bool {
        m <= n && (m < self.sinks || m + self.window > n)
    }

    /// Whether query n reads key m through the linear state.
    pub fn linear(self, n: usize, m: usize) -> bool {
        m >= self.sinks && m + self.window <= n
    }

    /// The positions a state keeps after `len` tokens: the sinks, and the tokens past them that
    /// have not yet entered the linear state (the next query takes in position len − w).
    pub fn kept(self, len: usize) -> Vec<usize> {
        let from = self.sinks.max(len.saturating_sub(self.window));
        (0..self.sinks.min(len)).chain(from..len).collect()
    }
}

/// Which branches a window layer runs. The two single-branch settings are controls: a hybrid
/// can learn to lean on its window, which short-context scores hide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Branches {
    #[default]
    Both,
    /// Window and sinks only (the linear share set to 0): for an untrained model, the teacher
    /// restricted to its window.
    Window,
    /// The linear branch alone over every earlier token (no window, no sinks).
    Linear,
}

impl std::str::FromStr for Branches {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "both" => Ok(Self::Both),
            "window" => Ok(Self::Window),
            "linear" => Ok(Self::Linear),
            other => bail!("unknown branches '{other}' (known: both, window, linear)"),
        }
    }
}

/// A window + linear layer: the teacher's projections, φ and the per-head mix.
#[derive(Debug, Clone)]
pub struct WindowAttention {
    pub proj: Projections,
    pub phi: FeatureMap,
    /// θ (H): the linear branch's share is sigmoid(θ).
    pub mix_logit: Tensor,
    pub mix: Mix,
    pub feature_dim: usize,
    pub gammas: HeadDecays,
    /// The delta rule's write strengths' parameters (H, d' + 1) ([`crate::attention::delta`]);
    /// `None`: the additive rule.
    pub delta: Option<Tensor>,
    pub chunk_size: usize,
    pub span: Span,
    /// The teacher's RoPE, over the head dimension.
    pub rope: Rope,
    pub branches: Branches,
}

impl WindowAttention {
    /// The per-head mix (α or g) the branches setting gives, (H,): sigmoid(θ), differentiable
    /// in θ, when both branches run.
    fn mix_weights(&self) -> Result<Tensor> {
        let theta = &self.mix_logit;
        Ok(match self.branches {
            Branches::Both => (theta.neg()?.exp()? + 1.0)?.recip()?,
            Branches::Window => theta.zeros_like()?,
            Branches::Linear => theta.ones_like()?,
        })
    }

    /// The shapes of this layer's state (under the branches setting).
    pub fn state_dims(&self) -> StateDims {
        StateDims {
            heads: self.proj.n_heads,
            kv_heads: self.proj.n_kv_heads,
            head_dim: self.proj.head_dim,
            feature_dim: self.feature_dim,
            span: self.span(),
            rule: self.rule(),
        }
    }

    pub fn rule(&self) -> LinearRule {
        LinearRule::of(self.delta.as_ref())
    }

    /// The span the branches setting runs: the layer's, or none for the linear branch alone.
    pub fn span(&self) -> Span {
        match self.branches {
            Branches::Linear => Span::absolute(0, 0),
            _ => self.span,
        }
    }

    /// q (B, H, T, d), k and v (B, H_kv, T, d) RoPE'd as the teacher's, φq (B, H, T, d') and
    /// φk (B, H_kv, T, d'), for `x` (B, T, hidden) at positions offset.. .
    pub fn features(&self, x: &Tensor, offset: usize, exec: Exec) -> Result<[Tensor; 5]> {
        let (b, t, _) = x.dims3()?;
        let p = &self.proj;
        let (h, hkv, d, f) = (p.n_heads, p.n_kv_heads, p.head_dim, self.feature_dim);
        let (q, k, v) = p.heads(x, exec)?;
        let (q, k) = (
            self.rope.apply(&q, offset, exec)?,
            self.rope.apply(&k, offset, exec)?,
        );
        // φ reads all heads of a row side by side.
        let phi = |y: &Tensor, role: Role, n: usize| -> Result<Tensor> {
            let rows = y.transpose(1, 2)?.reshape((b, t, n * d))?;
            split_heads(&self.phi.apply(&rows, role, exec)?, n, f)
        };
        let (fq, fk) = (phi(&q, Role::Query, h)?, phi(&k, Role::Key, hkv)?);
        Ok([q, k, v, fq, fk])
    }

    /// `x` (B, T, hidden) → (B, T, hidden). With a `state`, continues from it (inference only)
    /// and leaves the state after the last token there.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        state: Option<&mut Option<WindowState>>,
        exec: Exec,
    ) -> Result<Tensor> {
        self.proj
            .output(&self.heads_output(x, offset, state, exec)?, exec)
    }

    /// Per-head output (B, H, T, d), before Wo.
    pub fn heads_output(
        &self,
        x: &Tensor,
        offset: usize,
        state: Option<&mut Option<WindowState>>,
        exec: Exec,
    ) -> Result<Tensor> {
        let [q, k, v, fq, fk] = self.features(x, offset, exec)?;
        let (b, h, t, d) = q.dims4()?;
        match exec {
            Exec::Train => {
                ensure!(
                    state.is_none() && offset == 0,
                    "a window layer trains on whole sequences, without a state"
                );
                chunk::chunked(
                    ((&q, &k, &v), self.sinks_turn(0, t)?.as_ref()),
                    (&fq, &fk),
                    (
                        &self
                            .mix_weights()?
                            .to_dtype(q.dtype())?
                            .reshape((1, h, 1, 1))?,
                        self.delta.as_ref(),
                    ),
                    &self.gammas,
                    self.span(),
                    self.mix,
                    self.chunk_size,
                )
            }
            Exec::Infer => {
                ensure!(
                    q.dtype() == DType::F32,
                    "window attention inference runs in f32 (got {:?})",
                    q.dtype()
                );
                let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1()?) };
                let rows = [&q, &k, &v, &fq, &fk].map(flat);
                let [q, k, v, fq, fk] = rows;
                let y = self.scan([&q?, &k?, &v?, &fq?, &fk?], (b, t), offset, state)?;
                Ok(Tensor::from_vec(y, (b, h, t, d), x.device())?)
            }
        }
    }

    /// One token of each of several sequences from their q, k and v rows (row r: sequence r's
    /// heads side by side, at position `offsets[r]`), RoPE and φ on plain slices: a decoding
    /// step would otherwise spend more time in a dozen small tensor operations per layer than
    /// in the sums. Returns the per-head outputs (H·d a row) before Wo. Each row's values are
    /// what it gets alone: a sequence's step does not depend on the batch.
    pub fn step(
        &self,
        [mut q, mut k, v]: [Vec<f32>; 3],
        offsets: &[usize],
        states: &mut [&mut Option<WindowState>],
    ) -> Result<Vec<f32>> {
        let rows = offsets.len();
        let d = self.proj.head_dim;
        let (lq, lk, lv) = (q.len() / rows, k.len() / rows, v.len() / rows);
        self.rope.rotate_rows([&mut q, &mut k], offsets, d)?;
        let fq = self.phi.apply_rows(&q, rows, Role::Query)?;
        let fk = self.phi.apply_rows(&k, rows, Role::Key)?;
        let (lfq, lfk) = (fq.len() / rows, fk.len() / rows);
        let outs = spin::map_rows(states, &|r, state| {
            let inputs = [
                &q[r * lq..(r + 1) * lq],
                &k[r * lk..(r + 1) * lk],
                &v[r * lv..(r + 1) * lv],
                &fq[r * lfq..(r + 1) * lfq],
                &fk[r * lfk..(r + 1) * lfk],
            ];
            self.scan(inputs, (1, 1), offsets[r], Some(state))
        });
        Ok(outs.into_iter().collect::<Result<Vec<_>>>()?.concat())
    }

    /// The inference side's sums on slices (q, k, v, φq, φk as [`scan::Inputs`] lays them
    /// out) for `batch` sequences of `len` tokens at `offset`, continuing `state` (from the
    /// start when `None`). Returns y (B, H, T, d).
    fn scan(
        &self,
        [q, k, v, fq, fk]: [&[f32]; 5],
        (batch, len): (usize, usize),
        offset: usize,
        state: Option<&mut Option<WindowState>>,
    ) -> Result<Vec<f32>> {
        let mut scratch = None;
        let state = state.unwrap_or(&mut scratch);
        let sd = self.state_dims();
        let st = state.get_or_insert_with(|| WindowState::empty(batch, sd));
        ensure!(
            st.batch == batch && st.len == offset && st.dims == sd,
            "window state holds {} sequences at position {} ({:?}); this call has {batch} at {offset} ({sd:?})",
            st.batch,
            st.len,
            st.dims
        );
        // The mix per head from θ, on the slice: sigmoid as `mix_weights` takes it.
        let theta: Vec<f32> = self.mix_logit.to_dtype(DType::F32)?.to_vec1()?;
        let weights: Vec<f32> = match self.branches {
            Branches::Both => theta.iter().map(|t| 1.0 / (1.0 + (-t).exp())).collect(),
            Branches::Window => vec![0.0; theta.len()],
            Branches::Linear => vec![1.0; theta.len()],
        };
        let dims = Dims {
            batch,
            heads: self.proj.n_heads,
            kv_heads: self.proj.n_kv_heads,
            len,
            feature_dim: self.feature_dim,
            value_dim: self.proj.head_dim,
        };
        let qs = self.sink_queries(q, (batch, len), offset)?;
        let delta = self
            .delta
            .as_ref()
            .map(|p| p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        let inputs = scan::Inputs {
            q,
            qs: qs.as_deref(),
            k,
            v,
            fq,
            fk,
            delta: delta.as_deref(),
        };
        Ok(scan::prefill(
            &inputs,
            st,
            &self.gammas.gammas()?,
            &weights,
            self.mix,
            self.chunk_size,
            dims,
        ))
    }

    /// The turn of RoPE'd q rows at positions offset..offset + len into the sinks' queries
    /// q̃ ([`Span::sink_query_position`]): row n turned back by n − p, as R(p − n) R(n) = R(p);
    /// `None` where every row would be q itself.
    fn sinks_turn(&self, offset: usize, len: usize) -> Result<Option<Rotation>> {
        let span = self.span();
        if !span.moves_sinks(offset + len) {
            return Ok(None);
        }
        let backs: Vec<usize> = (offset..offset + len)
            .map(|n| n - span.sink_query_position(n))
            .collect();
        Ok(Some(self.rope.turning_back(&backs)?))
    }

    /// q̃ for RoPE'd q rows (B, H, T, d) at positions offset.. ([`Self::sinks_turn`]).
    fn sink_queries(
        &self,
        q: &[f32],
        (batch, len): (usize, usize),
        offset: usize,
    ) -> Result<Option<Vec<f32>>> {
        let Some(turn) = self.sinks_turn(offset, len)? else {
            return Ok(None);
        };
        let d = self.proj.head_dim;
        ensure!(
            q.len() == batch * self.proj.n_heads * len * d,
            "window layer: {} query values for {batch} × {} heads × {len} tokens × {d}",
            q.len(),
            self.proj.n_heads
        );
        let mut qs = q.to_vec();
        for (row, x) in qs.chunks_exact_mut(d).enumerate() {
            // Rows run over (sequence, head, position), the position fastest.
            turn.rotate_row(row % len, x, false);
        }
        Ok(Some(qs))
    }

    /// The teacher's softmax attention on the same q, k, v and o projections.
    pub fn teacher(&self) -> SoftmaxAttention {
        SoftmaxAttention {
            proj: self.proj.clone(),
            rope: self.rope.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
