//! int8 weights: a Linear whose weight is candle's Q8_0 (blocks of 32 int8 values with one f16
//! scale), multiplied through candle's `QMatMul`. On a CPU with AVX512-VNNI or AVX-VNNI candle
//! repacks the weight into 16-row tiles and quantises the activations to int8 per 256 values
//! (`vpdpbusd` dot products), but only when k is a multiple of 256 and n of 16; elsewhere it runs
//! a per-row loop several times slower. So the weight is stored zero-padded to those multiples,
//! the input is zero-padded along k, and the padded output columns are dropped: zeros add
//! nothing to the sums, the product is that of the unpadded weight.
//!
//! The format is chosen when the model is built ([`with_weight_format`] around the loading, or
//! [`set_weight_format`] for the whole process): every Linear built by [`super::linear`] and
//! [`super::linear_no_bias`] then quantises its weight and keeps no float copy.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Module, Result, Tensor};

/// Values per row block of candle's repacked int8 kernels (its `QK_K`).
const K_MULTIPLE: usize = 256;
/// Output rows per tile of candle's repacked int8 kernels.
const N_MULTIPLE: usize = 16;

/// How the weights of the Linears built from a `VarBuilder` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As loaded, in the model's dtype.
    #[default]
    Dense,
    /// Q8_0 int8 blocks (CPU only).
    Q8,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "dense" | "" => Ok(Self::Dense),
            "q8" => Ok(Self::Q8),
            other => Err(format!("unknown weight format {other:?}: use dense or q8")),
        }
    }
}

static PROCESS_FORMAT: OnceLock<WeightFormat> = OnceLock::new();

thread_local! {
    /// [`with_weight_format`]'s choice while it runs on this thread.
    static SCOPED_FORMAT: Cell<Option<WeightFormat>> = const { Cell::new(None) };
}

/// Chooses the weight format for the whole process, before the model is built; later calls
/// keep the first choice (returned).
pub fn set_weight_format(format: WeightFormat) -> WeightFormat {
    *PROCESS_FORMAT.get_or_init(|| format)
}

/// The format Linears built now on this thread get: [`with_weight_format`]'s, else
/// [`set_weight_format`]'s, else dense.
pub fn weight_format() -> WeightFormat {
    SCOPED_FORMAT
        .get()
        .or_else(|| PROCESS_FORMAT.get().copied())
        .unwrap_or_default()
}

/// Runs `build` with the Linears it builds on this thread in `format` (the parity tests build
/// a q8 model beside f32 ones in the same process).
pub fn with_weight_format<R>(format: WeightFormat, build: impl FnOnce() -> R) -> R {
    struct Restore(Option<WeightFormat>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED_FORMAT.set(self.0);
        }
    }
    let _restore = Restore(SCOPED_FORMAT.replace(Some(format)));
    build()
}

/// `y = x W^T + b` with W in Q8_0, padded for candle's int8 kernels (see the module docs).
#[derive(Debug, Clone)]
pub struct Q8Linear {
    matmul: QMatMul,
    in_features: usize,
    out_features: usize,
    padded_in: usize,
    padded_out: usize,
    weight_bytes: usize,
    bias: Option<Tensor>,
    /// The dtype the weight was loaded in, for [`Q8Linear::dequantized_weight`].
    dtype: DType,
    dequantized: Arc<OnceLock<Tensor>>,
}

impl Q8Linear {
    /// Quantises `weight` `(out_features, in_features)`, on the CPU.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        if !weight.device().is_cpu() {
            candle_core::bail!(
                "q8 weights run on the CPU only; this weight is on {:?}",
                weight.device()
            );
        }
        let (out_features, in_features) = weight.dims2()?;
        let padded_in = in_features.next_multiple_of(K_MULTIPLE);
        let padded_out = out_features.next_multiple_of(N_MULTIPLE);
        let padded = weight
            .to_dtype(DType::F32)?
            .pad_with_zeros(1, 0, padded_in - in_features)?
            .pad_with_zeros(0, 0, padded_out - out_features)?;
        let quantized = QTensor::quantize(&padded, GgmlDType::Q8_0)?;
        let weight_bytes = quantized.storage_size_in_bytes();
        Ok(Self {
            matmul: QMatMul::from_qtensor(quantized)?,
            in_features,
            out_features,
            padded_in,
            padded_out,
            weight_bytes,
            bias,
            dtype: weight.dtype(),
            dequantized: Arc::new(OnceLock::new()),
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Bytes of the quantised weight (padding included).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight the product uses, dequantised to the loaded dtype, made on first call (no
    /// float copy is kept otherwise).
    pub fn dequantized_weight(&self) -> Result<&Tensor> {
        if let Some(w) = self.dequantized.get() {
            return Ok(w);
        }
        let QMatMul::QTensor(q) = &self.matmul else {
            candle_core::bail!("q8 linear: the weight is not quantised");
        };
        let w = q
            .dequantize(&candle_core::Device::Cpu)?
            .narrow(0, 0, self.out_features)?
            .narrow(1, 0, self.in_features)?
            .to_dtype(self.dtype)?
            .contiguous()?;
        Ok(self.dequantized.get_or_init(|| w))
    }
}

impl Module for Q8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(D::Minus1)?;
        if k != self.in_features {
            candle_core::bail!(
                "q8 linear: input has {k} features, the weight takes {}",
                self.in_features
            );
        }
        let x = if self.padded_in > k {
            x.pad_with_zeros(D::Minus1, 0, self.padded_in - k)?
        } else {
            x.contiguous()?
        };
        // candle's quantised product takes at least a matrix.
        let y = if x.rank() == 1 {
            self.matmul.forward(&x.unsqueeze(0)?)?.squeeze(0)?
        } else {
            self.matmul.forward(&x)?
        };
        let y = if self.padded_out > self.out_features {
            y.narrow(D::Minus1, 0, self.out_features)?.contiguous()?
        } else {
            y
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Largest |a - b| relative to the largest |b|.
    fn relative_max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(1e-6))
    }

    /// Q8_0 rounds each weight to 1/254 of its block's largest magnitude, and candle's
    /// kernels round the activations to int8 too: about 1 % of the output's scale at most on
    /// random data (the measured figure is in the README).
    const Q8_TOLERANCE: f32 = 0.03;

    /// Values uniform in `-scale..scale` from `seed`: the same every run, so a shape's bound
    /// either holds or fails, not now and then.
    fn uniform(scale: f32, shape: impl Into<candle_core::Shape>, seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let shape = shape.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    #[test]
    fn matches_the_dense_product_on_padded_and_unpadded_shapes() -> Result<()> {
        // k and n below, at and past the kernels' multiples; rank 1, 2 and 3 inputs.
        for (seed, (n, k)) in [(1, 1), (5, 33), (16, 256), (37, 300), (48, 512)]
            .into_iter()
            .enumerate()
        {
            let seed = 3 * seed as u64;
            let w = uniform(0.05, (n, k), seed)?;
            let b = uniform(0.1, n, seed + 1)?;
            let q8 = Q8Linear::new(&w, Some(b.clone()))?;
            let dense = candle_nn::Linear::new(w.clone(), Some(b));
            for shape in [vec![k], vec![3, k], vec![2, 5, k]] {
                let x = uniform(1.0, shape.as_slice(), seed + 2)?;
                let got = q8.forward(&x)?;
                // candle_nn's Linear takes at least a matrix.
                let want = if x.rank() == 1 {
                    dense.forward(&x.unsqueeze(0)?)?.squeeze(0)?
                } else {
                    dense.forward(&x)?
                };
                assert_eq!(got.dims(), want.dims());
                let diff = relative_max_diff(&got, &want)?;
                assert!(diff <= Q8_TOLERANCE, "n {n} k {k} {shape:?}: {diff}");
                // bf16 activations come back in bf16.
                let got = q8.forward(&x.to_dtype(DType::BF16)?)?;
                assert_eq!(got.dtype(), DType::BF16);
                let diff = relative_max_diff(&got, &want)?;
                assert!(
                    diff <= Q8_TOLERANCE + 1.0 / 64.0,
                    "bf16 n {n} k {k}: {diff}"
                );
            }
            let w_back = q8.dequantized_weight()?;
            assert_eq!(w_back.dims(), &[n, k]);
            assert!(relative_max_diff(w_back, &w)? <= 1.0 / 100.0);
        }
        Ok(())
    }

    #[test]
    fn wrong_width_is_an_error() -> Result<()> {
        let w = Tensor::randn(0f32, 0.05, (4, 40), &Device::Cpu)?;
        let q8 = Q8Linear::new(&w, None)?;
        let x = Tensor::zeros((2, 39), DType::F32, &Device::Cpu)?;
        let err = q8.forward(&x).unwrap_err().to_string();
        assert!(err.contains("39") && err.contains("40"), "{err}");
        Ok(())
    }

    #[test]
    fn the_scoped_format_applies_on_its_thread_only_and_is_restored() {
        let outer = weight_format();
        let inside = with_weight_format(WeightFormat::Q8, || {
            let other_thread = std::thread::spawn(weight_format).join().ok();
            (weight_format(), other_thread)
        });
        assert_eq!(inside.0, WeightFormat::Q8);
        assert_eq!(inside.1, Some(outer));
        assert_eq!(weight_format(), outer);
        assert_eq!("Q8".parse::<WeightFormat>(), Ok(WeightFormat::Q8));
        assert!("int4".parse::<WeightFormat>().unwrap_err().contains("int4"));
    }
}
