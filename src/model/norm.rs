//! LayerNorm and RMSNorm, drop-ins for candle_nn's (same weights, same `VarBuilder` paths), with
//! the vectorised kernels of `omnicall_kernels::activation` on the CPU for f32 and bf16
//! ([`Kernels::Auto`]), candle's everywhere else.
//!
//! candle's CPU norms sum each row one value at a time, and for bf16 widen and round each
//! value apart: about a tenth of the bf16 audio encoder's time.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{LayerNormConfig, VarBuilder};
use half::bf16;
use omnicall_kernels::unary::Lane;

use super::linear::{Kernels, detected_level, kernels};

/// `LayerNorm` (`candle_nn::LayerNorm`'s weights and forward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

impl LayerNorm {
    /// `weight` and `bias` are `(size,)`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
        }
    }
}

/// A [`LayerNorm`] read from `vb`, like `candle_nn::layer_norm`.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(size, config, vb)?,
    })
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = &self.inner;
        let op = NormOp {
            eps: inner.eps() as f32,
            center: inner.remove_mean(),
        };
        if !applies(x, inner.weight()) {
            return inner.forward(x);
        }
        match inner.bias() {
            Some(bias) if bias.dtype() == x.dtype() => {
                x.apply_op3_no_bwd(inner.weight(), bias, &op)
            }
            Some(_) => inner.forward(x),
            None => x.apply_op2_no_bwd(inner.weight(), &op),
        }
    }
}

/// `RMSNorm` (`candle_nn::RmsNorm`'s weights and forward).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    inner: candle_nn::RmsNorm,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            inner: candle_nn::RmsNorm::new(weight, eps),
        }
    }
}

/// An [`RmsNorm`] read from `vb`, like `candle_nn::rms_norm`.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm {
        inner: candle_nn::rms_norm(size, eps, vb)?,
    })
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if applies(x, self.inner.weight()) {
            let op = NormOp {
                eps: self.inner.eps() as f32,
                center: false,
            };
            x.apply_op2_no_bwd(self.inner.weight(), &op)
        } else {
            self.inner.forward(x)
        }
    }
}

/// Whether the CPU kernels take `x` with `weight`: f32 or bf16 on the CPU, the same dtype,
/// normalised over a last dimension as long as the weight.
fn applies(x: &Tensor, weight: &Tensor) -> bool {
    kernels() == Kernels::Auto
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && weight.dtype() == x.dtype()
        && x.rank() >= 1
        && weight.dims() == [x.dims()[x.rank() - 1]]
}

#[derive(Debug, Clone, Copy)]
struct NormOp {
    eps: f32,
    /// LayerNorm (subtract the mean) or RMSNorm.
    center: bool,
}

/// Rows per work item of the pool.
const ROWS_PER_ITEM: usize = 16;

/// The output buffer, shared by the work items: each writes only its own rows.
struct SharedOut<T>(*mut T);
// SAFETY: the work items write disjoint row ranges of the buffer, which outlives them.
unsafe impl<T> Sync for SharedOut<T> {}

impl NormOp {
    fn run<T: Lane + Default + Send + Sync>(
        &self,
        x: &[T],
        weight: &[T],
        bias: Option<&[T]>,
    ) -> Vec<T> {
        let dim = weight.len();
        let rows = x.len() / dim;
        let level = detected_level();
        let mut out = vec![T::default(); x.len()];
        let rows_of = |range: std::ops::Range<usize>, dst: &mut [T]| {
            let src = &x[range.start * dim..range.end * dim];
            if self.center {
                omnicall_kernels::activation::layer_norm(level, src, weight, bias, self.eps, dst);
            } else {
                omnicall_kernels::activation::rms_norm(level, src, weight, self.eps, dst);
            }
        };
        let items = rows.div_ceil(ROWS_PER_ITEM);
        if items <= 1 {
            rows_of(0..rows, &mut out);
            return out;
        }
        let shared = SharedOut(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let shared = &shared;
            let first = range.start * ROWS_PER_ITEM;
            let last = (range.end * ROWS_PER_ITEM).min(rows);
            // SAFETY: rows [first, last) are this item's alone; `out` outlives the pool's work.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(shared.0.add(first * dim), (last - first) * dim)
            };
            rows_of(first..last, dst);
        });
        out
    }

    fn cpu(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let copy;
        let (x, (start, end)) = match x_layout.contiguous_offsets() {
            Some(offsets) => (x, offsets),
            None => {
                copy = x.to_dtype(x_layout, x.dtype())?;
                (&copy, (0, x_layout.shape().elem_count()))
            }
        };
        let contiguous = |l: &Layout| -> Result<(usize, usize)> {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::msg(format!("{}: weights must be contiguous", self.name()))
            })
        };
        let (w0, w1) = contiguous(weight_layout)?;
        let (b0, b1) = match bias {
            Some((_, l)) => contiguous(l)?,
            None => (w0, w1),
        };
        let dim = x_layout.dims().last().copied().unwrap_or(0);
        if dim == 0 || w1 - w0 != dim || b1 - b0 != dim {
            candle_core::bail!(
                "{}: rows of {dim} values need a weight and bias of {dim}, got {} and {}",
                self.name(),
                w1 - w0,
                b1 - b0
            );
        }
        let out = match (x, weight, bias.map(|(b, _)| b)) {
            (CpuStorage::F32(x), CpuStorage::F32(w), None) => {
                CpuStorage::F32(self.run(&x[start..end], &w[w0..w1], None))
            }
            (CpuStorage::F32(x), CpuStorage::F32(w), Some(CpuStorage::F32(b))) => {
                CpuStorage::F32(self.run(&x[start..end], &w[w0..w1], Some(&b[b0..b1])))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), None) => {
                CpuStorage::BF16(self.run::<bf16>(&x[start..end], &w[w0..w1], None))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), Some(CpuStorage::BF16(b))) => {
                CpuStorage::BF16(self.run::<bf16>(&x[start..end], &w[w0..w1], Some(&b[b0..b1])))
            }
            _ => candle_core::bail!(
                "{}: the input, weight and bias must share one dtype (f32 or bf16), got {:?} and {:?}",
                self.name(),
                x.dtype(),
                weight.dtype()
            ),
        };
        Ok((out, x_layout.shape().clone()))
    }

    fn name(&self) -> &'static str {
        if self.center {
            "layer-norm"
        } else {
            "rms-norm"
        }
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(x, x_layout, weight, weight_layout, None)
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(
            x,
            x_layout,
            weight,
            weight_layout,
            Some((bias, bias_layout)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff as max_diff;
    use candle_core::Device;

    /// Both norms equal candle's on f32 and bf16, contiguous and strided, over one row and
    /// over more rows than one work item.
    #[test]
    fn norms_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, dim) in [(1, 7), (3, 33), (5 * ROWS_PER_ITEM + 3, 64)] {
            let x = (Tensor::randn(0f32, 2.0, (dim, rows), &dev)?.t()? + 0.5)?;
            let w = Tensor::randn(1f32, 0.3, dim, &dev)?;
            let b = Tensor::randn(0f32, 0.3, dim, &dev)?;
            for dtype in [DType::F32, DType::BF16] {
                let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 0.04 };
                let ln = LayerNorm::new(w.clone(), b.clone(), 1e-5);
                let want = ln.inner.forward(&x.contiguous()?)?;
                let diff = max_diff(&ln.forward(&x)?, &want)?;
                assert!(
                    diff <= tolerance,
                    "layer norm {dtype:?} {rows}x{dim}: {diff}"
                );
                let rms = RmsNorm::new(w.clone(), 1e-6);
                let want = rms.inner.forward(&x.contiguous()?)?;
                let diff = max_diff(&rms.forward(&x)?, &want)?;
                assert!(diff <= tolerance, "rms norm {dtype:?} {rows}x{dim}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn mixed_dtypes_are_refused_by_name() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 4), DType::F32, &dev)?;
        let w = Tensor::ones(4, DType::BF16, &dev)?;
        let op = NormOp {
            eps: 1e-6,
            center: false,
        };
        let err = x.apply_op2_no_bwd(&w, &op).expect_err("mixed dtypes");
        assert!(err.to_string().contains("rms-norm"), "{err}");
        Ok(())
    }
}
