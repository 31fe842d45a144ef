//! The models' activations over f32 or bf16 slices, as straight-line f32 arithmetic the
//! compiler vectorises: candle's calls libm's `erf` or `exp` one value at a time, and for bf16
//! widens and rounds each value on its own.

use half::bf16;

use crate::Level;
use crate::activation::{exp, gelu_tanh};

/// An activation of the models, one value in, one out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    /// `0.5 x (1 + erf(x / √2))`, the exact GELU (PyTorch's `gelu`).
    GeluErf,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// `x / (1 + e^-x)` (SiLU, swish).
    Silu,
}

/// `erfc(z)` for `z >= 0` to about 1.2e-7 relative (Numerical Recipes' `erfcc`, a Chebyshev
/// fit of `ln(erfc(z) / t)` in `t = 1 / (1 + z/2)`), which keeps GELU's tiny negative tail
/// accurate in relative terms.
#[inline(always)]
fn erfc_non_negative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z + poly)
}

/// The exact GELU, `0.5 x erfc(-x / √2)`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let tail = erfc_non_negative(z.abs());
    // erfc(z) = 2 - erfc(-z) for z < 0
    let erfc = if z >= 0.0 { tail } else { 2.0 - tail };
    0.5 * x * erfc
}

/// SiLU, `x / (1 + e^-x)`; `exp` clamps its argument, so the result is finite for any finite x.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// A value the kernels read and write: f32 as is, bf16 widened and rounded in registers.
pub trait Lane: Copy {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Lane for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Lane for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Rounded to nearest, ties to even, NaN kept quiet: what `bf16::from_f32` gives, written
    /// without branches so that it vectorises.
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        let bits = v.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let quiet_nan = (bits >> 16) | 0x40;
        let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
        bf16::from_bits(if is_nan { quiet_nan } else { rounded } as u16)
    }
}

/// `out[i] = op(x[i])`, on the best level of this CPU at or below `level`.
///
/// # Panics
/// When the lengths differ.
pub fn unary<T: Lane>(level: Level, op: Unary, x: &[T], out: &mut [T]) {
    assert_eq!(x.len(), out.len(), "unary: lengths");
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { unary_avx512(op, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { unary_avx2(op, x, out) },
        _ => unary_generic(op, x, out),
    }
}

/// `out[i] = silu(gate[i]) · up[i]`: the gated MLPs' activation and product in one pass.
///
/// # Panics
/// When the lengths differ.
pub fn silu_mul<T: Lane>(level: Level, gate: &[T], up: &[T], out: &mut [T]) {
    assert!(
        gate.len() == up.len() && gate.len() == out.len(),
        "silu_mul: lengths"
    );
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { silu_mul_avx512(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { silu_mul_avx2(gate, up, out) },
        _ => silu_mul_generic(gate, up, out),
    }
}

/// `dst[i] = bf16(src[i] + bias[i])`, or without a bias: a product's f32 sums rounded once,
/// with the bias added before the rounding, as a fused product does.
///
/// # Panics
/// When the lengths differ.
pub fn add_bias_round(level: Level, src: &[f32], bias: Option<&[bf16]>, dst: &mut [bf16]) {
    assert!(
        src.len() == dst.len() && bias.is_none_or(|b| b.len() == src.len()),
        "add_bias_round: lengths"
    );
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { add_bias_round_avx512(src, bias, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { add_bias_round_avx2(src, bias, dst) },
        _ => add_bias_round_generic(src, bias, dst),
    }
}

#[inline(always)]
fn add_bias_round_generic(src: &[f32], bias: Option<&[bf16]>, dst: &mut [bf16]) {
    match bias {
        Some(bias) => {
            for ((d, &s), &b) in dst.iter_mut().zip(src).zip(bias) {
                *d = bf16::narrow(s + b.widen());
            }
        }
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16::narrow(s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn add_bias_round_avx512(src: &[f32], bias: Option<&[bf16]>, dst: &mut [bf16]) {
    add_bias_round_generic(src, bias, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_bias_round_avx2(src: &[f32], bias: Option<&[bf16]>, dst: &mut [bf16]) {
    add_bias_round_generic(src, bias, dst)
}

#[inline(always)]
fn unary_generic<T: Lane>(op: Unary, x: &[T], out: &mut [T]) {
    // One loop per op, so that each is a plain vectorisable map.
    macro_rules! map {
        ($f:expr) => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = T::narrow($f(v.widen()));
            }
        };
    }
    match op {
        Unary::GeluErf => map!(gelu_erf),
        Unary::GeluTanh => map!(gelu_tanh),
        Unary::Silu => map!(silu),
    }
}

#[inline(always)]
fn silu_mul_generic<T: Lane>(gate: &[T], up: &[T], out: &mut [T]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = T::narrow(silu(g.widen()) * u.widen());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unary_avx512<T: Lane>(op: Unary, x: &[T], out: &mut [T]) {
    unary_generic(op, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unary_avx2<T: Lane>(op: Unary, x: &[T], out: &mut [T]) {
    unary_generic(op, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn silu_mul_avx512<T: Lane>(gate: &[T], up: &[T], out: &mut [T]) {
    silu_mul_generic(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2<T: Lane>(gate: &[T], up: &[T], out: &mut [T]) {
    silu_mul_generic(gate, up, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(op: Unary, x: f32) -> f32 {
        match op {
            Unary::GeluErf => gelu_erf(x),
            Unary::GeluTanh => gelu_tanh(x),
            Unary::Silu => silu(x),
        }
    }

    fn inputs() -> Vec<f32> {
        (-3000..3000)
            .map(|i| i as f32 * 0.005)
            .chain([-100.0, -30.0, -9.5, 9.5, 30.0, 100.0, 0.0, -0.0, 1e-30])
            .collect()
    }

    /// `erfc(z)` for `z >= 0` in f64: the asymptotic series past 3, else `1 - erf` by its
    /// Taylor series (no cancellation worth the name there), far more precise than f32.
    fn erfc_f64(z: f64) -> f64 {
        if z > 3.0 {
            let mut term = 1.0;
            let mut sum = 1.0;
            for n in 1..12 {
                term *= -((2 * n - 1) as f64) / (2.0 * z * z);
                sum += term;
            }
            return (-z * z).exp() / (z * std::f64::consts::PI.sqrt()) * sum;
        }
        let mut term = z;
        let mut sum = z;
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
    }

    fn want(op: Unary, x: f32) -> f64 {
        let v = x as f64;
        match op {
            Unary::GeluErf => {
                let z = v.abs() / std::f64::consts::SQRT_2;
                // 0.5 v (1 + erf(v / √2)), written through erfc to keep the negative tail
                if v >= 0.0 {
                    0.5 * v * (2.0 - erfc_f64(z))
                } else {
                    0.5 * v * erfc_f64(z)
                }
            }
            Unary::GeluTanh => {
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3));
                0.5 * v * (1.0 + inner.tanh())
            }
            Unary::Silu => v / (1.0 + (-v).exp()),
        }
    }

    #[test]
    fn f32_activations_match_their_definitions_on_every_level() {
        let x = inputs();
        for op in [Unary::GeluErf, Unary::GeluTanh, Unary::Silu] {
            for level in Level::ALL {
                let mut out = vec![f32::NAN; x.len()];
                unary(level, op, &x, &mut out);
                for (&v, &got) in x.iter().zip(&out) {
                    let want = want(op, v);
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{level:?} {op:?}({v}) = {got}, want {want}"
                    );
                    assert_eq!(got, apply(op, v), "{level:?} {op:?}({v}): levels agree");
                }
            }
        }
    }

    #[test]
    fn gelu_erf_keeps_the_negative_tail_in_relative_terms() {
        for x in [-3.0f32, -5.0, -8.0, -10.0] {
            let (got, want) = (gelu_erf(x) as f64, want(Unary::GeluErf, x));
            assert!(
                ((got - want) / want).abs() < 1e-5,
                "gelu({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
            // exactly halfway between two bf16 values, both parities
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        for v in inputs().into_iter().map(|v| v * 1.37).chain(specials) {
            assert_eq!(
                bf16::narrow(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{v}"
            );
        }
        assert!(bf16::narrow(f32::NAN).is_nan());
    }

    #[test]
    fn add_bias_round_adds_in_f32_then_rounds_once() {
        let src: Vec<f32> = (0..77).map(|i| (i as f32 * 0.31).sin() * 5.0).collect();
        let bias: Vec<bf16> = (0..77).map(|i| bf16::from_f32(i as f32 * 0.01)).collect();
        for level in Level::ALL {
            let mut dst = vec![bf16::ZERO; src.len()];
            add_bias_round(level, &src, Some(&bias), &mut dst);
            for i in 0..src.len() {
                assert_eq!(
                    dst[i],
                    bf16::from_f32(src[i] + bias[i].to_f32()),
                    "{level:?} {i}"
                );
            }
            add_bias_round(level, &src, None, &mut dst);
            for i in 0..src.len() {
                assert_eq!(dst[i], bf16::from_f32(src[i]), "{level:?} {i}");
            }
        }
    }

    #[test]
    fn bf16_activations_and_silu_mul_round_the_f32_result() {
        let x: Vec<bf16> = inputs().into_iter().map(bf16::from_f32).collect();
        let up: Vec<bf16> = (0..x.len())
            .map(|i| bf16::from_f32((i as f32 * 0.01).sin() * 2.0))
            .collect();
        for level in Level::ALL {
            let mut out = vec![bf16::ZERO; x.len()];
            unary(level, Unary::GeluErf, &x, &mut out);
            for (&v, &got) in x.iter().zip(&out) {
                assert_eq!(
                    got,
                    bf16::from_f32(gelu_erf(v.to_f32())),
                    "{level:?} gelu({v})"
                );
            }
            silu_mul(level, &x, &up, &mut out);
            for ((&g, &u), &got) in x.iter().zip(&up).zip(&out) {
                let want = bf16::from_f32(silu(g.to_f32()) * u.to_f32());
                assert_eq!(got, want, "{level:?} silu({g}) * {u}");
            }
        }
    }
}
