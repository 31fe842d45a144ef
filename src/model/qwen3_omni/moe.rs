//! The sparse mixture-of-experts feed-forward block of the Qwen3-MoE decoders (Thinker and
//! Talker), and the SwiGLU MLP each expert is.
//!
//! The router is computed as the reference does: softmax over all experts in f32, the top-k
//! probabilities, renormalised to sum to one when `norm_topk_prob`. The Talker's block adds a
//! shared expert scaled by a sigmoid gate.

use crate::model::activation;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::linear::{Linear, linear_no_bias};

/// `gate_proj` / `up_proj` / `down_proj` with SiLU gating.
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGluMlp {
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }
}

impl Module for SwiGluMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activation::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// The shape of one sparse block, read from the Thinker's or the Talker's text config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub hidden_size: usize,
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    /// The Talker's always-on expert (`shared_expert`, gated by `shared_expert_gate`).
    pub shared_expert_intermediate_size: Option<usize>,
}

#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: SwiGluMlp,
    gate: Linear,
}

/// `mlp` of a sparse decoder layer: `gate` (the router) and `experts.{e}`.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<SwiGluMlp>,
    top_k: usize,
    norm_topk_prob: bool,
    shared: Option<SharedExpert>,
}

impl SparseMoe {
    pub fn new(spec: &MoeSpec, vb: VarBuilder) -> Result<Self> {
        if spec.num_experts_per_tok == 0 || spec.num_experts_per_tok > spec.num_experts {
            candle_core::bail!(
                "num_experts_per_tok ({}) must be in 1..={} (num_experts)",
                spec.num_experts_per_tok,
                spec.num_experts
            );
        }
        let h = spec.hidden_size;
        let experts = (0..spec.num_experts)
            .map(|e| SwiGluMlp::new(h, spec.moe_intermediate_size, vb.pp("experts").pp(e)))
            .collect::<Result<Vec<_>>>()?;
        let shared = spec
            .shared_expert_intermediate_size
            .map(|size| -> Result<SharedExpert> {
                Ok(SharedExpert {
                    mlp: SwiGluMlp::new(h, size, vb.pp("shared_expert"))?,
                    gate: linear_no_bias(h, 1, vb.pp("shared_expert_gate"))?,
                })
            })
            .transpose()?;
        Ok(Self {
            router: linear_no_bias(h, spec.num_experts, vb.pp("gate"))?,
            experts,
            top_k: spec.num_experts_per_tok,
            norm_topk_prob: spec.norm_topk_prob,
            shared,
        })
    }

    /// Per token, the chosen experts (most probable first) and their weights.
    pub fn route(&self, tokens: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let logits = self.router.forward(tokens)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let probs = probs.to_vec2::<f32>()?;
        Ok(probs
            .iter()
            .map(|row| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                // Stable: equal probabilities keep the lower expert first, as torch.topk does on CPU.
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let chosen: Vec<(usize, f32)> =
                    order[..self.top_k].iter().map(|&e| (e, row[e])).collect();
                if self.norm_topk_prob {
                    let sum: f32 = chosen.iter().map(|(_, p)| p).sum();
                    chosen.into_iter().map(|(e, p)| (e, p / sum)).collect()
                } else {
                    chosen
                }
            })
            .collect())
    }
}

impl Module for SparseMoe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().expect("hidden dim");
        let tokens = x.reshape(((), hidden))?;
        let routes = self.route(&tokens)?;
        // Gather, per expert, the tokens routed to it and their weights; run each expert once.
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, chosen) in routes.iter().enumerate() {
            for &(expert, weight) in chosen {
                per_expert[expert].0.push(token as u32);
                per_expert[expert].1.push(weight);
            }
        }
        let mut out = tokens.zeros_like()?;
        for (expert, (rows, weights)) in per_expert.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, x.device())?;
            let weights = Tensor::from_vec(weights, (n, 1), x.device())?.to_dtype(x.dtype())?;
            let y = self.experts[expert]
                .forward(&tokens.index_select(&rows, 0)?)?
                .broadcast_mul(&weights)?;
            out = out.index_add(&rows, &y, 0)?;
        }
        if let Some(shared) = &self.shared {
            let gate = candle_nn::ops::sigmoid(&shared.gate.forward(&tokens)?)?;
            out = (out + shared.mlp.forward(&tokens)?.broadcast_mul(&gate)?)?;
        }
        out.reshape(dims)
    }
}
