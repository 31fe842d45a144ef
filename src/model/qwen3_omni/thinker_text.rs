//! The Thinker's text decoder (`thinker.model.*` + `thinker.lm_head`): the Qwen3-MoE stack with
//! the token embedding and the LM head. Text positions are the same id on all three rotary rows.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use crate::model::linear::{Linear, linear_no_bias};
use crate::model::qwen3_omni::attention::AttentionSpec;
use crate::model::qwen3_omni::config::TextConfig;
use crate::model::qwen3_omni::moe::MoeSpec;
use crate::model::qwen3_omni::moe_decoder::{Deepstack, MoeDecoder, MoeDecoderSpec};

impl From<&TextConfig> for MoeDecoderSpec {
    fn from(c: &TextConfig) -> Self {
        Self {
            attention: AttentionSpec {
                hidden_size: c.hidden_size,
                num_attention_heads: c.num_attention_heads,
                num_key_value_heads: c.num_key_value_heads,
                head_dim: c.head_dim(),
                rms_norm_eps: c.rms_norm_eps,
                qk_norm: true,
                sliding_window: None,
            },
            moe: Some(MoeSpec {
                hidden_size: c.hidden_size,
                moe_intermediate_size: c.moe_intermediate_size,
                num_experts: c.num_experts,
                num_experts_per_tok: c.num_experts_per_tok,
                norm_topk_prob: c.norm_topk_prob,
                shared_expert_intermediate_size: None,
            }),
            dense_intermediate_size: c.intermediate_size,
            sparse_layers: (0..c.num_hidden_layers)
                .map(|i| c.is_moe_layer(i))
                .collect(),
            rope_theta: c.rope_theta(),
            mrope_section: c.mrope_section(),
        }
    }
}

/// The Thinker's decoder and LM head. `vb` points at `thinker`.
#[derive(Debug, Clone)]
pub struct ThinkerText {
    embed_tokens: Embedding,
    decoder: MoeDecoder,
    lm_head: Linear,
}

impl ThinkerText {
    pub fn new(c: &TextConfig, tie_word_embeddings: bool, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let embed_tokens = embedding(c.vocab_size, c.hidden_size, model.pp("embed_tokens"))?;
        let lm_head = if tie_word_embeddings || c.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(c.hidden_size, c.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            decoder: MoeDecoder::new(&MoeDecoderSpec::from(c), model)?,
            lm_head,
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
        layer_outputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.decoder.forward(embeds, positions, layer_outputs)
    }

    /// [`Self::forward_hidden`] with the vision DeepStack features added after the first layers.
    pub fn forward_hidden_deepstack(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        layer_outputs: Option<&mut Vec<Tensor>>,
        deepstack: Option<&Deepstack>,
    ) -> Result<Tensor> {
        self.decoder
            .forward_deepstack(embeds, positions, layer_outputs, deepstack)
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.embeddings().device().clone()
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
        self.decoder.cache_len()
    }

    /// Rolls the context back to its first `len` positions.
    pub fn truncate_cache(&mut self, len: usize) {
        self.decoder.truncate_cache(len)
    }

    pub fn clear_cache(&mut self) {
        self.decoder.clear_cache()
    }

    pub fn dtype(&self) -> DType {
        self.decoder.dtype()
    }
}

/// Rotary positions (3, len) of text tokens starting at `start`: the same id on every row,
/// as the reference's `get_rope_index` lays text out.
pub fn text_positions(start: i64, len: usize, device: &Device) -> Result<Tensor> {
    crate::model::thinker::decoder::sequential_positions(start, len, device)
}
