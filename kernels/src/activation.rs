//! Elementwise functions written as straight-line f32 arithmetic that the compiler vectorises
//! (libm's `expf`/`tanhf` are calls, one lane at a time).

use crate::Level;
use crate::unary::Lane;

/// `e^x` to about 2 f32 ulps: `x = n ln 2 + r` (ln 2 split in two, Cody-Waite), a degree-6
/// polynomial in `r` (|r| <= ln 2 / 2), scaled by `2^n` through the exponent bits. Arguments
/// are clamped to [-87.3, 88.7], so the result stays finite and is at least ~1e-38.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is the low mantissa bits of `shifted` (two's complement within them).
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    f32::from_bits((p.to_bits() as i32).wrapping_add(n_bits << 23) as u32)
}

/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (GELU, tanh approximation), computed as
/// `x / (1 + e^{-2 u})`, the same function.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0173;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }
}

/// `LayerNorm` without affine parameters, then `· one_plus_scale + shift` (the DiT's
/// adaptive norm), for each row of `x` (rows of `one_plus_scale.len()` values). Statistics in
/// f32 as candle's `layer_norm`: mean and mean of squares in one pass.
///
/// # Panics
/// When the lengths do not match.
pub fn modulated_layer_norm(
    level: Level,
    x: &[f32],
    one_plus_scale: &[f32],
    shift: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    layer_norm(level, x, one_plus_scale, Some(shift), eps, out)
}

/// `LayerNorm` over each row of `x` (rows of `weight.len()` values): `(x - mean) / √(var +
/// eps) · weight + bias`, statistics in f32 whatever `T` (as candle's `layer_norm`), one
/// rounding per output value.
///
/// # Panics
/// When the lengths do not match.
pub fn layer_norm<T: Lane>(
    level: Level,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    eps: f32,
    out: &mut [T],
) {
    let dim = weight.len();
    assert!(
        dim > 0
            && bias.is_none_or(|b| b.len() == dim)
            && x.len() == out.len()
            && x.len().is_multiple_of(dim),
        "layer norm: lengths"
    );
    let args = NormArgs {
        x,
        weight,
        bias,
        eps,
        center: true,
    };
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { norm_avx512(args, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { norm_avx2(args, out) },
        _ => norm_generic(args, out),
    }
}

/// `RMSNorm` over each row of `x` (rows of `weight.len()` values): `x / √(mean(x²) + eps) ·
/// weight`, in f32 whatever `T` (as candle's `rms_norm`).
///
/// # Panics
/// When the lengths do not match.
pub fn rms_norm<T: Lane>(level: Level, x: &[T], weight: &[T], eps: f32, out: &mut [T]) {
    let dim = weight.len();
    assert!(
        dim > 0 && x.len() == out.len() && x.len().is_multiple_of(dim),
        "rms norm: lengths"
    );
    let args = NormArgs {
        x,
        weight,
        bias: None,
        eps,
        center: false,
    };
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { norm_avx512(args, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { norm_avx2(args, out) },
        _ => norm_generic(args, out),
    }
}

#[derive(Clone, Copy)]
struct NormArgs<'a, T> {
    x: &'a [T],
    weight: &'a [T],
    bias: Option<&'a [T]>,
    eps: f32,
    /// LayerNorm (subtract the mean) or RMSNorm (do not).
    center: bool,
}

#[inline(always)]
fn norm_generic<T: Lane>(args: NormArgs<T>, out: &mut [T]) {
    const LANES: usize = 16;
    let NormArgs {
        x,
        weight,
        bias,
        eps,
        center,
    } = args;
    let dim = weight.len();
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        // Sums in 16 lanes, so that they vectorise.
        let (mut sum, mut sum2) = ([0f32; LANES], [0f32; LANES]);
        let whole = dim - dim % LANES;
        for chunk in row[..whole].chunks_exact(LANES) {
            for l in 0..LANES {
                let v = chunk[l].widen();
                sum[l] += v;
                sum2[l] += v * v;
            }
        }
        let (mut s, mut s2) = (sum.iter().sum::<f32>(), sum2.iter().sum::<f32>());
        for &v in &row[whole..] {
            let v = v.widen();
            s += v;
            s2 += v * v;
        }
        let (mean, mean2) = (s / dim as f32, s2 / dim as f32);
        let (mean, var) = if center {
            (mean, mean2 - mean * mean)
        } else {
            (0.0, mean2)
        };
        let inv_std = 1.0 / (var + eps).sqrt();
        match bias {
            Some(bias) => {
                for (((o, &v), &a), &b) in dst.iter_mut().zip(row).zip(weight).zip(bias) {
                    *o = T::narrow((v.widen() - mean) * inv_std * a.widen() + b.widen());
                }
            }
            None => {
                for ((o, &v), &a) in dst.iter_mut().zip(row).zip(weight) {
                    *o = T::narrow((v.widen() - mean) * inv_std * a.widen());
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn norm_avx512<T: Lane>(args: NormArgs<T>, out: &mut [T]) {
    norm_generic(args, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_avx2<T: Lane>(args: NormArgs<T>, out: &mut [T]) {
    norm_generic(args, out)
}

/// `out = x + y · gate` for each row of `x` and `y` (rows of `gate.len()` values): the DiT's
/// gated residual.
///
/// # Panics
/// When the lengths do not match.
pub fn gated_residual(level: Level, x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
    let dim = gate.len();
    assert!(
        dim > 0 && x.len() == y.len() && x.len() == out.len() && x.len().is_multiple_of(dim),
        "gated residual: lengths"
    );
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { gated_avx512(x, y, gate, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { gated_avx2(x, y, gate, out) },
        _ => gated_generic(x, y, gate, out),
    }
}

#[inline(always)]
fn gated_generic(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
    let dim = gate.len();
    for ((xr, yr), dst) in x
        .chunks_exact(dim)
        .zip(y.chunks_exact(dim))
        .zip(out.chunks_exact_mut(dim))
    {
        for (((o, &a), &b), &g) in dst.iter_mut().zip(xr).zip(yr).zip(gate) {
            *o = a + b * g;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn gated_avx512(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
    gated_generic(x, y, gate, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_avx2(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
    gated_generic(x, y, gate, out)
}

#[cfg(test)]
mod norm_tests {
    use super::*;

    #[test]
    fn modulated_norm_matches_the_definition_on_every_level() {
        for dim in [1, 7, 16, 33, 1024] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * dim)
                .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
                .collect();
            let scale: Vec<f32> = (0..dim).map(|i| 1.0 + (i as f32 * 0.11).cos()).collect();
            let shift: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.23).sin()).collect();
            for level in Level::ALL {
                let mut out = vec![f32::NAN; x.len()];
                modulated_layer_norm(level, &x, &scale, &shift, 1e-6, &mut out);
                for (r, (row, got)) in x.chunks(dim).zip(out.chunks(dim)).enumerate() {
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                    let var =
                        row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                    for i in 0..dim {
                        let want = (row[i] as f64 - mean) / (var + 1e-6).sqrt() * scale[i] as f64
                            + shift[i] as f64;
                        assert!(
                            (got[i] as f64 - want).abs() < 2e-4,
                            "{level:?} dim {dim} row {r} col {i}: {} vs {want}",
                            got[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rms_norm_and_bf16_layer_norm_match_the_definition_on_every_level() {
        use half::bf16;
        for dim in [1, 7, 33, 1280] {
            let x: Vec<f32> = (0..3 * dim)
                .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
                .collect();
            let w: Vec<f32> = (0..dim).map(|i| 1.0 + (i as f32 * 0.11).cos()).collect();
            let b: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.23).sin()).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
            for level in Level::ALL {
                let mut out = vec![f32::NAN; x.len()];
                rms_norm(level, &x, &w, 1e-6, &mut out);
                let mut out_b = vec![bf16::ZERO; x.len()];
                layer_norm(level, &xb, &wb, Some(&bb), 1e-5, &mut out_b);
                for (r, row) in x.chunks(dim).enumerate() {
                    let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
                    let rowb: Vec<f64> = xb[r * dim..(r + 1) * dim]
                        .iter()
                        .map(|v| v.to_f64())
                        .collect();
                    let mean = rowb.iter().sum::<f64>() / dim as f64;
                    let var = rowb.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
                    for i in 0..dim {
                        let want = row[i] as f64 / (ms + 1e-6).sqrt() * w[i] as f64;
                        let got = out[r * dim + i] as f64;
                        assert!((got - want).abs() < 1e-4, "{level:?} rms {dim} {r} {i}");
                        let want = (rowb[i] - mean) / (var + 1e-5).sqrt() * wb[i].to_f64()
                            + bb[i].to_f64();
                        let got = out_b[r * dim + i].to_f64();
                        // one bf16 rounding of values up to ~10
                        assert!((got - want).abs() <= 0.04, "{level:?} bf16 {dim} {r} {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn gated_residual_on_every_level() {
        let dim = 37;
        let x: Vec<f32> = (0..3 * dim).map(|i| i as f32 * 0.5).collect();
        let y: Vec<f32> = (0..3 * dim).map(|i| (i as f32).sin()).collect();
        let g: Vec<f32> = (0..dim).map(|i| i as f32 - 3.0).collect();
        for level in Level::ALL {
            let mut out = vec![0f32; x.len()];
            gated_residual(level, &x, &y, &g, &mut out);
            for i in 0..x.len() {
                assert_eq!(out[i], x[i] + y[i] * g[i % dim], "{level:?} {i}");
            }
        }
    }
}
