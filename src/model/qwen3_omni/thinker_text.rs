//! The Thinker's text decoder (`thinker.model.*` + `thinker.lm_head`): Qwen3-MoE layers with
//! q/k-normed attention and the interleaved multimodal rotary embedding, a final RMSNorm and
//! the LM head. Text positions are the same id on all three rotary rows.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder, embedding, rms_norm};

use crate::model::linear::{Linear, linear_no_bias};
use crate::model::qwen3_omni::attention::{Attention, AttentionSpec};
use crate::model::qwen3_omni::config::TextConfig;
use crate::model::qwen3_omni::moe::{MoeSpec, SparseMoe, SwiGluMlp};
use crate::model::qwen3_omni::rotary::InterleavedMrope;

impl From<&TextConfig> for AttentionSpec {
    fn from(c: &TextConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            rms_norm_eps: c.rms_norm_eps,
            qk_norm: true,
            sliding_window: None,
        }
    }
}

impl From<&TextConfig> for MoeSpec {
    fn from(c: &TextConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            moe_intermediate_size: c.moe_intermediate_size,
            num_experts: c.num_experts,
            num_experts_per_tok: c.num_experts_per_tok,
            norm_topk_prob: c.norm_topk_prob,
            shared_expert_intermediate_size: None,
        }
    }
}

/// A layer's feed-forward block: sparse MoE, or the dense MLP of `mlp_only_layers`.
#[derive(Debug, Clone)]
enum FeedForward {
    Sparse(SparseMoe),
    Dense(SwiGluMlp),
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Sparse(moe) => moe.forward(x),
            FeedForward::Dense(mlp) => mlp.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: FeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(c: &TextConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let mlp = if c.is_moe_layer(layer) {
            FeedForward::Sparse(SparseMoe::new(&MoeSpec::from(c), vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(SwiGluMlp::new(
                c.hidden_size,
                c.intermediate_size,
                vb.pp("mlp"),
            )?)
        };
        Ok(Self {
            self_attn: Attention::new(&AttentionSpec::from(c), vb.pp("self_attn"))?,
            mlp,
            input_layernorm: rms_norm(c.hidden_size, c.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// The Thinker's decoder and LM head. `vb` points at `thinker`.
#[derive(Debug, Clone)]
pub struct ThinkerText {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: InterleavedMrope,
    dtype: DType,
}

impl ThinkerText {
    pub fn new(c: &TextConfig, tie_word_embeddings: bool, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let embed_tokens = embedding(c.vocab_size, c.hidden_size, model.pp("embed_tokens"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::new(c, i, model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if tie_word_embeddings || c.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(c.hidden_size, c.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(c.hidden_size, c.rms_norm_eps, model.pp("norm"))?,
            lm_head,
            rotary: InterleavedMrope::new(
                c.head_dim(),
                c.rope_theta(),
                &c.mrope_section(),
                vb.device(),
            )?,
            dtype: vb.dtype(),
        })
    }

    /// (b, t) token ids to (b, t, hidden) embeddings.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs `embeds` (b, t, hidden) at `positions` (3, t) after what the cache holds; returns
    /// the hidden states after the final norm, (b, t, hidden). With `layer_outputs`, also each
    /// layer's output before the norm.
    pub fn forward_hidden(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        mut layer_outputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, self.dtype)?;
        let mut x = embeds.clone();
        for layer in self.layers.iter_mut() {
            x = layer.forward(&x, &cos, &sin)?;
            if let Some(outs) = layer_outputs.as_deref_mut() {
                outs.push(x.clone());
            }
        }
        self.norm.forward(&x)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Token ids (b, t) at `positions` (3, t) to logits (b, t, vocab).
    pub fn forward(&mut self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let embeds = self.embed(ids)?;
        let hidden = self.forward_hidden(&embeds, positions, None)?;
        self.logits(&hidden)
    }

    /// Positions held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.self_attn.cache().len())
            .unwrap_or(0)
    }

    /// Rolls the context back to its first `len` positions.
    pub fn truncate_cache(&mut self, len: usize) {
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().truncate(len);
        }
    }

    pub fn clear_cache(&mut self) {
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().clear();
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Rotary positions (3, len) of text tokens starting at `start`: the same id on every row,
/// as the reference's `get_rope_index` lays text out.
pub fn text_positions(start: i64, len: usize, device: &Device) -> Result<Tensor> {
    crate::model::thinker::decoder::sequential_positions(start, len, device)
}
