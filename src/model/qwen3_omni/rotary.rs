//! Qwen3-Omni's interleaved multimodal rotary embedding (the reference's
//! `recomposition_frequencies`): rotary frequency `i` takes its angle from the height row when
//! `i % 3 == 1` and `i < 3 * mrope_section[1]`, from the width row when `i % 3 == 2` and
//! `i < 3 * mrope_section[2]`, else from the temporal row. Qwen2.5-Omni instead gives each row
//! one contiguous block of frequencies ([`crate::model::thinker::decoder::MultimodalRotary`]).

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct InterleavedMrope {
    /// (1, head_dim / 2) inverse frequencies.
    inv_freq: Tensor,
    /// (3, 1, head_dim / 2): one-hot choice of the position row of every frequency.
    row_of_freq: Tensor,
}

impl InterleavedMrope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        mrope_section: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        if mrope_section.len() != 3 || mrope_section.iter().sum::<usize>() != half {
            candle_core::bail!(
                "mrope_section {mrope_section:?} must have 3 parts summing to head_dim/2 = {half}"
            );
        }
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let row = |i: usize| {
            if i % 3 == 1 && i < 3 * mrope_section[1] {
                1
            } else if i % 3 == 2 && i < 3 * mrope_section[2] {
                2
            } else {
                0
            }
        };
        let one_hot: Vec<f32> = (0..3)
            .flat_map(|r| (0..half).map(move |i| if row(i) == r { 1.0 } else { 0.0 }))
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, half), device)?,
            row_of_freq: Tensor::from_vec(one_hot, (3, 1, half), device)?,
        })
    }

    /// `positions`: (3, seq_len) integer (temporal, height, width) ids. Returns (cos, sin),
    /// each (seq_len, head_dim / 2) in `dtype`, for `candle_nn::rotary_emb::rope`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let positions = positions.to_dtype(DType::F32)?.unsqueeze(2)?; // (3, t, 1)
        let freqs = positions.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?; // (3, t, half)
        // Selecting with a one-hot mask adds exact zeros: the chosen angle is unchanged.
        let freqs = freqs.broadcast_mul(&self.row_of_freq)?.sum(0)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

/// Plain 1-D rotary embedding (Code2Wav's pre-transformer, the code predictor).
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1f32 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?,
        })
    }

    /// Positions `start..start + len`; (cos, sin) each (len, head_dim / 2).
    pub fn cos_sin(&self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let pos = Tensor::arange(start as u32, (start + len) as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_take_their_interleaved_rows() -> Result<()> {
        let dev = Device::Cpu;
        // half = 8, sections [2, 3, 3]: H at 1, 4, 7; W at 2, 5; T elsewhere (0, 3, 6).
        let rope = InterleavedMrope::new(16, 100.0, &[2, 3, 3], &dev)?;
        let pos = Tensor::new(&[[1i64], [2], [3]], &dev)?;
        let (cos, _) = rope.cos_sin(&pos, DType::F32)?;
        let got = cos.flatten_all()?.to_vec1::<f32>()?;
        let rows = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0];
        for (i, (g, p)) in got.iter().zip(rows).enumerate() {
            let w = (p * (1.0 / 100f64.powf(2.0 * i as f64 / 16.0))).cos();
            assert!((*g as f64 - w).abs() < 1e-6, "freq {i}: {g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn equal_rows_are_plain_rope() -> Result<()> {
        let dev = Device::Cpu;
        let mrope = InterleavedMrope::new(16, 1e4, &[2, 3, 3], &dev)?;
        let plain = Rotary::new(16, 1e4, &dev)?;
        let pos = Tensor::arange(5i64, 9, &dev)?
            .unsqueeze(0)?
            .repeat((3, 1))?;
        let (c1, s1) = mrope.cos_sin(&pos, DType::F32)?;
        let (c2, s2) = plain.cos_sin(5, 4, DType::F32)?;
        let diff = (c1 - c2)?.abs()?.max_all()?.to_scalar::<f32>()?
            + (s1 - s2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }
}
