//! Causal grouped-query self-attention of the Qwen3 decoders: no q/k/v bias, an RMSNorm over
//! each head of q and k before the rotary embedding (Thinker, Talker, code predictor), and an
//! optional sliding window (Code2Wav's pre-transformer, which has no q/k norm). The KV cache is
//! the one the Qwen2.5 decoder uses, truncatable for barge-in.

use crate::model::norm::{RmsNorm, rms_norm};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::linear::{Linear, linear_no_bias};
use crate::model::thinker::decoder::KvCache;

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RMSNorm over the head dim of q and k (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// A query sees itself and the `window - 1` keys before it.
    pub sliding_window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
    cache: KvCache,
}

impl Attention {
    pub fn new(spec: &AttentionSpec, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (spec.hidden_size, spec.head_dim);
        if spec.num_key_value_heads == 0
            || !spec
                .num_attention_heads
                .is_multiple_of(spec.num_key_value_heads)
        {
            candle_core::bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                spec.num_attention_heads,
                spec.num_key_value_heads
            );
        }
        let qk_norm = if spec.qk_norm {
            Some((
                rms_norm(d, spec.rms_norm_eps, vb.pp("q_norm"))?,
                rms_norm(d, spec.rms_norm_eps, vb.pp("k_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj: linear_no_bias(h, spec.num_attention_heads * d, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(h, spec.num_key_value_heads * d, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(h, spec.num_key_value_heads * d, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(spec.num_attention_heads * d, h, vb.pp("o_proj"))?,
            qk_norm,
            num_heads: spec.num_attention_heads,
            num_kv_heads: spec.num_key_value_heads,
            head_dim: d,
            sliding_window: spec.sliding_window,
            cache: KvCache::default(),
        })
    }

    /// `x`: (b, t, hidden) after what the cache holds; `cos`/`sin`: (t, head_dim / 2).
    pub fn forward(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim));
        let mut q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let mut k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        let past = self.cache.len();
        let (k, v) = self.cache.append(&k, &v)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        // The query heads sharing a KV head are stacked along the query axis.
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, groups * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let keys = past + t;
        let mask = attention_mask(t, past, self.sliding_window, x.device())?;
        let scores = scores
            .reshape((b, self.num_kv_heads, groups, t, keys))?
            .to_dtype(DType::F32)?
            .broadcast_add(&mask)?
            .reshape((b, self.num_kv_heads, groups * t, keys))?;
        // Softmax in f32, as the reference's eager attention does.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.num_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }
}

/// (t, past + t) additive mask: query i (absolute position past + i) sees key j when
/// j <= past + i and, with a window, past + i - j < window.
pub fn attention_mask(
    t: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let q = past + i;
            (0..past + t).map(move |j| {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_hides_keys_too_far_back() -> Result<()> {
        let m = attention_mask(3, 2, Some(2), &Device::Cpu)?.to_vec2::<f32>()?;
        let visible: Vec<Vec<bool>> = m
            .iter()
            .map(|row| row.iter().map(|v| *v == 0.0).collect())
            .collect();
        assert_eq!(
            visible,
            vec![
                vec![false, true, true, false, false],
                vec![false, false, true, true, false],
                vec![false, false, false, true, true],
            ]
        );
        Ok(())
    }
}
