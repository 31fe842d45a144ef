//! The Whisper-style audio tower of the Thinker (`thinker.audio_tower`).
//!
//! Log-mel features `[n_mels, F]` are cut into chunks of `2 * n_window` frames (the last one
//! shorter). Each chunk goes through conv1 + GELU and conv2 (stride 2) + GELU as if zero-padded
//! on its own, gets the sinusoidal position table from row 0, and its tokens attend only to each
//! other through pre-LN encoder layers. The tokens of one audio are then average-pooled in pairs
//! (a trailing odd token is dropped), layer-normed and projected to the Thinker's width:
//! 25 embeddings per second for the published model.
//!
//! Chunks are independent up to the pooling, so they run as one batch padded to a full chunk
//! with a key mask, and a stream can encode each chunk as soon as its last frame arrives
//! ([`AudioEncoderStream`]) with the same result as the whole clip (up to float rounding from
//! differently shaped matmuls). Fed by `media::mel::MelStream` with
//! `FloorPolicy::Groups(chunk_frames())`, a chunk's embeddings come out once the samples under
//! its last mel frame's window have arrived (`n_fft / 2` = 12.5 ms after the chunk's end).

use crate::model::activation;
use crate::model::linear::attention_dtype;
use crate::model::norm::LayerNorm;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Activation, Conv1d, Conv1dConfig, VarBuilder};

use crate::model::config::AudioEncoderConfig;
use crate::model::linear::{Linear, linear, linear_no_bias};

/// Number of audio embeddings the tower yields for `mel_frames` valid feature frames: the
/// stride-2 convolution, then the stride-2 average pooling (a trailing odd frame is dropped).
/// It is also the number of `<|AUDIO|>` placeholders and of TMRoPE temporal ids (one per 40 ms).
pub fn output_len(mel_frames: usize) -> usize {
    if mel_frames == 0 {
        return 0;
    }
    let after_conv = (mel_frames - 1) / 2 + 1;
    // Python's floor division makes (1 - 2) // 2 + 1 == 0: a single conv frame yields nothing.
    if after_conv < 2 {
        0
    } else {
        (after_conv - 2) / 2 + 1
    }
}

/// Tokens after the stride-2 convolution for a chunk of `frames` mel frames.
fn conv_len(frames: usize) -> usize {
    (frames.max(1) - 1) / 2 + 1
}

/// LayerNorm eps of the reference (`nn.LayerNorm` default).
const LAYER_NORM_EPS: f64 = 1e-5;

fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    crate::model::norm::layer_norm(size, LAYER_NORM_EPS, vb)
}

fn conv1d(
    in_channels: usize,
    out_channels: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv1d> {
    let weight = vb.get((out_channels, in_channels, 3), "weight")?;
    let bias = vb.get(out_channels, "bias")?;
    let cfg = Conv1dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Ok(Conv1d::new(weight, Some(bias), cfg))
}

/// `[sin(p * w_k), cos(p * w_k)]` with `w_k = exp(-k * ln(10000) / (channels/2 - 1))`, computed
/// in f32 as the reference does.
fn sinusoids(length: usize, channels: usize, device: &Device) -> Result<Tensor> {
    let half = channels / 2;
    let increment = (10000f64.ln() / (half.max(2) - 1) as f64) as f32;
    let inv: Vec<f32> = (0..half).map(|k| (-increment * k as f32).exp()).collect();
    let mut table = vec![0f32; length * channels];
    for p in 0..length {
        for (k, w) in inv.iter().enumerate() {
            let angle = p as f32 * w;
            table[p * channels + k] = angle.sin();
            table[p * channels + half + k] = angle.cos();
        }
    }
    Tensor::from_vec(table, (length, channels), device)
}

/// Bidirectional multi-head attention within each chunk of a batch (k_proj has no bias).
#[derive(Debug, Clone)]
struct ChunkAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ChunkAttention {
    fn new(cfg: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.encoder_attention_heads,
            head_dim: d / cfg.encoder_attention_heads,
        })
    }

    /// `x`: [chunks, tokens, d]; `key_mask`: additive [chunks, 1, 1, tokens] (0 or -inf), or
    /// `None` when every chunk is full.
    fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (dtype, product_dtype) = (x.dtype(), attention_dtype(x));
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .to_dtype(product_dtype)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match key_mask {
            Some(mask) => scores.broadcast_add(&mask.to_dtype(product_dtype)?)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .to_dtype(dtype)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.out_proj.forward(&out)
    }
}

/// One pre-LN encoder layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: ChunkAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &AudioEncoderConfig, activation: Activation, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: ChunkAttention::new(cfg, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(d, cfg.encoder_ffn_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.encoder_ffn_dim, d, vb.pp("fc2"))?,
            final_layer_norm: layer_norm(d, vb.pp("final_layer_norm"))?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.self_attn_layer_norm.forward(x)?, key_mask)?;
        let x = (x + h)?;
        let h = self.final_layer_norm.forward(&x)?;
        let h = self
            .fc2
            .forward(&activation::apply(self.activation, &self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// Intermediate results of one forward pass, for parity checks against the reference.
#[derive(Debug, Clone)]
pub struct AudioEncoderTrace {
    /// [tokens, d_model]: after the convolutions and position table, padding rows removed.
    pub layer0_input: Tensor,
    /// [outputs, d_model]: after the layers and the pair pooling (input of `ln_post`).
    pub pooled: Tensor,
    /// [outputs, output_dim]: the audio embeddings.
    pub output: Tensor,
}

/// Encoded tokens of a batch of chunks, before pooling.
struct EncodedChunks {
    /// [tokens, d_model]: valid rows only, chunks in order.
    hidden: Tensor,
    /// [tokens, d_model]: the layers' input, when traced.
    layer0_input: Option<Tensor>,
}

/// `thinker.audio_tower`.
#[derive(Debug, Clone)]
pub struct AudioEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    /// [n_window tokens of a full chunk, d_model], in the weights' dtype.
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    proj: Linear,
    num_mel_bins: usize,
    d_model: usize,
    output_dim: usize,
    chunk_frames: usize,
}

impl AudioEncoder {
    /// `vb` at `thinker.audio_tower`.
    pub fn new(cfg: &AudioEncoderConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.n_window == 0 {
            candle_core::bail!("audio_config.n_window must be > 0");
        }
        if cfg.encoder_attention_heads == 0
            || !cfg.d_model.is_multiple_of(cfg.encoder_attention_heads)
        {
            candle_core::bail!(
                "audio_config.d_model ({}) is not a multiple of encoder_attention_heads ({})",
                cfg.d_model,
                cfg.encoder_attention_heads
            );
        }
        if !cfg.d_model.is_multiple_of(2) || cfg.d_model < 4 {
            candle_core::bail!(
                "audio_config.d_model ({}) must be even and at least 4 for the position table",
                cfg.d_model
            );
        }
        let chunk_frames = 2 * cfg.n_window;
        let chunk_tokens = conv_len(chunk_frames);
        if chunk_tokens > cfg.max_source_positions {
            candle_core::bail!(
                "audio_config.n_window ({}) gives {chunk_tokens} tokens per chunk, more than \
                 max_source_positions ({})",
                cfg.n_window,
                cfg.max_source_positions
            );
        }
        let activation: Activation =
            serde_json::from_value(serde_json::Value::String(cfg.activation_function.clone()))
                .map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "audio_config.activation_function {:?} is not supported",
                        cfg.activation_function
                    ))
                })?;
        let d = cfg.d_model;
        let positions = sinusoids(chunk_tokens, d, vb.device())?.to_dtype(vb.dtype())?;
        let layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::new(cfg, activation, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1: conv1d(cfg.num_mel_bins, d, 1, vb.pp("conv1"))?,
            conv2: conv1d(d, d, 2, vb.pp("conv2"))?,
            positions,
            layers,
            ln_post: layer_norm(d, vb.pp("ln_post"))?,
            proj: linear(d, cfg.output_dim, vb.pp("proj"))?,
            num_mel_bins: cfg.num_mel_bins,
            d_model: d,
            output_dim: cfg.output_dim,
            chunk_frames,
        })
    }

    /// Mel frames per attention chunk (`2 * n_window`).
    pub fn chunk_frames(&self) -> usize {
        self.chunk_frames
    }

    pub fn num_mel_bins(&self) -> usize {
        self.num_mel_bins
    }

    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    fn dtype(&self) -> DType {
        self.positions.dtype()
    }

    fn device(&self) -> &Device {
        self.positions.device()
    }

    /// `features` [n_mels, F] -> embeddings [output_len(F), output_dim].
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let mut out = self.forward_many(std::slice::from_ref(features))?;
        Ok(out.remove(0))
    }

    /// Several audios at once (their chunks share one batch); one embedding matrix per audio.
    pub fn forward_many(&self, audios: &[Tensor]) -> Result<Vec<Tensor>> {
        self.run(audios, false).map(|(out, _)| out)
    }

    /// One audio with its intermediate results.
    pub fn forward_traced(&self, features: &Tensor) -> Result<AudioEncoderTrace> {
        let (mut out, trace) = self.run(std::slice::from_ref(features), true)?;
        let (layer0_input, pooled) = trace.expect("traced run");
        Ok(AudioEncoderTrace {
            layer0_input,
            pooled,
            output: out.remove(0),
        })
    }

    /// A streaming state for one audio (see [`AudioEncoderStream`]).
    pub fn stream(&self) -> AudioEncoderStream {
        AudioEncoderStream::default()
    }

    /// The frame count of `[n_mels, frames]` features (maybe 0).
    fn check_features(&self, features: &Tensor) -> Result<usize> {
        let (mels, frames) = features.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "audio features must be [n_mels, frames], got shape {:?}",
                features.dims()
            ))
        })?;
        if mels != self.num_mel_bins {
            candle_core::bail!(
                "audio features have {mels} mel bins, the audio tower takes {}",
                self.num_mel_bins
            );
        }
        Ok(frames)
    }

    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        audios: &[Tensor],
        trace: bool,
    ) -> Result<(Vec<Tensor>, Option<(Tensor, Tensor)>)> {
        if audios.is_empty() {
            return Ok((Vec::new(), None));
        }
        let mut chunks = Vec::new();
        let mut tokens_per_audio = Vec::with_capacity(audios.len());
        for features in audios {
            let frames = self.check_features(features)?;
            if frames == 0 {
                candle_core::bail!("audio features have no frames");
            }
            let features = features.to_dtype(self.dtype())?.to_device(self.device())?;
            let mut tokens = 0;
            let mut start = 0;
            while start < frames {
                let len = self.chunk_frames.min(frames - start);
                chunks.push(features.narrow(1, start, len)?);
                tokens += conv_len(len);
                start += len;
            }
            tokens_per_audio.push(tokens);
        }
        let encoded = self.encode_chunks(&chunks, trace)?;
        let mut outputs = Vec::with_capacity(audios.len());
        let mut pooled_all = Vec::new();
        let mut offset = 0;
        for tokens in tokens_per_audio {
            let hidden = encoded.hidden.narrow(0, offset, tokens)?;
            offset += tokens;
            let pooled = self.pool_pairs(&hidden)?;
            outputs.push(self.project(&pooled)?);
            if trace {
                pooled_all.push(pooled);
            }
        }
        let trace = match (trace, encoded.layer0_input) {
            (true, Some(layer0)) => Some((layer0, Tensor::cat(&pooled_all, 0)?)),
            _ => None,
        };
        Ok((outputs, trace))
    }

    /// Runs chunks (each [n_mels, <= chunk_frames]) through the convolutions and the layers;
    /// returns their valid tokens in order.
    fn encode_chunks(&self, chunks: &[Tensor], trace: bool) -> Result<EncodedChunks> {
        let full = self.chunk_frames;
        let full_tokens = conv_len(full);
        let lens: Vec<usize> = chunks.iter().map(|c| c.dim(1)).collect::<Result<_>>()?;
        // Pad every chunk to a full one, so each chunk is computed the same way whatever batch
        // it is in (the stream then matches the whole clip).
        let padded = chunks
            .iter()
            .zip(&lens)
            .map(|(c, &len)| {
                if len == full {
                    Ok(c.clone())
                } else {
                    c.pad_with_zeros(1, 0, full - len)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::stack(&padded, 0)?; // [chunks, n_mels, full]
        let n = lens.len();
        let all_full = lens.iter().all(|&l| l == full);

        let h = activation::gelu_erf(&self.conv1.forward(&x)?)?;
        // Zero the conv1 output past each chunk's end, as if the chunk were padded on its own.
        let h = if all_full {
            h
        } else {
            let mask: Vec<f32> = lens
                .iter()
                .flat_map(|&len| (0..full).map(move |i| if i < len { 1.0 } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, 1, full), self.device())?.to_dtype(h.dtype())?;
            h.broadcast_mul(&mask)?
        };
        let h = activation::gelu_erf(&self.conv2.forward(&h)?)?.transpose(1, 2)?; // [chunks, tokens, d]
        let mut h = h
            .broadcast_add(&self.positions.unsqueeze(0)?)?
            .contiguous()?;

        let key_mask = if all_full {
            None
        } else {
            let mask: Vec<f32> = lens
                .iter()
                .flat_map(|&len| {
                    let valid = conv_len(len);
                    (0..full_tokens).map(move |i| if i < valid { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            Some(
                Tensor::from_vec(mask, (n, 1, 1, full_tokens), self.device())?
                    .to_dtype(h.dtype())?,
            )
        };
        let valid_rows = |h: &Tensor| -> Result<Tensor> {
            let flat = h.reshape((n * full_tokens, self.d_model))?;
            if all_full {
                return Ok(flat);
            }
            let rows: Vec<u32> = lens
                .iter()
                .enumerate()
                .flat_map(|(c, &len)| (0..conv_len(len)).map(move |i| (c * full_tokens + i) as u32))
                .collect();
            let rows = Tensor::from_vec(rows.clone(), rows.len(), self.device())?;
            flat.index_select(&rows, 0)
        };
        let layer0_input = if trace { Some(valid_rows(&h)?) } else { None };
        for layer in &self.layers {
            h = layer.forward(&h, key_mask.as_ref())?;
        }
        Ok(EncodedChunks {
            hidden: valid_rows(&h)?,
            layer0_input,
        })
    }

    /// Average of consecutive token pairs, [tokens, d] -> [tokens / 2, d] (odd last dropped).
    fn pool_pairs(&self, hidden: &Tensor) -> Result<Tensor> {
        let pairs = hidden.dim(0)? / 2;
        if pairs == 0 {
            return Tensor::zeros((0, self.d_model), hidden.dtype(), hidden.device());
        }
        let h = hidden
            .narrow(0, 0, 2 * pairs)?
            .reshape((pairs, 2, self.d_model))?;
        (h.i((.., 0, ..))? + h.i((.., 1, ..))?)? / 2.0
    }

    /// `ln_post` then `proj`.
    fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        if pooled.dim(0)? == 0 {
            return Tensor::zeros((0, self.output_dim), pooled.dtype(), pooled.device());
        }
        self.proj.forward(&self.ln_post.forward(pooled)?)
    }
}

/// Streaming state of the audio tower for one audio: push mel frames as they come, get the
/// embeddings of every chunk they complete at once, and of the last partial chunk on
/// [`flush`](Self::flush). The concatenated outputs equal [`AudioEncoder::forward`] on all the
/// frames. A pooled pair can straddle two chunks (when `n_window` is odd), so a lone last token
/// waits for the next chunk.
#[derive(Debug, Default, Clone)]
pub struct AudioEncoderStream {
    /// Frames of the open chunk, [n_mels, < chunk_frames].
    open: Option<Tensor>,
    /// An encoded token waiting for its pooling partner, [1, d_model].
    carry: Option<Tensor>,
    frames_in: usize,
    embeddings_out: usize,
}

impl AudioEncoderStream {
    /// Mel frames pushed since the audio started.
    pub fn frames_pushed(&self) -> usize {
        self.frames_in
    }

    /// Embeddings emitted since the audio started.
    pub fn embeddings_emitted(&self) -> usize {
        self.embeddings_out
    }

    /// Frames waiting for their chunk to complete.
    pub fn open_frames(&self) -> usize {
        self.open
            .as_ref()
            .map(|t| t.dim(1).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Feeds mel frames [n_mels, k]; returns the embeddings [m, output_dim] of the chunks they
    /// completed, or `None` if none did.
    pub fn push(&mut self, encoder: &AudioEncoder, frames: &Tensor) -> Result<Option<Tensor>> {
        let k = encoder.check_features(frames)?;
        if k == 0 {
            return Ok(None);
        }
        let frames = frames
            .to_dtype(encoder.dtype())?
            .to_device(encoder.device())?;
        self.frames_in += k;
        let all = match self.open.take() {
            Some(open) => Tensor::cat(&[&open, &frames], 1)?,
            None => frames,
        };
        let total = all.dim(1)?;
        let complete = total / encoder.chunk_frames;
        let used = complete * encoder.chunk_frames;
        if used < total {
            self.open = Some(all.narrow(1, used, total - used)?);
        }
        if complete == 0 {
            return Ok(None);
        }
        let chunks = (0..complete)
            .map(|c| all.narrow(1, c * encoder.chunk_frames, encoder.chunk_frames))
            .collect::<Result<Vec<_>>>()?;
        self.emit(encoder, &chunks)
    }

    /// Ends the audio: encodes the open partial chunk and returns the remaining embeddings
    /// (`None` if there are none; a last odd token is dropped, as the reference does). The
    /// state is then ready for the next audio.
    pub fn flush(&mut self, encoder: &AudioEncoder) -> Result<Option<Tensor>> {
        let out = match self.open.take() {
            Some(open) => self.emit(encoder, &[open])?,
            None => None,
        };
        *self = Self::default();
        Ok(out)
    }

    fn emit(&mut self, encoder: &AudioEncoder, chunks: &[Tensor]) -> Result<Option<Tensor>> {
        let hidden = encoder.encode_chunks(chunks, false)?.hidden;
        let hidden = match self.carry.take() {
            Some(carry) => Tensor::cat(&[&carry, &hidden], 0)?,
            None => hidden,
        };
        let tokens = hidden.dim(0)?;
        if tokens % 2 == 1 {
            self.carry = Some(hidden.narrow(0, tokens - 1, 1)?);
        }
        if tokens < 2 {
            return Ok(None);
        }
        let out = encoder.project(&encoder.pool_pairs(&hidden)?)?;
        self.embeddings_out += out.dim(0)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random_weights::RandomWeights;

    /// Float32 rounding of outputs of order 1 computed with differently shaped matmuls.
    const ROUNDING: f32 = 1e-5;

    /// A small tower with an odd `n_window` (pooled pairs straddle chunks) and random weights.
    fn small_config(n_window: usize) -> AudioEncoderConfig {
        serde_json::from_value(serde_json::json!({
            "num_mel_bins": 8, "encoder_layers": 2, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32, "d_model": 16, "max_source_positions": 40,
            "n_window": n_window, "output_dim": 12
        }))
        .unwrap()
    }

    fn small_encoder(n_window: usize) -> AudioEncoder {
        let vb = RandomWeights::var_builder(DType::F32, &Device::Cpu);
        AudioEncoder::new(&small_config(n_window), vb).unwrap()
    }

    fn features(frames: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (8, frames), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn stream_equals_whole_clip() {
        for n_window in [5, 4] {
            let encoder = small_encoder(n_window);
            for frames in [1, 2, 3, 9, 10, 11, 20, 37, 50] {
                let x = features(frames);
                let whole = encoder.forward(&x).unwrap();
                assert_eq!(whole.dims(), &[output_len(frames), 12]);
                for piece in [1, 3, 7, 10, frames] {
                    let mut stream = encoder.stream();
                    let mut parts = Vec::new();
                    let mut start = 0;
                    while start < frames {
                        let k = piece.min(frames - start);
                        if let Some(out) = stream
                            .push(&encoder, &x.narrow(1, start, k).unwrap())
                            .unwrap()
                        {
                            parts.push(out);
                        }
                        start += k;
                    }
                    parts.extend(stream.flush(&encoder).unwrap());
                    let total: usize = parts.iter().map(|p| p.dim(0).unwrap()).sum();
                    assert_eq!(
                        total,
                        output_len(frames),
                        "n_window {n_window}, {frames} frames"
                    );
                    if total > 0 {
                        let streamed = Tensor::cat(&parts, 0).unwrap();
                        // The same function; only matmul shapes (rows per call) differ, which
                        // can change float rounding.
                        let diff = max_diff(&streamed, &whole);
                        assert!(
                            diff <= ROUNDING,
                            "n_window {n_window}, {frames} frames in pieces of {piece}: {diff:e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_emit_as_soon_as_complete() {
        let encoder = small_encoder(5);
        let mut stream = encoder.stream();
        // A chunk is 10 frames = 5 tokens: 2 embeddings now, the 5th token waits for a partner.
        assert!(stream.push(&encoder, &features(9)).unwrap().is_none());
        let out = stream.push(&encoder, &features(1)).unwrap().unwrap();
        assert_eq!(out.dims(), &[2, 12]);
        // Two chunks at once: 10 tokens + the carried one -> 5 embeddings, one token carried.
        let out = stream.push(&encoder, &features(20)).unwrap().unwrap();
        assert_eq!(out.dims(), &[5, 12]);
        assert_eq!(stream.open_frames(), 0);
        assert!(stream.push(&encoder, &features(0)).unwrap().is_none());
        // 30 frames in all: output_len(30) = 7; flush drops the odd last token.
        assert!(stream.flush(&encoder).unwrap().is_none());
        assert_eq!(output_len(30), 7);
        assert_eq!(stream.frames_pushed(), 0);
    }

    #[test]
    fn several_audios_in_one_batch() {
        let encoder = small_encoder(5);
        let audios = [features(23), features(4), features(10)];
        assert!(encoder.forward_many(&[]).unwrap().is_empty());
        let together = encoder.forward_many(&audios).unwrap();
        for (audio, out) in audios.iter().zip(&together) {
            let alone = encoder.forward(audio).unwrap();
            assert!(max_diff(out, &alone) <= ROUNDING);
        }
    }

    #[test]
    fn bad_features_and_configs_are_rejected() {
        let encoder = small_encoder(5);
        let err = encoder.forward(&features(0)).unwrap_err().to_string();
        assert!(err.contains("no frames"), "{err}");
        let wrong_bins = Tensor::zeros((7, 10), DType::F32, &Device::Cpu).unwrap();
        let err = encoder.forward(&wrong_bins).unwrap_err().to_string();
        assert!(err.contains("7 mel bins"), "{err}");
        let flat = Tensor::zeros(80, DType::F32, &Device::Cpu).unwrap();
        let err = encoder.forward(&flat).unwrap_err().to_string();
        assert!(err.contains("[n_mels, frames]"), "{err}");
        let mut stream = encoder.stream();
        assert!(stream.push(&encoder, &wrong_bins).is_err());

        let vb = RandomWeights::var_builder(DType::F32, &Device::Cpu);
        let err = AudioEncoder::new(&small_config(0), vb.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_window"), "{err}");
        let err = AudioEncoder::new(&small_config(100), vb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_source_positions"), "{err}");
    }

    #[test]
    fn position_table_layout() {
        let table = sinusoids(3, 8, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Row 0: sin 0 = 0, cos 0 = 1; column 0 has frequency 1, the last 1/10000.
        assert_eq!(table[0], vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert!((table[2][0] - 2f32.sin()).abs() < 1e-6);
        assert!((table[2][3] - (2e-4f32).sin()).abs() < 1e-7);
        assert!((table[2][7] - (2e-4f32).cos()).abs() < 1e-7);
    }

    #[test]
    fn output_length_rule() {
        // 1 s = 100 frames -> 50 -> 25 tokens; the fixture's 330 frames -> 165 -> 82.
        assert_eq!(output_len(100), 25);
        assert_eq!(output_len(330), 82);
        assert_eq!(output_len(200), 50);
        assert_eq!(output_len(0), 0);
        assert_eq!(output_len(2), 0);
        assert_eq!(output_len(3), 1);
    }
}
