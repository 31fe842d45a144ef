//! The AuT audio encoder (`thinker.audio_tower.*`), as the reference's `Qwen3OmniMoeAudioEncoder`
//! runs it: the log-mel is cut into chunks of `2 * n_window` frames (zero-padded to the longest
//! chunk), each chunk goes through three stride-2 3x3 convolutions and `conv_out`, gets sinusoid
//! positions that restart per chunk, keeps its valid frames, and the transformer layers attend
//! within windows of `n_window_infer` mel frames (bidirectional inside a window, nothing across).
//!
//! Streaming: windows never see each other, so encoding a stream window by window (pieces of
//! `n_window_infer` frames) gives the whole clip's output, as long as the last piece holds a full
//! chunk (`2 * n_window` frames) or is the whole clip: the reference pads a short last chunk to the
//! longest chunk of its call, and an all-short call pads nothing.

use crate::model::activation;
use crate::model::norm::{LayerNorm, layer_norm};
use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder, conv2d};

use crate::model::linear::{Linear, linear, linear_no_bias};
use crate::model::qwen3_omni::config::AudioEncoderConfig;
use crate::model::qwen3_omni::rope_index::audio_output_length;

/// `SinusoidsPositionEmbedding`: (length, channels), sines then cosines.
fn sinusoids(length: usize, channels: usize, device: &candle_core::Device) -> Result<Tensor> {
    let half = channels / 2;
    let increment = (10000f64.ln() / (half as f64 - 1.0)) as f32;
    let inv: Vec<f32> = (0..half).map(|i| (-increment * i as f32).exp()).collect();
    let mut table = Vec::with_capacity(length * channels);
    for t in 0..length {
        let scaled = inv.iter().map(|&f| t as f32 * f);
        table.extend(scaled.clone().map(f32::sin));
        table.extend(scaled.map(f32::cos));
    }
    Tensor::from_vec(table, (length, channels), device)
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(c: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.d_model;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: c.encoder_attention_heads,
        })
    }

    /// `x` (t, d); attention within each `windows` range only.
    fn forward(&self, x: &Tensor, windows: &[(usize, usize)]) -> Result<Tensor> {
        let (t, d) = x.dims2()?;
        let head_dim = d / self.heads;
        let split = |y: Tensor| y.reshape((t, self.heads, head_dim))?.transpose(0, 1);
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (head_dim as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(windows.len());
        for &(start, end) in windows {
            let len = end - start;
            let (q, k, v) = (
                q.narrow(1, start, len)?.contiguous()?,
                k.narrow(1, start, len)?.contiguous()?,
                v.narrow(1, start, len)?.contiguous()?,
            );
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(v.dtype())?;
            outs.push(probs.matmul(&v)?);
        }
        let out = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((t, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn new(c: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.d_model;
        Ok(Self {
            self_attn: Attention::new(c, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(d, 1e-5, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(d, c.encoder_ffn_dim, vb.pp("fc1"))?,
            fc2: linear(c.encoder_ffn_dim, d, vb.pp("fc2"))?,
            final_layer_norm: layer_norm(d, 1e-5, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, x: &Tensor, windows: &[(usize, usize)]) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.self_attn_layer_norm.forward(x)?, windows)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.final_layer_norm.forward(&x)?)?;
        x + self.fc2.forward(&activation::gelu_erf(&h)?)?
    }
}

/// `conv.forward(x)`, but in f32 for bf16 on the CPU: candle's CPU conv2d lowers to a matmul
/// kernel that has no bf16, so widen and narrow back as candle's own bf16 matmul does.
fn conv2d_forward(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::BF16) {
        return conv.forward(x);
    }
    let widened = Conv2d::new(
        conv.weight().to_dtype(DType::F32)?,
        conv.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
        *conv.config(),
    );
    widened
        .forward(&x.to_dtype(DType::F32)?)?
        .to_dtype(DType::BF16)
}

/// `thinker.audio_tower`.
#[derive(Debug, Clone)]
pub struct AudioEncoder {
    conv2d1: Conv2d,
    conv2d2: Conv2d,
    conv2d3: Conv2d,
    conv_out: Linear,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    proj1: Linear,
    proj2: Linear,
    n_window: usize,
    n_window_infer: usize,
    num_mel_bins: usize,
}

impl AudioEncoder {
    pub fn new(c: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        if c.activation_function != "gelu" {
            candle_core::bail!(
                "audio_config.activation_function {:?} is not supported (the reference uses gelu)",
                c.activation_function
            );
        }
        if c.n_window == 0 || c.n_window_infer < 2 * c.n_window {
            candle_core::bail!(
                "audio_config.n_window_infer ({}) must hold at least one chunk of 2 * n_window ({}) frames",
                c.n_window_infer,
                2 * c.n_window
            );
        }
        let conv = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let ds = c.downsample_hidden_size;
        let freq_out = c.num_mel_bins.div_ceil(2).div_ceil(2).div_ceil(2);
        Ok(Self {
            conv2d1: conv2d(1, ds, 3, conv, vb.pp("conv2d1"))?,
            conv2d2: conv2d(ds, ds, 3, conv, vb.pp("conv2d2"))?,
            conv2d3: conv2d(ds, ds, 3, conv, vb.pp("conv2d3"))?,
            conv_out: linear_no_bias(ds * freq_out, c.d_model, vb.pp("conv_out"))?,
            positions: sinusoids(c.max_source_positions, c.d_model, vb.device())?
                .to_dtype(vb.dtype())?,
            layers: (0..c.encoder_layers)
                .map(|i| EncoderLayer::new(c, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            ln_post: layer_norm(c.d_model, 1e-5, vb.pp("ln_post"))?,
            proj1: linear(c.d_model, c.d_model, vb.pp("proj1"))?,
            proj2: linear(c.d_model, c.output_dim, vb.pp("proj2"))?,
            n_window: c.n_window,
            n_window_infer: c.n_window_infer,
            num_mel_bins: c.num_mel_bins,
        })
    }

    /// Tokens (n, output_dim) of one clip's log-mel `features` (mel bins, frames); n is
    /// [`audio_output_length`] of the frame count.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.forward_clips(std::slice::from_ref(features))
    }

    /// The tokens of several clips (mel bins, frames each) encoded in one call, concatenated in
    /// order: as in the reference, every chunk is padded to the longest chunk of the call and the
    /// attention window follows from it.
    pub fn forward_clips(&self, clips: &[Tensor]) -> Result<Tensor> {
        let chunk = 2 * self.n_window;
        let mut chunks = Vec::new(); // (clip, start frame, length)
        let mut clip_frames = Vec::with_capacity(clips.len());
        for (c, features) in clips.iter().enumerate() {
            let (bins, frames) = features.dims2()?;
            if bins != self.num_mel_bins || frames == 0 {
                candle_core::bail!(
                    "audio clip {c} features are ({bins}, {frames}); the encoder wants ({}, frames > 0)",
                    self.num_mel_bins
                );
            }
            for i in 0..frames.div_ceil(chunk) {
                chunks.push((c, i * chunk, chunk.min(frames - i * chunk)));
            }
            clip_frames.push(frames);
        }
        if chunks.is_empty() {
            candle_core::bail!("audio encoder: no clips");
        }
        let longest = chunks.iter().map(|&(_, _, len)| len).max().unwrap_or(0);
        let padded = chunks
            .iter()
            .map(|&(c, start, len)| {
                clips[c]
                    .narrow(1, start, len)?
                    .pad_with_zeros(1, 0, longest - len)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::stack(&padded, 0)?.unsqueeze(1)?; // (chunks, 1, bins, longest)
        let x = activation::gelu_erf(&conv2d_forward(&self.conv2d1, &x)?)?;
        let x = activation::gelu_erf(&conv2d_forward(&self.conv2d2, &x)?)?;
        let x = activation::gelu_erf(&conv2d_forward(&self.conv2d3, &x)?)?;
        let (b, c, f, t) = x.dims4()?;
        let x = x.permute((0, 3, 1, 2))?.reshape((b, t, c * f))?;
        let x = self
            .conv_out
            .forward(&x)?
            .broadcast_add(&self.positions.i(..t)?.unsqueeze(0)?)?;
        let valid: Vec<usize> = chunks
            .iter()
            .map(|&(_, _, len)| audio_output_length(len, self.n_window))
            .collect();
        if let Some(&n) = valid.iter().find(|&&n| n > t) {
            candle_core::bail!(
                "audio encoder: the reference counts {n} tokens for a chunk the convolutions make \
                 {t} of (audio_config.n_window {} does not fit the 3-conv downsampling)",
                self.n_window
            );
        }
        let kept = valid
            .iter()
            .enumerate()
            .map(|(i, &n)| x.i((i, ..n, ..)))
            .collect::<Result<Vec<_>>>()?;
        let mut h = Tensor::cat(&kept, 0)?;
        // The reference's cu_seqlens: per clip, windows of (longest chunk's tokens) * (chunks
        // per window).
        let window = valid.iter().copied().max().unwrap_or(0) * (self.n_window_infer / chunk);
        let mut windows = Vec::new();
        let mut start = 0;
        for &frames in &clip_frames {
            let tokens = audio_output_length(frames, self.n_window);
            for i in 0..tokens.div_ceil(window) {
                windows.push((start + i * window, start + tokens.min((i + 1) * window)));
            }
            start += tokens;
        }
        if start != h.dim(0)? {
            candle_core::bail!(
                "audio encoder: {} tokens after the convolutions, the reference counts {start}",
                h.dim(0)?
            );
        }
        for layer in &self.layers {
            h = layer.forward(&h, &windows)?;
        }
        let h = self.ln_post.forward(&h)?;
        let h = activation::gelu_erf(&self.proj1.forward(&h)?)?;
        self.proj2.forward(&h)
    }

    /// Mel frames per attention window: stream pieces of this size encode exactly.
    pub fn window_frames(&self) -> usize {
        self.n_window_infer / (2 * self.n_window) * 2 * self.n_window
    }
}
