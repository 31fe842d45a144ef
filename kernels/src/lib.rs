//! omnicall's hand-written CPU kernels, in a crate of their own so that the dev profile can
//! compile them optimised (`[profile.dev.package.omnicall-kernels]`): at opt-level 0 every
//! SIMD intrinsic is a function call and the loops below run at well under 1 GB/s.
//!
//! [`gemv`] is `x (rows, k) @ w (n, k)^T` for a few rows of bf16 activations against bf16
//! weights, with f32 accumulation: the decode step's product. It reads the weight once, in
//! tiles of [`TILE_W`] weight rows against up to [`TILE_X`] input rows, widening bf16 in
//! registers (AVX512-BF16 `vdpbf16ps` where the CPU has it, bf16 shifted into f32 and AVX2 FMA
//! otherwise, plain loops as the last resort), so decoding runs at the memory bandwidth. It
//! runs on the calling thread: the caller splits the weight rows among its threads.
//!
//! [`bf16_gemm`] is the same product for many rows (prefill, encoders) where the CPU has
//! AVX512-BF16: outer-product tiles of `vdpbf16ps` over weights packed in pairs, no horizontal
//! sums.
//!
//! [`int8`] holds the u8 × i8 products of statically quantized graphs (exact i32 sums, AVX-512
//! VNNI where the CPU has it) and the requantization of their sums.
//! [`snake`] is BigVGAN's anti-aliased SnakeBeta activation on one channel, fused;
//! [`band_attention`] the DiT's block-local attention of one query block, without a mask.

use half::bf16;

pub mod activation;
pub mod band_attention;
pub mod bf16_gemm;
pub mod int8;
pub mod snake;
pub mod unary;

/// Weight rows per tile: each weight vector loaded is used by every input row of the tile.
pub const TILE_W: usize = 4;
/// Input rows per tile (more rows are done as several tiles over the same weight rows, which
/// are then in cache).
pub const TILE_X: usize = 4;

/// The instruction set a kernel runs with, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// AVX-512 with BF16 dot products (`vdpbf16ps`, 32 bf16 pairs per instruction).
    Avx512Bf16,
    /// AVX2 with FMA: bf16 widened to f32 by a shift, 8 lanes.
    Avx2Fma,
    /// Plain Rust, any CPU.
    Scalar,
}

impl Level {
    /// Every level, best first.
    pub const ALL: [Level; 3] = [Level::Avx512Bf16, Level::Avx2Fma, Level::Scalar];

    /// The best level this CPU runs (checked at run time).
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .find(|level| level.is_available())
            .unwrap_or(Level::Scalar)
    }

    /// Whether this CPU has the instructions of `self`.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Level::Avx512Bf16 | Level::Avx2Fma => false,
            Level::Scalar => true,
        }
    }

    /// `self` where the CPU has it, else the best level below it that it has.
    pub fn or_below(self) -> Self {
        Self::ALL
            .into_iter()
            .filter(|level| *level >= self)
            .find(|level| level.is_available())
            .unwrap_or(Level::Scalar)
    }
}

/// The input rows of [`gemv`], in the form its level reads them: bf16 pairs for `vdpbf16ps`,
/// widened once to f32 for the FMA and scalar kernels.
pub struct Rows<'a> {
    level: Level,
    k: usize,
    bf16: &'a [bf16],
    f32: Vec<f32>,
}

impl<'a> Rows<'a> {
    /// `x` holds `x.len() / k` rows of `k` values, row-major. `level` is lowered to what the
    /// CPU has ([`Level::or_below`]).
    ///
    /// # Panics
    /// When `k` is 0 or does not divide `x.len()`.
    pub fn new(level: Level, x: &'a [bf16], k: usize) -> Self {
        assert!(
            k > 0 && x.len().is_multiple_of(k),
            "{} input values are not rows of {k}",
            x.len()
        );
        let level = level.or_below();
        let f32 = match level {
            Level::Avx512Bf16 => Vec::new(),
            Level::Avx2Fma | Level::Scalar => x.iter().map(|v| v.to_f32()).collect(),
        };
        Self {
            level,
            k,
            bf16: x,
            f32,
        }
    }

    pub fn count(&self) -> usize {
        self.bf16.len() / self.k
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The level [`gemv`] runs these rows with.
    pub fn level(&self) -> Level {
        self.level
    }
}

/// `out[r * n + j] = Σ_i x[r][i] · w[j][i]` for the `rows` rows of `x` and the `n = w.len() / k`
/// rows of `w`, accumulated in f32.
///
/// # Panics
/// When `w` is not whole rows of `k` or `out` does not hold `rows · n` values.
pub fn gemv(x: &Rows, w: &[bf16], out: &mut [f32]) {
    let k = x.k;
    assert!(
        w.len().is_multiple_of(k),
        "{} weight values are not rows of {k}",
        w.len()
    );
    let (rows, n) = (x.count(), w.len() / k);
    assert_eq!(
        out.len(),
        rows * n,
        "output holds {} values, not {rows} x {n}",
        out.len()
    );
    let tiles = Tiles { rows, n, k };
    match x.level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Rows::new` lowered the level to one the CPU has; `Tiles` keeps every read
        // within `rows x k` of `x`, `n x k` of `w` and every write within `rows x n` of `out`.
        Level::Avx512Bf16 => unsafe { tiles.run_avx512bf16(x.bf16, w, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { tiles.run_avx2(&x.f32, w, out) },
        _ => tiles.run_scalar(&x.f32, w, out),
    }
}

/// The tiling of one [`gemv`]: input rows in groups of up to [`TILE_X`], weight rows in groups
/// of [`TILE_W`] and then one at a time.
struct Tiles {
    rows: usize,
    n: usize,
    k: usize,
}

/// Calls `$tile::<R, W>(x_start, j_start)` over every tile, with `R`, `W` constants so that the
/// accumulators of a tile stay in registers.
macro_rules! for_each_tile {
    ($self:ident, $tile:ident, $($arg:expr),*) => {{
        let mut r0 = 0;
        while r0 < $self.rows {
            let r_len = $crate::TILE_X.min($self.rows - r0);
            let mut j0 = 0;
            while j0 < $self.n {
                let w_len = if $self.n - j0 >= $crate::TILE_W { $crate::TILE_W } else { 1 };
                match (r_len, w_len) {
                    (1, 1) => $tile::<1, 1>($self, r0, j0, $($arg),*),
                    (2, 1) => $tile::<2, 1>($self, r0, j0, $($arg),*),
                    (3, 1) => $tile::<3, 1>($self, r0, j0, $($arg),*),
                    (_, 1) => $tile::<4, 1>($self, r0, j0, $($arg),*),
                    (1, _) => $tile::<1, { $crate::TILE_W }>($self, r0, j0, $($arg),*),
                    (2, _) => $tile::<2, { $crate::TILE_W }>($self, r0, j0, $($arg),*),
                    (3, _) => $tile::<3, { $crate::TILE_W }>($self, r0, j0, $($arg),*),
                    (_, _) => $tile::<4, { $crate::TILE_W }>($self, r0, j0, $($arg),*),
                }
                j0 += w_len;
            }
            r0 += r_len;
        }
    }};
}

impl Tiles {
    fn run_scalar(&self, x: &[f32], w: &[bf16], out: &mut [f32]) {
        let k = self.k;
        for (x_row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(self.n)) {
            for (w_row, y) in w.chunks_exact(k).zip(out_row.iter_mut()) {
                *y = x_row.iter().zip(w_row).map(|(a, b)| a * b.to_f32()).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{TILE_W, Tiles};
    use half::bf16;
    use std::arch::x86_64::*;

    impl Tiles {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn run_avx512bf16(&self, x: &[bf16], w: &[bf16], out: &mut [f32]) {
            let (x, w, out) = (
                x.as_ptr().cast::<u16>(),
                w.as_ptr().cast::<u16>(),
                out.as_mut_ptr(),
            );
            // SAFETY: this function has the tiles' features; `gemv` checked the lengths.
            unsafe { for_each_tile!(self, tile_avx512bf16, x, w, out) };
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn run_avx2(&self, x: &[f32], w: &[bf16], out: &mut [f32]) {
            let (x, w, out) = (x.as_ptr(), w.as_ptr().cast::<u16>(), out.as_mut_ptr());
            // SAFETY: as above.
            unsafe { for_each_tile!(self, tile_avx2, x, w, out) };
        }
    }

    /// 32 bf16 from `p`, the lanes past `len` (< 32) zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load_bf16x32(p: *const u16, len: usize) -> __m512bh {
        let v = if len >= 32 {
            // SAFETY: the caller's 32 values from `p` are readable.
            unsafe { _mm512_loadu_si512(p.cast()) }
        } else {
            let mask: __mmask32 = (1u32 << len) - 1;
            // SAFETY: only the `len` masked-in values are read.
            unsafe { _mm512_maskz_loadu_epi16(mask, p.cast()) }
        };
        // SAFETY: both are 512 bits of plain data.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// One tile: input rows `r0..r0 + R` against weight rows `j0..j0 + W`, `vdpbf16ps` over k.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_avx512bf16<const R: usize, const W: usize>(
        t: &Tiles,
        r0: usize,
        j0: usize,
        x: *const u16,
        w: *const u16,
        out: *mut f32,
    ) {
        let k = t.k;
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let mut i = 0;
        while i < k {
            let len = (k - i).min(32);
            // SAFETY (all loads and the stores below): rows r0 + r < rows and j0 + c < n, and
            // `i + len <= k`, so every read is inside x (rows x k) and w (n x k) and every write
            // inside out (rows x n), as `gemv` checked.
            let wv: [__m512bh; W] =
                std::array::from_fn(|c| unsafe { load_bf16x32(w.add((j0 + c) * k + i), len) });
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let xv = unsafe { load_bf16x32(x.add((r0 + r) * k + i), len) };
                for (a, wc) in acc_row.iter_mut().zip(wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, wc);
                }
            }
            i += len;
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (c, a) in acc_row.iter().enumerate() {
                unsafe { *out.add((r0 + r) * t.n + j0 + c) = _mm512_reduce_add_ps(*a) };
            }
        }
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
    }

    /// One tile: input rows `r0..r0 + R` (f32) against weight rows `j0..j0 + W` (bf16 widened
    /// by a 16-bit shift), FMA over k in 8 lanes, then the tail of k one value at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize, const W: usize>(
        t: &Tiles,
        r0: usize,
        j0: usize,
        x: *const f32,
        w: *const u16,
        out: *mut f32,
    ) {
        let k = t.k;
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let whole = k - k % 8;
        let mut i = 0;
        // SAFETY (all loads and stores): as in `tile_avx512bf16`, with `i + 8 <= k` here.
        while i < whole {
            let wv: [__m256; W] = std::array::from_fn(|c| unsafe {
                let raw = _mm_loadu_si128(w.add((j0 + c) * k + i).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            });
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add((r0 + r) * k + i)) };
                for (a, wc) in acc_row.iter_mut().zip(wv) {
                    *a = _mm256_fmadd_ps(xv, wc, *a);
                }
            }
            i += 8;
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (c, a) in acc_row.iter().enumerate() {
                let mut sum = hsum256(*a);
                for i in whole..k {
                    let (xv, wv) = unsafe {
                        (
                            *x.add((r0 + r) * k + i),
                            bf16::from_bits(*w.add((j0 + c) * k + i)),
                        )
                    };
                    sum += xv * wv.to_f32();
                }
                unsafe { *out.add((r0 + r) * t.n + j0 + c) = sum };
            }
        }
    }

    const _: () = assert!(TILE_W >= 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), rounded to bf16 (also the other kernels' tests').
    pub(crate) fn values(len: usize, seed: u32) -> Vec<bf16> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                bf16::from_f32((state as f32 / u32::MAX as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// The plain product in f64.
    fn plain(x: &[bf16], w: &[bf16], k: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for x_row in x.chunks_exact(k) {
            for w_row in w.chunks_exact(k) {
                out.push(
                    x_row
                        .iter()
                        .zip(w_row)
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    fn every_level_matches_the_plain_product_on_odd_shapes() {
        // k below, at and past the vector widths and not a multiple of them (odd k splits a
        // bf16 pair), n = 1 and n past a weight tile, rows = 1 and past an input tile.
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 1, 7),
            (1, 5, 33),
            (2, 3, 31),
            (3, 9, 64),
            (5, 4, 100),
            (8, 13, 257),
            (4, 7, 1031),
        ] {
            let x = values(rows * k, 1 + k as u32);
            let w = values(n * k, 7 + n as u32);
            let want = plain(&x, &w, k);
            for level in Level::ALL.into_iter().filter(|l| l.is_available()) {
                let rows_in = Rows::new(level, &x, k);
                assert_eq!(rows_in.level(), level);
                let mut got = vec![0f32; rows * n];
                gemv(&rows_in, &w, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    // f32 sums of k products of values below 1: order differences only.
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "{level:?} rows {rows} n {n} k {k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_unavailable_level_falls_back() {
        let level = Level::detect();
        assert!(level.is_available());
        assert_eq!(Level::Scalar.or_below(), Level::Scalar);
        assert_eq!(Level::Avx512Bf16.or_below(), level);
    }

    #[test]
    #[should_panic(expected = "not rows of")]
    fn ragged_input_is_refused() {
        Rows::new(Level::Scalar, &values(7, 1), 2);
    }
}
