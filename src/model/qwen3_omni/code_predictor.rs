//! The Talker's code predictor (`talker.code_predictor.*`): a small dense Qwen3 decoder that,
//! per 80 ms frame, turns the Talker's last hidden state and the frame's codebook-0 code into
//! the remaining `num_code_groups - 1` codes, one step each, with its own KV cache that starts
//! empty every frame. Step `g` reads its input through `codec_embedding[g - 1]` and its logits
//! through `lm_head[g - 1]`.

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use crate::model::linear::{Linear, linear_no_bias};
use crate::model::qwen3_omni::attention::AttentionSpec;
use crate::model::qwen3_omni::config::CodePredictorConfig;
use crate::model::qwen3_omni::moe_decoder::{MoeDecoder, MoeDecoderSpec};
use crate::model::qwen3_omni::thinker_text::text_positions;

impl From<&CodePredictorConfig> for MoeDecoderSpec {
    /// All layers dense; plain 1-D RoPE, i.e. every frequency on the temporal row.
    fn from(c: &CodePredictorConfig) -> Self {
        Self {
            attention: AttentionSpec {
                hidden_size: c.hidden_size,
                num_attention_heads: c.num_attention_heads,
                num_key_value_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                rms_norm_eps: c.rms_norm_eps,
                qk_norm: true,
                sliding_window: None,
            },
            moe: None,
            dense_intermediate_size: c.intermediate_size,
            sparse_layers: vec![false; c.num_hidden_layers],
            rope_theta: c.rope.theta(10000.0),
            mrope_section: vec![c.head_dim / 2, 0, 0],
        }
    }
}

/// One frame's codes beyond codebook 0.
#[derive(Debug, Clone)]
pub struct ResidualFrame {
    /// Codes of codebooks 1..num_code_groups.
    pub codes: Vec<u32>,
    /// (b, vocab) logits that chose each code.
    pub logits: Vec<Tensor>,
    /// (b, 1, hidden): the sum of the frame's code embeddings (codebook 0 through the Talker's
    /// embedding, the others through this predictor's), the Talker's next input before its text
    /// part is added.
    pub summed_embedding: Tensor,
}

/// `talker.code_predictor`.
#[derive(Debug, Clone)]
pub struct CodePredictor {
    decoder: MoeDecoder,
    codec_embedding: Vec<Embedding>,
    lm_head: Vec<Linear>,
}

impl CodePredictor {
    pub fn new(c: &CodePredictorConfig, vb: VarBuilder) -> Result<Self> {
        if c.num_code_groups < 2 {
            candle_core::bail!(
                "code_predictor_config.num_code_groups ({}) must be at least 2",
                c.num_code_groups
            );
        }
        let model = vb.pp("model");
        let residual = c.num_code_groups - 1;
        Ok(Self {
            decoder: MoeDecoder::new(&MoeDecoderSpec::from(c), model.clone())?,
            codec_embedding: (0..residual)
                .map(|g| {
                    embedding(
                        c.vocab_size,
                        c.hidden_size,
                        model.pp("codec_embedding").pp(g),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            lm_head: (0..residual)
                .map(|g| linear_no_bias(c.hidden_size, c.vocab_size, vb.pp("lm_head").pp(g)))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// The last position's hidden state (b, 1, hidden) after `embeds` (b, t, hidden).
    fn step(&mut self, embeds: &Tensor) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let positions = text_positions(self.decoder.cache_len() as i64, t, embeds.device())?;
        let hidden = self.decoder.forward(embeds, &positions, None)?;
        hidden.i((.., t - 1..t, ..))
    }

    /// The residual codes of one frame from `talker_hidden` (b, 1, hidden: the Talker's last
    /// hidden state) and `code0_embedding` (b, 1, hidden: the Talker's embedding of the frame's
    /// codebook-0 code). `pick` turns a step's (b, vocab) logits into a code (greedy, sampling).
    pub fn generate(
        &mut self,
        talker_hidden: &Tensor,
        code0_embedding: &Tensor,
        mut pick: impl FnMut(&Tensor) -> Result<u32>,
    ) -> Result<ResidualFrame> {
        self.decoder.clear_cache();
        let mut input = Tensor::cat(&[talker_hidden, code0_embedding], 1)?;
        let mut summed = code0_embedding.clone();
        let mut codes = Vec::with_capacity(self.lm_head.len());
        let mut logits = Vec::with_capacity(self.lm_head.len());
        for g in 0..self.lm_head.len() {
            let hidden = self.step(&input)?;
            let step_logits = self.lm_head[g].forward(&hidden)?.squeeze(1)?;
            let code = pick(&step_logits)?;
            let ids = Tensor::new(&[[code]], input.device())?;
            input = self.codec_embedding[g].forward(&ids)?;
            summed = (summed + &input)?;
            codes.push(code);
            logits.push(step_logits);
        }
        self.decoder.clear_cache();
        Ok(ResidualFrame {
            codes,
            logits,
            summed_embedding: summed,
        })
    }
}
