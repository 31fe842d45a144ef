//! The Qwen3-MoE decoder stack shared by the Thinker and the Talker (`*.model.layers`,
//! `*.model.norm`): q/k-normed GQA attention with the interleaved multimodal rotary embedding,
//! a sparse MoE (or, for `mlp_only_layers`, dense) feed-forward block, pre-norm residuals, and
//! a KV cache that can be rolled back. The token embedding and head belong to each owner. The
//! code predictor uses it too, all layers dense and its RoPE one section (plain 1-D).

use crate::model::norm::{RmsNorm, rms_norm};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::qwen3_omni::attention::{Attention, AttentionSpec};
use crate::model::qwen3_omni::moe::{MoeSpec, SparseMoe, SwiGluMlp};
use crate::model::qwen3_omni::rotary::InterleavedMrope;

/// The shape of one stack, read from the Thinker's or the Talker's text config.
/// Visual features added to the outputs of the first decoder layers (DeepStack).
#[derive(Debug, Clone)]
pub struct Deepstack {
    /// (n,) u32: the sequence positions of the visual tokens.
    pub positions: Tensor,
    /// Per layer from the first, (n, hidden) features in position order.
    pub features: Vec<Tensor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeDecoderSpec {
    pub attention: AttentionSpec,
    /// The sparse block's shape; `None` for a stack without sparse layers.
    pub moe: Option<MoeSpec>,
    /// Size of the dense MLP of the layers that are not sparse.
    pub dense_intermediate_size: usize,
    /// Per layer: sparse MoE (true) or dense MLP (false).
    pub sparse_layers: Vec<bool>,
    pub rope_theta: f64,
    pub mrope_section: Vec<usize>,
}

/// A layer's feed-forward block: sparse MoE, or the dense MLP.
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
    fn new(spec: &MoeDecoderSpec, sparse: bool, vb: VarBuilder) -> Result<Self> {
        let h = spec.attention.hidden_size;
        let eps = spec.attention.rms_norm_eps;
        let mlp = if sparse {
            let Some(moe) = &spec.moe else {
                candle_core::bail!("a sparse decoder layer needs the MoE block's shape");
            };
            FeedForward::Sparse(SparseMoe::new(moe, vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(SwiGluMlp::new(
                h,
                spec.dense_intermediate_size,
                vb.pp("mlp"),
            )?)
        };
        Ok(Self {
            self_attn: Attention::new(&spec.attention, vb.pp("self_attn"))?,
            mlp,
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
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

/// Layers and final norm; `vb` at the model prefix (`thinker.model`, `talker.model`).
#[derive(Debug, Clone)]
pub struct MoeDecoder {
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rotary: InterleavedMrope,
    dtype: DType,
}

impl MoeDecoder {
    pub fn new(spec: &MoeDecoderSpec, vb: VarBuilder) -> Result<Self> {
        let layers = spec
            .sparse_layers
            .iter()
            .enumerate()
            .map(|(i, &sparse)| DecoderLayer::new(spec, sparse, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: rms_norm(
                spec.attention.hidden_size,
                spec.attention.rms_norm_eps,
                vb.pp("norm"),
            )?,
            rotary: InterleavedMrope::new(
                spec.attention.head_dim,
                spec.rope_theta,
                &spec.mrope_section,
                vb.device(),
            )?,
            dtype: vb.dtype(),
        })
    }

    /// Runs `embeds` (b, t, hidden) at `positions` (3, t) after what the cache holds; returns
    /// the hidden states after the final norm. With `layer_outputs`, also each layer's output.
    pub fn forward(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        layer_outputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.forward_deepstack(embeds, positions, layer_outputs, None)
    }

    /// [`Self::forward`], with `deepstack` features added to the outputs of the first layers at
    /// their positions (the reference's `_deepstack_process`).
    pub fn forward_deepstack(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        mut layer_outputs: Option<&mut Vec<Tensor>>,
        deepstack: Option<&Deepstack>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, self.dtype)?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            x = layer.forward(&x, &cos, &sin)?;
            // The reference records a layer's output before DeepStack adds to it.
            if let Some(outs) = layer_outputs.as_deref_mut() {
                outs.push(x.clone());
            }
            if let Some((d, f)) = deepstack.and_then(|d| d.features.get(i).map(|f| (d, f))) {
                x = x.index_add(&d.positions, &f.unsqueeze(0)?.to_dtype(x.dtype())?, 1)?;
            }
        }
        self.norm.forward(&x)
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
