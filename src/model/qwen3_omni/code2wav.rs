//! Code2Wav (`code2wav.*`): the 16 codes of each 80 ms frame to a 24 kHz waveform. The codes'
//! embeddings are averaged, run through the sliding-window pre-transformer, upsampled by causal
//! transposed convolutions with ConvNeXt blocks, then decoded by a causal ConvNet of SnakeBeta
//! activations and dilated residual units. Every convolution is causal (left padding only), so
//! a frame's samples depend on earlier frames alone; [`Code2Wav::chunked_decode`] renders long
//! code streams chunk by chunk with a left context, as the reference does.

use crate::model::activation;
use candle_core::{D, Module, Result, Tensor};
use candle_nn::{
    Conv1d, Conv1dConfig, ConvTranspose1d, ConvTranspose1dConfig, Embedding, VarBuilder,
};

use crate::model::linear::{Linear, linear};
use crate::model::qwen3_omni::code2wav_transformer::PreTransformer;
use crate::model::qwen3_omni::config::Code2WavConfig;

/// Stride-1 Conv1d padded on the left by `(kernel - 1) * dilation` zeros, the reference's
/// `CausalConvNet` as Code2Wav uses it (every one has stride 1, so it adds no right padding).
#[derive(Debug, Clone)]
struct CausalConv {
    conv: Conv1d,
    left_padding: usize,
}

impl CausalConv {
    fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        dilation: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv1dConfig {
            padding: 0,
            stride: 1,
            dilation,
            groups,
            cudnn_fwd_algo: None,
        };
        Ok(Self {
            conv: candle_nn::conv1d(in_c, out_c, kernel, cfg, vb.pp("conv"))?,
            left_padding: (kernel - 1) * dilation,
        })
    }
}

impl Module for CausalConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv
            .forward(&x.pad_with_zeros(D::Minus1, self.left_padding, 0)?)
    }
}

/// ConvTranspose1d with `kernel - stride` samples trimmed from each end (`CausalTransConvNet`).
#[derive(Debug, Clone)]
struct CausalTransConv {
    conv: ConvTranspose1d,
    trim: usize,
}

impl CausalTransConv {
    fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = ConvTranspose1dConfig {
            padding: 0,
            output_padding: 0,
            stride,
            dilation: 1,
            groups: 1,
        };
        Ok(Self {
            conv: candle_nn::conv_transpose1d(in_c, out_c, kernel, cfg, vb.pp("conv"))?,
            trim: kernel - stride,
        })
    }
}

impl Module for CausalTransConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let len = y.dim(D::Minus1)?;
        y.narrow(D::Minus1, self.trim, len - 2 * self.trim)
    }
}

/// `x + sin²(x·e^α) / (e^β + 1e-9)` per channel, on (b, c, t).
#[derive(Debug, Clone)]
struct SnakeBeta {
    frequency: Tensor,
    inverse_magnitude: Tensor,
}

impl SnakeBeta {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let alpha = vb.get(channels, "alpha")?;
        let beta = vb.get(channels, "beta")?;
        Ok(Self {
            frequency: alpha.exp()?.reshape((1, channels, 1))?,
            inverse_magnitude: (beta.exp()? + 1e-9)?.recip()?.reshape((1, channels, 1))?,
        })
    }
}

impl Module for SnakeBeta {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let wave = x.broadcast_mul(&self.frequency)?.sin()?.sqr()?;
        x + wave.broadcast_mul(&self.inverse_magnitude)?
    }
}

/// Depthwise causal conv, LayerNorm, pointwise MLP with GELU, scaled residual.
#[derive(Debug, Clone)]
struct ConvNeXtBlock {
    dwconv: CausalConv,
    norm: crate::model::norm::LayerNorm,
    pwconv1: Linear,
    pwconv2: Linear,
    gamma: Tensor,
}

impl ConvNeXtBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dwconv: CausalConv::new(dim, dim, 7, 1, dim, vb.pp("dwconv"))?,
            norm: crate::model::norm::layer_norm(dim, 1e-6, vb.pp("norm"))?,
            pwconv1: linear(dim, 4 * dim, vb.pp("pwconv1"))?,
            pwconv2: linear(4 * dim, dim, vb.pp("pwconv2"))?,
            gamma: vb.get(dim, "gamma")?,
        })
    }
}

impl Module for ConvNeXtBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.dwconv.forward(x)?.transpose(1, 2)?;
        let h = self.norm.forward(&h)?;
        let h = activation::gelu_erf(&self.pwconv1.forward(&h)?)?;
        let h = self.pwconv2.forward(&h)?.broadcast_mul(&self.gamma)?;
        x + h.transpose(1, 2)?
    }
}

/// SnakeBeta, dilated causal conv (kernel 7), SnakeBeta, 1x1 conv, plus the input.
#[derive(Debug, Clone)]
struct ResidualUnit {
    act1: SnakeBeta,
    conv1: CausalConv,
    act2: SnakeBeta,
    conv2: CausalConv,
}

impl ResidualUnit {
    fn new(dim: usize, dilation: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            act1: SnakeBeta::new(dim, vb.pp("act1"))?,
            conv1: CausalConv::new(dim, dim, 7, dilation, 1, vb.pp("conv1"))?,
            act2: SnakeBeta::new(dim, vb.pp("act2"))?,
            conv2: CausalConv::new(dim, dim, 1, 1, 1, vb.pp("conv2"))?,
        })
    }
}

impl Module for ResidualUnit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.act1.forward(x)?)?;
        x + self.conv2.forward(&self.act2.forward(&h)?)?
    }
}

/// One decoder block: SnakeBeta, upsampling transposed conv, residual units at dilations 1, 3, 9.
#[derive(Debug, Clone)]
struct DecoderBlock {
    act: SnakeBeta,
    upsample: CausalTransConv,
    units: Vec<ResidualUnit>,
}

impl DecoderBlock {
    fn new(in_dim: usize, out_dim: usize, rate: usize, vb: VarBuilder) -> Result<Self> {
        let block = vb.pp("block");
        let units = [1, 3, 9]
            .iter()
            .enumerate()
            .map(|(i, &dilation)| ResidualUnit::new(out_dim, dilation, block.pp(i + 2)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            act: SnakeBeta::new(in_dim, block.pp(0))?,
            upsample: CausalTransConv::new(in_dim, out_dim, 2 * rate, rate, block.pp(1))?,
            units,
        })
    }
}

impl Module for DecoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.upsample.forward(&self.act.forward(x)?)?;
        for unit in &self.units {
            h = unit.forward(&h)?;
        }
        Ok(h)
    }
}

/// `code2wav`; `vb` at `code2wav`.
#[derive(Debug, Clone)]
pub struct Code2Wav {
    code_embedding: Embedding,
    pre_transformer: PreTransformer,
    upsample: Vec<(CausalTransConv, ConvNeXtBlock)>,
    input_conv: CausalConv,
    blocks: Vec<DecoderBlock>,
    output_act: SnakeBeta,
    output_conv: CausalConv,
    codebook_size: usize,
    num_quantizers: usize,
    total_upsample: usize,
}

impl Code2Wav {
    pub fn new(c: &Code2WavConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let upsample = c
            .upsampling_ratios
            .iter()
            .enumerate()
            .map(|(i, &factor)| -> Result<_> {
                let stage = vb.pp("upsample").pp(i);
                Ok((
                    CausalTransConv::new(h, h, factor, factor, stage.pp(0))?,
                    ConvNeXtBlock::new(h, stage.pp(1))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = vb.pp("decoder");
        let blocks = c
            .upsample_rates
            .iter()
            .enumerate()
            .map(|(i, &rate)| {
                DecoderBlock::new(
                    c.decoder_dim >> i,
                    c.decoder_dim >> (i + 1),
                    rate,
                    decoder.pp(i + 1),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let n = c.upsample_rates.len();
        let out_dim = c.decoder_dim >> n;
        Ok(Self {
            code_embedding: candle_nn::embedding(
                c.codebook_size * c.num_quantizers,
                h,
                vb.pp("code_embedding"),
            )?,
            pre_transformer: PreTransformer::new(c, vb.pp("pre_transformer"))?,
            upsample,
            input_conv: CausalConv::new(h, c.decoder_dim, 7, 1, 1, decoder.pp(0))?,
            blocks,
            output_act: SnakeBeta::new(out_dim, decoder.pp(n + 1))?,
            output_conv: CausalConv::new(out_dim, 1, 7, 1, 1, decoder.pp(n + 2))?,
            codebook_size: c.codebook_size,
            num_quantizers: c.num_quantizers,
            total_upsample: c.total_upsample(),
        })
    }

    /// Waveform samples per code frame.
    pub fn samples_per_frame(&self) -> usize {
        self.total_upsample
    }

    /// Codes (b, quantizers, frames) to the mean of their embeddings, (b, frames, hidden).
    pub fn embed(&self, codes: &Tensor) -> Result<Tensor> {
        let (_, q, _) = codes.dims3()?;
        if q != self.num_quantizers {
            candle_core::bail!(
                "code2wav: expected {} codebooks, got {q}",
                self.num_quantizers
            );
        }
        let offsets: Vec<u32> = (0..q as u32)
            .map(|i| i * self.codebook_size as u32)
            .collect();
        let offsets = Tensor::from_vec(offsets, (1, q, 1), codes.device())?;
        let ids = codes
            .to_dtype(candle_core::DType::U32)?
            .broadcast_add(&offsets)?;
        self.code_embedding.forward(&ids)?.mean(1)
    }

    /// The pre-transformer on embedded codes, (b, frames, hidden).
    pub fn pre_transform(&mut self, embeds: &Tensor) -> Result<Tensor> {
        self.pre_transformer.forward(embeds)
    }

    /// The upsampling stages on pre-transformer output: (b, hidden, frames * prod(ratios)).
    pub fn upsample(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut x = hidden.transpose(1, 2)?.contiguous()?;
        for (conv, block) in &self.upsample {
            x = block.forward(&conv.forward(&x)?)?;
        }
        Ok(x)
    }

    /// Upsampled features to the waveform (b, 1, samples), clamped to [-1, 1].
    pub fn decode_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.input_conv.forward(x)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = self.output_conv.forward(&self.output_act.forward(&x)?)?;
        x.clamp(-1f32, 1f32)
    }

    /// Codes (b, quantizers, frames) to the waveform (b, 1, samples), in one pass.
    pub fn forward(&mut self, codes: &Tensor) -> Result<Tensor> {
        let embeds = self.embed(codes)?;
        let hidden = self.pre_transform(&embeds)?;
        let up = self.upsample(&hidden)?;
        self.decode_upsampled(&up)
    }

    /// The reference's `chunked_decode`: chunks of `chunk_size` frames, each decoded with up to
    /// `left_context` earlier frames whose samples are then dropped.
    pub fn chunked_decode(
        &mut self,
        codes: &Tensor,
        chunk_size: usize,
        left_context: usize,
    ) -> Result<Tensor> {
        if chunk_size == 0 {
            candle_core::bail!("code2wav: chunk_size must be > 0");
        }
        let frames = codes.dim(D::Minus1)?;
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < frames {
            let end = (start + chunk_size).min(frames);
            // As the reference: the full context only once start exceeds it.
            let context = if start > left_context {
                left_context
            } else {
                start
            };
            let wav =
                self.forward(&codes.narrow(D::Minus1, start - context, end - start + context)?)?;
            let skip = context * self.total_upsample;
            let len = wav.dim(D::Minus1)?;
            pieces.push(wav.narrow(D::Minus1, skip.min(len), len - skip.min(len))?);
            start = end;
        }
        Tensor::cat(&pieces, D::Minus1)
    }
}

/// Frame-by-frame Code2Wav: each frame's samples as soon as its codes exist, decoded with up to
/// `left_context` earlier frames. Sample `i` of the stream is sample `i` of the offline decode of
/// all frames so far, up to what the missing context beyond `left_context` changes (the
/// pre-transformer's window and the convolutions' reach); the first frames, which have all their
/// history, are exact.
///
/// A decode of `n` frames yields `n * samples_per_frame - lag` samples (the causal transposed
/// convolutions trim their last samples, which need the next frame), so the first frame gives
/// `samples_per_frame - lag` samples and every later one `samples_per_frame`: the stream stays
/// aligned with the offline waveform instead of losing `lag` samples per frame.
#[derive(Debug, Clone)]
pub struct Code2WavStream {
    left_context: usize,
    /// The last `left_context` frames' codes, oldest first (quantizer-major per frame).
    history: Vec<Vec<u32>>,
    frames_seen: usize,
    emitted: usize,
}

impl Code2WavStream {
    pub fn new(left_context: usize) -> Self {
        Self {
            left_context,
            history: Vec::new(),
            frames_seen: 0,
            emitted: 0,
        }
    }

    /// The samples of one more frame (`codes`: one code per quantizer).
    pub fn push_frame(&mut self, code2wav: &mut Code2Wav, codes: &[u32]) -> Result<Vec<f32>> {
        if codes.len() != code2wav.num_quantizers {
            candle_core::bail!(
                "code2wav stream: a frame has {} codes, the decoder takes {}",
                codes.len(),
                code2wav.num_quantizers
            );
        }
        self.history.push(codes.to_vec());
        if self.history.len() > self.left_context + 1 {
            self.history.remove(0);
        }
        let window = self.history.len();
        let first = self.frames_seen + 1 - window;
        self.frames_seen += 1;
        let q = code2wav.num_quantizers;
        let flat: Vec<u32> = (0..q)
            .flat_map(|k| self.history.iter().map(move |frame| frame[k]))
            .collect();
        let device = code2wav.code_embedding.embeddings().device().clone();
        let ids = Tensor::from_vec(flat, (1, q, window), &device)?;
        let wav = code2wav.forward(&ids)?.flatten_all()?;
        let len = wav.dim(0)?;
        // This decode's sample j is sample first * samples_per_frame + j of the stream.
        let offset = first * code2wav.total_upsample;
        let end = offset + len;
        if self.emitted < offset {
            candle_core::bail!(
                "code2wav stream: left context {} is shorter than the decoder's trim",
                self.left_context
            );
        }
        let new = wav.narrow(0, self.emitted - offset, end.saturating_sub(self.emitted))?;
        self.emitted = end.max(self.emitted);
        new.to_dtype(candle_core::DType::F32)?.to_vec1()
    }

    /// Samples given out so far.
    pub fn emitted(&self) -> usize {
        self.emitted
    }
}
