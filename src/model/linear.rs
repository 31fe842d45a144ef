//! The one place every Linear of the model (Thinker, Talker, audio and vision encoders, DiT)
//! computes its product: a drop-in for `candle_nn::Linear` (same weights, same `VarBuilder`
//! paths) that picks the kernel for the device, dtype and shape.
//!
//! candle's CPU matmul in bf16 widens both whole operands to f32 on every call, on one thread:
//! a fresh f32 copy of every weight matrix per product, so bf16 ran several times slower than
//! f32. When the weights are bf16 on the CPU, [`Linear`] instead widens the weight a block of
//! rows at a time (the block stays in cache), on candle's thread pool, with f32 accumulation
//! and one rounding of the output to bf16 as candle's own product does:
//! * inputs of at most [`MAX_GEMV_ROWS`] rows (decoding) run [`Bf16Gemv`]: the weight read
//!   once, widened in registers (`vdpbf16ps` where the CPU has AVX512-BF16), by the kernels of
//!   the `omnicall-kernels` crate;
//! * larger inputs (prefill, the encoders) run [`Bf16Gemm`]: `vdpbf16ps` dot products in cache
//!   blocks where the CPU has AVX512-BF16, else gemm's f32 kernel on each widened block.
//!
//! With int8 weights ([`WeightFormat::Q8`], `--weights q8`) the Linears built from a `VarBuilder`
//! hold Q8_0 blocks and multiply through candle's `QMatMul` instead (see [`q8`]).
//!
//! Everything else (f32, CUDA) goes through `candle_nn::Linear` unchanged; f32 on the CPU gets
//! gemm's AVX-512 kernels where the CPU has them (the `x86-v4` feature, chosen at run time).
//! Every product adds its work to a process-wide count ([`product_work`]) that the benchmarks
//! read to report achieved GFLOP/s and weight GB/s.
//!
//! [`Kernels::Generic`] (`OMNICALL_KERNELS=generic`, or `--kernels generic`) turns the CPU
//! kernels off, so that the CPU runs the device-generic path a GPU takes and the parity tests
//! check that path too.
//!
//! The inner loops are not written in this crate: the dev profile compiles it unoptimised,
//! where a hand-written loop runs at well under 1 GB/s. They are the `omnicall-kernels` crate's
//! (compiled optimised in every profile), candle's own primitives (`BackendStorage::to_dtype`
//! for widening prefill blocks, its barrier thread pool) and the `gemm` crate's f32 kernel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use omnicall_kernels::bf16_gemm::{PackedWeights, gemm_packed};
use omnicall_kernels::unary::add_bias_round;
use omnicall_kernels::{Level, Rows, gemv};

pub mod conv;
pub mod q8;

pub use conv::{Conv1d, conv1d, conv1d_no_bias};
pub use q8::{Q8Linear, WeightFormat, set_weight_format, weight_format, with_weight_format};

/// Most input rows (all leading dimensions together) sent to [`Bf16Gemv`]; larger inputs
/// (prefill) go to candle's matmul, whose up-front widening is then shared by many rows.
pub const MAX_GEMV_ROWS: usize = 8;

/// Weight rows per work item of [`Bf16Gemv`]: enough items for every thread of the pool at the
/// model's smallest output widths, few enough that the pool's overhead stays small.
const GEMV_BLOCK_ROWS: usize = 128;

/// Which kernels the model's products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The CPU kernels of this crate where they apply, candle's products elsewhere.
    Auto,
    /// candle's device-generic products everywhere: what CUDA runs.
    Generic,
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "generic" => Ok(Self::Generic),
            other => Err(format!("unknown kernels {other:?}: use auto or generic")),
        }
    }
}

/// The environment variable read (once) when [`set_kernels`] was not called first.
pub const KERNELS_ENV: &str = "OMNICALL_KERNELS";

static KERNELS: OnceLock<Kernels> = OnceLock::new();

/// Chooses the kernels for the whole process, before the first product; later calls and
/// calls after the first product keep the first choice (returned).
pub fn set_kernels(kernels: Kernels) -> Kernels {
    *KERNELS.get_or_init(|| kernels)
}

/// The process's kernels: [`set_kernels`]'s choice, else `OMNICALL_KERNELS` (`auto` when unset;
/// an unknown value is reported once and means `auto`).
pub fn kernels() -> Kernels {
    *KERNELS.get_or_init(|| match std::env::var(KERNELS_ENV) {
        Ok(value) => value.parse().unwrap_or_else(|e: String| {
            tracing::warn!("{KERNELS_ENV}: {e}; using auto");
            Kernels::Auto
        }),
        Err(_) => Kernels::Auto,
    })
}

/// The work of every [`Linear`] product since the process started: the benchmarks read it
/// around a stage to say how close to the machine's limits the stage runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProductWork {
    /// Multiply-adds count two.
    pub flops: u64,
    /// Weight bytes read (once per product).
    pub weight_bytes: u64,
}

impl ProductWork {
    /// The work done since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            flops: self.flops.saturating_sub(earlier.flops),
            weight_bytes: self.weight_bytes.saturating_sub(earlier.weight_bytes),
        }
    }
}

static PRODUCT_FLOPS: AtomicU64 = AtomicU64::new(0);
static PRODUCT_WEIGHT_BYTES: AtomicU64 = AtomicU64::new(0);

/// The work of every [`Linear`] product so far (all threads).
pub fn product_work() -> ProductWork {
    ProductWork {
        flops: PRODUCT_FLOPS.load(Ordering::Relaxed),
        weight_bytes: PRODUCT_WEIGHT_BYTES.load(Ordering::Relaxed),
    }
}

/// Adds a product of `x` with an `(n, k)` weight of `weight_bytes` to [`product_work`].
fn count_product(x: &Tensor, n: usize, k: usize, weight_bytes: usize) {
    let rows = x.elem_count() / k.max(1);
    PRODUCT_FLOPS.fetch_add((2 * rows * n * k) as u64, Ordering::Relaxed);
    PRODUCT_WEIGHT_BYTES.fetch_add(weight_bytes as u64, Ordering::Relaxed);
}

/// `y = x W^T + b`, a drop-in for `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Dense(candle_nn::Linear),
    Q8(Q8Linear),
}

/// An f32 weight on the CPU stored transposed, `(in, out)` row-major, behind an `(out, in)`
/// view: candle's product multiplies by `weight.t()`, which is then contiguous, and gemm packs
/// it by copying whole columns. Stored `(out, in)`, gemm packs it element by element, strided
/// (about a tenth of the DiT's time in that packing). Other devices, dtypes and
/// [`Kernels::Generic`] keep the weight as it is.
fn cpu_weight_layout(weight: Tensor) -> Tensor {
    let applies = kernels() == Kernels::Auto
        && weight.device().is_cpu()
        && weight.dtype() == DType::F32
        && weight.rank() == 2
        && weight.is_contiguous();
    if !applies {
        return weight;
    }
    match weight.t().and_then(|t| t.contiguous()).and_then(|t| t.t()) {
        Ok(view) => view,
        Err(_) => weight,
    }
}

impl Linear {
    /// `weight` is `(out_features, in_features)`, `bias` is `(out_features,)`; kept dense.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            kind: Kind::Dense(candle_nn::Linear::new(weight, bias)),
        }
    }

    /// The same product with the weight quantised to Q8_0 (CPU only; see [`q8`]).
    pub fn new_q8(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            kind: Kind::Q8(Q8Linear::new(weight, bias)?),
        })
    }

    /// A loaded Linear in the format [`weight_format`] says.
    fn from_loaded(inner: candle_nn::Linear) -> Result<Self> {
        match weight_format() {
            // The loaded weight is this Linear's own, so its storage can be rearranged (a
            // weight shared with another module, such as tied embeddings, goes through `new`).
            WeightFormat::Dense => Ok(Self::new(
                cpu_weight_layout(inner.weight().clone()),
                inner.bias().cloned(),
            )),
            WeightFormat::Q8 => Self::new_q8(inner.weight(), inner.bias().cloned()),
        }
    }

    /// The weight `(out_features, in_features)`; a q8 Linear dequantises it on first call.
    ///
    /// # Panics
    /// When a q8 weight cannot be dequantised, which a weight quantised here always can.
    pub fn weight(&self) -> &Tensor {
        match &self.kind {
            Kind::Dense(inner) => inner.weight(),
            Kind::Q8(q8) => q8
                .dequantized_weight()
                .expect("a Q8_0 weight quantised on the CPU dequantises"),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Dense(inner) => inner.bias(),
            Kind::Q8(q8) => q8.bias(),
        }
    }

    /// Whether the weight is stored as int8 blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self.kind, Kind::Q8(_))
    }

    /// The product through [`Bf16Gemv`] or [`Bf16Gemm`] when one applies, `None` otherwise.
    fn forward_gemv(inner: &candle_nn::Linear, x: &Tensor) -> Result<Option<Tensor>> {
        let weight = inner.weight();
        let applies = kernels() == Kernels::Auto
            && weight.device().is_cpu()
            && weight.dtype() == DType::BF16
            && x.dtype() == DType::BF16
            && weight.rank() == 2
            && weight.is_contiguous()
            && x.rank() >= 1;
        if !applies {
            return Ok(None);
        }
        let (_, in_features) = weight.dims2()?;
        let (leading, k) = x.dims().split_at(x.rank() - 1);
        if k[0] != in_features {
            // Let candle report the shape mismatch in its usual words.
            return Ok(None);
        }
        let rows: usize = leading.iter().product();
        if rows == 0 {
            return Ok(None);
        }
        let x = x.reshape((rows, in_features))?;
        // The bias is added to the f32 sums before the one rounding.
        let bias = inner
            .bias()
            .filter(|b| b.dtype() == DType::BF16 && b.dims() == [weight.dim(0).unwrap_or(0)]);
        let y = match (rows <= MAX_GEMV_ROWS, bias) {
            (true, None) => x.apply_op2_no_bwd(weight, &Bf16Gemv)?,
            (true, Some(bias)) => x.apply_op3_no_bwd(weight, bias, &Bf16Gemv)?,
            (false, None) => x.apply_op2_no_bwd(weight, &Bf16Gemm)?,
            (false, Some(bias)) => x.apply_op3_no_bwd(weight, bias, &Bf16Gemm)?,
        };
        let mut out_dims = leading.to_vec();
        out_dims.push(y.dim(1)?);
        let y = y.reshape(out_dims)?;
        match inner.bias() {
            Some(other) if bias.is_none() => y.broadcast_add(other).map(Some),
            _ => Ok(Some(y)),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kind {
            Kind::Dense(inner) => {
                let weight = inner.weight();
                if let Ok((n, k)) = weight.dims2() {
                    let bytes = weight.elem_count() * weight.dtype().size_in_bytes();
                    count_product(x, n, k, bytes);
                }
                match Self::forward_gemv(inner, x)? {
                    Some(y) => Ok(y),
                    None => inner.forward(x),
                }
            }
            Kind::Q8(q8) => {
                count_product(x, q8.out_features(), q8.in_features(), q8.weight_bytes());
                q8.forward(x)
            }
        }
    }
}

/// The dtype the attention products (`q kᵀ`, `probs v`) of activations like `x` run in: f32
/// for bf16 on the CPU ([`Kernels::Auto`]), since candle's CPU bf16 matmul widens both
/// operands on one thread while gemm's f32 kernels use the pool and AVX-512 (and the
/// reference's CPU attention also sums in f32); `x`'s own dtype everywhere else.
pub fn attention_dtype(x: &Tensor) -> DType {
    if kernels() == Kernels::Auto && x.device().is_cpu() && x.dtype() == DType::BF16 {
        DType::F32
    } else {
        x.dtype()
    }
}

/// A [`Linear`] with a bias, like `candle_nn::linear`, in the format of [`weight_format`].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::from_loaded(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// A [`Linear`] without a bias, like `candle_nn::linear_no_bias`, in the format of
/// [`weight_format`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::from_loaded(candle_nn::linear_no_bias(in_dim, out_dim, vb)?)
}

/// `x (rows, k) @ w (n, k)^T -> (rows, n)`, all bf16, accumulated in f32: CPU only, for a few
/// rows of `x` (see the module docs), with the best kernel this CPU has.
#[derive(Debug, Clone, Copy)]
pub struct Bf16Gemv;

/// [`Bf16Gemv`] with a chosen kernel level (lowered to what the CPU has): the tests force each
/// fallback with it.
#[derive(Debug, Clone, Copy)]
pub struct Bf16GemvAt(pub Level);

/// The best [`Level`] of this CPU, detected once.
pub(crate) fn detected_level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(Level::detect)
}

impl CustomOp2 for Bf16Gemv {
    fn name(&self) -> &'static str {
        "bf16-gemv"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Bf16GemvAt(detected_level()).cpu_fwd(x, x_layout, w, w_layout)
    }
}

impl CustomOp2 for Bf16GemvAt {
    fn name(&self) -> &'static str {
        "bf16-gemv"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        gemv_cpu(self.0, x, x_layout, w, w_layout, None)
    }
}

impl CustomOp3 for Bf16Gemv {
    fn name(&self) -> &'static str {
        "bf16-gemv-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = bias_values(CustomOp3::name(self), w_layout, bias, bias_layout)?;
        gemv_cpu(detected_level(), x, x_layout, w, w_layout, Some(bias))
    }
}

/// The bias of a product: contiguous bf16, one value per weight row.
fn bias_values<'a>(
    op: &str,
    w_layout: &Layout,
    bias: &'a CpuStorage,
    bias_layout: &Layout,
) -> Result<&'a [bf16]> {
    let (n, _) = w_layout.shape().dims2()?;
    match (bias, bias_layout.contiguous_offsets()) {
        (CpuStorage::BF16(all), Some((start, end))) if end - start == n => Ok(&all[start..end]),
        _ => candle_core::bail!(
            "{op}: the bias must be {n} contiguous bf16 values, got {:?} {:?}",
            bias.dtype(),
            bias_layout.shape()
        ),
    }
}

/// `x (rows, k) @ w (n, k)^T (+ bias)` for a few rows, bf16 out, at `level`.
fn gemv_cpu(
    level: Level,
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
    bias: Option<&[bf16]>,
) -> Result<(CpuStorage, Shape)> {
    let (rows, k) = x_layout.shape().dims2()?;
    let (n, w_k) = w_layout.shape().dims2()?;
    if k != w_k {
        candle_core::bail!("bf16-gemv: input has {k} columns but the weight has {w_k}");
    }
    let (CpuStorage::BF16(x_all), CpuStorage::BF16(w_all)) = (x, w) else {
        candle_core::bail!(
            "bf16-gemv: needs bf16 input and weight, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        );
    };
    let Some((w_start, w_end)) = w_layout.contiguous_offsets() else {
        candle_core::bail!("bf16-gemv: the weight must be contiguous");
    };
    let mut out = vec![0f32; rows * n];
    if rows == 0 || n == 0 || k == 0 {
        return Ok((round_rows(&out, n, bias), Shape::from((rows, n))));
    }
    let w_data = &w_all[w_start..w_end];
    // Any input layout: a strided one is copied into logical order (it is a few rows).
    let x_data = logical_bf16(x, x_all, x_layout)?;
    let x_data = &x_data[..];
    let x_rows = Rows::new(level, x_data, k);

    let shared = SharedOut(out.as_mut_ptr());
    run_blocks(n.div_ceil(GEMV_BLOCK_ROWS), rows * n * k, |block_range| {
        let shared = &shared;
        for b in block_range {
            let first = b * GEMV_BLOCK_ROWS;
            let len = GEMV_BLOCK_ROWS.min(n - first);
            let mut block = vec![0f32; rows * len];
            gemv(&x_rows, &w_data[first * k..(first + len) * k], &mut block);
            for (r, part) in block.chunks_exact(len).enumerate() {
                // SAFETY: columns [first, first + len) of output row r (of `rows` rows of
                // n) are written by this block only, and `out` outlives the pool's work.
                unsafe {
                    std::ptr::copy_nonoverlapping(part.as_ptr(), shared.0.add(r * n + first), len)
                };
            }
        }
    });
    Ok((round_rows(&out, n, bias), Shape::from((rows, n))))
}

/// `out` (rows of `n` f32 sums) plus `bias` on every row, rounded once to bf16.
fn round_rows(out: &[f32], n: usize, bias: Option<&[bf16]>) -> CpuStorage {
    let mut rounded = vec![bf16::ZERO; out.len()];
    if n > 0 {
        for (src, dst) in out.chunks_exact(n).zip(rounded.chunks_exact_mut(n)) {
            add_bias_round(detected_level(), src, bias, dst);
        }
    }
    CpuStorage::BF16(rounded)
}

/// The bf16 values of `x` in logical (row-major) order: borrowed when contiguous, else copied.
fn logical_bf16<'a>(
    x: &CpuStorage,
    all: &'a [bf16],
    layout: &Layout,
) -> Result<std::borrow::Cow<'a, [bf16]>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(std::borrow::Cow::Borrowed(&all[start..end])),
        None => match x.to_dtype(layout, DType::BF16)? {
            CpuStorage::BF16(copy) => Ok(std::borrow::Cow::Owned(copy)),
            _ => candle_core::bail!("copying a bf16 input did not give bf16"),
        },
    }
}

/// Products of fewer multiply-adds than this run on the calling thread: waking the pool costs
/// more than they do (and far more on a loaded machine, where a woken worker waits for a core).
const INLINE_MAX_MACS: usize = 1 << 20;

/// Runs `f` over `0..n_blocks`: on candle's barrier pool, or inline when the whole product
/// (`macs` multiply-adds) is small.
fn run_blocks(n_blocks: usize, macs: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if macs <= INLINE_MAX_MACS {
        f(0..n_blocks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n_blocks, f);
    }
}

/// Weight rows widened per work item of [`Bf16Gemm`]: 256 rows of a 2048-wide matrix are
/// 2 MiB of f32, about one core's L2.
const GEMM_BLOCK_ROWS: usize = 256;

/// Weight rows per cache block of the AVX512-BF16 prefill path: packed with [`DOT_BLOCK_K`] of
/// depth they are 128 KiB, which stay in a core's L2 while every input row passes over them.
const DOT_BLOCK_ROWS: usize = 128;
/// The depth of one k block of the AVX512-BF16 prefill path: a tile's panels (3 x 16 weight
/// rows) of this depth are 48 KiB, read from L2 for each tile of input rows.
const DOT_BLOCK_K: usize = 512;

/// `x (rows, k) @ w (n, k)^T -> (rows, n)`, all bf16, for prefill-sized inputs on the CPU.
///
/// candle's bf16 matmul widens the whole weight to f32 on one thread for every call. Where the
/// CPU has AVX512-BF16 the product runs as `vdpbf16ps` dot products on bf16 as stored (twice
/// the multiply-adds of an f32 FMA per instruction), in cache blocks of weight rows and of k
/// ([`dot_block_bf16`]); elsewhere each work item widens [`GEMM_BLOCK_ROWS`] weight rows (the
/// block stays in cache) and runs gemm's f32 kernel on it. Either writes its columns of an f32
/// output, the blocks run on candle's pool, and the f32 result is rounded to bf16 once, as
/// candle's own product does.
#[derive(Debug, Clone, Copy)]
pub struct Bf16Gemm;

/// [`Bf16Gemm`] with a chosen kernel: [`Level::Avx512Bf16`] (where the CPU has it) the dot
/// products, any other level the widened blocks through gemm. The tests force each with it.
#[derive(Debug, Clone, Copy)]
pub struct Bf16GemmAt(pub Level);

/// The AVX512-BF16 path of [`Bf16GemmAt`]: `x` (rows, k) and `w` (n, k) row-major, bf16 out
/// with the bias added to the f32 sums. `None` when the CPU has no AVX512-BF16.
fn dot_product_blocks(
    x: &[bf16],
    w: &[bf16],
    (rows, n, k): (usize, usize, usize),
    bias: Option<&[bf16]>,
) -> Option<Vec<bf16>> {
    if !Level::Avx512Bf16.is_available() {
        return None;
    }
    let mut out = vec![bf16::ZERO; rows * n];
    let shared = SharedOut(out.as_mut_ptr());
    let level = detected_level();
    run_blocks(n.div_ceil(DOT_BLOCK_ROWS), rows * n * k, |block_range| {
        let shared = &shared;
        let mut packed = PackedWeights::default();
        for b in block_range {
            let first = b * DOT_BLOCK_ROWS;
            let len = DOT_BLOCK_ROWS.min(n - first);
            // the block's columns of every row, summed over the k blocks, then rounded out
            let mut block = vec![0f32; rows * len];
            for i0 in (0..k).step_by(DOT_BLOCK_K) {
                let depth = DOT_BLOCK_K.min(k - i0);
                packed.pack(&w[first * k + i0..], k, len, depth);
                let done = gemm_packed(&x[i0..], k, rows, &packed, &mut block, len, i0 > 0);
                debug_assert!(done, "AVX512-BF16 was detected");
            }
            let block_bias = bias.map(|bias| &bias[first..first + len]);
            for (r, part) in block.chunks_exact(len).enumerate() {
                // SAFETY: columns [first, first + len) of output row r (of `rows` rows of n)
                // are written by this block only, and `out` outlives the pool's work.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(shared.0.add(r * n + first), len) };
                add_bias_round(level, part, block_bias, dst);
            }
        }
    });
    Some(out)
}

/// The output buffer, shared by the work items: each writes only its own columns.
struct SharedOut<T>(*mut T);
// SAFETY: the work items write disjoint column ranges of the buffer, which outlives them.
unsafe impl<T> Sync for SharedOut<T> {}

impl CustomOp2 for Bf16Gemm {
    fn name(&self) -> &'static str {
        "bf16-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        gemm_cpu(detected_level(), x, x_layout, w, w_layout, None)
    }
}

impl CustomOp2 for Bf16GemmAt {
    fn name(&self) -> &'static str {
        "bf16-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        gemm_cpu(self.0, x, x_layout, w, w_layout, None)
    }
}

impl CustomOp3 for Bf16Gemm {
    fn name(&self) -> &'static str {
        "bf16-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        CustomOp3::cpu_fwd(
            &Bf16GemmAt(detected_level()),
            x,
            x_layout,
            w,
            w_layout,
            bias,
            bias_layout,
        )
    }
}

impl CustomOp3 for Bf16GemmAt {
    fn name(&self) -> &'static str {
        "bf16-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = bias_values(CustomOp3::name(self), w_layout, bias, bias_layout)?;
        gemm_cpu(self.0, x, x_layout, w, w_layout, Some(bias))
    }
}

/// `x (rows, k) @ w (n, k)^T (+ bias)` for many rows, bf16 out: the dot-product blocks at
/// [`Level::Avx512Bf16`], the widened blocks through gemm at any other level.
fn gemm_cpu(
    level: Level,
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
    bias: Option<&[bf16]>,
) -> Result<(CpuStorage, Shape)> {
    let (rows, k) = x_layout.shape().dims2()?;
    let (n, w_k) = w_layout.shape().dims2()?;
    if k != w_k {
        candle_core::bail!("bf16-gemm: input has {k} columns but the weight has {w_k}");
    }
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
        candle_core::bail!(
            "bf16-gemm: needs bf16 input and weight, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    let Some((w_start, w_end)) = w_layout.contiguous_offsets() else {
        candle_core::bail!("bf16-gemm: the weight must be contiguous");
    };
    if let (Level::Avx512Bf16, CpuStorage::BF16(x_all), CpuStorage::BF16(w_all)) = (level, x, w)
        && rows > 0
        && n > 0
        && k > 0
    {
        let x_data = logical_bf16(x, x_all, x_layout)?;
        let w_data = &w_all[w_start..w_end];
        if let Some(out) = dot_product_blocks(&x_data, w_data, (rows, n, k), bias) {
            return Ok((CpuStorage::BF16(out), Shape::from((rows, n))));
        }
    }
    // The input is activations (rows x k), small beside the weight: widened whole, in
    // logical order whatever its layout.
    let CpuStorage::F32(x_f32) = x.to_dtype(x_layout, DType::F32)? else {
        candle_core::bail!("bf16-gemm: widening the input did not give f32");
    };
    let mut out = vec![0f32; rows * n];
    let shared = SharedOut(out.as_mut_ptr());
    let n_blocks = n.div_ceil(GEMM_BLOCK_ROWS);
    let first_error: Mutex<Option<candle_core::Error>> = Mutex::new(None);
    run_blocks(n_blocks, rows * n * k, |block_range| {
        let shared = &shared;
        for b in block_range {
            let first = b * GEMM_BLOCK_ROWS;
            let len = GEMM_BLOCK_ROWS.min(n - first);
            let block_layout = Layout::contiguous_with_offset((len, k), w_start + first * k);
            let w_f32 = match w.to_dtype(&block_layout, DType::F32) {
                Ok(CpuStorage::F32(v)) => v,
                Ok(_) => {
                    let e = candle_core::Error::msg("bf16-gemm: widening gave no f32");
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    continue;
                }
                Err(e) => {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    continue;
                }
            };
            // SAFETY: `x_f32` is (rows, k) row-major, `w_f32` (len, k) row-major read as
            // its transpose (k, len), and the destination is columns [first, first + len)
            // of the (rows, n) row-major `out`, written by this item only.
            unsafe {
                gemm::gemm(
                    rows,
                    len,
                    k,
                    shared.0.add(first),
                    1,
                    n as isize,
                    false,
                    x_f32.as_ptr(),
                    1,
                    k as isize,
                    w_f32.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    if let Some(e) = first_error
        .into_inner()
        .map_err(|_| candle_core::Error::msg("bf16-gemm: error slot poisoned"))?
    {
        return Err(e);
    }
    Ok((round_rows(&out, n, bias), Shape::from((rows, n))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// Loaded f32 Linears (weight stored transposed on the CPU) equal the plain product on odd
    /// shapes, with and without a bias, for 2- and 3-dimensional inputs; the weight reads back
    /// as given.
    #[test]
    fn f32_linear_matches_the_plain_product() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n, k) in [(1, 1, 1), (3, 7, 5), (9, 33, 17), (130, 65, 257)] {
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 0.2, n, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
            let loaded =
                |bias: Option<Tensor>| Linear::from_loaded(candle_nn::Linear::new(w.clone(), bias));
            let lin = loaded(Some(b.clone()))?;
            assert!(
                n == 1 || k == 1 || !lin.weight().is_contiguous(),
                "stored transposed"
            );
            let weight_diff = (lin.weight() - &w)?.abs()?.flatten_all()?.max(0)?;
            assert_eq!(weight_diff.to_scalar::<f32>()?, 0.0);
            let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            let diff = |got: Tensor| -> Result<f32> {
                (got.reshape(want.shape())? - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()
            };
            assert!(diff(lin.forward(&x)?)? < 1e-4, "{rows}x{k} . {n}x{k}");
            assert!(diff(lin.forward(&x.unsqueeze(0)?)?)? < 1e-4);
            let no_bias = loaded(None)?.forward(&x)?;
            let want_nb = x.matmul(&w.t()?)?;
            let d = (no_bias - want_nb)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4);
        }
        Ok(())
    }

    /// Random bf16 `(rows, k)` input, `(n, k)` weight, `(n,)` bias.
    fn operands(rows: usize, n: usize, k: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 0.1, n, &dev)?.to_dtype(DType::BF16)?;
        Ok((x, w, b))
    }

    /// Largest |a - b| relative to the largest |b|, both compared in f32.
    fn relative_max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(1e-6))
    }

    /// bf16 has an 8-bit mantissa: one rounding of the output is 2^-8 relative; the f32 sums
    /// differ only in their order.
    const BF16_TOLERANCE: f32 = 1.0 / 128.0;

    #[test]
    fn matches_candle_matmul_for_odd_sizes_with_and_without_bias() -> Result<()> {
        // k not a multiple of any vector width, n not a multiple of the block.
        for (n, k) in [
            (1, 1),
            (7, 13),
            (131, 67),
            (300, 257),
            (GEMV_BLOCK_ROWS + 5, 33),
        ] {
            for rows in 1..=4 {
                let (x, w, b) = operands(rows, n, k)?;
                for bias in [None, Some(b.clone())] {
                    let with_bias = bias.is_some();
                    let fast = Linear::new(w.clone(), bias.clone());
                    let reference = candle_nn::Linear::new(w.clone(), bias);
                    let got = fast.forward(&x)?;
                    assert_eq!(got.dtype(), DType::BF16);
                    let want = reference.forward(&x)?;
                    let diff = relative_max_diff(&got, &want)?;
                    assert!(
                        diff <= BF16_TOLERANCE,
                        "rows {rows} n {n} k {k} bias {with_bias}: relative diff {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn op_gives_the_f32_product_rounded_once() -> Result<()> {
        let (x, w, _) = operands(3, 45, 70)?;
        let got = x.apply_op2_no_bwd(&w, &Bf16Gemv)?;
        let exact = x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?
            .to_dtype(DType::BF16)?;
        // Same products, same rounding: only the order of the f32 sum may differ.
        assert!(relative_max_diff(&got, &exact)? <= 1.0 / 256.0);
        Ok(())
    }

    #[test]
    fn handles_batched_and_non_contiguous_inputs() -> Result<()> {
        let (n, k) = (50, 40);
        let (_, w, b) = operands(1, n, k)?;
        let fast = Linear::new(w.clone(), Some(b.clone()));
        let reference = candle_nn::Linear::new(w, Some(b));
        // (batch, seq, k) with 2 rows in all.
        let x3 = Tensor::randn(0f32, 1.0, (2, 1, k), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let got = fast.forward(&x3)?;
        assert_eq!(got.dims(), &[2, 1, n]);
        assert!(relative_max_diff(&got, &reference.forward(&x3)?)? <= BF16_TOLERANCE);
        // A transposed view: rows are strided, not contiguous.
        let xt = Tensor::randn(0f32, 1.0, (k, 3), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .t()?;
        assert!(!xt.is_contiguous());
        let got = fast.forward(&xt)?;
        let want = reference.forward(&xt.contiguous()?)?;
        assert!(relative_max_diff(&got, &want)? <= BF16_TOLERANCE);
        // The op itself walks a strided layout in logical order.
        let direct = xt.apply_op2_no_bwd(fast.weight(), &Bf16Gemv)?;
        let row1 = xt
            .i(1..2)?
            .contiguous()?
            .apply_op2_no_bwd(fast.weight(), &Bf16Gemv)?;
        assert!(relative_max_diff(&direct.i(1..2)?, &row1)? <= 1e-6);
        Ok(())
    }

    #[test]
    fn f32_uses_candle_unchanged() -> Result<()> {
        let (n, k) = (20, 30);
        let (x, w, b) = operands(MAX_GEMV_ROWS + 1, n, k)?;
        let (x, w, b) = (
            x.to_dtype(DType::F32)?,
            w.to_dtype(DType::F32)?,
            b.to_dtype(DType::F32)?,
        );
        let got = Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
        let want = candle_nn::Linear::new(w, Some(b)).forward(&x)?;
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(relative_max_diff(&got, &want)?, 0.0);
        Ok(())
    }

    /// `x @ w^T` in f32 from the bf16 operands, rounded to bf16 once: the plain reference.
    fn plain_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.to_dtype(DType::F32)?
            .broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?
            .to_dtype(DType::BF16)
    }

    #[test]
    fn gemv_at_every_level_matches_the_plain_product_on_odd_shapes() -> Result<()> {
        // Each fallback forced (the levels this CPU lacks run the one below): k odd and past
        // the vector widths, n = 1 and past a block, rows 1 to the decode limit.
        for (n, k) in [(1, 1), (1, 67), (9, 33), (GEMV_BLOCK_ROWS + 3, 257)] {
            for rows in [1, 2, 5, MAX_GEMV_ROWS] {
                let (x, w, _) = operands(rows, n, k)?;
                let want = plain_product(&x, &w)?;
                for level in Level::ALL {
                    let got = x.apply_op2_no_bwd(&w, &Bf16GemvAt(level))?;
                    let diff = relative_max_diff(&got, &want)?;
                    assert!(
                        diff <= 1.0 / 256.0,
                        "{level:?} rows {rows} n {n} k {k}: relative diff {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gemm_matches_the_plain_product_on_odd_shapes() -> Result<()> {
        // k not a multiple of any vector or cache block, n = 1, n just past a weight block,
        // rows just past the decode path, and work both below and above the inline limit.
        for (rows, n, k) in [
            (MAX_GEMV_ROWS + 1, 1, 7),
            (9, 13, 1),
            (17, GEMM_BLOCK_ROWS + 3, 67),
            (33, 2 * GEMM_BLOCK_ROWS + 1, 129),
            (130, 300, 257),
            // more than one k block of the dot-product path, the last one odd
            (10, 6, 2 * DOT_BLOCK_K + 3),
        ] {
            let (x, w, _) = operands(rows, n, k)?;
            let want = plain_product(&x, &w)?;
            // the dot products (where the CPU has AVX512-BF16) and the widened blocks
            for level in [Level::Avx512Bf16, Level::Avx2Fma] {
                let got = x.apply_op2_no_bwd(&w, &Bf16GemmAt(level))?;
                assert_eq!(got.dims(), &[rows, n]);
                let diff = relative_max_diff(&got, &want)?;
                assert!(
                    diff <= 1.0 / 256.0,
                    "{level:?} rows {rows} n {n} k {k}: relative diff {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn prefill_sizes_take_the_gemm_with_batches_bias_and_strides() -> Result<()> {
        let (n, k) = (GEMM_BLOCK_ROWS + 9, 45);
        let (_, w, b) = operands(1, n, k)?;
        let fast = Linear::new(w.clone(), Some(b.clone()));
        let reference = candle_nn::Linear::new(w.clone(), Some(b));
        // (batch, seq, k): batch > 1, rows > MAX_GEMV_ROWS in all.
        let x3 = Tensor::randn(0f32, 1.0, (3, 7, k), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let got = fast.forward(&x3)?;
        assert_eq!(got.dims(), &[3, 7, n]);
        assert!(relative_max_diff(&got, &reference.forward(&x3)?)? <= BF16_TOLERANCE);
        // A transposed (strided) input.
        let xt = Tensor::randn(0f32, 1.0, (k, 40), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .t()?;
        assert!(!xt.is_contiguous());
        let got = fast.forward(&xt)?;
        let want = reference.forward(&xt.contiguous()?)?;
        assert!(relative_max_diff(&got, &want)? <= BF16_TOLERANCE);
        // A mismatched width is an error, not a panic.
        assert!(
            xt.narrow(1, 0, k - 1)?
                .contiguous()?
                .apply_op2_no_bwd(&w, &Bf16Gemm)
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn products_are_counted() -> Result<()> {
        let (x, w, _) = operands(3, 5, 7)?;
        let before = product_work();
        Linear::new(w, None).forward(&x)?;
        // Other tests count their products too, concurrently: at least this one's.
        let work = product_work().since(before);
        assert!(work.flops >= 2 * 3 * 5 * 7, "{work:?}");
        assert!(work.weight_bytes >= 5 * 7 * 2, "{work:?}");
        Ok(())
    }

    #[test]
    fn kernels_parse_and_reject_unknown_names() {
        assert_eq!("generic".parse::<Kernels>(), Ok(Kernels::Generic));
        assert_eq!("AUTO".parse::<Kernels>(), Ok(Kernels::Auto));
        let err = "fast".parse::<Kernels>().unwrap_err();
        assert!(err.contains("fast") && err.contains("generic"), "{err}");
    }

    #[test]
    fn shape_mismatch_is_an_error_not_a_panic() -> Result<()> {
        let (x, w, _) = operands(1, 8, 16)?;
        let fast = Linear::new(w.clone(), None);
        assert!(fast.forward(&x.narrow(1, 0, 15)?).is_err());
        assert!(x.narrow(1, 0, 15)?.apply_op2_no_bwd(&w, &Bf16Gemv).is_err());
        assert!(
            x.to_dtype(DType::F32)?
                .apply_op2_no_bwd(&w, &Bf16Gemv)
                .is_err()
        );
        Ok(())
    }

    /// This process's CPU seconds so far: on a loaded machine the CPU time says what a kernel
    /// does with the cores it gets.
    fn cpu_seconds() -> f64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }

    /// Wall and CPU seconds per run of `f`, after one untimed run.
    fn time(f: &dyn Fn() -> Result<Tensor>, reps: usize) -> Result<(f64, f64)> {
        f()?;
        let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
        for _ in 0..reps {
            f()?;
        }
        let wall = start.elapsed().as_secs_f64() / reps as f64;
        Ok((wall, (cpu_seconds() - cpu) / reps as f64))
    }

    /// f32 and bf16 products at the 3B Thinker's prefill shapes (a 500-token prompt: the MLP's up
    /// projection, the attention scores of 16 heads as one batched product) and the vision
    /// MLP's, in GFLOP/s. Run with
    /// `cargo test --lib model::linear -- --ignored --nocapture f32_product_timing`.
    #[test]
    #[ignore = "timing, not a check"]
    fn f32_product_timing() -> Result<()> {
        let dev = Device::Cpu;
        for (name, m, k, n) in [
            ("thinker mlp up", 500, 2048, 11008),
            ("thinker mlp down", 500, 11008, 2048),
            ("vision mlp", 3128, 1280, 3584),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let lin = Linear::new(w, None);
            let gflop = 2.0 * (m * k * n) as f64 / 1e9;
            let (x_bf16, w_bf16) = (
                x.to_dtype(DType::BF16)?,
                lin.weight().to_dtype(DType::BF16)?,
            );
            let fast_bf16 = Linear::new(w_bf16.clone(), None);
            let candle_bf16 = candle_nn::Linear::new(w_bf16, None);
            let w_bf16 = fast_bf16.weight().clone();
            let runs: [(&str, &dyn Fn() -> Result<Tensor>); 5] = [
                ("f32", &|| lin.forward(&x)),
                ("bf16 (this module)", &|| fast_bf16.forward(&x_bf16)),
                ("bf16 AVX512-BF16 tiles", &|| {
                    x_bf16.apply_op2_no_bwd(&w_bf16, &Bf16GemmAt(Level::Avx512Bf16))
                }),
                ("bf16 widened blocks + gemm f32", &|| {
                    x_bf16.apply_op2_no_bwd(&w_bf16, &Bf16GemmAt(Level::Avx2Fma))
                }),
                ("bf16 (candle)", &|| candle_bf16.forward(&x_bf16)),
            ];
            for (kind, run) in runs {
                let (s, cpu) = time(run, 2)?;
                println!(
                    "{name} ({m}x{k})·({n}x{k})ᵀ {kind}: {:.1} ms, {:.1} GFLOP/s, \
                     {:.1} GFLOP per CPU-second",
                    s * 1e3,
                    gflop / s,
                    gflop / cpu
                );
            }
        }
        let (heads, seq, head_dim) = (16, 500, 128);
        let q = Tensor::randn(0f32, 1.0, (heads, seq, head_dim), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (heads, seq, head_dim), &dev)?;
        let (s, cpu) = time(&|| q.matmul(&k.t()?), 5)?;
        let gflop = 2.0 * (heads * seq * seq * head_dim) as f64 / 1e9;
        println!(
            "attention scores {heads}x({seq}x{head_dim})·({seq}x{head_dim})ᵀ: {:.1} ms, \
             {:.1} GFLOP/s, {:.1} GFLOP per CPU-second",
            s * 1e3,
            gflop / s,
            gflop / cpu
        );
        Ok(())
    }

    /// The decode micro-benchmark of the task: `x[rows, 2048] @ W[11008, 2048]^T` in bf16,
    /// through this op and through candle's matmul. Run with
    /// `cargo test --lib model::linear -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn decode_matvec_timing() -> Result<()> {
        let (n, k) = (11008, 2048);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let candle_bf16 = candle_nn::Linear::new(w.clone(), None);
        let candle_f32 = candle_nn::Linear::new(w.to_dtype(DType::F32)?, None);
        let gb = (n * k * 2) as f64 / 1e9;
        for rows in [1, 2, 4, 8] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::BF16)?;
            let x_f32 = x.to_dtype(DType::F32)?;
            for level in Level::ALL.into_iter().filter(|l| l.is_available()) {
                let (wall, cpu) = time(&|| x.apply_op2_no_bwd(&w, &Bf16GemvAt(level)), 20)?;
                println!(
                    "rows {rows} bf16-gemv {level:?}: {:.2} ms, {:.1} GB/s of bf16 weights, \
                     {:.1} GB per CPU-second",
                    wall * 1e3,
                    gb / wall,
                    gb / cpu
                );
            }
            let (bf16_wall, _) = time(&|| candle_bf16.forward(&x), 3)?;
            let (f32_wall, _) = time(&|| candle_f32.forward(&x_f32), 10)?;
            println!(
                "rows {rows}: candle bf16 {:.2} ms, candle f32 {:.2} ms",
                bf16_wall * 1e3,
                f32_wall * 1e3
            );
        }
        Ok(())
    }
}
