//! Prefill-sized bf16 products with AVX512-BF16: `x (rows, k) @ w (n, k)^T` as outer-product
//! tiles of `vdpbf16ps`, the weights packed in pairs.
//!
//! [`gemv`](crate::gemv) multiplies a few rows as dot products (one horizontal sum per output
//! value: right for decoding, where the weight is read once). For many rows the product is
//! compute-bound and the sums would cost a large share of it; here each instruction instead
//! adds one pair of k of a broadcast input row to 16 output columns at once: the weights are
//! packed ([`PackedWeights`]) so that one 512-bit load holds, for 16 weight rows, the two bf16
//! values of the same pair of k. A tile keeps [`TILE_ROWS`] x [`TILE_PANELS`] x 16 sums in
//! registers for the whole depth and adds them to the output once.
//!
//! The caller chooses the cache blocks: a block of weight rows and of k, packed once, that stays
//! in L2 while every input row passes over it (see `model::linear` in the main crate).

use half::bf16;

/// Weight rows per packed panel: one 512-bit register of f32 sums.
pub const PANEL: usize = 16;
/// Input rows per tile.
pub const TILE_ROWS: usize = 8;
/// Panels per tile: 8 x 3 sums, 3 weight loads and one broadcast fill 28 of the 32 registers.
pub const TILE_PANELS: usize = 3;

/// Weight rows `j < n` of depth `k`, packed for [`gemm_packed`]: panel `g`, pair `p` holds, for
/// `l < 16`, the bf16 values `w[16g + l][2p]` (low half) and `w[16g + l][2p + 1]` (high half) of
/// one 32-bit lane; rows past `n` and the value past an odd `k` are zero.
#[derive(Debug, Default)]
pub struct PackedWeights {
    data: Vec<u32>,
    n: usize,
    k: usize,
}

impl PackedWeights {
    /// Packs `n` rows of `k` values starting `w_stride` apart in `w`, reusing this buffer.
    ///
    /// # Panics
    /// When `w_stride < k` or `w` does not reach the last row's last value.
    pub fn pack(&mut self, w: &[bf16], w_stride: usize, n: usize, k: usize) {
        assert!(
            w_stride >= k,
            "weight stride {w_stride} is shorter than k {k}"
        );
        assert!(
            n == 0 || w.len() >= (n - 1) * w_stride + k,
            "{} weight values do not hold {n} rows of {k} at stride {w_stride}",
            w.len()
        );
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        self.data.clear();
        self.data.resize(panels * pairs * PANEL, 0);
        // Panel by panel, pair by pair: the writes are sequential and the 16 rows being read
        // advance together, each line of them used for 16 pairs.
        let whole = k / 2;
        for g in 0..panels {
            let rows = (n - g * PANEL).min(PANEL);
            let panel = &mut self.data[g * pairs * PANEL..(g + 1) * pairs * PANEL];
            let starts: [usize; PANEL] =
                std::array::from_fn(|l| (g * PANEL + l.min(rows - 1)) * w_stride);
            for (p, lanes) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (l, lane) in lanes[..rows].iter_mut().enumerate() {
                    let at = starts[l] + 2 * p;
                    let low = w[at].to_bits() as u32;
                    let high = if p < whole {
                        w[at + 1].to_bits() as u32
                    } else {
                        0
                    };
                    *lane = low | (high << 16);
                }
            }
        }
        self.n = n;
        self.k = k;
    }

    /// The packed weight rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The packed depth.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `out[r · out_stride + j] = Σ_{i < k} x[r · x_stride + i] · w[j][i]` (or `+=` that with
/// `accumulate`) for `r < rows` and the `j < n` rows of `w`, in f32, with AVX512-BF16.
///
/// Returns `false`, writing nothing, when this CPU has no AVX512-BF16.
///
/// # Panics
/// When `x_stride < k`, `out_stride < n`, or a slice does not reach its last row's last value.
pub fn gemm_packed(
    x: &[bf16],
    x_stride: usize,
    rows: usize,
    w: &PackedWeights,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
) -> bool {
    if !crate::Level::Avx512Bf16.is_available() {
        return false;
    }
    let (n, k) = (w.n, w.k);
    if rows == 0 || n == 0 {
        return true;
    }
    assert!(
        x_stride >= k && out_stride >= n,
        "strides {x_stride} / {out_stride} are shorter than k {k} / n {n}"
    );
    assert!(
        x.len() >= (rows - 1) * x_stride + k,
        "{} input values do not hold {rows} rows of {k} at stride {x_stride}",
        x.len()
    );
    assert!(
        out.len() >= (rows - 1) * out_stride + n,
        "{} output values do not hold {rows} rows of {n} at stride {out_stride}",
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    {
        let shape = x86::Shape {
            rows,
            n,
            k,
            pairs: k.div_ceil(2),
            x_stride,
            out_stride,
            accumulate,
        };
        // SAFETY: the CPU has AVX512-BF16 (checked above); the asserts and the packing keep
        // every read inside `x` and the packed panels and every write inside `out`.
        unsafe { shape.run(x.as_ptr().cast(), w.data.as_ptr(), out.as_mut_ptr()) };
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PANEL, TILE_PANELS, TILE_ROWS};
    use std::arch::x86_64::*;

    pub(super) struct Shape {
        pub rows: usize,
        pub n: usize,
        pub k: usize,
        pub pairs: usize,
        pub x_stride: usize,
        pub out_stride: usize,
        pub accumulate: bool,
    }

    /// Calls `tile::<R, C>` with `R` and `C` constants, so that the sums stay in registers.
    macro_rules! with_rows {
        ($r:expr, $c:expr, $call:ident, $($arg:expr),*) => {
            match $r {
                1 => with_rows!(@panels 1, $c, $call, $($arg),*),
                2 => with_rows!(@panels 2, $c, $call, $($arg),*),
                3 => with_rows!(@panels 3, $c, $call, $($arg),*),
                4 => with_rows!(@panels 4, $c, $call, $($arg),*),
                5 => with_rows!(@panels 5, $c, $call, $($arg),*),
                6 => with_rows!(@panels 6, $c, $call, $($arg),*),
                7 => with_rows!(@panels 7, $c, $call, $($arg),*),
                _ => with_rows!(@panels 8, $c, $call, $($arg),*),
            }
        };
        (@panels $r:literal, $c:expr, $call:ident, $($arg:expr),*) => {
            match $c {
                1 => $call::<$r, 1>($($arg),*),
                2 => $call::<$r, 2>($($arg),*),
                _ => $call::<$r, 3>($($arg),*),
            }
        };
    }

    const _: () = assert!(TILE_ROWS == 8 && TILE_PANELS == 3);

    impl Shape {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn run(&self, x: *const u16, w: *const u32, out: *mut f32) {
            let panels = self.n.div_ceil(PANEL);
            let mut r0 = 0;
            while r0 < self.rows {
                let r_len = TILE_ROWS.min(self.rows - r0);
                let mut g0 = 0;
                while g0 < panels {
                    let g_len = TILE_PANELS.min(panels - g0);
                    // SAFETY: rows r0..r0 + r_len and panels g0..g0 + g_len are inside the
                    // shape `gemm_packed` checked.
                    unsafe { with_rows!(r_len, g_len, tile, self, r0, g0, x, w, out) };
                    g0 += g_len;
                }
                r0 += r_len;
            }
        }
    }

    /// One tile: input rows `r0..r0 + R` against panels `g0..g0 + C` over the whole depth.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const R: usize, const C: usize>(
        s: &Shape,
        r0: usize,
        g0: usize,
        x: *const u16,
        w: *const u32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        // One pair of k: the panels' 16 x 2 weights, each input row's pair broadcast.
        // SAFETY (every load): pair p < pairs of panel g < panels is inside the packing, and
        // input values r · x_stride + i with i < k are inside `x` (checked by the caller).
        macro_rules! pair_step {
            ($p:expr, $pair_at:expr) => {{
                let p = $p;
                let wv: [__m512bh; C] = std::array::from_fn(|c| unsafe {
                    let v = _mm512_loadu_si512(w.add(((g0 + c) * s.pairs + p) * PANEL).cast());
                    std::mem::transmute::<__m512i, __m512bh>(v)
                });
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let pair: u32 = $pair_at((r0 + r) * s.x_stride + 2 * p);
                    let xv = unsafe {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32))
                    };
                    for (a, wc) in acc_row.iter_mut().zip(wv) {
                        *a = _mm512_dpbf16_ps(*a, xv, wc);
                    }
                }
            }};
        }
        let whole = s.k / 2;
        for p in 0..whole {
            pair_step!(p, |at| unsafe { x.add(at).cast::<u32>().read_unaligned() });
        }
        if whole < s.pairs {
            // the last value of an odd k; its partner is zero in the packing too
            pair_step!(whole, |at| unsafe { *x.add(at) as u32 });
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (c, a) in acc_row.iter().enumerate() {
                let first = (g0 + c) * PANEL;
                let cols = (s.n - first).min(PANEL);
                let mask: __mmask16 = if cols == PANEL {
                    !0
                } else {
                    (1u16 << cols) - 1
                };
                // SAFETY: columns first..first + cols of row r0 + r are inside `out`.
                unsafe {
                    let y = out.add((r0 + r) * s.out_stride + first);
                    let sum = if s.accumulate {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), *a)
                    } else {
                        *a
                    };
                    _mm512_mask_storeu_ps(y, mask, sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::values;

    #[test]
    fn matches_the_plain_product_on_odd_shapes_with_strides_and_accumulation() {
        // rows 1, within and past a tile; n = 1, past a panel and past a tile of panels; odd k
        // (a lone last value), k = 1 and 2; rows of the operands parts of longer rows; a second
        // k block added to the first.
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 1, 2),
            (3, 17, 3),
            (8, 16, 31),
            (9, 49, 33),
            (17, 5, 64),
            (11, 100, 257),
        ] {
            let stride = k + 3;
            let x = values(rows * stride, 5 + k as u32);
            let w = values(n * stride, 13 + n as u32);
            let out_stride = n + 1;
            let mut got = vec![f32::NAN; rows * out_stride];
            for r in 0..rows {
                got[r * out_stride..r * out_stride + n].fill(0.0);
            }
            let split = k / 2;
            let mut packed = PackedWeights::default();
            packed.pack(&w, stride, n, split);
            if !gemm_packed(&x, stride, rows, &packed, &mut got, out_stride, false) {
                assert!(!crate::Level::Avx512Bf16.is_available());
                return;
            }
            packed.pack(&w[split..], stride, n, k - split);
            assert!(gemm_packed(
                &x[split..],
                stride,
                rows,
                &packed,
                &mut got,
                out_stride,
                true
            ));
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * stride + i].to_f64() * w[j * stride + i].to_f64())
                        .sum();
                    let g = got[r * out_stride + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "rows {rows} n {n} k {k} at ({r}, {j}): {g} vs {want}"
                    );
                }
                assert!(
                    got[r * out_stride + n].is_nan(),
                    "a column past n was written"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "do not hold")]
    fn a_short_input_is_refused() {
        let mut packed = PackedWeights::default();
        packed.pack(&values(8, 1), 4, 2, 4);
        let mut out = vec![0f32; 4];
        gemm_packed(&values(7, 2), 4, 2, &packed, &mut out, 2, false);
        // without AVX512-BF16 nothing is checked: fail the same way
        panic!("do not hold");
    }
}
