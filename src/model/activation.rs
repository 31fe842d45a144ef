//! The models' activations with the CPU kernels of `omnicall_kernels::unary` where they apply
//! (f32 or bf16 on the CPU, [`Kernels::Auto`]), candle's ops everywhere else (CUDA, other
//! dtypes, [`Kernels::Generic`]).
//!
//! candle runs exact GELU through libm's `erf` and SiLU through `exp`, one value at a time,
//! and for bf16 widens and rounds each value apart: about a fifth of the bf16 audio encoder's
//! time. The kernels are vectorised, split over candle's pool, and compute in f32 whatever the
//! storage, rounding once, as candle does.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use candle_nn::Activation;
use half::bf16;
use omnicall_kernels::unary::{Lane, Unary};

use super::linear::{Kernels, detected_level, kernels};

/// Values per work item: small enough to split a block's activations over the pool, large
/// enough that a work item outweighs its dispatch.
const CHUNK: usize = 1 << 14;

/// Whether the CPU kernels take tensors like `x`.
fn applies(x: &Tensor) -> bool {
    kernels() == Kernels::Auto
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// `act(x)`: GELU (exact or tanh) and SiLU through the kernels, the other activations through
/// candle.
pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    let unary = match act {
        Activation::Gelu => Unary::GeluErf,
        Activation::NewGelu | Activation::GeluPytorchTanh => Unary::GeluTanh,
        Activation::Silu => Unary::Silu,
        other => return candle_core::Module::forward(&other, x),
    };
    if applies(x) {
        x.apply_op1_no_bwd(&UnaryOp(unary))
    } else {
        candle_core::Module::forward(&act, x)
    }
}

/// The exact GELU (`Tensor::gelu_erf`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    apply(Activation::Gelu, x)
}

/// GELU, tanh approximation (`Tensor::gelu`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    apply(Activation::GeluPytorchTanh, x)
}

/// SiLU (`candle_nn::ops::silu`).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    apply(Activation::Silu, x)
}

/// `silu(gate) * up` of the gated MLPs, one pass over both on the CPU.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if applies(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        gate.apply_op2_no_bwd(up, &SiluMul)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// The output buffer, shared by the work items: each writes only its own values.
struct SharedOut<T>(*mut T);
// SAFETY: the work items write disjoint ranges of the buffer, which outlives them.
unsafe impl<T> Sync for SharedOut<T> {}

/// `f(input range, output)` over `len` values in [`CHUNK`]s on candle's pool (inline when one
/// chunk), into a fresh buffer.
fn map_chunks<T: Lane + Default + Send>(
    len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); len];
    let chunks = len.div_ceil(CHUNK);
    if chunks <= 1 {
        f(0..len, &mut out);
        return out;
    }
    let shared = SharedOut(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        let shared = &shared;
        let start = range.start * CHUNK;
        let end = (range.end * CHUNK).min(len);
        // SAFETY: values [start, end) are this item's alone; `out` outlives the pool's work.
        let dst = unsafe { std::slice::from_raw_parts_mut(shared.0.add(start), end - start) };
        f(start..end, dst);
    });
    out
}

/// `storage` as contiguous storage with its first and last value: itself where it is, else a
/// copy in logical order.
fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    copy: &'a mut Option<CpuStorage>,
) -> Result<(&'a CpuStorage, usize, usize)> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok((storage, start, end));
    }
    let copied = copy.insert(storage.to_dtype(layout, storage.dtype())?);
    Ok((copied, 0, layout.shape().elem_count()))
}

#[derive(Debug, Clone, Copy)]
struct UnaryOp(Unary);

impl CustomOp1 for UnaryOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Unary::GeluErf => "gelu-erf",
            Unary::GeluTanh => "gelu-tanh",
            Unary::Silu => "silu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Lane + Default + Send + Sync>(op: Unary, x: &[T]) -> Vec<T> {
            let level = detected_level();
            map_chunks(x.len(), |range, dst| {
                omnicall_kernels::unary::unary(level, op, &x[range], dst)
            })
        }
        let mut copy = None;
        let out = match contiguous(storage, layout, &mut copy)? {
            (CpuStorage::F32(all), a, b) => CpuStorage::F32(run(self.0, &all[a..b])),
            (CpuStorage::BF16(all), a, b) => CpuStorage::BF16(run::<bf16>(self.0, &all[a..b])),
            (other, _, _) => candle_core::bail!(
                "{}: needs f32 or bf16, got {:?}",
                self.name(),
                other.dtype()
            ),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[derive(Debug, Clone, Copy)]
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Lane + Default + Send + Sync>(gate: &[T], up: &[T]) -> Vec<T> {
            let level = detected_level();
            map_chunks(gate.len(), |range, dst| {
                omnicall_kernels::unary::silu_mul(level, &gate[range.clone()], &up[range], dst)
            })
        }
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ in shape",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let (mut gate_copy, mut up_copy) = (None, None);
        let gate = contiguous(gate, gate_layout, &mut gate_copy)?;
        let up = contiguous(up, up_layout, &mut up_copy)?;
        let out = match (gate, up) {
            ((CpuStorage::F32(g), ga, gb), (CpuStorage::F32(u), ua, ub)) => {
                CpuStorage::F32(run(&g[ga..gb], &u[ua..ub]))
            }
            ((CpuStorage::BF16(g), ga, gb), (CpuStorage::BF16(u), ua, ub)) => {
                CpuStorage::BF16(run::<bf16>(&g[ga..gb], &u[ua..ub]))
            }
            ((g, _, _), (u, _, _)) => candle_core::bail!(
                "silu-mul: needs two f32 or two bf16 tensors, got {:?} and {:?}",
                g.dtype(),
                u.dtype()
            ),
        };
        Ok((out, gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff as max_diff;
    use candle_core::Device;

    /// Each activation equals candle's on f32 (to the kernels' accuracy) and bf16 (to one
    /// rounding), on contiguous, strided and multi-chunk inputs.
    #[test]
    fn activations_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for len in [1, 37, 3 * CHUNK + 5] {
            let x = (Tensor::randn(0f32, 3.0, (2, len), &dev)?).t()?;
            for act in [
                Activation::Gelu,
                Activation::GeluPytorchTanh,
                Activation::Silu,
            ] {
                let want = candle_core::Module::forward(&act, &x)?;
                let got = apply(act, &x)?;
                assert_eq!(got.dims(), want.dims());
                assert!(max_diff(&got, &want)? < 1e-5, "{act:?} f32, {len}");
                let xb = x.to_dtype(DType::BF16)?;
                let want = candle_core::Module::forward(&act, &xb)?;
                let got = apply(act, &xb)?;
                assert_eq!(got.dtype(), DType::BF16);
                // one bf16 step of values up to ~10
                assert!(max_diff(&got, &want)? <= 0.0625, "{act:?} bf16, {len}");
            }
        }
        Ok(())
    }

    #[test]
    fn silu_mul_matches_candle_and_refuses_mixed_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        for len in [3, 2 * CHUNK + 1] {
            let gate = Tensor::randn(0f32, 3.0, (2, len), &dev)?;
            let up = Tensor::randn(0f32, 1.0, (2, len), &dev)?;
            let want = (candle_nn::ops::silu(&gate)? * &up)?;
            assert!(max_diff(&silu_mul(&gate, &up)?, &want)? < 1e-5);
            let (gb, ub) = (gate.to_dtype(DType::BF16)?, up.to_dtype(DType::BF16)?);
            // one rounding of the f32 result on the rounded inputs
            let (gf, uf) = (gb.to_dtype(DType::F32)?, ub.to_dtype(DType::F32)?);
            let want = (candle_nn::ops::silu(&gf)? * &uf)?;
            let got = silu_mul(&gb, &ub)?.to_dtype(DType::F32)?;
            let relative = ((got - &want)?.abs()? / (want.abs()? + 1.0)?)?;
            let worst = relative.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(worst <= 1.0 / 256.0, "bf16 silu_mul: {worst}");
            let err = gate
                .apply_op2_no_bwd(&ub, &SiluMul)
                .expect_err("mixed dtypes");
            assert!(err.to_string().contains("silu-mul"), "{err}");
        }
        Ok(())
    }
}
