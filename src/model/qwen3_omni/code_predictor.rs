//! The Talker's code predictor (`talker.code_predictor.*`): a small dense Qwen3 decoder that,
//! per 80 ms frame, turns the Talker's last hidden state and the frame's codebook-0 code into
//! the remaining `num_code_groups - 1` codes, one step each, with its own KV cache that starts
//! empty every frame. Step `g` reads its input through `codec_embedding[g - 1]` and its logits
//! through `lm_head[g - 1]`.

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder, embedding, rms_norm};

use crate::model::linear::{Linear, linear_no_bias};
use crate::model::qwen3_omni::attention::{Attention, AttentionSpec};
use crate::model::qwen3_omni::config::CodePredictorConfig;
use crate::model::qwen3_omni::moe::SwiGluMlp;
use crate::model::qwen3_omni::rotary::Rotary;

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: SwiGluMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(c: &CodePredictorConfig, vb: VarBuilder) -> Result<Self> {
        let spec = AttentionSpec {
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps,
            qk_norm: true,
            sliding_window: None,
        };
        let h = c.hidden_size;
        Ok(Self {
            self_attn: Attention::new(&spec, vb.pp("self_attn"))?,
            mlp: SwiGluMlp::new(h, c.intermediate_size, vb.pp("mlp"))?,
            input_layernorm: rms_norm(h, c.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                h,
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
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    codec_embedding: Vec<Embedding>,
    lm_head: Vec<Linear>,
    rotary: Rotary,
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
            layers: (0..c.num_hidden_layers)
                .map(|i| DecoderLayer::new(c, model.pp("layers").pp(i)))
                .collect::<Result<Vec<_>>>()?,
            norm: rms_norm(c.hidden_size, c.rms_norm_eps, model.pp("norm"))?,
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
            rotary: Rotary::new(c.head_dim, c.rope.theta(10000.0), vb.device())?,
        })
    }

    fn step(&mut self, embeds: &Tensor) -> Result<Tensor> {
        let past = self
            .layers
            .first()
            .map(|l| l.self_attn.cache().len())
            .unwrap_or(0);
        let t = embeds.dim(1)?;
        let (cos, sin) = self.rotary.cos_sin(past, t, embeds.dtype())?;
        let mut x = embeds.clone();
        for layer in self.layers.iter_mut() {
            x = layer.forward(&x, &cos, &sin)?;
        }
        self.norm.forward(&x.i((.., t - 1..t, ..))?)
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
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().clear();
        }
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
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().clear();
        }
        Ok(ResidualFrame {
            codes,
            logits,
            summed_embedding: summed,
        })
    }
}
