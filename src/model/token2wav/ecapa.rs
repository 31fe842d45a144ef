//! The ECAPA-TDNN speaker encoder inside the DiT (`ECAPA_TimeDelayNet` of the reference, at
//! `token2wav.code2wav_dit_model.input_embed.spk_encoder`): it turns a reference log-mel
//! `[B, T, mel_dim]` into one speaker vector `[B, enc_dim]`.
//!
//! Every convolution is `padding="same"` with **reflect** padding. The network: a TDNN layer,
//! SE-Res2Net blocks with residuals, multi-layer feature aggregation (MFA) of the blocks'
//! outputs, attentive statistics pooling (ASP) and a final 1x1 convolution.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv1dConfig, VarBuilder};

use crate::model::linear::{Conv1d, conv1d};

use crate::model::config::DiTConfig;

/// Variance floor of the pooling statistics (`AttentiveStatisticsPooling.eps`).
const STATS_EPS: f64 = 1e-12;

/// Pads the last (time) dimension by reflection, like `padding_mode="reflect"`.
fn reflect_pad(xs: &Tensor, left: usize, right: usize) -> Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(xs.clone());
    }
    let t = xs.dim(D::Minus1)?;
    if left >= t || right >= t {
        candle_core::bail!(
            "ECAPA: reflect padding ({left}, {right}) needs more than {t} frames of reference mel"
        );
    }
    let idx: Vec<u32> = (0..left)
        .map(|i| (left - i) as u32)
        .chain(0..t as u32)
        .chain((0..right).map(|i| (t - 2 - i) as u32))
        .collect();
    let len = idx.len();
    let idx = Tensor::from_vec(idx, len, xs.device())?;
    xs.contiguous()?.index_select(&idx, D::Minus1)
}

/// `nn.Conv1d(..., padding="same", padding_mode="reflect")`.
#[derive(Debug, Clone)]
struct SameConv1d {
    conv: Conv1d,
    pad_left: usize,
    pad_right: usize,
}

impl SameConv1d {
    fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv1dConfig {
            dilation,
            ..Default::default()
        };
        let conv = conv1d(in_channels, out_channels, kernel_size, cfg, vb)?;
        // torch "same": total = dilation * (k - 1), the extra frame (if odd) goes right.
        let total = dilation * (kernel_size - 1);
        Ok(Self {
            conv,
            pad_left: total / 2,
            pad_right: total - total / 2,
        })
    }
}

impl Module for SameConv1d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv
            .forward(&reflect_pad(xs, self.pad_left, self.pad_right)?)
    }
}

/// `TimeDelayNetBlock`: same-padded convolution then ReLU.
#[derive(Debug, Clone)]
struct TdnnBlock {
    conv: SameConv1d,
}

impl TdnnBlock {
    fn new(in_c: usize, out_c: usize, k: usize, dilation: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: SameConv1d::new(in_c, out_c, k, dilation, vb.pp("conv"))?,
        })
    }
}

impl Module for TdnnBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)?.relu()
    }
}

/// `Res2NetBlock`: the channels split in `scale` parts; part 0 passes through, part i > 0 goes
/// through TDNN block i-1 after adding the previous part's output (from part 2 on).
#[derive(Debug, Clone)]
struct Res2NetBlock {
    blocks: Vec<TdnnBlock>,
    scale: usize,
}

impl Res2NetBlock {
    fn new(
        channels: usize,
        scale: usize,
        k: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if scale == 0 || !channels.is_multiple_of(scale) {
            candle_core::bail!(
                "ECAPA: channels {channels} not divisible by enc_res2net_scale {scale}"
            );
        }
        let part = channels / scale;
        let blocks = (0..scale - 1)
            .map(|i| TdnnBlock::new(part, part, k, dilation, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks, scale })
    }
}

impl Module for Res2NetBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let parts = xs.chunk(self.scale, 1)?;
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.scale);
        for (i, part) in parts.iter().enumerate() {
            let out = match i {
                0 => part.clone(),
                1 => self.blocks[0].forward(part)?,
                _ => self.blocks[i - 1].forward(&(part + &outputs[i - 1])?)?,
            };
            outputs.push(out);
        }
        Tensor::cat(&outputs, 1)
    }
}

/// `SqueezeExcitationBlock`: channel gates from the time-mean.
#[derive(Debug, Clone)]
struct SqueezeExcitation {
    conv1: SameConv1d,
    conv2: SameConv1d,
}

impl SqueezeExcitation {
    fn new(channels: usize, se_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: SameConv1d::new(channels, se_channels, 1, 1, vb.pp("conv1"))?,
            conv2: SameConv1d::new(se_channels, channels, 1, 1, vb.pp("conv2"))?,
        })
    }
}

impl Module for SqueezeExcitation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let s = xs.mean_keepdim(2)?;
        let s = self.conv1.forward(&s)?.relu()?;
        let s = candle_nn::ops::sigmoid(&self.conv2.forward(&s)?)?;
        xs.broadcast_mul(&s)
    }
}

/// `SqueezeExcitationRes2NetBlock`: TDNN(1x1) - Res2Net - TDNN(1x1) - SE, plus the residual.
#[derive(Debug, Clone)]
struct SeRes2NetBlock {
    tdnn1: TdnnBlock,
    res2net: Res2NetBlock,
    tdnn2: TdnnBlock,
    se: SqueezeExcitation,
}

impl SeRes2NetBlock {
    fn new(cfg: &DiTConfig, i: usize, vb: VarBuilder) -> Result<Self> {
        let (in_c, out_c) = (cfg.enc_channels[i - 1], cfg.enc_channels[i]);
        if in_c != out_c {
            candle_core::bail!(
                "ECAPA: SE-Res2Net block {i} maps {in_c} to {out_c} channels, but its residual needs equal counts"
            );
        }
        Ok(Self {
            tdnn1: TdnnBlock::new(in_c, out_c, 1, 1, vb.pp("tdnn1"))?,
            res2net: Res2NetBlock::new(
                out_c,
                cfg.enc_res2net_scale,
                cfg.enc_kernel_sizes[i],
                cfg.enc_dilations[i],
                vb.pp("res2net_block"),
            )?,
            tdnn2: TdnnBlock::new(out_c, out_c, 1, 1, vb.pp("tdnn2"))?,
            se: SqueezeExcitation::new(out_c, cfg.enc_se_channels, vb.pp("se_block"))?,
        })
    }
}

impl Module for SeRes2NetBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.tdnn1.forward(xs)?;
        let h = self.res2net.forward(&h)?;
        let h = self.tdnn2.forward(&h)?;
        self.se.forward(&h)? + xs
    }
}

/// Weighted mean and standard deviation over time: `w` `[B, 1 or C, T]` sums to 1 over T.
fn weighted_stats(xs: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = xs.broadcast_mul(w)?.sum_keepdim(2)?;
    let var = xs
        .broadcast_sub(&mean)?
        .sqr()?
        .broadcast_mul(w)?
        .sum_keepdim(2)?;
    let std = var.clamp(STATS_EPS, f64::INFINITY)?.sqrt()?;
    Ok((mean, std))
}

/// `AttentiveStatisticsPooling`: attention over time from (features, global mean, global std),
/// then the attention-weighted mean and std, concatenated: `[B, 2C, 1]`.
#[derive(Debug, Clone)]
struct AttentiveStatsPooling {
    tdnn: TdnnBlock,
    conv: SameConv1d,
}

impl AttentiveStatsPooling {
    fn new(channels: usize, attention_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            tdnn: TdnnBlock::new(channels * 3, attention_channels, 1, 1, vb.pp("tdnn"))?,
            conv: SameConv1d::new(attention_channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }
}

impl Module for AttentiveStatsPooling {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let t = xs.dim(2)?;
        // Uniform weights 1/T (the reference's all-ones length mask divided by its total).
        let uniform =
            Tensor::full(1f32 / t as f32, (1, 1, t), xs.device())?.to_dtype(xs.dtype())?;
        let (mean, std) = weighted_stats(xs, &uniform)?;
        let dims = xs.dims();
        let ctx = Tensor::cat(
            &[
                xs.clone(),
                mean.broadcast_as(dims)?,
                std.broadcast_as(dims)?,
            ],
            1,
        )?;
        let att = self.conv.forward(&self.tdnn.forward(&ctx)?.tanh()?)?;
        let att =
            candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())?;
        let (mean, std) = weighted_stats(xs, &att)?;
        Tensor::cat(&[mean, std], 1)
    }
}

/// `ECAPA_TimeDelayNet`, the DiT's speaker encoder.
#[derive(Debug, Clone)]
pub struct EcapaTdnn {
    first: TdnnBlock,
    blocks: Vec<SeRes2NetBlock>,
    mfa: TdnnBlock,
    asp: AttentiveStatsPooling,
    fc: SameConv1d,
    mel_dim: usize,
}

impl EcapaTdnn {
    /// `vb` at `...input_embed.spk_encoder`.
    pub fn new(cfg: &DiTConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.enc_channels.len();
        if n < 2 || cfg.enc_kernel_sizes.len() != n || cfg.enc_dilations.len() != n {
            candle_core::bail!(
                "ECAPA: enc_channels ({n}), enc_kernel_sizes ({}) and enc_dilations ({}) must have the same length >= 2",
                cfg.enc_kernel_sizes.len(),
                cfg.enc_dilations.len()
            );
        }
        let first = TdnnBlock::new(
            cfg.mel_dim,
            cfg.enc_channels[0],
            cfg.enc_kernel_sizes[0],
            cfg.enc_dilations[0],
            vb.pp("blocks").pp(0),
        )?;
        let blocks = (1..n - 1)
            .map(|i| SeRes2NetBlock::new(cfg, i, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let last = cfg.enc_channels[n - 1];
        let aggregated: usize = cfg.enc_channels[1..n - 1].iter().sum();
        if aggregated != last {
            candle_core::bail!(
                "ECAPA: the MFA input ({aggregated} = sum of enc_channels[1..-1]) must equal enc_channels[-1] ({last})"
            );
        }
        let mfa = TdnnBlock::new(
            last,
            last,
            cfg.enc_kernel_sizes[n - 1],
            cfg.enc_dilations[n - 1],
            vb.pp("mfa"),
        )?;
        let asp = AttentiveStatsPooling::new(last, cfg.enc_attention_channels, vb.pp("asp"))?;
        let fc = SameConv1d::new(last * 2, cfg.enc_dim, 1, 1, vb.pp("fc"))?;
        Ok(Self {
            first,
            blocks,
            mfa,
            asp,
            fc,
            mel_dim: cfg.mel_dim,
        })
    }
}

impl Module for EcapaTdnn {
    /// `ref_mel` `[B, T, mel_dim]` -> speaker vector `[B, enc_dim]`.
    fn forward(&self, ref_mel: &Tensor) -> Result<Tensor> {
        let (_, _, mel) = ref_mel.dims3()?;
        if mel != self.mel_dim {
            candle_core::bail!(
                "ECAPA: reference mel has {mel} bins, the model expects mel_dim = {}",
                self.mel_dim
            );
        }
        let mut h = self
            .first
            .forward(&ref_mel.transpose(1, 2)?.contiguous()?)?;
        let mut outs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = block.forward(&h)?;
            outs.push(h.clone());
        }
        let h = self.mfa.forward(&Tensor::cat(&outs, 1)?)?;
        let pooled = self.asp.forward(&h)?;
        self.fc.forward(&pooled)?.squeeze(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reflect_pad_mirrors_without_repeating_the_edge() -> Result<()> {
        let x = Tensor::new(&[[[0f32, 1., 2., 3., 4.]]], &Device::Cpu)?;
        let y = reflect_pad(&x, 2, 3)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![2., 1., 0., 1., 2., 3., 4., 3., 2., 1.]
        );
        assert!(reflect_pad(&x, 5, 0).is_err());
        Ok(())
    }
}
