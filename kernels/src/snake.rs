//! BigVGAN's anti-aliased SnakeBeta on one channel: upsample (polyphase FIR, replicate padding),
//! `x + sin²(f x) / m`, downsample (strided FIR, replicate padding), all within a few buffers
//! of the row's length, so that the signal is read once and written once instead of once per
//! elementwise step. Every loop runs over time with the taps outside, which the compiler turns
//! into full-width vector code for the level it is compiled for (AVX-512, AVX2 + FMA, plain).

use crate::Level;

/// The filters and paddings of one anti-aliased activation (shared by every channel).
#[derive(Debug, Clone)]
pub struct SnakeResampler {
    /// Upsampling ratio: output sample `ratio m + p` is phase `p` of input sample `m`.
    pub ratio: usize,
    /// `ratio` rows of `span` taps: `u[ratio m + p] = Σ_s up[p][s] · xp[m + s]`, `xp` the input
    /// with `up_pad` replicated edge samples.
    pub up: Vec<f32>,
    pub span: usize,
    pub up_pad: (usize, usize),
    /// `y[i] = Σ_j down[j] · vp[ratio i + j]`, `vp` the activated upsampled signal with
    /// `down_pad` replicated edge samples.
    pub down: Vec<f32>,
    pub down_pad: (usize, usize),
}

/// Reusable buffers of [`SnakeResampler::run`] (one per thread).
#[derive(Debug, Default)]
pub struct SnakeScratch {
    padded: Vec<f32>,
    phases: Vec<f32>,
    streams: Vec<f32>,
}

impl SnakeResampler {
    /// Output samples of the downsampler for an input of `len` upsampled samples.
    pub fn down_len(&self, len: usize) -> usize {
        let taps = self.down.len();
        (len + self.down_pad.0 + self.down_pad.1).saturating_sub(taps) / self.ratio + 1
    }

    /// One channel: `out[i]` for the `x.len()` input samples of `x`, with `frequency = exp(α)`
    /// and `inverse_magnitude = 1 / (exp(β) + ε)`, on the best level of this CPU at or below
    /// `level`.
    ///
    /// # Panics
    /// When `x` is empty, `out` is not as long as `x`, or the filters do not give one output
    /// per input sample.
    pub fn run(
        &self,
        level: Level,
        x: &[f32],
        frequency: f32,
        inverse_magnitude: f32,
        out: &mut [f32],
        scratch: &mut SnakeScratch,
    ) {
        let t = x.len();
        assert!(t > 0, "anti-aliased snake: empty signal");
        assert_eq!(out.len(), t, "anti-aliased snake: output length");
        assert_eq!(
            self.down_len(self.ratio * t),
            t,
            "anti-aliased snake: filters do not give one output per input sample"
        );
        assert_eq!(self.up.len(), self.ratio * self.span, "upsampler taps");
        assert!(
            self.span <= 1 + self.up_pad.0 + self.up_pad.1,
            "anti-aliased snake: the upsampler reads past its padding"
        );
        let args = (x, frequency, inverse_magnitude);
        match level.or_below() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` returned a level this CPU has.
            Level::Avx512Bf16 => unsafe { self.run_avx512(args, out, scratch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx2Fma => unsafe { self.run_avx2(args, out, scratch) },
            _ => self.run_generic(args, out, scratch),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run_avx512(
        &self,
        args: (&[f32], f32, f32),
        out: &mut [f32],
        scratch: &mut SnakeScratch,
    ) {
        self.run_generic(args, out, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(
        &self,
        args: (&[f32], f32, f32),
        out: &mut [f32],
        scratch: &mut SnakeScratch,
    ) {
        self.run_generic(args, out, scratch)
    }

    #[inline(always)]
    fn run_generic(
        &self,
        (x, frequency, inverse_magnitude): (&[f32], f32, f32),
        out: &mut [f32],
        scratch: &mut SnakeScratch,
    ) {
        let t = x.len();
        let (r, span) = (self.ratio, self.span);
        let SnakeScratch {
            padded,
            phases,
            streams,
        } = scratch;

        // Input with replicated edges.
        padded.clear();
        padded.extend(std::iter::repeat_n(x[0], self.up_pad.0));
        padded.extend_from_slice(x);
        padded.extend(std::iter::repeat_n(x[t - 1], self.up_pad.1));

        // Each phase of the upsampled signal, activated.
        phases.clear();
        phases.resize(r * t, 0.0);
        for (phase, taps) in phases.chunks_exact_mut(t).zip(self.up.chunks_exact(span)) {
            for (s, &c) in taps.iter().enumerate() {
                for (u, &v) in phase.iter_mut().zip(&padded[s..s + t]) {
                    *u += c * v;
                }
            }
            for u in phase.iter_mut() {
                let s = sin_reduced(frequency * *u);
                *u += inverse_magnitude * s * s;
            }
        }

        // The downsampler reads `vp[r i + j]`, `vp` the interleaved phases with the replicated
        // edges: `vp[r i + j] = stream[j % r][i + j / r]`. Each stream is one phase, shifted,
        // between copies of the first and the last sample, so it is built by copies alone.
        let left = self.down_pad.0;
        let len = r * t;
        let taps = self.down.len();
        // Long enough for every tap's reach past the last output.
        let groups = (t - 1) + taps.div_ceil(r) + 1;
        let (first, last) = (phases[0], phases[(len - 1) % r * t + (len - 1) / r]);
        streams.clear();
        streams.resize(r * groups, 0.0);
        for (k, stream) in streams.chunks_exact_mut(groups).enumerate() {
            // Stream k holds vp[r i + k]: before `left` the first sample, from `left + len`
            // on the last one, the phase `(r i + k - left) % r` in between.
            let begin = left.saturating_sub(k).div_ceil(r).min(groups);
            let end = (left + len)
                .saturating_sub(k)
                .div_ceil(r)
                .clamp(begin, groups);
            stream[..begin].fill(first);
            if begin < end {
                let q = r * begin + k - left;
                let phase = &phases[(q % r) * t..][..t];
                stream[begin..end].copy_from_slice(&phase[q / r..q / r + end - begin]);
            }
            stream[end..].fill(last);
        }

        out.fill(0.0);
        for (j, &c) in self.down.iter().enumerate() {
            let stream = &streams[(j % r) * groups + j / r..][..t];
            for (y, &v) in out.iter_mut().zip(stream) {
                *y += c * v;
            }
        }
    }
}

/// `sin(x)` to a few f32 ulps for |x| up to about 1e5, as straight-line arithmetic that
/// vectorises: `x = k π + r` with `|r| <= π/2` (π split in three parts, Cody-Waite), the odd
/// Taylor polynomial of degree 11 in `r` (truncation error under 6e-8 on that interval), and
/// the sign of `(-1)^k`.
#[inline(always)]
pub fn sin_reduced(x: f32) -> f32 {
    // Round to nearest by the 1.5 * 2^23 trick (exact for |x / π| < 2^22).
    const ROUNDER: f32 = 12_582_912.0;
    const PI_HI: f32 = 3.140_625;
    const PI_MID: f32 = 9.676_536e-4;
    const PI_LO: f32 = 5.126_566e-12;
    let shifted = x * std::f32::consts::FRAC_1_PI + ROUNDER;
    let k = shifted - ROUNDER;
    let r = ((x - k * PI_HI) - k * PI_MID) - k * PI_LO;
    let r2 = r * r;
    let poly = -1.0 / 6.0
        + r2 * (1.0 / 120.0
            + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362_880.0 + r2 * (-1.0 / 39_916_800.0))));
    let s = r + r * r2 * poly;
    // Odd k flips the sign: k's low bit is the low mantissa bit of `shifted` (no float to
    // integer conversion, which would not vectorise).
    f32::from_bits(s.to_bits() ^ (shifted.to_bits() << 31))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sin_matches_the_library_sin() {
        let mut worst = 0f64;
        let mut x = -2000.0f32;
        while x < 2000.0 {
            let got = sin_reduced(x) as f64;
            let want = (x as f64).sin();
            worst = worst.max((got - want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-6, "worst abs error {worst}");
        let mut worst_small = 0f64;
        for i in -5000..5000 {
            let x = i as f32 * 1e-3;
            worst_small = worst_small.max((sin_reduced(x) as f64 - (x as f64).sin()).abs());
        }
        assert!(worst_small < 2e-7, "worst abs error near 0: {worst_small}");
        assert_eq!(sin_reduced(0.0), 0.0);
    }

    /// The plain definition: replicate pad, upsample as a transposed convolution, activate,
    /// replicate pad, strided FIR; all in f64.
    fn reference(rs: &SnakeResampler, x: &[f32], f: f32, inv: f32) -> Vec<f64> {
        let t = x.len();
        let r = rs.ratio;
        let mut padded: Vec<f64> = vec![x[0] as f64; rs.up_pad.0];
        padded.extend(x.iter().map(|&v| v as f64));
        padded.extend(vec![x[t - 1] as f64; rs.up_pad.1]);
        let mut v = vec![0f64; r * t];
        for m in 0..t {
            for p in 0..r {
                let mut acc = 0f64;
                for s in 0..rs.span {
                    acc += rs.up[p * rs.span + s] as f64 * padded[m + s];
                }
                let w = (f as f64 * acc).sin();
                v[r * m + p] = acc + inv as f64 * w * w;
            }
        }
        let mut vp: Vec<f64> = vec![v[0]; rs.down_pad.0];
        vp.extend(&v);
        vp.extend(vec![v[r * t - 1]; rs.down_pad.1]);
        (0..t)
            .map(|i| {
                rs.down
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| c as f64 * vp[r * i + j])
                    .sum()
            })
            .collect()
    }

    fn resampler(ratio: usize, span: usize, taps: usize, up_pad: (usize, usize)) -> SnakeResampler {
        let even = taps.is_multiple_of(2);
        SnakeResampler {
            ratio,
            up: (0..ratio * span)
                .map(|i| ((i as f32 * 0.7).sin()) * 0.3)
                .collect(),
            span,
            up_pad,
            down: (0..taps).map(|i| ((i as f32 * 1.3).cos()) * 0.2).collect(),
            down_pad: (taps / 2 - usize::from(even), taps / 2),
        }
    }

    #[test]
    fn every_level_matches_the_plain_definition() {
        // BigVGAN's geometry (ratio 2, 7 polyphase taps, 12 down taps) and two odd ones.
        let cases = [
            resampler(2, 7, 12, (3, 3)),
            resampler(2, 3, 5, (1, 1)),
            resampler(3, 4, 7, (1, 2)),
        ];
        for rs in &cases {
            for t in [1, 2, 5, 17, 33, 100] {
                let x: Vec<f32> = (0..t).map(|i| ((i as f32 * 0.37).sin()) * 2.5).collect();
                let want = reference(rs, &x, 1.7, 0.8);
                for level in Level::ALL {
                    let mut out = vec![f32::NAN; t];
                    rs.run(level, &x, 1.7, 0.8, &mut out, &mut SnakeScratch::default());
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "{level:?} t {t} ratio {} sample {i}: {g} vs {w}",
                            rs.ratio
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p omnicall-kernels -- --ignored --nocapture snake_timing`
    #[test]
    #[ignore = "timing"]
    fn snake_timing() {
        let rs = SnakeResampler {
            ratio: 2,
            up: vec![0.1; 14],
            span: 7,
            up_pad: (3, 3),
            down: vec![0.08; 12],
            down_pad: (5, 6),
        };
        let (c, t) = (384, 2880);
        let x: Vec<f32> = (0..c * t).map(|i| ((i as f32) * 0.001).sin()).collect();
        let mut out = vec![0f32; c * t];
        for level in Level::ALL.into_iter().filter(|l| l.is_available()) {
            let mut scratch = SnakeScratch::default();
            let mut s = f64::INFINITY;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                for (row, o) in x.chunks_exact(t).zip(out.chunks_exact_mut(t)) {
                    rs.run(level, row, 1.3, 0.7, o, &mut scratch);
                }
                s = s.min(start.elapsed().as_secs_f64());
            }
            println!(
                "{level:?}: {:.1} M input samples/s",
                (c * t) as f64 / s / 1e6
            );
        }
        let start = std::time::Instant::now();
        let mut acc = 0f32;
        for &v in &x {
            acc += (v * 1.3).sin();
        }
        println!(
            "libm sin: {:.1} M/s ({acc})",
            x.len() as f64 / start.elapsed().as_secs_f64() / 1e6
        );
    }
}
