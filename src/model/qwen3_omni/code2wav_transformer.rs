//! Code2Wav's pre-transformer (`code2wav.pre_transformer.*`): causal sliding-window attention
//! without q/k norm, plain 1-D RoPE, SwiGLU MLP, and a learnt per-channel scale on both residual
//! branches (layer scale).

use crate::model::norm::{RmsNorm, rms_norm};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::qwen3_omni::attention::{Attention, AttentionSpec};
use crate::model::qwen3_omni::config::Code2WavConfig;
use crate::model::qwen3_omni::moe::SwiGluMlp;
use crate::model::qwen3_omni::rotary::Rotary;

#[derive(Debug, Clone)]
struct TransformerLayer {
    self_attn: Attention,
    mlp: SwiGluMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    self_attn_layer_scale: Tensor,
    mlp_layer_scale: Tensor,
}

impl TransformerLayer {
    fn new(c: &Code2WavConfig, vb: VarBuilder) -> Result<Self> {
        let spec = AttentionSpec {
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            rms_norm_eps: c.rms_norm_eps,
            qk_norm: false,
            sliding_window: Some(c.sliding_window),
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
            self_attn_layer_scale: vb.pp("self_attn_layer_scale").get(h, "scale")?,
            mlp_layer_scale: vb.pp("mlp_layer_scale").get(h, "scale")?,
        })
    }

    fn forward(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin)?;
        let h = (x + attn.broadcast_mul(&self.self_attn_layer_scale)?)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        &h + mlp.broadcast_mul(&self.mlp_layer_scale)?
    }
}

/// The pre-transformer; `vb` at `code2wav.pre_transformer`.
#[derive(Debug, Clone)]
pub struct PreTransformer {
    layers: Vec<TransformerLayer>,
    norm: RmsNorm,
    rotary: Rotary,
}

impl PreTransformer {
    pub fn new(c: &Code2WavConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..c.num_hidden_layers)
            .map(|i| TransformerLayer::new(c, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: rms_norm(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            rotary: Rotary::new(c.head_dim(), c.rope_theta(), vb.device())?,
        })
    }

    /// (b, frames, hidden) embeddings of a whole chunk, positions from 0 (each decode starts
    /// afresh, as the reference's `chunked_decode` does); returns (b, frames, hidden).
    pub fn forward(&mut self, embeds: &Tensor) -> Result<Tensor> {
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().clear();
        }
        let t = embeds.dim(1)?;
        let (cos, sin) = self.rotary.cos_sin(0, t, embeds.dtype())?;
        let mut x = embeds.clone();
        for layer in self.layers.iter_mut() {
            x = layer.forward(&x, &cos, &sin)?;
        }
        for layer in self.layers.iter_mut() {
            layer.self_attn.cache_mut().clear();
        }
        self.norm.forward(&x)
    }
}
