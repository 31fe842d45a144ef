//! Random weights of the exact published shapes, generated in memory as the model asks for them.
//!
//! Speed is measured at full size with random weights: a matmul costs the same whatever the
//! values, so a `VarBuilder` over this backend builds the real 3B/7B networks from their
//! `config.json` without any checkpoint file. Values are scaled like a trained network's
//! (matrices ~ U with variance 1/fan_in, norm gains 1, biases 0) so activations stay finite.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

/// A backend that answers every tensor request with fresh random values of the asked shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomWeights;

impl RandomWeights {
    /// A `VarBuilder` over random weights, like `VarBuilder::from_mmaped_safetensors` over a
    /// checkpoint.
    pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hint: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let dims = shape.dims().to_vec();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        match (dims.len(), hint) {
            // Vectors fetched without a hint: norm gains are 1, everything else (biases,
            // SnakeBeta log-scales) 0.
            (0 | 1, Init::Const(_)) if leaf == "weight" => Tensor::ones(shape, dtype, device),
            (0 | 1, Init::Const(v)) => (Tensor::ones(shape, dtype, device)? * v)?.to_dtype(dtype),
            (0 | 1, _) => Tensor::zeros(shape, dtype, device),
            _ => {
                // Matrices and kernels: uniform with variance 1/fan_in.
                let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
                let bound = (3.0 / fan_in as f64).sqrt();
                let uniform = Tensor::rand(-bound as f32, bound as f32, shape, device)?;
                uniform.to_dtype(dtype)
            }
        }
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}: ask with a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_scales_follow_the_request() -> Result<()> {
        let vb = RandomWeights::var_builder(DType::F32, &Device::Cpu);
        let lin = candle_nn::linear(256, 64, vb.pp("proj"))?;
        assert_eq!(lin.weight().dims(), &[64, 256]);
        let w = lin.weight().flatten_all()?.to_vec1::<f32>()?;
        let bound = (3.0f32 / 256.0).sqrt();
        assert!(w.iter().all(|x| x.abs() <= bound));
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        assert!(
            (var * 256.0 - 1.0).abs() < 0.1,
            "variance x fan_in = {}",
            var * 256.0
        );
        let norm = vb.get(64, "norm.weight")?.to_vec1::<f32>()?;
        assert!(norm.iter().all(|&x| x == 1.0));
        let bias = vb.get(64, "proj.bias")?.to_vec1::<f32>()?;
        assert!(bias.iter().all(|&x| x == 0.0));
        Ok(())
    }
}
