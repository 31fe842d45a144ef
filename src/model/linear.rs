//! A drop-in for `candle_nn::Linear` (same weights, same `VarBuilder` paths) with a fast path
//! for decoding in bf16 on the CPU.
//!
//! candle's CPU matmul in bf16 widens both whole operands to f32 on every call: for a decode step
//! (one row times a weight matrix) that is a fresh f32 copy of every weight matrix per token, and
//! bf16 decodes several times slower than f32. When the weights are bf16 on the CPU and the
//! input has at most [`MAX_GEMV_ROWS`] rows, [`Linear`] instead runs [`Bf16Gemv`]: the weight
//! rows are widened a block at a time (the block stays in cache), dotted with the f32-widened
//! input rows, and the sum rounded to bf16 once, as candle's own product does. Everything
//! else (f32, CUDA, prefill-sized inputs) goes through `candle_nn::Linear` unchanged.
//!
//! [`Kernels::Generic`] (`OMNICALL_KERNELS=generic`, or `--kernels generic`) turns the CPU
//! kernel off, so that the CPU runs the device-generic path a GPU takes and the parity tests
//! check that path too.
//!
//! The inner loops are candle's own optimised CPU primitives (`BackendStorage::to_dtype` for the
//! widening, `VecOps::vec_dot` for the f32 dot products, its barrier thread pool for the
//! blocks) rather than loops written here: the dev profile compiles this crate unoptimised
//! (only dependencies get opt-level 2), where a hand-written loop runs at well under 1 GB/s.

use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

/// Most input rows (all leading dimensions together) sent to [`Bf16Gemv`]; larger inputs
/// (prefill) go to candle's matmul, whose up-front widening is then shared by many rows.
pub const MAX_GEMV_ROWS: usize = 8;

/// Weight rows widened and dotted per work item: 128 rows of a 2048-wide matrix are 1 MiB of
/// f32, which stays in a core's L2 between the widening and the dot products.
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

/// `y = x W^T + b`, a drop-in for `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// `weight` is `(out_features, in_features)`, `bias` is `(out_features,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The product through [`Bf16Gemv`] when it applies, `None` otherwise.
    fn forward_gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let weight = self.inner.weight();
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
        if rows == 0 || rows > MAX_GEMV_ROWS {
            return Ok(None);
        }
        let y = x
            .reshape((rows, in_features))?
            .apply_op2_no_bwd(weight, &Bf16Gemv)?;
        let mut out_dims = leading.to_vec();
        out_dims.push(y.dim(1)?);
        let y = y.reshape(out_dims)?;
        match self.inner.bias() {
            Some(bias) => y.broadcast_add(bias).map(Some),
            None => Ok(Some(y)),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_gemv(x)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// A [`Linear`] with a bias, like `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear { inner })
}

/// A [`Linear`] without a bias, like `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear { inner })
}

/// `x (rows, k) @ w (n, k)^T -> (rows, n)`, all bf16, accumulated in f32: CPU only, for a few
/// rows of `x` (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Gemv;

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
        let (rows, k) = x_layout.shape().dims2()?;
        let (n, w_k) = w_layout.shape().dims2()?;
        if k != w_k {
            candle_core::bail!("bf16-gemv: input has {k} columns but the weight has {w_k}");
        }
        if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
            candle_core::bail!(
                "bf16-gemv: needs bf16 input and weight, got {:?} and {:?}",
                x.dtype(),
                w.dtype()
            );
        }
        let Some((w_start, _)) = w_layout.contiguous_offsets() else {
            candle_core::bail!("bf16-gemv: the weight must be contiguous");
        };
        // Any input layout: the widening walks it in logical order.
        let CpuStorage::F32(x_f32) = x.to_dtype(x_layout, DType::F32)? else {
            candle_core::bail!("bf16-gemv: widening the input did not give f32");
        };

        let mut out = vec![bf16::ZERO; rows * n];
        let n_blocks = n.div_ceil(GEMV_BLOCK_ROWS);
        // Block b owns columns [b * GEMV_BLOCK_ROWS, ..) of every output row.
        let mut blocks: Vec<Vec<&mut [bf16]>> = (0..n_blocks).map(|_| Vec::new()).collect();
        for out_row in out.chunks_mut(n.max(1)) {
            for (block, part) in blocks.iter_mut().zip(out_row.chunks_mut(GEMV_BLOCK_ROWS)) {
                block.push(part);
            }
        }
        let blocks: Vec<Mutex<Vec<&mut [bf16]>>> = blocks.into_iter().map(Mutex::new).collect();
        let first_error: Mutex<Option<candle_core::Error>> = Mutex::new(None);

        candle_core::utils::barrier_pool().execute_chunked(n_blocks, |block_range| {
            for b in block_range {
                let result = (|| -> Result<()> {
                    let mut parts = blocks[b]
                        .lock()
                        .map_err(|_| candle_core::Error::msg("bf16-gemv: output block poisoned"))?;
                    let first = b * GEMV_BLOCK_ROWS;
                    let len = GEMV_BLOCK_ROWS.min(n - first);
                    let block_layout =
                        Layout::contiguous_with_offset((len, k), w_start + first * k);
                    let CpuStorage::F32(w_f32) = w.to_dtype(&block_layout, DType::F32)? else {
                        candle_core::bail!("bf16-gemv: widening the weight did not give f32");
                    };
                    // Weight row outer: it stays in L1 while every input row meets it.
                    for (j, w_row) in w_f32.chunks_exact(k).enumerate() {
                        for (x_row, out_part) in x_f32.chunks_exact(k).zip(parts.iter_mut()) {
                            if let Some(y) = out_part.get_mut(j) {
                                *y = bf16::from_f32(dot(x_row, w_row));
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = result
                    && let Ok(mut slot) = first_error.lock()
                {
                    slot.get_or_insert(e);
                }
            }
        });

        if let Some(e) = first_error
            .into_inner()
            .map_err(|_| candle_core::Error::msg("bf16-gemv: error slot poisoned"))?
        {
            return Err(e);
        }
        Ok((CpuStorage::BF16(out), Shape::from((rows, n))))
    }
}

/// `sum(a[i] * b[i])` in f32 with candle's vectorised kernel.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let mut sum = 0f32;
    // SAFETY: both pointers are valid for `len` reads and `sum` for one write.
    unsafe { <f32 as VecOps>::vec_dot(a.as_ptr(), b.as_ptr(), &mut sum, len) };
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

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
    fn other_dtypes_and_prefill_sizes_use_candle() -> Result<()> {
        let (n, k) = (20, 30);
        let (x, w, b) = operands(MAX_GEMV_ROWS + 1, n, k)?;
        for (x, w, b) in [
            (x.clone(), w.clone(), b.clone()),
            (
                x.to_dtype(DType::F32)?,
                w.to_dtype(DType::F32)?,
                b.to_dtype(DType::F32)?,
            ),
        ] {
            let got = Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
            let want = candle_nn::Linear::new(w, Some(b)).forward(&x)?;
            assert_eq!(got.dtype(), want.dtype());
            assert_eq!(relative_max_diff(&got, &want)?, 0.0);
        }
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

    /// The decode micro-benchmark of the task: `x[rows, 2048] @ W[11008, 2048]^T` in bf16,
    /// through this op and through candle's matmul. Run with
    /// `cargo test --lib model::linear -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn decode_matvec_timing() -> Result<()> {
        let (n, k) = (11008, 2048);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let time = |f: &dyn Fn() -> Result<Tensor>, reps: usize| -> Result<f64> {
            f()?;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
        };
        let w_f32 = w.to_dtype(DType::F32)?;
        let fast = Linear::new(w.clone(), None);
        let candle_bf16 = candle_nn::Linear::new(w.clone(), None);
        let candle_f32 = candle_nn::Linear::new(w_f32, None);
        let gb = (n * k * 2) as f64 / 1e9;
        for rows in [1, 2, 4, 8] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::BF16)?;
            let x_f32 = x.to_dtype(DType::F32)?;
            let ms_fast = time(&|| fast.forward(&x), 20)?;
            let ms_bf16 = time(&|| candle_bf16.forward(&x), 3)?;
            let ms_f32 = time(&|| candle_f32.forward(&x_f32), 10)?;
            println!(
                "rows {rows}: bf16-gemv {ms_fast:.2} ms ({:.1} GB/s of bf16 weights), \
                 candle bf16 {ms_bf16:.2} ms, candle f32 {ms_f32:.2} ms",
                gb / (ms_fast / 1e3)
            );
        }
        Ok(())
    }
}
