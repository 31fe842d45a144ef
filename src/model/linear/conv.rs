//! One-dimensional convolutions as matrix products: a drop-in for `candle_nn::Conv1d`.
//!
//! candle's CPU conv1d copies the input into an im2col buffer of `k` times its size on one
//! thread, reading it channel by channel across time, runs one product with the output
//! channels-last and copies that back to channels-first, again on one thread. Here, on the CPU
//! in f32, a convolution `y[o, τ] = b[o] + Σ_j Σ_c w[o, c, j] x[c, s τ + d j - p]` is `k`
//! products accumulated into one channels-first output: tap `j` multiplies the weight's
//! `[out, in]` slice at `j` (a strided view of the weight, no copy) by the zero-padded input
//! shifted by `d j` (a strided view too). gemm packs both views itself, on candle's threads.
//! The output starts as the bias. Other devices, dtypes and grouped convolutions take
//! candle's conv1d.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv1dConfig, VarBuilder};

use super::{Kernels, kernels};

/// `candle_nn::Conv1d` with the CPU product above.
#[derive(Debug, Clone)]
pub struct Conv1d {
    inner: candle_nn::Conv1d,
    /// `(out,)`: the bias, zeros for a convolution without one (the CPU product starts from it).
    bias_or_zeros: Tensor,
}

impl Conv1d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv1dConfig) -> Result<Self> {
        let out_channels = weight.dim(0)?;
        let bias_or_zeros = match &bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(out_channels, weight.dtype(), weight.device())?,
        };
        Ok(Self {
            inner: candle_nn::Conv1d::new(weight, bias, config),
            bias_or_zeros,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub fn config(&self) -> &Conv1dConfig {
        self.inner.config()
    }

    /// Whether `x` takes the CPU product of this module.
    fn takes_cpu_product(&self, x: &Tensor) -> bool {
        let w = self.inner.weight();
        kernels() == Kernels::Auto
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && self.inner.config().groups == 1
            && x.rank() == 3
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.takes_cpu_product(x) {
            return self.inner.forward(x);
        }
        let cfg = self.inner.config();
        let op = ConvProduct {
            padding: cfg.padding,
            stride: cfg.stride,
            dilation: cfg.dilation,
        };
        x.apply_op3_no_bwd(self.inner.weight(), &self.bias_or_zeros, &op)
    }
}

/// Like `candle_nn::conv1d`: weight `(out, in, k)` and bias `(out,)`.
pub fn conv1d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv1dConfig,
    vb: VarBuilder,
) -> Result<Conv1d> {
    let inner = candle_nn::conv1d(in_channels, out_channels, kernel_size, cfg, vb)?;
    Conv1d::new(inner.weight().clone(), inner.bias().cloned(), cfg)
}

/// Like `candle_nn::conv1d_no_bias`.
pub fn conv1d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv1dConfig,
    vb: VarBuilder,
) -> Result<Conv1d> {
    let inner = candle_nn::conv1d_no_bias(in_channels, out_channels, kernel_size, cfg, vb)?;
    Conv1d::new(inner.weight().clone(), None, cfg)
}

/// The CPU f32 convolution (input `[B, C, T]`, weight `[O, C, K]`, bias `[O]`) as `K`
/// accumulated products per batch item.
#[derive(Debug, Clone, Copy)]
struct ConvProduct {
    padding: usize,
    stride: usize,
    dilation: usize,
}

/// A contiguous f32 slice of `storage` in `layout`, or a contiguous copy of it.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    copy: &'a mut Vec<f32>,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(all) = storage else {
        candle_core::bail!("conv1d: needs f32, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => {
            let CpuStorage::F32(c) = storage.to_dtype(layout, DType::F32)? else {
                candle_core::bail!("conv1d: copying did not give f32");
            };
            *copy = c;
            Ok(&copy[..])
        }
    }
}

impl CustomOp3 for ConvProduct {
    fn name(&self) -> &'static str {
        "conv1d-taps"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c_in, len) = x_layout.shape().dims3()?;
        let (c_out, w_in, taps) = w_layout.shape().dims3()?;
        let b_len = b_layout.shape().dims1()?;
        if w_in != c_in || b_len != c_out || taps == 0 || self.stride == 0 {
            candle_core::bail!(
                "conv1d: input {:?}, weight {:?}, bias {:?}, stride {}",
                x_layout.shape(),
                w_layout.shape(),
                b_layout.shape(),
                self.stride
            );
        }
        let Self {
            padding,
            stride,
            dilation,
        } = *self;
        let padded_len = len + 2 * padding;
        let reach = dilation * (taps - 1) + 1;
        if padded_len < reach {
            candle_core::bail!(
                "conv1d: input of {len} samples (padding {padding}) is shorter than the kernel's \
                 reach {reach}"
            );
        }
        let out_len = (padded_len - reach) / stride + 1;
        let (mut x_copy, mut w_copy, mut b_copy) = (Vec::new(), Vec::new(), Vec::new());
        let x = contiguous_f32(x, x_layout, &mut x_copy)?;
        let w = contiguous_f32(w, w_layout, &mut w_copy)?;
        let b = contiguous_f32(b, b_layout, &mut b_copy)?;

        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut out = vec![0f32; batch * c_out * out_len];
        let mut padded = vec![0f32; c_in * padded_len];
        for (x_item, out_item) in x
            .chunks_exact(c_in * len)
            .zip(out.chunks_exact_mut(c_out * out_len))
        {
            for (row, src) in padded
                .chunks_exact_mut(padded_len)
                .zip(x_item.chunks_exact(len))
            {
                row[padding..padding + len].copy_from_slice(src);
            }
            for (row, &bias) in out_item.chunks_exact_mut(out_len).zip(b) {
                row.fill(bias);
            }
            for j in 0..taps {
                // SAFETY: lhs (o, c) = w[o, c, j] reads within `c_out x c_in x taps`; rhs
                // (c, τ) = padded[c, stride τ + dilation j] stays within the row, as
                // stride (out_len - 1) + dilation (taps - 1) < padded_len; dst (o, τ) is
                // within `c_out x out_len`.
                unsafe {
                    gemm::gemm(
                        c_out,
                        out_len,
                        c_in,
                        out_item.as_mut_ptr(),
                        1,
                        out_len as isize,
                        true,
                        w.as_ptr().add(j),
                        taps as isize,
                        (c_in * taps) as isize,
                        padded.as_ptr().add(dilation * j),
                        stride as isize,
                        padded_len as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, out_len))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU product against candle's conv1d on odd shapes (one input channel, one tap, a
    /// kernel as long as the padded input, strides, dilations, batches, a strided input).
    #[test]
    fn taps_product_matches_candle_conv1d() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, len, taps, padding, stride, dilation)
            (1, 1, 1, 1, 1, 0, 1, 1),
            (1, 3, 5, 7, 3, 1, 1, 1),
            (2, 7, 4, 33, 5, 2, 1, 3),
            (1, 17, 9, 20, 11, 5, 1, 1),
            (3, 4, 6, 31, 4, 0, 2, 1),
            (1, 5, 3, 9, 7, 1, 3, 1),
            (1, 2, 2, 5, 7, 1, 1, 1),
            (2, 33, 65, 101, 7, 9, 1, 3),
        ];
        for (batch, c_in, c_out, len, taps, padding, stride, dilation) in cases {
            let cfg = Conv1dConfig {
                padding,
                stride,
                dilation,
                ..Default::default()
            };
            let w = Tensor::randn(0f32, 0.3, (c_out, c_in, taps), &dev)?;
            let b = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (batch, c_in, len), &dev)?;
            for bias in [Some(b.clone()), None] {
                let conv = Conv1d::new(w.clone(), bias.clone(), cfg)?;
                let want = candle_nn::Conv1d::new(w.clone(), bias, cfg).forward(&x)?;
                let got = conv.forward(&x)?;
                let diff = (got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{batch} {c_in} {c_out} {len} {taps}: {diff}");
            }
            // A transposed (strided) input takes the same product.
            let xt = Tensor::randn(0f32, 1.0, (batch, len, c_in), &dev)?.transpose(1, 2)?;
            let conv = Conv1d::new(w.clone(), Some(b.clone()), cfg)?;
            let want = candle_nn::Conv1d::new(w.clone(), Some(b.clone()), cfg).forward(&xt)?;
            let diff = (conv.forward(&xt)? - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "strided input: {diff}");
        }
        Ok(())
    }

    /// The BigVGAN convolutions of 1.92 s of audio at 3B shapes against candle's conv1d:
    /// `cargo test --release --lib linear::conv -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing"]
    fn bigvgan_shapes_timing() -> Result<()> {
        let dev = Device::Cpu;
        for (c, t) in [
            (768, 960),
            (384, 2880),
            (192, 5760),
            (96, 11520),
            (48, 23040),
            (24, 46080),
        ] {
            for (k, d) in [(3, 1), (7, 3), (11, 5)] {
                let cfg = Conv1dConfig {
                    padding: (k * d - d) / 2,
                    dilation: d,
                    ..Default::default()
                };
                let w = Tensor::randn(0f32, 0.1, (c, c, k), &dev)?;
                let x = Tensor::randn(0f32, 1.0, (1, c, t), &dev)?;
                let ours = Conv1d::new(w.clone(), None, cfg)?;
                let theirs = candle_nn::Conv1d::new(w, None, cfg);
                let gflop = 2.0 * (c * c * k * t) as f64 / 1e9;
                let rate = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
                    f()?;
                    let start = std::time::Instant::now();
                    f()?;
                    Ok(gflop / start.elapsed().as_secs_f64())
                };
                println!(
                    "C {c} T {t} k {k}: candle {:.1}, per-tap products {:.1} GFLOP/s",
                    rate(&|| theirs.forward(&x))?,
                    rate(&|| ours.forward(&x))?
                );
            }
        }
        Ok(())
    }
}
