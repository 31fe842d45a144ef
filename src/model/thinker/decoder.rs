//! The Qwen2.5 decoder stack shared by the Thinker and the Talker: RMSNorm, GQA attention with
//! q/k/v bias and multimodal rotary embedding (M-RoPE), SwiGLU MLP, and a KV cache that grows
//! block by block and can be truncated back to any length (barge-in rolls the context back).

use crate::model::activation;
use crate::model::linear::attention_dtype;
use crate::model::norm::{RmsNorm, rms_norm};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::{TalkerConfig, TextConfig};
use crate::model::linear::{Linear, linear, linear_no_bias};

/// The shape of one decoder stack, read from the Thinker's text config or the Talker's config.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Split of `head_dim / 2` rotary frequencies over (temporal, height, width) positions.
    pub mrope_section: Vec<usize>,
}

impl From<&TextConfig> for DecoderSpec {
    fn from(c: &TextConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta(),
            mrope_section: c.mrope_section(),
        }
    }
}

impl From<&TalkerConfig> for DecoderSpec {
    fn from(c: &TalkerConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta(),
            mrope_section: c.mrope_section(),
        }
    }
}

/// Multimodal rotary embedding: each rotary frequency takes its angle from one of the three
/// position rows, chosen by `mrope_section`; with equal rows it is ordinary 1-D RoPE.
#[derive(Debug, Clone)]
pub struct MultimodalRotary {
    inv_freq: Tensor,
    mrope_section: Vec<usize>,
}

impl MultimodalRotary {
    pub fn new(
        head_dim: usize,
        theta: f64,
        mrope_section: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        if mrope_section.iter().sum::<usize>() != half {
            candle_core::bail!("mrope_section {mrope_section:?} must sum to head_dim/2 = {half}");
        }
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, half), device)?,
            mrope_section: mrope_section.to_vec(),
        })
    }

    /// `positions`: (3, seq_len) integer tensor of (temporal, height, width) ids.
    /// Returns (cos, sin), each (seq_len, head_dim / 2), in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let positions = positions.to_dtype(DType::F32)?;
        let mut parts = Vec::with_capacity(self.mrope_section.len());
        let mut start = 0;
        for (row, &len) in self.mrope_section.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let pos = positions.get(row % 3)?.unsqueeze(1)?; // (seq, 1)
            let freqs = pos.broadcast_mul(&self.inv_freq.narrow(1, start, len)?)?;
            parts.push(freqs);
            start += len;
        }
        let freqs = Tensor::cat(&parts, 1)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

/// A per-layer key/value cache, preallocated and grown by doubling so that appending a step does
/// not copy the whole history, and truncatable to any earlier length.
///
/// Appends write into the buffer in place, so a cloned cache must not keep sharing it: clones
/// share the buffer only until one of them writes, which first moves that one to a private copy.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Counts the caches sharing `k`/`v`; only a sole owner may write in place.
    owner: std::sync::Arc<()>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the first `len` positions (no-op if the cache is shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.k = None;
        self.v = None;
        self.len = 0;
    }

    /// Drops positions `range` (the later ones move down to close the gap). Keys were rotated
    /// at their absolute positions before caching, so the entries that stay remain valid: this
    /// is how a long conversation forgets its oldest parts.
    pub fn remove(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        if range.start > range.end || range.end > self.len {
            candle_core::bail!(
                "kv cache: cannot remove positions {range:?} of a cache holding {}",
                self.len
            );
        }
        let removed = range.end - range.start;
        if removed == 0 {
            return Ok(());
        }
        let tail = self.len - range.end;
        if tail > 0 {
            let (k, v) = match (self.k.as_ref(), self.v.as_ref()) {
                (Some(k), Some(v)) => (k.clone(), v.clone()),
                _ => candle_core::bail!("kv cache buffers missing"),
            };
            // Copied out first: source and destination overlap.
            let k_tail = k.narrow(2, range.end, tail)?.contiguous()?.copy()?;
            let v_tail = v.narrow(2, range.end, tail)?.contiguous()?.copy()?;
            if std::sync::Arc::strong_count(&self.owner) > 1 {
                // Shared with a clone: move to a private copy before writing.
                self.k = Some(k.copy()?);
                self.v = Some(v.copy()?);
                self.owner = std::sync::Arc::new(());
            }
            let (kb, vb) = match (self.k.as_ref(), self.v.as_ref()) {
                (Some(k), Some(v)) => (k, v),
                _ => candle_core::bail!("kv cache buffers missing"),
            };
            kb.slice_set(&k_tail, 2, range.start)?;
            vb.slice_set(&v_tail, 2, range.start)?;
        }
        self.len -= removed;
        Ok(())
    }

    /// Appends (b, kv_heads, t, d) keys and values; returns the whole cached (k, v).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let capacity = self.k.as_ref().map(|k| k.dim(2)).transpose()?.unwrap_or(0);
        let shared = std::sync::Arc::strong_count(&self.owner) > 1;
        if needed > capacity || shared {
            let new_capacity = if needed > capacity {
                needed.max(capacity * 2).max(64)
            } else {
                capacity
            };
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let buf = Tensor::zeros((b, h, new_capacity, d), like.dtype(), like.device())?;
                if let Some(old) = old.as_ref().filter(|_| self.len > 0) {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
            self.owner = std::sync::Arc::new(());
        }
        let (kb, vb) = match (self.k.as_ref(), self.v.as_ref()) {
            (Some(k), Some(v)) => (k, v),
            _ => candle_core::bail!("kv cache buffers missing after allocation"),
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(spec: &DecoderSpec, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (spec.hidden_size, spec.head_dim);
        Ok(Self {
            q_proj: linear(h, spec.num_attention_heads * d, vb.pp("q_proj"))?,
            k_proj: linear(h, spec.num_key_value_heads * d, vb.pp("k_proj"))?,
            v_proj: linear(h, spec.num_key_value_heads * d, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(spec.num_attention_heads * d, h, vb.pp("o_proj"))?,
            num_heads: spec.num_attention_heads,
            num_kv_heads: spec.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `x` (1, T, hidden) holds the rows of every sequence of the pass one after the other,
    /// `lengths[i]` rows for sequence i, which attends over `caches[i]` only. The projections
    /// run once on all T rows; the attention runs per sequence (selective batching).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lengths: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.num_heads)?;
        let k = split(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?;
        // Rotation is per row, so the rows of all sequences rotate together.
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        let mut outs = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for (&len, cache) in lengths.iter().zip(caches.iter_mut()) {
            let rows = |y: &Tensor| y.narrow(2, start, len);
            outs.push(self.attend(&rows(&q)?, &rows(&k)?, &rows(&v)?, cache)?);
            start += len;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one sequence")
        } else {
            Tensor::cat(&outs, 1)?
        };
        self.o_proj.forward(&out)
    }

    /// One sequence's attention: rotated `q` (b, heads, t, d) over `cache` after appending `k`,
    /// `v` (b, kv_heads, t, d). Returns (b, t, heads * d).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let past = cache.len();
        let (k, v) = cache.append(k, v)?;
        // A decode step's products are too small to repay widening the whole cache.
        let dtype = q.dtype();
        let product_dtype = if t > 1 { attention_dtype(q) } else { dtype };
        let (k, v) = (
            k.to_dtype(product_dtype)?.contiguous()?,
            v.to_dtype(product_dtype)?.contiguous()?,
        );
        // Grouped-query attention without repeating K/V: the `groups` query heads that share a
        // KV head are stacked along the query axis, (b, kv, groups * t, d).
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.to_dtype(product_dtype)?.contiguous()?.reshape((
            b,
            self.num_kv_heads,
            groups * t,
            self.head_dim,
        ))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let keys = past + t;
            let mask = causal_mask(t, past, q.device())?.to_dtype(scores.dtype())?;
            scores = scores
                .reshape((b, self.num_kv_heads, groups, t, keys))?
                .broadcast_add(&mask)?
                .reshape((b, self.num_kv_heads, groups * t, keys))?;
        }
        // Softmax in f32, as the reference's eager attention does.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out =
            probs
                .matmul(&v)?
                .to_dtype(dtype)?
                .reshape((b, self.num_heads, t, self.head_dim))?;
        out.transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))
    }
}

/// (t, past + t) additive mask: query i (at absolute position past + i) sees keys 0..=past + i.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), device)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(spec: &DecoderSpec, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activation::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn new(spec: &DecoderSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(spec, vb.pp("self_attn"))?,
            mlp: Mlp::new(spec, vb.pp("mlp"))?,
            input_layernorm: rms_norm(
                spec.hidden_size,
                spec.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: rms_norm(
                spec.hidden_size,
                spec.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    /// `x` (1, T, hidden): the rows of every sequence of the pass, `lengths[i]` of them for
    /// sequence i with its cache `caches[i]` (see [`DecoderStack::forward_batch`]).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lengths: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            cos,
            sin,
            lengths,
            caches,
        )?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// The KV caches of one sequence, one per layer of a [`DecoderStack`]. Several caches can run
/// through the same weights ([`DecoderStack::forward_batch`]): each session holds its own.
#[derive(Debug, Clone, Default)]
pub struct DecoderCache {
    layers: Vec<KvCache>,
}

impl DecoderCache {
    /// An empty cache for a stack of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![KvCache::default(); layers],
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map(KvCache::len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls the context back to its first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        for cache in self.layers.iter_mut() {
            cache.truncate(len);
        }
    }

    pub fn clear(&mut self) {
        for cache in self.layers.iter_mut() {
            cache.clear();
        }
    }

    /// Drops cached positions `range` in every layer (see [`KvCache::remove`]).
    pub fn remove(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        for cache in self.layers.iter_mut() {
            cache.remove(range.clone())?;
        }
        Ok(())
    }
}

/// One sequence's part of a batched pass ([`DecoderStack::forward_batch`]).
#[derive(Debug)]
pub struct SequenceRows<'a> {
    /// The sequence's own caches, appended to.
    pub cache: &'a mut DecoderCache,
    /// (t, hidden) input rows: one for a decode step, a chunk for a prefill.
    pub embeds: Tensor,
    /// (3, t) positions of those rows.
    pub positions: Tensor,
}

/// The layers and final norm of a Qwen2.5 decoder (`thinker.model.*` / `talker.model.*`),
/// without the token embedding, which each owner handles itself, and with the KV cache of the
/// owner's own sequence.
#[derive(Debug, Clone)]
pub struct DecoderStack {
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rotary: MultimodalRotary,
    dtype: DType,
    cache: DecoderCache,
}

impl DecoderStack {
    /// `vb` points at the model prefix (`thinker.model` or `talker.model`).
    pub fn new(spec: &DecoderSpec, vb: VarBuilder) -> Result<Self> {
        let layers = (0..spec.num_hidden_layers)
            .map(|i| DecoderLayer::new(spec, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cache: DecoderCache::new(layers.len()),
            layers,
            norm: rms_norm(spec.hidden_size, spec.rms_norm_eps, vb.pp("norm"))?,
            rotary: MultimodalRotary::new(
                spec.head_dim,
                spec.rope_theta,
                &spec.mrope_section,
                vb.device(),
            )?,
            dtype: vb.dtype(),
        })
    }

    /// Runs `embeds` (b, t, hidden) at `positions` (3, t) after what the cache holds and
    /// returns the final hidden states after the last norm, (b, t, hidden).
    pub fn forward(&mut self, embeds: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.forward_with_layer_outputs(embeds, positions, None)
    }

    /// Like `forward`, also collecting each layer's output (before the final norm) when asked.
    pub fn forward_with_layer_outputs(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        mut layer_outputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, self.dtype)?;
        let t = embeds.dim(1)?;
        let mut x = embeds.clone();
        for (layer, cache) in self.layers.iter().zip(self.cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, &[t], &mut [cache])?;
            if let Some(outs) = layer_outputs.as_deref_mut() {
                outs.push(x.clone());
            }
        }
        self.norm.forward(&x)
    }

    /// One pass of these weights over several sequences, each with its own cache, positions
    /// and number of rows (decode steps, and prefill chunks riding along): the linear layers
    /// run once on the stacked rows, the attention per sequence over its own cache. Returns
    /// each sequence's (t, hidden) states after the final norm; this stack's own cache is not
    /// touched. Results equal running each sequence alone.
    pub fn forward_batch(&self, sequences: &mut [SequenceRows<'_>]) -> Result<Vec<Tensor>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let mut lengths = Vec::with_capacity(sequences.len());
        let (mut rows, mut cos, mut sin) = (Vec::new(), Vec::new(), Vec::new());
        for (i, seq) in sequences.iter().enumerate() {
            let (t, _) = seq.embeds.dims2()?;
            if seq.positions.dims() != [3, t] {
                candle_core::bail!(
                    "batched pass: sequence {i} has positions of shape {:?} for {t} rows, \
                     expected (3, {t})",
                    seq.positions.dims()
                );
            }
            if seq.cache.layers.len() != self.layers.len() {
                candle_core::bail!(
                    "batched pass: sequence {i}'s cache has {} layers, the stack has {}",
                    seq.cache.layers.len(),
                    self.layers.len()
                );
            }
            let (c, s) = self.rotary.cos_sin(&seq.positions, self.dtype)?;
            cos.push(c);
            sin.push(s);
            rows.push(seq.embeds.to_dtype(self.dtype)?);
            lengths.push(t);
        }
        let mut x = Tensor::cat(&rows, 0)?.unsqueeze(0)?;
        let (cos, sin) = (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut caches: Vec<&mut KvCache> = sequences
                .iter_mut()
                .map(|seq| &mut seq.cache.layers[l])
                .collect();
            x = layer.forward(&x, &cos, &sin, &lengths, &mut caches)?;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?;
        let mut start = 0;
        lengths
            .iter()
            .map(|&len| {
                let part = x.narrow(0, start, len);
                start += len;
                part
            })
            .collect()
    }

    /// Whether `other` runs on the very same weight tensors (a clone of this stack), so that
    /// its cache can ride in this stack's batched passes.
    pub fn shares_weights(&self, other: &DecoderStack) -> bool {
        match (self.layers.first(), other.layers.first()) {
            (Some(a), Some(b)) => {
                a.self_attn.q_proj.weight().id() == b.self_attn.q_proj.weight().id()
                    && self.layers.len() == other.layers.len()
            }
            (None, None) => true,
            _ => false,
        }
    }

    /// An empty cache shaped for this stack, for a sequence run with [`Self::forward_batch`].
    pub fn new_cache(&self) -> DecoderCache {
        DecoderCache::new(self.layers.len())
    }

    /// This stack's own cache.
    pub fn cache(&self) -> &DecoderCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut DecoderCache {
        &mut self.cache
    }

    /// Number of positions held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Rolls the context back to its first `len` positions.
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Drops cached positions `range` in every layer (see [`KvCache::remove`]).
    pub fn remove_cache_range(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        self.cache.remove(range)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Positions that continue a sequence after `start` by plain 1-D steps on all three rows
/// (text tokens and decode steps: `past_len + rope_delta`).
pub fn sequential_positions(start: i64, len: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<i64> = (0..len as i64).map(|i| start + i).collect();
    Tensor::from_vec(row, (1, len), device)?.repeat((3, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_grows_and_truncates() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::default();
        let a = Tensor::arange(0f32, 8., &dev)?.reshape((1, 1, 4, 2))?;
        let (k, _) = cache.append(&a, &a)?;
        assert_eq!(k.dims(), &[1, 1, 4, 2]);
        for _ in 0..40 {
            cache.append(&a, &a)?;
        }
        assert_eq!(cache.len(), 164);
        cache.truncate(2);
        let b = Tensor::full(9f32, (1, 1, 1, 2), &dev)?;
        let (k, _) = cache.append(&b, &b)?;
        assert_eq!(k.dims(), &[1, 1, 3, 2]);
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 1., 2., 3., 9., 9.]
        );
        Ok(())
    }

    #[test]
    fn removing_a_range_closes_the_gap() -> Result<()> {
        let dev = Device::Cpu;
        let step = |v: f32| Tensor::full(v, (1, 1, 1, 2), &dev);
        let mut a = KvCache::default();
        for v in 0..6 {
            a.append(&step(v as f32)?, &step(v as f32)?)?;
        }
        let shared = a.clone();
        a.remove(1..3)?;
        assert_eq!(a.len(), 4);
        let (k, _) = a.append(&step(9.)?, &step(9.)?)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 0., 3., 3., 4., 4., 5., 5., 9., 9.]
        );
        // the clone still sees the original entries
        let mut b = shared;
        let (k, _) = b.append(&step(7.)?, &step(7.)?)?;
        assert_eq!(k.dim(2)?, 7);
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?[2..4], [1., 1.]);
        assert!(a.remove(3..9).is_err());
        a.remove(0..0)?;
        a.remove(2..5)?;
        assert_eq!(a.len(), 2);
        Ok(())
    }

    #[test]
    fn cloned_caches_never_share_writes() -> Result<()> {
        let dev = Device::Cpu;
        let step = |v: f32| Tensor::full(v, (1, 1, 1, 2), &dev);
        let mut a = KvCache::default();
        a.append(&step(1.)?, &step(1.)?)?;
        a.append(&step(2.)?, &step(2.)?)?;
        let mut b = a.clone();
        // Both roll back and write different values at the same position.
        a.truncate(1);
        b.truncate(1);
        let (ka, _) = a.append(&step(7.)?, &step(7.)?)?;
        let (kb, _) = b.append(&step(8.)?, &step(8.)?)?;
        assert_eq!(ka.flatten_all()?.to_vec1::<f32>()?, vec![1., 1., 7., 7.]);
        assert_eq!(kb.flatten_all()?.to_vec1::<f32>()?, vec![1., 1., 8., 8.]);
        // The original keeps writing in place once it is the sole owner again.
        drop(b);
        let (ka, _) = a.append(&step(9.)?, &step(9.)?)?;
        assert_eq!(ka.dims(), &[1, 1, 3, 2]);
        Ok(())
    }

    #[test]
    fn mrope_with_equal_rows_is_plain_rope() -> Result<()> {
        let dev = Device::Cpu;
        let rot = MultimodalRotary::new(16, 10000.0, &[2, 3, 3], &dev)?;
        let plain = MultimodalRotary::new(16, 10000.0, &[8, 0, 0], &dev)?;
        let pos = sequential_positions(3, 5, &dev)?;
        let (c1, s1) = rot.cos_sin(&pos, DType::F32)?;
        let (c2, s2) = plain.cos_sin(&pos, DType::F32)?;
        let diff = (c1 - c2)?.abs()?.max_all()?.to_scalar::<f32>()?
            + (s1 - s2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }

    #[test]
    fn mrope_takes_each_section_from_its_row() -> Result<()> {
        let dev = Device::Cpu;
        let rot = MultimodalRotary::new(8, 100.0, &[1, 1, 2], &dev)?;
        let pos = Tensor::new(&[[1i64], [2], [3]], &dev)?;
        let (cos, _) = rot.cos_sin(&pos, DType::F32)?;
        let got = cos.flatten_all()?.to_vec1::<f32>()?;
        let inv: Vec<f64> = (0..4)
            .map(|i| 1.0 / 100f64.powf(2.0 * i as f64 / 8.0))
            .collect();
        let want = [
            (1.0 * inv[0]).cos(),
            (2.0 * inv[1]).cos(),
            (3.0 * inv[2]).cos(),
            (3.0 * inv[3]).cos(),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}
