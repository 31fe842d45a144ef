//! The flow-matching DiT of token2wav and its ODE sampler (`Qwen2_5OmniToken2WavDiTModel`, at
//! `token2wav.code2wav_dit_model`).
//!
//! One evaluation maps a noisy mel `x` `[1, N, mel_dim]` (N = `repeats` x codes), the ODE time
//! `t`, the codec codes and the speaker conditioning to a velocity. With classifier-free
//! guidance it runs a batch of two: row 0 conditioned, row 1 with the speaker vector and the
//! reference mel zeroed (the zeros still go through ECAPA) and every code replaced by code 0.
//!
//! Layout of the work, so that nothing constant is recomputed inside the ODE loop:
//! * [`SpeakerCondition`] (once per voice): ECAPA of the reference mel and of zeros, and their
//!   share of the input projection.
//! * [`OdeSchedule`] (once per set of sampler options): the time grid and, for each of the
//!   `4 (steps - 1)` evaluation times, the time embedding's modulation of every layer.
//! * the codes of a window (once per [`Dit::sample`] call): their share of the input
//!   projection, the rotary table.
//! * per evaluation: the noisy mel's share of the projection and the transformer blocks.
//!
//! Attention is block-local: frame p of layer i sees frame q iff
//! `-back_i <= q / block_size - p / block_size <= ahead_i`; it is computed per query block over
//! its `back_i + 1 + ahead_i` key blocks only, never as a full (N x N) matrix.

use crate::model::activation;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};
use omnicall_kernels::band_attention::{BandScratch, BandShape, Rope, band_attention};

use super::ecapa::EcapaTdnn;
use crate::model::config::DiTConfig;
use crate::model::linear::{Kernels, Linear, detected_level, kernels, linear};

/// Width of the sinusoidal time features (`DiTTimestepEmbedding(freq_embed_dim=256)`).
const TIME_FREQ_DIM: usize = 256;
/// The time is scaled by this before the sinusoid (`SinusPositionEmbedding.forward(scale=1000)`).
const TIME_SCALE: f32 = 1000.0;
/// Epsilon of the DiT's affine-free LayerNorms.
const LN_EPS: f32 = 1e-6;
/// Below this guidance scale the reference skips the unconditioned row.
const MIN_GUIDANCE: f64 = 1e-5;

/// Settings of the ODE sampler (`sample(num_steps, guidance_scale, sway_coefficient)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    /// Points of the time grid (`num_steps`); the ODE takes `steps - 1` RK4 intervals.
    pub steps: usize,
    /// `f = cond + (cond - uncond) * guidance_scale`; below 1e-5 only the conditioned row runs.
    pub guidance_scale: f64,
    /// `t += sway * (cos(pi/2 t) - 1 + t)`; -1 gives `t = 1 - cos(pi t / 2)`.
    pub sway: f64,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            steps: 10,
            guidance_scale: 0.5,
            sway: -1.0,
        }
    }
}

impl SamplerOptions {
    /// The time grid as the reference computes it in float32: `linspace(0, 1, steps)` then sway.
    pub fn time_grid(&self) -> Result<Vec<f32>> {
        if self.steps < 2 {
            candle_core::bail!("DiT sampler: steps must be at least 2, got {}", self.steps);
        }
        let n = self.steps;
        let step = 1f32 / (n - 1) as f32;
        let sway = self.sway as f32;
        let half_pi = std::f64::consts::FRAC_PI_2 as f32;
        Ok((0..n)
            .map(|i| {
                // torch.linspace fills the second half backwards from the end point.
                let t = if i < n / 2 {
                    i as f32 * step
                } else {
                    1f32 - (n - 1 - i) as f32 * step
                };
                t + sway * ((half_pi * t).cos() - 1f32 + t)
            })
            .collect())
    }
}

/// `torch.chunk(xs, n, dim=-1)` for a last dim divisible by `n`.
fn chunks(xs: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let len = xs.dim(D::Minus1)? / n;
    (0..n).map(|i| xs.narrow(D::Minus1, i * len, len)).collect()
}

/// `LayerNorm(dim, elementwise_affine=False, eps=1e-6)`, statistics in f32.
#[derive(Debug, Clone)]
struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    fn new(dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, DType::F32, device)?,
            zeros: Tensor::zeros(dim, DType::F32, device)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        candle_nn::ops::layer_norm(&xs, &self.ones, &self.zeros, LN_EPS)?.to_dtype(dtype)
    }
}

/// `norm(x) * (1 + scale) + shift` with the modulation `[1, 1, hidden]` broadcast.
fn modulate(normed: &Tensor, one_plus_scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    normed.broadcast_mul(one_plus_scale)?.broadcast_add(shift)
}

impl PlainLayerNorm {
    /// `modulate(self.forward(xs), one_plus_scale, shift)`, in one pass on the CPU in f32.
    fn forward_modulated(
        &self,
        xs: &Tensor,
        one_plus_scale: &Tensor,
        shift: &Tensor,
    ) -> Result<Tensor> {
        if takes_row_op(xs, &[one_plus_scale, shift]) {
            return xs.apply_op3_no_bwd(one_plus_scale, shift, &RowOp::ModulatedNorm);
        }
        modulate(&self.forward(xs)?, one_plus_scale, shift)
    }
}

/// `xs + ys * gate` with the gate `[1, 1, hidden]` broadcast, in one pass on the CPU in f32.
fn gated_residual(xs: &Tensor, ys: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if takes_row_op(xs, &[ys, gate]) && ys.dims() == xs.dims() {
        return xs.apply_op3_no_bwd(ys, gate, &RowOp::GatedResidual);
    }
    xs + ys.broadcast_mul(gate)?
}

/// Whether [`RowOp`] applies: CPU kernels on, f32 on the CPU, per-hidden parameters.
fn takes_row_op(xs: &Tensor, others: &[&Tensor]) -> bool {
    let Some(&hidden) = xs.dims().last() else {
        return false;
    };
    kernels() == Kernels::Auto
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && others.iter().all(|t| t.dtype() == DType::F32)
        && others
            .last()
            .is_some_and(|p| p.elem_count() == hidden && p.dims().last() == Some(&hidden))
}

/// The DiT's elementwise steps fused on the CPU in f32, row by row on candle's thread pool:
/// `(x, 1 + scale, shift)` -> `LayerNorm(x) (1 + scale) + shift`, and `(x, y, gate)` ->
/// `x + y gate`. The last operand has one value per hidden column.
#[derive(Debug, Clone, Copy)]
enum RowOp {
    ModulatedNorm,
    GatedResidual,
}

/// Rows per work item of [`RowOp`].
const ROW_OP_ROWS: usize = 16;

/// A logical-order f32 view of a CPU operand (a copy only when it is strided).
fn f32_values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(all), Some((a, b))) => Ok(std::borrow::Cow::Borrowed(&all[a..b])),
        _ => match s.to_dtype(l, DType::F32)? {
            CpuStorage::F32(c) => Ok(std::borrow::Cow::Owned(c)),
            _ => candle_core::bail!("DiT CPU op: needs f32, got {:?}", s.dtype()),
        },
    }
}

impl CustomOp3 for RowOp {
    fn name(&self) -> &'static str {
        match self {
            Self::ModulatedNorm => "dit-modulated-norm",
            Self::GatedResidual => "dit-gated-residual",
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (
            f32_values(x, x_layout)?,
            f32_values(a, a_layout)?,
            f32_values(b, b_layout)?,
        );
        let hidden = b.len();
        let per_row_ok = match self {
            Self::ModulatedNorm => a.len() == hidden,
            Self::GatedResidual => a.len() == x.len(),
        };
        if hidden == 0 || !x.len().is_multiple_of(hidden) || !per_row_ok {
            candle_core::bail!(
                "{}: operands {:?}, {:?}, {:?}",
                self.name(),
                x_layout.shape(),
                a_layout.shape(),
                b_layout.shape()
            );
        }
        let rows = x.len() / hidden;
        let mut out = vec![0f32; x.len()];
        let shared = SharedOut(out.as_mut_ptr());
        let level = detected_level();
        let op = *self;
        candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(ROW_OP_ROWS), |range| {
            let shared = &shared;
            let start = range.start * ROW_OP_ROWS * hidden;
            let end = (range.end * ROW_OP_ROWS).min(rows) * hidden;
            // SAFETY: values [start, end) are this item's alone; `out` outlives the pool's work.
            let dst = unsafe { std::slice::from_raw_parts_mut(shared.0.add(start), end - start) };
            match op {
                Self::ModulatedNorm => omnicall_kernels::activation::modulated_layer_norm(
                    level,
                    &x[start..end],
                    &a,
                    &b,
                    LN_EPS,
                    dst,
                ),
                Self::GatedResidual => omnicall_kernels::activation::gated_residual(
                    level,
                    &x[start..end],
                    &a[start..end],
                    &b,
                    dst,
                ),
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// The modulation of one transformer block at one time (`AdaLayerNormZero`), each `[1, 1, hidden]`.
#[derive(Debug, Clone)]
struct BlockModulation {
    shift_attn: Tensor,
    scale_attn: Tensor, // 1 + scale
    gate_attn: Tensor,
    shift_mlp: Tensor,
    scale_mlp: Tensor, // 1 + scale
    gate_mlp: Tensor,
}

/// Everything the time `t` contributes to one DiT evaluation.
#[derive(Debug, Clone)]
struct TimeConditioning {
    blocks: Vec<BlockModulation>,
    final_scale: Tensor, // 1 + scale
    final_shift: Tensor,
}

/// The time grid of a sampler and the time conditioning of each of its evaluations, reusable
/// for every window sampled with the same options.
#[derive(Debug, Clone)]
pub struct OdeSchedule {
    options: SamplerOptions,
    grid: Vec<f32>,
    /// `4 (steps - 1)` entries in evaluation order (k1, k2, k3, k4 of each interval).
    evals: Vec<TimeConditioning>,
}

impl OdeSchedule {
    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// The time grid (after sway).
    pub fn grid(&self) -> &[f32] {
        &self.grid
    }

    /// The four evaluation times of interval `i` as the reference computes them in float32.
    fn eval_times(t0: f32, t1: f32) -> [f32; 4] {
        let h = t1 - t0;
        [
            t0,
            t0 + h * (1f64 / 3.0) as f32,
            t0 + h * (2f64 / 3.0) as f32,
            t1,
        ]
    }
}

/// The speaker side of the DiT input for one voice, computed once: ECAPA of the reference mel
/// (and of zeros for the guidance row) and its share of the input projection.
#[derive(Debug, Clone)]
pub struct SpeakerCondition {
    /// `[2, enc_dim]`: ECAPA(ref_mel), ECAPA(zeros).
    encoded: Tensor,
    /// `[2, 1, hidden]`: projection of (ECAPA output, speaker cond) plus the bias, per CFG row.
    projected: Tensor,
}

impl SpeakerCondition {
    /// ECAPA-TDNN output for the reference mel, `[1, enc_dim]`.
    pub fn speaker_embedding(&self) -> Result<Tensor> {
        self.encoded.narrow(0, 0, 1)
    }

    /// ECAPA-TDNN output for an all-zero reference mel (the guidance row), `[1, enc_dim]`.
    pub fn null_speaker_embedding(&self) -> Result<Tensor> {
        self.encoded.narrow(0, 1, 1)
    }
}

/// Sinusoidal time features of `SinusPositionEmbedding`, computed in float32 like the reference.
fn time_features(t: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let step = -((10000f64.ln() / (half - 1) as f64) as f32);
    let scaled_t = TIME_SCALE * t;
    let args: Vec<f32> = (0..half)
        .map(|i| scaled_t * (i as f32 * step).exp())
        .collect();
    args.iter()
        .map(|a| a.sin())
        .chain(args.iter().map(|a| a.cos()))
        .collect()
}

/// `DiTTimestepEmbedding`: sinusoid -> Linear -> SiLU -> Linear.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    mlp0: Linear,
    mlp2: Linear,
}

impl TimestepEmbedding {
    fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("time_mlp");
        Ok(Self {
            mlp0: linear(TIME_FREQ_DIM, hidden, vb.pp(0))?,
            mlp2: linear(hidden, hidden, vb.pp(2))?,
        })
    }

    /// `[1, hidden]` embedding of time `t`.
    fn forward(&self, t: f32, device: &Device, dtype: DType) -> Result<Tensor> {
        let feats = Tensor::from_vec(time_features(t, TIME_FREQ_DIM), (1, TIME_FREQ_DIM), device)?
            .to_dtype(dtype)?;
        self.mlp2.forward(&self.mlp0.forward(&feats)?.silu()?)
    }
}

/// `[B, N, heads · head_dim]` -> `[B, heads, N, head_dim]`, with head 0 rotated (interleaved
/// pairs).
fn split_heads(
    xs: &Tensor,
    heads: usize,
    head_dim: usize,
    rope: Option<&Rotary>,
) -> Result<Tensor> {
    let (b, n, _) = xs.dims3()?;
    let xs = xs
        .reshape((b, n, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let Some(rope) = rope else { return Ok(xs) };
    let head0 =
        candle_nn::rotary_emb::rope_i(&xs.narrow(1, 0, 1)?.contiguous()?, &rope.cos, &rope.sin)?;
    if heads == 1 {
        return Ok(head0);
    }
    Tensor::cat(&[head0, xs.narrow(1, 1, heads - 1)?], 1)
}

/// `DiTAttention`: q/k/v projections, RoPE on head 0 only, block-local attention, output proj.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &DiTConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.head_dim * cfg.num_attention_heads;
        Ok(Self {
            to_q: linear(cfg.hidden_size, inner, vb.pp("to_q"))?,
            to_k: linear(cfg.hidden_size, inner, vb.pp("to_k"))?,
            to_v: linear(cfg.hidden_size, inner, vb.pp("to_v"))?,
            to_out: linear(inner, cfg.hidden_size, vb.pp("to_out").pp(0))?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn forward(&self, xs: &Tensor, rope: &Rotary, band: &BlockBand) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (q, k, v) = (
            self.to_q.forward(xs)?,
            self.to_k.forward(xs)?,
            self.to_v.forward(xs)?,
        );
        if let Some(tables) = &rope.cpu
            && kernels() == Kernels::Auto
            && q.device().is_cpu()
            && q.dtype() == DType::F32
        {
            let op = CpuBandAttention {
                shape: BandShape {
                    frames: n,
                    heads: self.heads,
                    head_dim: self.head_dim,
                    block: band.block,
                    back: band.back,
                    ahead: band.ahead,
                    scale: scale as f32,
                },
                rope: tables.clone(),
            };
            return self.to_out.forward(&q.apply_op3_no_bwd(&k, &v, &op)?);
        }
        let (h, d) = (self.heads, self.head_dim);
        let q = split_heads(&q, h, d, Some(rope))?;
        let k = split_heads(&k, h, d, Some(rope))?;
        let v = split_heads(&v, h, d, None)?;
        let out = band.attend(&q, &k, &v, scale)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }
}

/// The rotary table of a window: `[N, head_dim / 2]` cos and sin for positions 0..N.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// The same values for the CPU attention, when the model is on the CPU in f32.
    cpu: Option<Arc<RopeTables>>,
}

#[derive(Debug)]
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    fn new(
        frames: usize,
        head_dim: usize,
        theta: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let theta = theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(frames * half);
        let mut sin = Vec::with_capacity(frames * half);
        for p in 0..frames {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let on_cpu = device.is_cpu() && dtype == DType::F32;
        Ok(Self {
            cos: Tensor::from_vec(cos.clone(), (frames, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin.clone(), (frames, half), device)?.to_dtype(dtype)?,
            cpu: on_cpu.then(|| Arc::new(RopeTables { cos, sin })),
        })
    }
}

/// Block-local attention of one (look-back, look-ahead) pair over a window of N frames: each
/// query block attends to key blocks `[block - back, block + ahead]` that exist.
#[derive(Debug, Clone)]
struct BlockBand {
    back: usize,
    ahead: usize,
    block: usize,
    frames: usize,
    blocks: usize,
    /// Additive mask `[blocks, 1, (back + 1 + ahead) block]` (0 or -inf) for keys outside the
    /// window; `None` when every key slot is a real frame.
    mask: Option<Tensor>,
}

impl BlockBand {
    fn new(
        back: usize,
        ahead: usize,
        block: usize,
        frames: usize,
        device: &Device,
    ) -> Result<Self> {
        let blocks = frames.div_ceil(block);
        let width = (back + 1 + ahead) * block;
        let mut mask = Vec::with_capacity(blocks * width);
        let mut any_masked = false;
        for qb in 0..blocks {
            for slot in 0..width {
                // padded key position (qb + slot / block) * block + slot % block, shifted back
                let padded = qb * block + slot;
                let valid = padded >= back * block && padded - back * block < frames;
                any_masked |= !valid;
                mask.push(if valid { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let mask = if any_masked {
            Some(Tensor::from_vec(mask, (blocks, 1, width), device)?)
        } else {
            None
        };
        Ok(Self {
            back,
            ahead,
            block,
            frames,
            blocks,
            mask,
        })
    }

    /// `q`, `k`, `v` `[B, H, N, D]` -> `[B, H, N, D]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, n, d) = q.dims4()?;
        if n != self.frames {
            candle_core::bail!("DiT attention: {n} frames, band built for {}", self.frames);
        }
        let (bs, nb) = (self.block, self.blocks);
        let tail = nb * bs - n;
        let window = self.back + 1 + self.ahead;
        // candle's matmul takes at most two batch dims: fold (B, H) into one.
        let q = q.pad_with_zeros(2, 0, tail)?.reshape((b * h, nb, bs, d))?;
        let windows = |xs: &Tensor| -> Result<Tensor> {
            let padded = xs.pad_with_zeros(2, self.back * bs, tail + self.ahead * bs)?;
            let parts = (0..window)
                .map(|j| {
                    padded
                        .narrow(2, j * bs, nb * bs)?
                        .reshape((b * h, nb, bs, d))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 2)
        };
        let (kw, vw) = (windows(k)?, windows(v)?);
        let scores = (q.matmul(&kw.transpose(2, 3)?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match &self.mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vw.dtype())?;
        let out = probs.matmul(&vw)?.reshape((b, h, nb * bs, d))?;
        if tail == 0 {
            Ok(out)
        } else {
            out.narrow(2, 0, n)
        }
    }
}

/// [`BlockBand::attend`] on the CPU in f32, fused: q, k, v `[B, N, heads · head_dim]` straight
/// from their projections, head 0 rotated on the fly, each (batch item, head, query block) over
/// its own key range only (no padding, no mask), on candle's thread pool. Returns
/// `[B, N, heads · head_dim]`, ready for the output projection.
#[derive(Debug, Clone)]
struct CpuBandAttention {
    shape: BandShape,
    rope: Arc<RopeTables>,
}

/// The output rows, shared by the pool's work items: each writes only its own (row, head)
/// segments.
struct SharedOut(*mut f32);
// SAFETY: the work items write disjoint segments of the buffer, which outlives them.
unsafe impl Sync for SharedOut {}

impl CustomOp3 for CpuBandAttention {
    fn name(&self) -> &'static str {
        "dit-band-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.shape;
        let (batch, frames, width) = q_layout.shape().dims3()?;
        let d = shape.head_dim;
        if frames != shape.frames
            || width != shape.heads * d
            || k_layout.shape() != q_layout.shape()
            || v_layout.shape() != q_layout.shape()
        {
            candle_core::bail!(
                "DiT attention: q {:?}, k {:?}, v {:?} for {shape:?}",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        let (q, k, v) = (
            f32_values(q, q_layout)?,
            f32_values(k, k_layout)?,
            f32_values(v, v_layout)?,
        );
        let per_item = frames * width;
        let blocks = shape.blocks();
        let items = batch * shape.heads * blocks;
        let mut out = vec![0f32; batch * per_item];
        let shared = SharedOut(out.as_mut_ptr());
        let rope = Rope {
            cos: &self.rope.cos,
            sin: &self.rope.sin,
        };
        let level = detected_level();
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let shared = &shared;
            let mut scratch = BandScratch::default();
            let mut rows = Vec::new();
            for item in range {
                let (b, rest) = (item / (shape.heads * blocks), item % (shape.heads * blocks));
                let (head, qb) = (rest / blocks, rest % blocks);
                let first = qb * shape.block;
                let len = shape.block.min(frames - first);
                rows.clear();
                rows.resize(len * d, 0.0);
                let item_range = b * per_item..(b + 1) * per_item;
                band_attention(
                    level,
                    &shape,
                    head,
                    qb,
                    (
                        &q[item_range.clone()],
                        &k[item_range.clone()],
                        &v[item_range],
                    ),
                    (head == 0).then_some(rope),
                    &mut rows,
                    &mut scratch,
                );
                for (i, row) in rows.chunks_exact(d).enumerate() {
                    // SAFETY: (frame first + i, head) of batch item b is this item's alone;
                    // the segment lies within `out`, which outlives the pool's work.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            shared.0.add(b * per_item + (first + i) * width + head * d),
                            d,
                        )
                    };
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, frames, width))))
    }
}

/// `DiTMLP`: Linear -> GELU (tanh) -> Linear.
#[derive(Debug, Clone)]
struct Mlp {
    ff0: Linear,
    ff3: Linear,
}

impl Mlp {
    fn new(cfg: &DiTConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.hidden_size * cfg.ff_mult;
        let vb = vb.pp("ff");
        Ok(Self {
            ff0: linear(cfg.hidden_size, inner, vb.pp(0))?,
            ff3: linear(inner, cfg.hidden_size, vb.pp(3))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = activation::gelu_tanh(&self.ff0.forward(xs)?)?;
        self.ff3.forward(&h)
    }
}

/// `DiTDecoderLayer`: AdaLayerNormZero, attention, modulated LayerNorm, MLP.
#[derive(Debug, Clone)]
struct DecoderLayer {
    attn_norm: Linear,
    attn: Attention,
    ff: Mlp,
    look_back: usize,
    look_ahead: usize,
}

impl DecoderLayer {
    fn new(cfg: &DiTConfig, i: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn_norm: linear(
                cfg.hidden_size,
                cfg.hidden_size * 6,
                vb.pp("attn_norm").pp("linear"),
            )?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ff: Mlp::new(cfg, vb.pp("ff"))?,
            look_back: usize::from(cfg.look_backward_layers.contains(&i)),
            look_ahead: usize::from(cfg.look_ahead_layers.contains(&i)),
        })
    }

    fn modulation(&self, silu_temb: &Tensor) -> Result<BlockModulation> {
        let emb = self.attn_norm.forward(silu_temb)?.unsqueeze(1)?;
        let c = chunks(&emb, 6)?;
        Ok(BlockModulation {
            shift_attn: c[0].contiguous()?,
            scale_attn: (&c[1] + 1.0)?,
            gate_attn: c[2].contiguous()?,
            shift_mlp: c[3].contiguous()?,
            scale_mlp: (&c[4] + 1.0)?,
            gate_mlp: c[5].contiguous()?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        m: &BlockModulation,
        norm: &PlainLayerNorm,
        rope: &Rotary,
        band: &BlockBand,
    ) -> Result<Tensor> {
        let normed = norm.forward_modulated(xs, &m.scale_attn, &m.shift_attn)?;
        let attn = self.attn.forward(&normed, rope, band)?;
        let xs = gated_residual(xs, &attn, &m.gate_attn)?;
        let normed = norm.forward_modulated(&xs, &m.scale_mlp, &m.shift_mlp)?;
        let ff = self.ff.forward(&normed)?;
        gated_residual(&xs, &ff, &m.gate_mlp)
    }
}

/// The codes of one window prepared for the ODE: their share of the input projection per CFG
/// row, the rotary table and the attention bands.
struct Prepared {
    /// `[rows, N, hidden]`: projection of (ECAPA, codes, cond) plus bias.
    input_bias: Tensor,
    rope: Rotary,
    /// For each layer, its index into `bands` (one band per distinct (back, ahead) pair).
    layer_band: Vec<usize>,
    bands: Vec<BlockBand>,
    frames: usize,
}

/// One session's window in [`Dit::sample_scheduled_batch`].
#[derive(Debug, Clone, Copy)]
pub struct DitWindow<'a> {
    pub speaker: &'a SpeakerCondition,
    /// `[1, n]` codes.
    pub codes: &'a Tensor,
    /// `[1, repeats n, mel_dim]` initial state.
    pub noise: &'a Tensor,
}

/// `Qwen2_5OmniToken2WavDiTModel`.
#[derive(Debug, Clone)]
pub struct Dit {
    time_embed: TimestepEmbedding,
    codec_embed: Embedding,
    spk_encoder: EcapaTdnn,
    /// Input projection split by input: x, ECAPA output, codec embedding, speaker cond.
    proj_x: Tensor,
    proj_spk: Tensor,
    proj_code: Tensor,
    proj_cond: Tensor,
    proj_bias: Tensor,
    layers: Vec<DecoderLayer>,
    norm_out: Linear,
    proj_out: Linear,
    norm: PlainLayerNorm,
    cfg: DiTConfig,
    device: Device,
    dtype: DType,
}

impl Dit {
    /// Whether `other` runs on the very same weight tensors (a clone of this DiT), so that its
    /// windows can ride in this DiT's batches.
    pub fn shares_weights(&self, other: &Dit) -> bool {
        self.proj_x.id() == other.proj_x.id()
    }

    /// `vb` at `token2wav.code2wav_dit_model`.
    pub fn new(cfg: &DiTConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.block_size == 0 || cfg.repeats == 0 || !cfg.head_dim.is_multiple_of(2) {
            candle_core::bail!(
                "DiT config: block_size ({}) and repeats ({}) must be > 0 and head_dim ({}) even",
                cfg.block_size,
                cfg.repeats,
                cfg.head_dim
            );
        }
        let h = cfg.hidden_size;
        let ie = vb.pp("input_embed");
        let in_dim = cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim;
        let w = ie.pp("proj").get((h, in_dim), "weight")?;
        let mut off = 0;
        let mut part = |len: usize| -> Result<Tensor> {
            let p = w.narrow(1, off, len)?.t()?.contiguous()?; // [len, hidden]
            off += len;
            Ok(p)
        };
        let proj_x = part(cfg.mel_dim)?;
        let proj_spk = part(cfg.enc_dim)?;
        let proj_code = part(cfg.emb_dim)?;
        let proj_cond = part(cfg.enc_emb_dim)?;
        let proj_bias = ie.pp("proj").get(h, "bias")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            time_embed: TimestepEmbedding::new(h, vb.pp("time_embed"))?,
            codec_embed: embedding(
                cfg.num_embeds + 1,
                cfg.emb_dim,
                vb.pp("text_embed").pp("codec_embed"),
            )?,
            spk_encoder: EcapaTdnn::new(cfg, ie.pp("spk_encoder"))?,
            proj_x,
            proj_spk,
            proj_code,
            proj_cond,
            proj_bias,
            layers,
            norm_out: linear(h, h * 2, vb.pp("norm_out").pp("linear"))?,
            proj_out: linear(h, cfg.mel_dim, vb.pp("proj_out"))?,
            norm: PlainLayerNorm::new(h, vb.device())?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &DiTConfig {
        &self.cfg
    }

    /// The ECAPA-TDNN speaker encoder.
    pub fn speaker_encoder(&self) -> &EcapaTdnn {
        &self.spk_encoder
    }

    /// Prepares a voice: `cond` `[1, enc_emb_dim]` (or `[enc_emb_dim]`), `ref_mel`
    /// `[1, T_ref, mel_dim]`. Runs ECAPA on the reference mel and on zeros of its shape, once.
    pub fn speaker_condition(&self, cond: &Tensor, ref_mel: &Tensor) -> Result<SpeakerCondition> {
        let cond = cond.to_device(&self.device)?.to_dtype(self.dtype)?;
        let cond = match cond.rank() {
            1 => cond.unsqueeze(0)?,
            _ => cond,
        };
        let (cb, cd) = cond.dims2()?;
        if cb != 1 || cd != self.cfg.enc_emb_dim {
            candle_core::bail!(
                "DiT: speaker cond must be [1, enc_emb_dim = {}], got {:?}",
                self.cfg.enc_emb_dim,
                cond.dims()
            );
        }
        let ref_mel = ref_mel.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (rb, _, rm) = ref_mel.dims3()?;
        if rb != 1 || rm != self.cfg.mel_dim {
            candle_core::bail!(
                "DiT: reference mel must be [1, T_ref, mel_dim = {}], got {:?}",
                self.cfg.mel_dim,
                ref_mel.dims()
            );
        }
        let both = Tensor::cat(&[ref_mel.clone(), ref_mel.zeros_like()?], 0)?;
        let encoded = self.spk_encoder.forward(&both)?; // [2, enc_dim]
        let conds = Tensor::cat(&[cond.clone(), cond.zeros_like()?], 0)?; // [2, enc_emb_dim]
        let projected = encoded
            .matmul(&self.proj_spk)?
            .add(&conds.matmul(&self.proj_cond)?)?
            .broadcast_add(&self.proj_bias)?
            .unsqueeze(1)?;
        Ok(SpeakerCondition { encoded, projected })
    }

    /// The time conditioning of one evaluation at time `t`.
    fn time_conditioning(&self, t: f32) -> Result<TimeConditioning> {
        let temb = self
            .time_embed
            .forward(t, &self.device, self.dtype)?
            .silu()?;
        let blocks = self
            .layers
            .iter()
            .map(|l| l.modulation(&temb))
            .collect::<Result<Vec<_>>>()?;
        let fin = self.norm_out.forward(&temb)?.unsqueeze(1)?;
        let c = chunks(&fin, 2)?; // (scale, shift) in that order
        Ok(TimeConditioning {
            blocks,
            final_scale: (&c[0] + 1.0)?,
            final_shift: c[1].contiguous()?,
        })
    }

    /// Precomputes the time grid and every evaluation's time conditioning for `options`.
    pub fn schedule(&self, options: &SamplerOptions) -> Result<OdeSchedule> {
        let grid = options.time_grid()?;
        let mut evals = Vec::with_capacity(4 * (grid.len() - 1));
        for w in grid.windows(2) {
            for t in OdeSchedule::eval_times(w[0], w[1]) {
                evals.push(self.time_conditioning(t)?);
            }
        }
        Ok(OdeSchedule {
            options: *options,
            grid,
            evals,
        })
    }

    /// Checks `codes` `[1, n]` and returns them as u32 on the model's device.
    fn check_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, n) = codes.dims2()?;
        if b != 1 || n == 0 {
            candle_core::bail!(
                "DiT: codes must be [1, n] with n > 0, got {:?}",
                codes.dims()
            );
        }
        let codes = codes.to_dtype(DType::I64)?;
        let values = codes.flatten_all()?.to_vec1::<i64>()?;
        let rows = self.cfg.num_embeds as i64 + 1;
        if let Some((i, c)) = values
            .iter()
            .enumerate()
            .find(|&(_, &c)| c < 0 || c >= rows)
        {
            candle_core::bail!(
                "DiT: code {c} at position {i} is outside the codec embedding (0..{rows})"
            );
        }
        codes.to_dtype(DType::U32)?.to_device(&self.device)
    }

    /// Everything about a window of codes that stays fixed over the ODE.
    fn prepare(
        &self,
        speaker: &SpeakerCondition,
        codes: &Tensor,
        guided: bool,
    ) -> Result<Prepared> {
        let codes = self.check_codes(codes)?;
        let n = codes.dim(1)?;
        let frames = n * self.cfg.repeats;
        if frames > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "DiT: {frames} mel frames exceed max_position_embeddings ({})",
                self.cfg.max_position_embeddings
            );
        }
        let h = self.cfg.hidden_size;
        // Codec embedding projected per code, then repeated in time (repeat_interleave).
        let code_proj = self
            .codec_embed
            .forward(&codes)?
            .matmul(&self.proj_code.unsqueeze(0)?)?; // [1, n, h]
        let repeat = |xs: &Tensor, rows: usize| -> Result<Tensor> {
            xs.unsqueeze(2)?
                .broadcast_as((rows, n, self.cfg.repeats, h))?
                .reshape((rows, frames, h))
        };
        let cond_row = repeat(&code_proj, 1)?.broadcast_add(&speaker.projected.narrow(0, 0, 1)?)?;
        let input_bias = if guided {
            let zero = Tensor::zeros((1, 1), DType::U32, &self.device)?;
            let null_code = self
                .codec_embed
                .forward(&zero)?
                .matmul(&self.proj_code.unsqueeze(0)?)?; // [1,1,h]
            let null_row = null_code
                .broadcast_add(&speaker.projected.narrow(0, 1, 1)?)?
                .broadcast_as((1, frames, h))?
                .contiguous()?;
            Tensor::cat(&[cond_row, null_row], 0)?
        } else {
            cond_row
        };
        let rope = Rotary::new(
            frames,
            self.cfg.head_dim,
            self.cfg.rope_theta(),
            &self.device,
            self.dtype,
        )?;
        let mut bands: Vec<BlockBand> = Vec::new();
        let mut layer_band = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let idx = match bands
                .iter()
                .position(|b| b.back == l.look_back && b.ahead == l.look_ahead)
            {
                Some(i) => i,
                None => {
                    bands.push(BlockBand::new(
                        l.look_back,
                        l.look_ahead,
                        self.cfg.block_size,
                        frames,
                        &self.device,
                    )?);
                    bands.len() - 1
                }
            };
            layer_band.push(idx);
        }
        Ok(Prepared {
            input_bias,
            rope,
            layer_band,
            bands,
            frames,
        })
    }

    /// One DiT evaluation on the prepared windows: `x` `[S, N, mel_dim]` (one state per
    /// session) -> `[S * rows, N, mel_dim]` (each session's `rows` guidance rows in turn).
    fn evaluate(&self, p: &Prepared, tc: &TimeConditioning, x: &Tensor) -> Result<Tensor> {
        let (sessions, frames, mel) = x.dims3()?;
        let (all_rows, _, hidden) = p.input_bias.dims3()?;
        let rows = all_rows / sessions;
        let projected = x
            .reshape((1, sessions * frames, mel))?
            .matmul(&self.proj_x.unsqueeze(0)?)?
            .reshape((sessions, 1, frames, hidden))?;
        let mut h = if sessions == 1 {
            projected.squeeze(0)?.broadcast_add(&p.input_bias)?
        } else {
            // Each session's state feeds its own conditioned and unconditioned rows.
            projected
                .broadcast_as((sessions, rows, frames, hidden))?
                .reshape((all_rows, frames, hidden))?
                .add(&p.input_bias)?
        };
        for ((layer, m), &band) in self.layers.iter().zip(&tc.blocks).zip(&p.layer_band) {
            h = layer.forward(&h, m, &self.norm, &p.rope, &p.bands[band])?;
        }
        let h = self
            .norm
            .forward_modulated(&h, &tc.final_scale, &tc.final_shift)?;
        self.proj_out.forward(&h)
    }

    /// The guided ODE right-hand side per session: `cond + (cond - uncond) * g` (or `cond`
    /// alone for `g < 1e-5`), `[S, N, mel_dim]`.
    fn velocity(
        &self,
        p: &Prepared,
        tc: &TimeConditioning,
        x: &Tensor,
        guidance: f64,
    ) -> Result<Tensor> {
        let sessions = x.dim(0)?;
        let out = self.evaluate(p, tc, x)?;
        if out.dim(0)? == sessions {
            return Ok(out);
        }
        let (_, frames, mel) = out.dims3()?;
        let out = out.reshape((sessions, 2, frames, mel))?;
        let cond = out.narrow(1, 0, 1)?.squeeze(1)?;
        let uncond = out.narrow(1, 1, 1)?.squeeze(1)?;
        &cond + ((&cond - &uncond)? * guidance)?
    }

    fn check_noise(&self, noise: &Tensor, frames: usize) -> Result<Tensor> {
        if noise.dims() != [1, frames, self.cfg.mel_dim] {
            candle_core::bail!(
                "DiT: noise must be [1, {frames}, {}] (repeats x codes frames), got {:?}",
                self.cfg.mel_dim,
                noise.dims()
            );
        }
        noise.to_device(&self.device)?.to_dtype(self.dtype)
    }

    /// One evaluation with the classifier-free-guidance batch, as the reference's
    /// `forward(..., apply_cfg=True)`: `x` `[1, N, mel_dim]` -> `[2, N, mel_dim]` (row 0
    /// conditioned, row 1 unconditioned).
    pub fn forward_cfg(
        &self,
        x: &Tensor,
        speaker: &SpeakerCondition,
        codes: &Tensor,
        t: f32,
    ) -> Result<Tensor> {
        let p = self.prepare(speaker, codes, true)?;
        let x = self.check_noise(x, p.frames)?;
        self.evaluate(&p, &self.time_conditioning(t)?, &x)
    }

    /// The guided ODE right-hand side at time `t`, `[1, N, mel_dim]`.
    pub fn guided_velocity(
        &self,
        x: &Tensor,
        speaker: &SpeakerCondition,
        codes: &Tensor,
        t: f32,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let p = self.prepare(speaker, codes, guidance_scale >= MIN_GUIDANCE)?;
        let x = self.check_noise(x, p.frames)?;
        self.velocity(&p, &self.time_conditioning(t)?, &x, guidance_scale)
    }

    /// Samples the mel of `codes` `[1, n]` from the initial state `noise` `[1, repeats n,
    /// mel_dim]` with the reference's fixed-grid RK4 (3/8 rule). Returns `[1, mel_dim, repeats n]`
    /// (natural-log mel).
    pub fn sample(
        &self,
        speaker: &SpeakerCondition,
        codes: &Tensor,
        noise: &Tensor,
        options: &SamplerOptions,
    ) -> Result<Tensor> {
        self.sample_scheduled(speaker, codes, noise, &self.schedule(options)?)
    }

    /// [`Dit::sample`] with a precomputed schedule (reuse it across windows and utterances).
    pub fn sample_scheduled(
        &self,
        speaker: &SpeakerCondition,
        codes: &Tensor,
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> Result<Tensor> {
        let window = DitWindow {
            speaker,
            codes,
            noise,
        };
        let mut mels = self.sample_scheduled_batch(&[window], schedule)?;
        Ok(mels.pop().expect("one window gives one mel"))
    }

    /// Samples the windows of several sessions at once, each with its own voice, codes and
    /// noise but the same number of codes (the DiT windows of sessions decoding on the same
    /// schedule): one batch of `2 S` rows per evaluation. Returns each window's
    /// `[1, mel_dim, repeats n]`, equal to [`Dit::sample_scheduled`] on it alone.
    pub fn sample_scheduled_batch(
        &self,
        windows: &[DitWindow<'_>],
        schedule: &OdeSchedule,
    ) -> Result<Vec<Tensor>> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let g = schedule.options.guidance_scale;
        let guided = g >= MIN_GUIDANCE;
        let mut prepared = Vec::with_capacity(windows.len());
        let mut noise = Vec::with_capacity(windows.len());
        for (i, w) in windows.iter().enumerate() {
            let p = self.prepare(w.speaker, w.codes, guided)?;
            if let Some(first) = prepared.first().map(|f: &Prepared| f.frames)
                && p.frames != first
            {
                candle_core::bail!(
                    "DiT batch: window {i} has {} mel frames, window 0 has {first}: batched \
                     windows must have the same number of codes",
                    p.frames
                );
            }
            noise.push(self.check_noise(w.noise, p.frames)?);
            prepared.push(p);
        }
        let biases: Vec<Tensor> = prepared.iter().map(|p| p.input_bias.clone()).collect();
        let mut p = prepared.swap_remove(0);
        if biases.len() > 1 {
            p.input_bias = Tensor::cat(&biases, 0)?;
        }
        let mut y = if noise.len() == 1 {
            noise.pop().expect("one window")
        } else {
            Tensor::cat(&noise, 0)?
        };
        let third = 1.0 / 3.0;
        for (i, w) in schedule.grid.windows(2).enumerate() {
            let h = (w[1] - w[0]) as f64;
            let tc = &schedule.evals[4 * i..4 * i + 4];
            let k1 = self.velocity(&p, &tc[0], &y, g)?;
            let k2 = self.velocity(&p, &tc[1], &(&y + ((&k1 * h)? * third)?)?, g)?;
            let k3 = self.velocity(&p, &tc[2], &(&y + ((&k2 - (&k1 * third)?)? * h)?)?, g)?;
            let k4 = self.velocity(&p, &tc[3], &(&y + (((&k1 - &k2)? + &k3)? * h)?)?, g)?;
            let sum = ((&k1 + ((&k2 + &k3)? * 3.0)?)? + &k4)?;
            y = (&y + ((sum * h)? / 8.0)?)?;
        }
        let mel = y.transpose(1, 2)?.contiguous()?;
        (0..windows.len()).map(|i| mel.narrow(0, i, 1)).collect()
    }

    /// Samples the mel frames `[start, end)` of a longer utterance as the streaming decoder
    /// does: the DiT runs on the codes `[start / repeats, end / repeats)` alone (positions and
    /// blocks restart at the window), from the matching slice of the utterance's noise
    /// `noise_all` `[1, >= end, mel_dim]`. Returns `[1, mel_dim, end - start]`.
    pub fn sample_window(
        &self,
        speaker: &SpeakerCondition,
        codes_all: &Tensor,
        noise_all: &Tensor,
        start: usize,
        end: usize,
        schedule: &OdeSchedule,
    ) -> Result<Tensor> {
        let r = self.cfg.repeats;
        let (_, n_all) = codes_all.dims2()?;
        let (_, t_all, _) = noise_all.dims3()?;
        if start >= end
            || !start.is_multiple_of(r)
            || !end.is_multiple_of(r)
            || end > n_all * r
            || end > t_all
        {
            candle_core::bail!(
                "DiT window [{start}, {end}) invalid: needs start < end, both multiples of repeats ({r}), \
                 end <= {} (codes) and <= {t_all} (noise frames)",
                n_all * r
            );
        }
        let codes = codes_all.narrow(1, start / r, (end - start) / r)?;
        let noise = noise_all.narrow(1, start, end - start)?;
        self.sample_scheduled(speaker, &codes, &noise, schedule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn time_grid_matches_reference_sway() -> Result<()> {
        let grid = SamplerOptions::default().time_grid()?;
        assert_eq!(grid.len(), 10);
        for (i, t) in grid.iter().enumerate() {
            let s = i as f64 / 9.0;
            let want = 1.0 - (std::f64::consts::FRAC_PI_2 * s).cos();
            assert!((*t as f64 - want).abs() < 1e-6, "t[{i}] = {t}, want {want}");
        }
        assert!(
            SamplerOptions {
                steps: 1,
                ..Default::default()
            }
            .time_grid()
            .is_err()
        );
        Ok(())
    }

    /// Block-local attention equals full attention with the boolean block mask.
    #[test]
    fn block_band_matches_masked_full_attention() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, d, block) = (2, 3, 4, 3);
        for frames in [1, 5, 9, 10] {
            for (back, ahead) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)] {
                let q = Tensor::randn(0f32, 1., (b, h, frames, d), &dev)?;
                let k = Tensor::randn(0f32, 1., (b, h, frames, d), &dev)?;
                let v = Tensor::randn(0f32, 1., (b, h, frames, d), &dev)?;
                let band = BlockBand::new(back, ahead, block, frames, &dev)?;
                let got = band.attend(&q, &k, &v, 0.5)?;
                let mut mask = Vec::new();
                for p in 0..frames {
                    for q in 0..frames {
                        let diff = (q / block) as i64 - (p / block) as i64;
                        let ok = diff >= -(back as i64) && diff <= ahead as i64;
                        mask.push(if ok { 0f32 } else { f32::NEG_INFINITY });
                    }
                }
                let mask = Tensor::from_vec(mask, (frames, frames), &dev)?;
                let scores = (q.matmul(&k.t()?)? * 0.5)?.broadcast_add(&mask)?;
                let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
                let diff = max_diff(&got, &want)?;
                assert!(
                    diff < 1e-5,
                    "frames {frames} back {back} ahead {ahead}: {diff}"
                );
            }
        }
        Ok(())
    }

    /// The fused CPU attention equals the generic path (heads split, head 0 rotated, the
    /// band's padded windows and mask) on odd shapes and a batch of two.
    #[test]
    fn cpu_band_attention_matches_the_generic_path() -> Result<()> {
        let dev = Device::Cpu;
        for (frames, heads, head_dim, block, back, ahead) in [
            (1, 1, 2, 3, 0, 0),
            (7, 2, 6, 3, 1, 0),
            (10, 3, 4, 3, 1, 1),
            (50, 2, 64, 24, 1, 1),
        ] {
            let rope = Rotary::new(frames, head_dim, 10000.0, &dev, DType::F32)?;
            let band = BlockBand::new(back, ahead, block, frames, &dev)?;
            let shape = (2, frames, heads * head_dim);
            let (q, k, v) = (
                Tensor::randn(0f32, 1., shape, &dev)?,
                Tensor::randn(0f32, 1., shape, &dev)?,
                Tensor::randn(0f32, 1., shape, &dev)?,
            );
            let scale = 1.0 / (head_dim as f64).sqrt();
            let want = band
                .attend(
                    &split_heads(&q, heads, head_dim, Some(&rope))?,
                    &split_heads(&k, heads, head_dim, Some(&rope))?,
                    &split_heads(&v, heads, head_dim, None)?,
                    scale,
                )?
                .transpose(1, 2)?
                .reshape(shape)?;
            let op = CpuBandAttention {
                shape: BandShape {
                    frames,
                    heads,
                    head_dim,
                    block,
                    back,
                    ahead,
                    scale: scale as f32,
                },
                rope: rope.cpu.clone().expect("f32 on the CPU has the tables"),
            };
            let got = q.apply_op3_no_bwd(&k, &v, &op)?;
            let diff = max_diff(&got, &want)?;
            assert!(
                diff < 1e-5,
                "frames {frames} heads {heads} block {block}: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn row_ops_match_the_generic_steps() -> Result<()> {
        let dev = Device::Cpu;
        let norm = PlainLayerNorm::new(37, &dev)?;
        let x = (Tensor::randn(0f32, 2., (2, 9, 37), &dev)? + 0.7)?;
        let y = Tensor::randn(0f32, 1., (2, 9, 37), &dev)?;
        let scale = (Tensor::randn(0f32, 0.3, (1, 1, 37), &dev)? + 1.0)?;
        let shift = Tensor::randn(0f32, 0.3, (1, 1, 37), &dev)?;
        assert!(takes_row_op(&x, &[&scale, &shift]) && takes_row_op(&x, &[&y, &shift]));
        let want = modulate(&norm.forward(&x)?, &scale, &shift)?;
        assert!(max_diff(&norm.forward_modulated(&x, &scale, &shift)?, &want)? < 1e-5);
        let want = (&x + y.broadcast_mul(&shift)?)?;
        assert!(max_diff(&gated_residual(&x, &y, &shift)?, &want)? < 1e-6);
        Ok(())
    }

    #[test]
    fn time_features_are_sin_then_cos() {
        let f = time_features(0.0, 8);
        assert_eq!(f, vec![0., 0., 0., 0., 1., 1., 1., 1.]);
    }
}
