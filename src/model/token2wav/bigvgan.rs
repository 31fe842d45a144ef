//! BigVGAN: natural-log mel `[B, mel_dim, T]` (100 Hz) to a 24 kHz waveform
//! (`Qwen2_5OmniToken2WavBigVGANModel`, at `token2wav.code2wav_bigvgan_model`).
//!
//! The mel is first mapped to the vocoder's normalised dB scale, then `conv_pre`, then one stage
//! per upsampling rate: a transposed convolution (weight `[in, out, k]`) followed by the mean of
//! the stage's AMP residual blocks run on the same input. Every activation is an anti-aliased
//! SnakeBeta: upsample x2 with a Kaiser-windowed sinc filter, SnakeBeta, downsample x2 with the
//! same filter (replicate padding on both resamplers). A last activation, `conv_post` (no bias)
//! and a clamp to [-1, 1] give the waveform; it has `T * prod(upsample_rates)` samples.
//!
//! The resamplers are depthwise filters shared by every channel: they run on the signal
//! transposed to channels-last, each as one matrix product over shifted copies (the
//! up-sampler in polyphase form, one row per phase), never as `C` grouped convolutions.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv1dConfig, VarBuilder};
use omnicall_kernels::snake::{SnakeResampler, SnakeScratch};

use crate::model::config::BigVGANConfig;
use crate::model::linear::{Conv1d, Kernels, conv1d, conv1d_no_bias, detected_level, kernels};

/// `conv_pre` and `conv_post` are kernel-7, padding-3 convolutions in the reference.
const EDGE_CONV_KERNEL: usize = 7;
/// `TorchActivation1d` resamples by 2 with 12-tap filters in both directions.
const RESAMPLE_RATIO: usize = 2;
const RESAMPLE_TAPS: usize = 12;
/// `kaiser_sinc_filter1d(cutoff = 0.5 / ratio, half_width = 0.6 / ratio, 12)`.
const FILTER_CUTOFF: f64 = 0.5 / RESAMPLE_RATIO as f64;
const FILTER_HALF_WIDTH: f64 = 0.6 / RESAMPLE_RATIO as f64;
/// `SnakeBeta.no_div_by_zero`.
const SNAKE_EPS: f64 = 1e-9;
/// The mel is floored at -115 dB and shifted by -20 dB before normalisation to [-1, 1].
const MIN_DB: f64 = -115.0;
const DB_OFFSET: f64 = -20.0;

/// Zeroth-order modified Bessel function of the first kind (power series; converges fast for
/// the small arguments of a Kaiser window).
fn bessel_i0(x: f64) -> f64 {
    let quarter_x2 = x * x / 4.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..64 {
        term *= quarter_x2 / (k * k) as f64;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// `kaiser_sinc_filter1d(cutoff, half_width, kernel_size)`: a Kaiser-windowed sinc low-pass
/// filter normalised to unit sum.
pub fn kaiser_sinc_filter(cutoff: f64, half_width: f64, kernel_size: usize) -> Vec<f32> {
    let even = kernel_size.is_multiple_of(2);
    let half = (kernel_size / 2) as f64;
    let delta_f = 4.0 * half_width;
    let attenuation = 2.285 * (half - 1.0) * std::f64::consts::PI * delta_f + 7.95;
    let beta = if attenuation > 50.0 {
        0.1102 * (attenuation - 8.7)
    } else if attenuation >= 21.0 {
        0.5842 * (attenuation - 21.0).powf(0.4) + 0.07886 * (attenuation - 21.0)
    } else {
        0.0
    };
    let n = kernel_size as f64;
    let window = |i: usize| -> f64 {
        if kernel_size == 1 {
            return 1.0;
        }
        let r = 2.0 * i as f64 / (n - 1.0) - 1.0;
        bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / bessel_i0(beta)
    };
    let sinc = |x: f64| -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let px = std::f64::consts::PI * x;
            px.sin() / px
        }
    };
    let filter: Vec<f64> = (0..kernel_size)
        .map(|i| {
            let t = if even {
                i as f64 - half + 0.5
            } else {
                i as f64 - half
            };
            2.0 * cutoff * window(i) * sinc(2.0 * cutoff * t)
        })
        .collect();
    let sum: f64 = filter.iter().sum();
    filter.iter().map(|f| (f / sum) as f32).collect()
}

/// Pads the last dimension by repeating the edge samples (`F.pad(mode="replicate")`).
#[cfg(test)]
fn replicate_pad(xs: &Tensor, left: usize, right: usize) -> Result<Tensor> {
    let (b, c, t) = xs.dims3()?;
    let mut parts = Vec::with_capacity(3);
    if left > 0 {
        parts.push(xs.narrow(2, 0, 1)?.broadcast_as((b, c, left))?);
    }
    parts.push(xs.clone());
    if right > 0 {
        parts.push(xs.narrow(2, t - 1, 1)?.broadcast_as((b, c, right))?);
    }
    Tensor::cat(&parts, 2)
}

/// Pads a channels-last signal `[T, N]` in time by repeating its first and last rows.
fn replicate_pad_rows(rows: &Tensor, left: usize, right: usize) -> Result<Tensor> {
    let (t, n) = rows.dims2()?;
    if t == 0 {
        candle_core::bail!("BigVGAN: cannot pad an empty signal");
    }
    let mut parts = Vec::with_capacity(3);
    if left > 0 {
        parts.push(rows.narrow(0, 0, 1)?.broadcast_as((left, n))?);
    }
    parts.push(rows.clone());
    if right > 0 {
        parts.push(rows.narrow(0, t - 1, 1)?.broadcast_as((right, n))?);
    }
    Tensor::cat(&parts, 0)
}

/// `UpSample1d(ratio, kernel)` in polyphase form.
///
/// The reference computes `ratio * conv_transpose1d(replicate_pad(x, p, p), filter, stride =
/// ratio)` and crops `crop_left` samples on the left (`p = kernel / ratio - 1`,
/// `crop_left = p * ratio + (kernel - ratio) / 2`). Output sample `ratio * m + phase` is then a
/// short filter over input samples `m + offset`; all phases share a window of `span` padded
/// samples, so the whole upsampler is one `[ratio, span]` matrix applied to `span` shifted
/// copies of the signal.
#[derive(Debug, Clone)]
struct UpSampler {
    ratio: usize,
    /// `[ratio, span]`.
    kernel: Tensor,
    /// The same, row-major, for the CPU kernel.
    taps: Vec<f32>,
    span: usize,
    pad_left: usize,
    pad_right: usize,
}

impl UpSampler {
    fn new(ratio: usize, filter: &[f32], device: &Device, dtype: DType) -> Result<Self> {
        let taps = filter.len();
        let pad = taps / ratio - 1;
        let crop_left = pad * ratio + (taps - ratio) / 2;
        // (phase, offset into the padded input, weight) of every contribution.
        let mut entries = Vec::new();
        for phase in 0..ratio {
            for (j, &f) in filter.iter().enumerate() {
                let t = phase + crop_left;
                if t >= j && (t - j).is_multiple_of(ratio) {
                    entries.push((phase, (t - j) / ratio, ratio as f32 * f));
                }
            }
        }
        let min_off = entries.iter().map(|e| e.1).min().unwrap_or(0);
        let max_off = entries.iter().map(|e| e.1).max().unwrap_or(0);
        // Output m reads padded samples [m + min_off, m + max_off]; of the `pad` edge copies on
        // each side, the first `min_off` are never read.
        if min_off > pad || max_off < pad {
            candle_core::bail!("BigVGAN: resampler geometry out of range");
        }
        let span = max_off - min_off + 1;
        let mut kernel = vec![0f32; ratio * span];
        for (phase, off, w) in entries {
            kernel[phase * span + off - min_off] = w;
        }
        Ok(Self {
            ratio,
            kernel: Tensor::from_vec(kernel.clone(), (ratio, span), device)?.to_dtype(dtype)?,
            taps: kernel,
            span,
            pad_left: pad - min_off,
            pad_right: max_off - pad,
        })
    }

    /// Channels-last `[T, N]` -> `[ratio T, N]`.
    fn forward_rows(&self, rows: &Tensor) -> Result<Tensor> {
        let (t, n) = rows.dims2()?;
        let padded = replicate_pad_rows(rows, self.pad_left, self.pad_right)?;
        let shifted = (0..self.span)
            .map(|s| padded.narrow(0, s, t))
            .collect::<Result<Vec<_>>>()?;
        let stacked = Tensor::stack(&shifted, 0)?.reshape((self.span, t * n))?;
        self.kernel
            .matmul(&stacked)? // [ratio, T N]
            .reshape((self.ratio, t, n))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.ratio * t, n))
    }
}

/// `DownSample1d(ratio, kernel)`: replicate padding then a strided low-pass filter, applied as
/// one `[1, taps]` matrix to `taps` shifted, decimated copies of the signal.
#[derive(Debug, Clone)]
struct DownSampler {
    ratio: usize,
    /// `[1, taps]`.
    kernel: Tensor,
    filter: Vec<f32>,
    taps: usize,
    pad_left: usize,
    pad_right: usize,
}

impl DownSampler {
    fn new(ratio: usize, filter: &[f32], device: &Device, dtype: DType) -> Result<Self> {
        let taps = filter.len();
        let even = taps.is_multiple_of(2);
        Ok(Self {
            ratio,
            kernel: Tensor::from_vec(filter.to_vec(), (1, taps), device)?.to_dtype(dtype)?,
            filter: filter.to_vec(),
            taps,
            pad_left: taps / 2 - usize::from(even),
            pad_right: taps / 2,
        })
    }

    /// Channels-last `[ratio T, N]` -> `[T, N]`.
    fn forward_rows(&self, rows: &Tensor) -> Result<Tensor> {
        let (len, n) = rows.dims2()?;
        let r = self.ratio;
        let t = (len + self.pad_left + self.pad_right - self.taps) / r + 1;
        // Pad a little further so that every tap's window splits into whole groups of `r`.
        let extra = (t * r + self.taps).saturating_sub(len + self.pad_left + self.pad_right);
        let padded = replicate_pad_rows(rows, self.pad_left, self.pad_right + extra)?;
        let shifted = (0..self.taps)
            .map(|j| {
                padded
                    .narrow(0, j, r * t)?
                    .reshape((t, r, n))?
                    .narrow(1, 0, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let stacked = Tensor::stack(&shifted, 0)?.reshape((self.taps, t * n))?;
        self.kernel.matmul(&stacked)?.reshape((t, n))
    }
}

/// Both resamplers, shared by every activation of the model, with their fused CPU form.
#[derive(Debug, Clone)]
struct Resamplers {
    up: UpSampler,
    down: DownSampler,
    cpu: Arc<SnakeResampler>,
}

impl Resamplers {
    fn new(up: UpSampler, down: DownSampler) -> Self {
        let cpu = Arc::new(SnakeResampler {
            ratio: up.ratio,
            up: up.taps.clone(),
            span: up.span,
            up_pad: (up.pad_left, up.pad_right),
            down: down.filter.clone(),
            down_pad: (down.pad_left, down.pad_right),
        });
        Self { up, down, cpu }
    }
}

/// `TorchActivation1d(SnakeBeta(C))`: upsample, SnakeBeta, downsample.
///
/// On the CPU in f32 the whole activation runs channel by channel in one pass of the
/// `omnicall-kernels` crate ([`SnakeResampler`]). Elsewhere the resamplers, depthwise filters
/// shared by every channel, work on the signal transposed to channels-last `[T, B C]`: each
/// filter is then a single matrix product over shifted copies of the whole signal, never `C`
/// grouped convolutions.
#[derive(Debug, Clone)]
struct AntiAliasedSnake {
    /// `exp(alpha)`, `[1, C]`.
    frequency: Tensor,
    /// `1 / (exp(beta) + 1e-9)`, `[1, C]`.
    inverse_magnitude: Tensor,
    up: UpSampler,
    down: DownSampler,
    /// The fused CPU activation, when the model is on the CPU in f32.
    cpu: Option<CpuSnake>,
}

impl AntiAliasedSnake {
    /// `vb` at the `TorchActivation1d` (its SnakeBeta is `act`).
    fn new(channels: usize, resamplers: &Resamplers, vb: VarBuilder) -> Result<Self> {
        let act = vb.pp("act");
        let alpha = act.get(channels, "alpha")?;
        let beta = act.get(channels, "beta")?;
        let frequency = alpha.exp()?.reshape((1, channels))?;
        let inverse_magnitude = (beta.exp()? + SNAKE_EPS)?.recip()?.reshape((1, channels))?;
        let cpu = if frequency.device().is_cpu() && frequency.dtype() == DType::F32 {
            Some(CpuSnake {
                resampler: resamplers.cpu.clone(),
                frequency: Arc::new(frequency.flatten_all()?.to_vec1()?),
                inverse_magnitude: Arc::new(inverse_magnitude.flatten_all()?.to_vec1()?),
            })
        } else {
            None
        };
        Ok(Self {
            frequency,
            inverse_magnitude,
            up: resamplers.up.clone(),
            down: resamplers.down.clone(),
            cpu,
        })
    }
}

impl Module for AntiAliasedSnake {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(cpu) = &self.cpu
            && kernels() == Kernels::Auto
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
        {
            return xs.apply_op1_no_bwd(cpu);
        }
        self.forward_generic(xs)
    }
}

impl AntiAliasedSnake {
    /// The device-generic activation (what a GPU runs).
    fn forward_generic(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, t) = xs.dims3()?;
        let rows = xs.reshape((b * c, t))?.t()?.contiguous()?; // [T, B C]
        let up = self.up.forward_rows(&rows)?;
        let (frequency, inverse) = if b == 1 {
            (self.frequency.clone(), self.inverse_magnitude.clone())
        } else {
            (
                self.frequency.repeat((1, b))?,
                self.inverse_magnitude.repeat((1, b))?,
            )
        };
        let wave = up.broadcast_mul(&frequency)?.sin()?.sqr()?;
        let snake = (up + wave.broadcast_mul(&inverse)?)?;
        self.down
            .forward_rows(&snake)?
            .t()?
            .contiguous()?
            .reshape((b, c, t))
    }
}

/// [`AntiAliasedSnake`] on the CPU: `[B, C, T]` f32, each channel through the fused kernel,
/// the channels split over candle's thread pool.
#[derive(Debug, Clone)]
struct CpuSnake {
    resampler: Arc<SnakeResampler>,
    frequency: Arc<Vec<f32>>,
    inverse_magnitude: Arc<Vec<f32>>,
}

/// The output rows, shared by the pool's work items: each writes only its own rows.
struct SharedRows(*mut f32);
// SAFETY: the work items write disjoint rows of the buffer, which outlives them.
unsafe impl Sync for SharedRows {}

/// Channels per work item of [`CpuSnake`]: enough items to balance the pool's threads.
const SNAKE_ROWS_PER_ITEM: usize = 8;

impl CustomOp1 for CpuSnake {
    fn name(&self) -> &'static str {
        "anti-aliased-snake"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, t) = layout.shape().dims3()?;
        if c != self.frequency.len() || t == 0 {
            candle_core::bail!(
                "anti-aliased snake: input {:?} for {} channels",
                layout.shape(),
                self.frequency.len()
            );
        }
        let copy;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(all), Some((start, end))) => &all[start..end],
            (CpuStorage::F32(_), None) => {
                let CpuStorage::F32(c) = storage.to_dtype(layout, DType::F32)? else {
                    candle_core::bail!("anti-aliased snake: copying did not give f32");
                };
                copy = c;
                &copy[..]
            }
            _ => candle_core::bail!("anti-aliased snake: needs f32, got {:?}", storage.dtype()),
        };
        let rows = b * c;
        let mut out = vec![0f32; rows * t];
        let shared = SharedRows(out.as_mut_ptr());
        let level = detected_level();
        let items = rows.div_ceil(SNAKE_ROWS_PER_ITEM);
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let shared = &shared;
            let mut scratch = SnakeScratch::default();
            for row in
                range.start * SNAKE_ROWS_PER_ITEM..(range.end * SNAKE_ROWS_PER_ITEM).min(rows)
            {
                let ch = row % c;
                // SAFETY: row `row` of `rows x t` is written by this item only, and `out`
                // outlives the pool's work.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.0.add(row * t), t) };
                self.resampler.run(
                    level,
                    &x[row * t..(row + 1) * t],
                    self.frequency[ch],
                    self.inverse_magnitude[ch],
                    dst,
                    &mut scratch,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, t))))
    }
}

/// `AMPBlock`: per dilation, `x += conv2(act(conv1(act(x))))` with `conv1` dilated.
#[derive(Debug, Clone)]
struct AmpBlock {
    convs1: Vec<Conv1d>,
    convs2: Vec<Conv1d>,
    activations: Vec<AntiAliasedSnake>,
}

impl AmpBlock {
    fn new(
        channels: usize,
        kernel: usize,
        dilations: &[usize],
        resamplers: &Resamplers,
        vb: VarBuilder,
    ) -> Result<Self> {
        let same = |dilation: usize| Conv1dConfig {
            padding: (kernel * dilation - dilation) / 2,
            dilation,
            ..Default::default()
        };
        let convs1 = dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| conv1d(channels, channels, kernel, same(d), vb.pp("convs1").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let convs2 = (0..dilations.len())
            .map(|i| conv1d(channels, channels, kernel, same(1), vb.pp("convs2").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let activations = (0..2 * dilations.len())
            .map(|i| AntiAliasedSnake::new(channels, resamplers, vb.pp("activations").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            convs1,
            convs2,
            activations,
        })
    }
}

impl Module for AmpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, (c1, c2)) in self.convs1.iter().zip(&self.convs2).enumerate() {
            let y = c1.forward(&self.activations[2 * i].forward(&h)?)?;
            let y = c2.forward(&self.activations[2 * i + 1].forward(&y)?)?;
            h = (h + y)?;
        }
        Ok(h)
    }
}

/// One `ConvTranspose1d(in, out, k, stride, padding = (k - stride) / 2)`, computed without
/// padding (candle's fast path) and cropped.
#[derive(Debug, Clone)]
struct Upsample {
    /// `[in, out, k]`.
    weight: Tensor,
    /// `[1, out, 1]`.
    bias: Tensor,
    stride: usize,
    crop: usize,
}

impl Upsample {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        if k < stride {
            candle_core::bail!(
                "BigVGAN: upsample kernel {k} is shorter than its rate {stride} (output would have gaps)"
            );
        }
        Ok(Self {
            weight: vb.get((c_in, c_out, k), "weight")?,
            bias: vb.get(c_out, "bias")?.reshape((1, c_out, 1))?,
            stride,
            crop: (k - stride) / 2,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let t = xs.dim(2)?;
        let k = self.weight.dim(2)?;
        let full = xs.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1)?;
        // PyTorch's output length with padding p: (t - 1) stride - 2p + k.
        let len = (t - 1) * self.stride + k - 2 * self.crop;
        full.narrow(2, self.crop, len)?.broadcast_add(&self.bias)
    }
}

/// `Qwen2_5OmniToken2WavBigVGANModel`.
#[derive(Debug, Clone)]
pub struct BigVgan {
    conv_pre: Conv1d,
    ups: Vec<Upsample>,
    /// Stage-major: the blocks of stage `i` are `resblocks[i * kernels .. (i + 1) * kernels]`.
    resblocks: Vec<AmpBlock>,
    kernels_per_stage: usize,
    activation_post: AntiAliasedSnake,
    conv_post: Conv1d,
    cfg: BigVGANConfig,
}

impl BigVgan {
    /// `vb` at `token2wav.code2wav_bigvgan_model`.
    pub fn new(cfg: &BigVGANConfig, vb: VarBuilder) -> Result<Self> {
        let stages = cfg.upsample_rates.len();
        if stages != cfg.upsample_kernel_sizes.len()
            || cfg.resblock_kernel_sizes.len() != cfg.resblock_dilation_sizes.len()
            || cfg.resblock_kernel_sizes.is_empty()
        {
            candle_core::bail!(
                "BigVGAN config: upsample_rates/upsample_kernel_sizes and resblock_kernel_sizes/\
                 resblock_dilation_sizes must pair up (got {} / {} and {} / {})",
                stages,
                cfg.upsample_kernel_sizes.len(),
                cfg.resblock_kernel_sizes.len(),
                cfg.resblock_dilation_sizes.len()
            );
        }
        if !cfg
            .upsample_initial_channel
            .is_multiple_of(1 << stages.min(63))
        {
            candle_core::bail!(
                "BigVGAN config: upsample_initial_channel {} is not divisible by 2^{stages}",
                cfg.upsample_initial_channel
            );
        }
        let (device, dtype) = (vb.device().clone(), vb.dtype());
        let filter = kaiser_sinc_filter(FILTER_CUTOFF, FILTER_HALF_WIDTH, RESAMPLE_TAPS);
        let up = UpSampler::new(RESAMPLE_RATIO, &filter, &device, dtype)?;
        let down = DownSampler::new(RESAMPLE_RATIO, &filter, &device, dtype)?;
        let resamplers = Resamplers::new(up, down);

        let edge = Conv1dConfig {
            padding: EDGE_CONV_KERNEL / 2,
            ..Default::default()
        };
        let c0 = cfg.upsample_initial_channel;
        let conv_pre = conv1d(cfg.mel_dim, c0, EDGE_CONV_KERNEL, edge, vb.pp("conv_pre"))?;
        let mut ups = Vec::with_capacity(stages);
        let mut resblocks = Vec::new();
        for (i, (&rate, &k)) in cfg
            .upsample_rates
            .iter()
            .zip(&cfg.upsample_kernel_sizes)
            .enumerate()
        {
            let (c_in, c_out) = (c0 >> i, c0 >> (i + 1));
            ups.push(Upsample::new(
                c_in,
                c_out,
                k,
                rate,
                vb.pp("ups").pp(i).pp(0),
            )?);
            for (j, (&rk, dil)) in cfg
                .resblock_kernel_sizes
                .iter()
                .zip(&cfg.resblock_dilation_sizes)
                .enumerate()
            {
                let index = i * cfg.resblock_kernel_sizes.len() + j;
                resblocks.push(AmpBlock::new(
                    c_out,
                    rk,
                    dil,
                    &resamplers,
                    vb.pp("resblocks").pp(index),
                )?);
            }
        }
        let c_last = c0 >> stages;
        let activation_post = AntiAliasedSnake::new(c_last, &resamplers, vb.pp("activation_post"))?;
        let conv_post = conv1d_no_bias(c_last, 1, EDGE_CONV_KERNEL, edge, vb.pp("conv_post"))?;
        Ok(Self {
            conv_pre,
            ups,
            resblocks,
            kernels_per_stage: cfg.resblock_kernel_sizes.len(),
            activation_post,
            conv_post,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &BigVGANConfig {
        &self.cfg
    }

    /// Waveform samples per mel frame.
    pub fn hop_length(&self) -> usize {
        self.cfg.hop_length()
    }

    /// The reference's `process_mel_spectrogram`: natural-log mel to dB (floored at -115 dB,
    /// shifted by -20 dB), then to [-1, 1]. `log(max(exp(m), floor)) = max(m, ln floor)`.
    fn normalise_mel(mel: &Tensor) -> Result<Tensor> {
        let ln_floor = MIN_DB / 20.0 * std::f64::consts::LN_10;
        let db = ((mel.maximum(ln_floor)? * (20.0 / std::f64::consts::LN_10))? + DB_OFFSET)?;
        (db - MIN_DB)?
            .affine(2.0 / -MIN_DB, -1.0)?
            .clamp(-1f32, 1f32)
    }

    /// `mel` `[B, mel_dim, T]` (natural log) -> waveform `[B, T * hop_length]` in [-1, 1].
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let (_, m, t) = mel.dims3()?;
        if m != self.cfg.mel_dim || t == 0 {
            candle_core::bail!(
                "BigVGAN: mel must be [B, mel_dim = {}, T > 0], got {:?}",
                self.cfg.mel_dim,
                mel.dims()
            );
        }
        let dtype = self.conv_pre.weight().dtype();
        let mut h = self
            .conv_pre
            .forward(&Self::normalise_mel(&mel.to_dtype(dtype)?)?)?;
        for (i, up) in self.ups.iter().enumerate() {
            h = up.forward(&h)?;
            let blocks =
                &self.resblocks[i * self.kernels_per_stage..(i + 1) * self.kernels_per_stage];
            let mut sum = blocks[0].forward(&h)?;
            for block in &blocks[1..] {
                sum = (sum + block.forward(&h)?)?;
            }
            h = (sum / self.kernels_per_stage as f64)?;
        }
        let wav = self
            .conv_post
            .forward(&self.activation_post.forward(&h)?)?
            .clamp(-1f32, 1f32)?;
        wav.squeeze(1)?.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiser_filter_matches_the_reference_recipe() {
        let f = kaiser_sinc_filter(0.25, 0.3, 12);
        assert_eq!(f.len(), 12);
        let sum: f32 = f.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        for i in 0..6 {
            assert!((f[i] - f[11 - i]).abs() < 1e-7, "symmetric");
        }
        // numpy.kaiser + numpy.sinc with the same recipe (float64).
        let want = [
            0.00202897,
            0.00938946,
            -0.02554346,
            -0.05765738,
            0.12857261,
            0.4432098,
        ];
        for (g, w) in f.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{f:?}");
        }
    }

    #[test]
    fn bessel_i0_known_values() {
        assert!((bessel_i0(0.0) - 1.0).abs() < 1e-15);
        assert!((bessel_i0(1.0) - 1.266_065_877_752_008_4).abs() < 1e-12);
        assert!((bessel_i0(2.0) - 2.279_585_302_336_067).abs() < 1e-12);
    }

    /// `[B, C, T]` through a channels-last resampler.
    fn by_rows(xs: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, c, t) = xs.dims3()?;
        let out = f(&xs.reshape((b * c, t))?.t()?.contiguous()?)?;
        let t_out = out.dim(0)?;
        out.t()?.contiguous()?.reshape((b, c, t_out))
    }

    /// The polyphase up-sampler equals the reference's replicate pad + grouped transposed
    /// convolution + crop; the down-sampler equals pad + grouped strided convolution.
    #[test]
    fn resamplers_match_direct_grouped_convolutions() -> Result<()> {
        let dev = Device::Cpu;
        let filter = kaiser_sinc_filter(0.25, 0.3, 12);
        let c = 3;
        let kernel = Tensor::from_vec(filter.clone(), (1, 1, 12), &dev)?;
        let grouped = kernel.broadcast_as((c, 1, 12))?.contiguous()?;
        let up = UpSampler::new(2, &filter, &dev, DType::F32)?;
        let down = DownSampler::new(2, &filter, &dev, DType::F32)?;
        for (b, t) in [(2, 9), (1, 1), (1, 2), (2, 16)] {
            let x = Tensor::randn(0f32, 1., (b, c, t), &dev)?;
            let got = by_rows(&x, |r| up.forward_rows(r))?;
            let pad = 12 / 2 - 1;
            let (crop_l, crop_r) = (pad * 2 + (12 - 2) / 2, pad * 2 + (12 - 2_usize).div_ceil(2));
            let full =
                (replicate_pad(&x, pad, pad)?.conv_transpose1d(&grouped, 0, 0, 2, 1, c)? * 2.0)?;
            let len = full.dim(2)? - crop_l - crop_r;
            let want = full.narrow(2, crop_l, len)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "upsample t {t}: {diff}");

            let x2 = Tensor::randn(0f32, 1., (b, c, 2 * t), &dev)?;
            let got = by_rows(&x2, |r| down.forward_rows(r))?;
            let want = replicate_pad(&x2, 5, 6)?.conv1d(&grouped, 0, 2, 1, c)?;
            assert_eq!(got.dims(), &[b, c, t]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "downsample t {t}: {diff}");
        }
        Ok(())
    }

    /// The activation equals SnakeBeta between the reference's grouped resampling convolutions.
    #[test]
    fn anti_aliased_snake_matches_the_reference_formulation() -> Result<()> {
        let dev = Device::Cpu;
        let filter = kaiser_sinc_filter(0.25, 0.3, 12);
        let up = UpSampler::new(2, &filter, &dev, DType::F32)?;
        let down = DownSampler::new(2, &filter, &dev, DType::F32)?;
        let c = 3;
        let (alpha, beta) = ([0.3f32, -0.2, 0.0], [-0.5f32, 0.1, 0.4]);
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("act.alpha".to_string(), Tensor::new(&alpha, &dev)?),
                ("act.beta".to_string(), Tensor::new(&beta, &dev)?),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &dev,
        );
        let act = AntiAliasedSnake::new(c, &Resamplers::new(up, down), vb)?;
        assert!(act.cpu.is_some(), "f32 on the CPU has the fused activation");
        let grouped = Tensor::from_vec(filter.clone(), (1, 1, 12), &dev)?
            .broadcast_as((c, 1, 12))?
            .contiguous()?;
        let freq = Tensor::new(&alpha, &dev)?.exp()?.reshape((1, c, 1))?;
        let inv = (Tensor::new(&beta, &dev)?.exp()? + 1e-9)?
            .recip()?
            .reshape((1, c, 1))?;
        for (b, t) in [(1, 7), (2, 33)] {
            let x = (Tensor::randn(0f32, 1., (b, c, t), &dev)? * 2.0)?;
            let full = (replicate_pad(&x, 5, 5)?.conv_transpose1d(&grouped, 0, 0, 2, 1, c)? * 2.0)?;
            let upsampled = full.narrow(2, 15, 2 * t)?;
            let wave = upsampled.broadcast_mul(&freq)?.sin()?.sqr()?;
            let snake = (upsampled + wave.broadcast_mul(&inv)?)?;
            let want = replicate_pad(&snake, 5, 6)?.conv1d(&grouped, 0, 2, 1, c)?;
            for (path, got) in [
                ("model's", act.forward(&x)?),
                ("generic", act.forward_generic(&x)?),
                (
                    "strided input",
                    act.forward(&x.transpose(1, 2)?.contiguous()?.transpose(1, 2)?)?,
                ),
            ] {
                assert_eq!(got.dims(), &[b, c, t]);
                let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{path} path, b {b} t {t}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn transposed_conv_crop_matches_padded_length() -> Result<()> {
        let dev = Device::Cpu;
        let vb = crate::model::random_weights::RandomWeights::var_builder(DType::F32, &dev);
        for (k, s) in [(11, 5), (7, 3), (4, 2)] {
            let up = Upsample::new(4, 2, k, s, vb.pp(format!("u{k}")))?;
            let x = Tensor::randn(0f32, 1., (1, 4, 6), &dev)?;
            let got = up.forward(&x)?;
            let want = x
                .conv_transpose1d(&up.weight, (k - s) / 2, 0, s, 1, 1)?
                .broadcast_add(&up.bias)?;
            assert_eq!(got.dims(), &[1, 2, 6 * s]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k {k} s {s}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn mel_normalisation_floors_and_clamps() -> Result<()> {
        let dev = Device::Cpu;
        let mel = Tensor::new(&[[[-20f32, -5.0, 0.0, 5.0]]], &dev)?;
        let got = BigVgan::normalise_mel(&mel)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want: Vec<f32> = [-20f64, -5.0, 0.0, 5.0]
            .iter()
            .map(|m| {
                let amp = m.exp().max(10f64.powf(-115.0 / 20.0));
                let db = 20.0 * amp.log10() - 20.0;
                (2.0 * ((db + 115.0) / 115.0) - 1.0).clamp(-1.0, 1.0) as f32
            })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn bad_mel_shape_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let cfg: BigVGANConfig = serde_json::from_str(
            r#"{"upsample_initial_channel": 8, "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4],
                "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]]}"#,
        )
        .unwrap();
        let vb = crate::model::random_weights::RandomWeights::var_builder(DType::F32, &dev);
        let vocoder = BigVgan::new(&cfg, vb)?;
        let err = vocoder
            .forward(&Tensor::zeros((1, 7, 5), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("mel_dim = 80"), "{err}");
        let wav = vocoder.forward(&Tensor::zeros((1, 80, 5), DType::F32, &dev)?)?;
        assert_eq!(wav.dims(), &[1, 20]);
        assert!(
            wav.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.abs() <= 1.0)
        );
        Ok(())
    }
}
