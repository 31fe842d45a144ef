//! The Talker (`talker.*`): a Qwen3-MoE decoder with a shared expert that reads the Thinker
//! through two projections (`text_projection` of token embeddings, `hidden_projection` of hidden
//! states) and emits each frame's codebook-0 code through `codec_head`; the code predictor then
//! fills the frame's other codebooks.

use crate::model::activation;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use crate::model::linear::{Linear, linear, linear_no_bias};
use crate::model::qwen3_omni::attention::AttentionSpec;
use crate::model::qwen3_omni::code_predictor::CodePredictor;
use crate::model::qwen3_omni::config::TalkerConfig;
use crate::model::qwen3_omni::moe::MoeSpec;
use crate::model::qwen3_omni::moe_decoder::{MoeDecoder, MoeDecoderSpec};

/// `Qwen3OmniMoeTalkerResizeMLP`: Thinker width to Talker width, fc1 + SiLU + fc2 with biases.
#[derive(Debug, Clone)]
pub struct ResizeMlp {
    linear_fc1: Linear,
    linear_fc2: Linear,
}

impl ResizeMlp {
    fn new(input: usize, intermediate: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_fc1: linear(input, intermediate, vb.pp("linear_fc1"))?,
            linear_fc2: linear(intermediate, output, vb.pp("linear_fc2"))?,
        })
    }
}

impl Module for ResizeMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activation::silu(&self.linear_fc1.forward(x)?)?;
        self.linear_fc2.forward(&h)
    }
}

/// `talker`; `vb` at `talker`.
#[derive(Debug, Clone)]
pub struct Talker {
    codec_embedding: Embedding,
    decoder: MoeDecoder,
    codec_head: Linear,
    text_projection: ResizeMlp,
    hidden_projection: ResizeMlp,
    code_predictor: CodePredictor,
}

impl Talker {
    pub fn new(c: &TalkerConfig, vb: VarBuilder) -> Result<Self> {
        let t = &c.text_config;
        if t.hidden_act != "silu" {
            candle_core::bail!(
                "talker text_config.hidden_act {:?} is not supported (the reference uses silu)",
                t.hidden_act
            );
        }
        let spec = MoeDecoderSpec {
            attention: AttentionSpec {
                hidden_size: t.hidden_size,
                num_attention_heads: t.num_attention_heads,
                num_key_value_heads: t.num_key_value_heads,
                head_dim: t.head_dim(),
                rms_norm_eps: t.rms_norm_eps,
                qk_norm: true,
                sliding_window: None,
            },
            moe: Some(MoeSpec {
                hidden_size: t.hidden_size,
                moe_intermediate_size: t.moe_intermediate_size,
                num_experts: t.num_experts,
                num_experts_per_tok: t.num_experts_per_tok,
                norm_topk_prob: t.norm_topk_prob,
                shared_expert_intermediate_size: t.shared_expert_intermediate_size,
            }),
            dense_intermediate_size: t.intermediate_size,
            sparse_layers: (0..t.num_hidden_layers)
                .map(|i| t.is_moe_layer(i))
                .collect(),
            rope_theta: t.rope_theta(),
            mrope_section: t.mrope_section(),
        };
        let model = vb.pp("model");
        let resize = |name: &str| {
            ResizeMlp::new(
                c.thinker_hidden_size,
                t.intermediate_size,
                t.hidden_size,
                vb.pp(name),
            )
        };
        Ok(Self {
            codec_embedding: embedding(t.vocab_size, t.hidden_size, model.pp("codec_embedding"))?,
            decoder: MoeDecoder::new(&spec, model)?,
            codec_head: linear_no_bias(t.hidden_size, t.vocab_size, vb.pp("codec_head"))?,
            text_projection: resize("text_projection")?,
            hidden_projection: resize("hidden_projection")?,
            code_predictor: CodePredictor::new(&c.code_predictor_config, vb.pp("code_predictor"))?,
        })
    }

    /// Codec ids (b, t) to (b, t, hidden).
    pub fn embed_codes(&self, ids: &Tensor) -> Result<Tensor> {
        self.codec_embedding.forward(ids)
    }

    /// The Thinker's token embeddings (b, t, thinker hidden) to Talker width.
    pub fn project_text(&self, thinker_embeds: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(thinker_embeds)
    }

    /// The Thinker's hidden states (b, t, thinker hidden) to Talker width.
    pub fn project_hidden(&self, thinker_hidden: &Tensor) -> Result<Tensor> {
        self.hidden_projection.forward(thinker_hidden)
    }

    /// Runs `embeds` (b, t, hidden) at `positions` (3, t) after the cache; returns the last
    /// hidden states (b, t, hidden) after the final norm.
    pub fn forward_hidden(&mut self, embeds: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.decoder.forward(embeds, positions, None)
    }

    /// Codebook-0 logits (b, t, vocab) of hidden states.
    pub fn codec_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.codec_head.forward(hidden)
    }

    pub fn code_predictor_mut(&mut self) -> &mut CodePredictor {
        &mut self.code_predictor
    }

    pub fn cache_len(&self) -> usize {
        self.decoder.cache_len()
    }

    pub fn truncate_cache(&mut self, len: usize) {
        self.decoder.truncate_cache(len)
    }

    pub fn clear_cache(&mut self) {
        self.decoder.clear_cache()
    }
}
