//! Products of uint8 activations with int8 operands, summed exactly in i32, and the
//! requantization of those sums to the uint8 codes of the next activation: the arithmetic of a
//! statically quantized graph's MatMul, Gemm and Conv nodes.
//!
//! [`gemm_u8i8`] is `a (rows, k) · b (n, k)ᵀ` for u8 `a` and an i8 `b` packed once
//! ([`PackedI8`]) in panels of [`PANEL`] columns, four k at a time: the layout of AVX-512 VNNI's
//! `vpdpbusd` (64 u8 × s8 products into 16 i32 lanes per instruction), which the kernel runs
//! where the CPU has it, in tiles of [`TILE_ROWS`] rows × one panel held in registers. CPUs with
//! AVX2 but not AVX-512 (most AMD and older Intel parts) widen both operands to i16 and sum pairs
//! with `vpmaddwd`, exact where `vpmaddubsw` would saturate. The scalar kernel reads the same
//! layout and is the reference the tests hold it to; all are exact, so their outputs are equal. [`requantize`] turns the sums into codes in one pass.

/// Columns of `b` per packed panel: four 16-lane i32 vectors.
pub const PANEL: usize = 64;
/// Rows of `a` per tile of the VNNI kernel (with a panel: 24 accumulators in registers).
pub const TILE_ROWS: usize = 6;
/// k values per packed group: the four u8 × s8 products one `vpdpbusd` lane sums.
const GROUP: usize = 4;

/// The instruction set [`gemm_u8i8`] runs with, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Level {
    /// AVX-512 VNNI (`vpdpbusd`), with AVX-512BW/VL for the byte stores of the codes.
    Avx512Vnni,
    /// AVX2: the products widened to i16 and summed in pairs (`vpmaddwd`), the requantization
    /// and the softmax 8 columns at a time.
    Avx2,
    /// Plain Rust, any CPU.
    Scalar,
}

impl Int8Level {
    /// Every level, best first.
    pub const ALL: [Int8Level; 3] = [Int8Level::Avx512Vnni, Int8Level::Avx2, Int8Level::Scalar];

    /// The best level this CPU runs (checked at run time).
    pub fn detect() -> Self {
        Self::Avx512Vnni.or_below()
    }

    /// Whether this CPU has the instructions of `self`.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Int8Level::Avx512Vnni | Int8Level::Avx2 => false,
            Int8Level::Scalar => true,
        }
    }

    /// `self` where the CPU has it, else the best level below it that it has.
    pub fn or_below(self) -> Self {
        Self::ALL
            .into_iter()
            .filter(|level| *level >= self)
            .find(|level| level.is_available())
            .unwrap_or(Int8Level::Scalar)
    }
}

/// The right operand `b (n, k)` of [`gemm_u8i8`], packed: panel `p` holds columns
/// `p·64 .. p·64 + 64`, and within it group `g` holds `b[j][4g .. 4g + 4]` for its 64 columns
/// in turn (256 bytes). Columns past `n` and k past `k` are zero, so they add nothing.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    n: usize,
    k: usize,
    data: Vec<i8>,
    sums: Vec<i32>,
}

impl PackedI8 {
    /// `b[j][i] = value(j, i)` for `j < n`, `i < k`.
    ///
    /// # Panics
    /// When `n` or `k` is 0.
    pub fn new(n: usize, k: usize, value: impl Fn(usize, usize) -> i8) -> Self {
        assert!(n > 0 && k > 0, "an int8 operand of {n} x {k}");
        let groups = k.div_ceil(GROUP);
        let panel_len = groups * GROUP * PANEL;
        let mut data = vec![0i8; n.div_ceil(PANEL) * panel_len];
        let mut sums = vec![0i32; n];
        for (j, sum) in sums.iter_mut().enumerate() {
            let panel = &mut data[(j / PANEL) * panel_len..][..panel_len];
            let lane = (j % PANEL) * GROUP;
            for i in 0..k {
                let v = value(j, i);
                *sum += v as i32;
                panel[(i / GROUP) * GROUP * PANEL + lane + i % GROUP] = v;
            }
        }
        Self { n, k, data, sums }
    }

    /// Rows of `b`, row-major (`b.len() / k` rows of `k`).
    ///
    /// # Panics
    /// When `k` is 0 or does not divide `b.len()`, or `b` is empty.
    pub fn from_rows(b: &[i8], k: usize) -> Self {
        assert!(
            k > 0 && b.len().is_multiple_of(k),
            "{} int8 values are not rows of {k}",
            b.len()
        );
        Self::new(b.len() / k, k, |j, i| b[j * k + i])
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// `Σ_i b[j][i]` for every column `j` (the zero-point terms of a product need them).
    pub fn sums(&self) -> &[i32] {
        &self.sums
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(GROUP)
    }

    fn panel(&self, p: usize) -> &[i8] {
        let len = self.groups() * GROUP * PANEL;
        &self.data[p * len..(p + 1) * len]
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }
}

/// `out[r·n + j] = Σ_i a[r·k + i] · b[j][i]`, exactly, for the `a.len() / k` rows of `a`. `level`
/// is lowered to what the CPU has ([`Int8Level::or_below`]); every level gives the same sums.
///
/// # Panics
/// When `a` is not whole rows of `b.k()` or `out` does not hold `rows · n` values.
pub fn gemm_u8i8(level: Int8Level, a: &[u8], b: &PackedI8, out: &mut [i32]) {
    let k = b.k;
    assert!(
        a.len().is_multiple_of(k),
        "{} input codes are not rows of {k}",
        a.len()
    );
    let (rows, n) = (a.len() / k, b.n);
    assert_eq!(
        out.len(),
        rows * n,
        "output holds {} sums, not {rows} x {n}",
        out.len()
    );
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` checked that the CPU has AVX-512F/BW/VL and VNNI; the lengths were
        // checked above, which is what the kernel's reads and writes stay within.
        Int8Level::Avx512Vnni => unsafe { vnni::gemm(a, rows, b, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` checked that the CPU has AVX2; the lengths were checked above.
        Int8Level::Avx2 => unsafe { avx2::gemm(a, rows, b, out) },
        _ => gemm_scalar(a, rows, b, out),
    }
}

fn gemm_scalar(a: &[u8], rows: usize, b: &PackedI8, out: &mut [i32]) {
    let (k, n) = (b.k, b.n);
    let mut group_codes = [0u8; GROUP];
    for p in 0..b.panels() {
        let panel = b.panel(p);
        let columns = PANEL.min(n - p * PANEL);
        for r in 0..rows {
            let a_row = &a[r * k..(r + 1) * k];
            let mut acc = [0i32; PANEL];
            for (g, weights) in panel.chunks_exact(GROUP * PANEL).enumerate() {
                let codes = &a_row[g * GROUP..k.min((g + 1) * GROUP)];
                group_codes[..codes.len()].copy_from_slice(codes);
                group_codes[codes.len()..].fill(0);
                for (s, w) in acc.iter_mut().zip(weights.chunks_exact(GROUP)) {
                    *s += (0..GROUP)
                        .map(|i| group_codes[i] as i32 * w[i] as i32)
                        .sum::<i32>();
                }
            }
            out[r * n + p * PANEL..][..columns].copy_from_slice(&acc[..columns]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GROUP, PANEL, PackedI8};
    use std::arch::x86_64::*;

    /// Rows of `a` per tile: with 8 columns, 12 accumulators, 2 weight registers and the
    /// broadcast codes.
    const ROWS: usize = 6;
    /// Columns of a panel per tile: one group of them is 32 weights (8 columns × 4 k), two
    /// i16 vectors.
    const COLUMNS: usize = 8;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm(a: &[u8], rows: usize, b: &PackedI8, out: &mut [i32]) {
        let (k, n) = (b.k, b.n);
        let width = b.groups() * GROUP;
        // The codes widened to i16 once, k padded with zeros to whole groups: a row's four
        // codes of a group are then one 8-byte broadcast from memory, with no shuffle.
        let mut wide_a = vec![0i16; rows * width];
        for (wide, row) in wide_a.chunks_exact_mut(width).zip(a.chunks_exact(k)) {
            for (x, &c) in wide.iter_mut().zip(row) {
                *x = c as i16;
            }
        }
        // 8 columns of a panel widened to i16 once for all the rows (not once per tile of
        // rows): per group the weights of columns 0..4, then of 4..8.
        let mut strip = vec![0i16; b.groups() * COLUMNS * GROUP];
        for p in 0..b.panels() {
            let panel = b.panel(p);
            let columns = PANEL.min(n - p * PANEL);
            for c0 in (0..columns).step_by(COLUMNS) {
                for (g, wide) in strip.chunks_exact_mut(COLUMNS * GROUP).enumerate() {
                    let w = &panel[g * GROUP * PANEL + c0 * GROUP..][..COLUMNS * GROUP];
                    // SAFETY: `w` holds 32 bytes and `wide` 32 i16.
                    unsafe {
                        let w = _mm256_loadu_si256(w.as_ptr().cast());
                        let low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
                        let high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w));
                        _mm256_storeu_si256(wide.as_mut_ptr().cast(), low);
                        _mm256_storeu_si256(wide.as_mut_ptr().add(16).cast(), high);
                    }
                }
                let used = COLUMNS.min(columns - c0);
                let mut r0 = 0;
                while r0 < rows {
                    let tile = ROWS.min(rows - r0);
                    let a_rows = &wide_a[r0 * width..(r0 + tile) * width];
                    let sums = match tile {
                        6 => tile_sums::<6>(a_rows, width, &strip),
                        5 => tile_sums::<5>(a_rows, width, &strip),
                        4 => tile_sums::<4>(a_rows, width, &strip),
                        3 => tile_sums::<3>(a_rows, width, &strip),
                        2 => tile_sums::<2>(a_rows, width, &strip),
                        _ => tile_sums::<1>(a_rows, width, &strip),
                    };
                    for (r, row) in sums.iter().enumerate().take(tile) {
                        out[(r0 + r) * n + p * PANEL + c0..][..used].copy_from_slice(&row[..used]);
                    }
                    r0 += tile;
                }
            }
        }
    }

    /// The sums of rows `0..R` of `a_rows` (widened codes, `width` a row) with the 8 columns
    /// of `strip` (widened weights; columns past `n` and k past `k` are zero).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_sums<const R: usize>(
        a_rows: &[i16],
        width: usize,
        strip: &[i16],
    ) -> [[i32; COLUMNS]; ROWS] {
        const { assert!(R <= ROWS) };
        assert!(a_rows.len() == R * width && strip.len() == width * COLUMNS);
        // Per row two vectors of pair sums: lanes 2c, 2c + 1 belong to column c (low: columns
        // 0..4, high: 4..8).
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..width / GROUP {
            // SAFETY (all reads): the strip holds 32 weights from g · 32 and each row its
            // four codes from g · 4, as the lengths asserted above say.
            let (w_low, w_high) = unsafe {
                let w = strip.as_ptr().add(g * COLUMNS * GROUP);
                (
                    _mm256_loadu_si256(w.cast()),
                    _mm256_loadu_si256(w.add(COLUMNS * GROUP / 2).cast()),
                )
            };
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let codes = unsafe {
                    a_rows
                        .as_ptr()
                        .add(r * width + g * GROUP)
                        .cast::<i64>()
                        .read_unaligned()
                };
                let x = _mm256_set1_epi64x(codes);
                acc_row[0] = _mm256_add_epi32(acc_row[0], _mm256_madd_epi16(x, w_low));
                acc_row[1] = _mm256_add_epi32(acc_row[1], _mm256_madd_epi16(x, w_high));
            }
        }
        let mut sums = [[0i32; COLUMNS]; ROWS];
        for (row, acc_row) in sums.iter_mut().zip(acc) {
            // hadd gives columns 0 1 4 5 | 2 3 6 7; the 64-bit permute puts them in order.
            let columns = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(
                acc_row[0], acc_row[1],
            ));
            // SAFETY: `row` holds 8 i32.
            unsafe { _mm256_storeu_si256(row.as_mut_ptr().cast(), columns) };
        }
        sums
    }
    /// [`super::requantize`] of one row, 8 columns at a time, the scalar operations in the
    /// scalar order (no fused multiply-add), so the codes are the scalar ones; the last
    /// `n % 8` columns run the scalar code.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn requantize_row(
        c: &super::Columns,
        a_sum: i32,
        sums: &[i32],
        codes: &mut [u8],
    ) {
        let n = sums.len();
        let whole = n - n % COLUMNS;
        let a_sum_v = _mm256_set1_epi32(a_sum);
        let (lo, hi) = (_mm256_set1_ps(-512.0), _mm256_set1_ps(512.0));
        let out_scale = _mm256_set1_ps(c.out_scale);
        let out_zero = _mm256_set1_epi32(c.out_zero);
        for j in (0..whole).step_by(COLUMNS) {
            // SAFETY: every slice holds n ≥ j + 8 values (`codes` n bytes).
            unsafe {
                let load_i = |s: &[i32]| _mm256_loadu_si256(s.as_ptr().add(j).cast());
                let load_f = |s: &[f32]| _mm256_loadu_ps(s.as_ptr().add(j));
                let exact = _mm256_add_epi32(
                    _mm256_sub_epi32(load_i(sums), _mm256_mullo_epi32(load_i(c.b_zero), a_sum_v)),
                    load_i(c.offset),
                );
                let value = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_cvtepi32_ps(exact), load_f(c.scale)),
                    load_f(c.bias),
                );
                let q = clamp(_mm256_div_ps(value, out_scale), lo, hi);
                let code = to_code(q, out_zero);
                _mm_storel_epi64(codes.as_mut_ptr().add(j).cast(), code);
            }
        }
        for j in whole..n {
            codes[j] = c.code(j, a_sum, sums[j]);
        }
    }

    /// [`super::exponentials`]: the largest code by `vpmaxub`, the table read by gathers, the
    /// 16 partial sums in two vectors, each lane adding in the scalar order; the codes past
    /// the last whole 16 run the scalar code.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exponentials(row: &[u8], exp_table: &[f32; 256], e: &mut [f32]) -> f32 {
        const LANES: usize = super::SUM_LANES;
        let n = row.len();
        let mut max = 0u8;
        let mut wide = _mm256_setzero_si256();
        let mut chunks = row.chunks_exact(32);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 32 bytes.
            wide = _mm256_max_epu8(wide, unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) });
        }
        let mut bytes = [0u8; 32];
        // SAFETY: `bytes` holds 32 bytes.
        unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), wide) };
        for &c in bytes.iter().chain(chunks.remainder()) {
            max = max.max(c);
        }
        let whole = n - n % LANES;
        let max_v = _mm_set1_epi8(max as i8);
        let mut acc = [_mm256_setzero_ps(); 2];
        for i in (0..whole).step_by(LANES) {
            // SAFETY: codes and exponentials i .. i + 16 exist; every difference to the
            // largest code is below 256, inside the table.
            unsafe {
                let d = _mm_sub_epi8(max_v, _mm_loadu_si128(row.as_ptr().add(i).cast()));
                let halves = [d, _mm_unpackhi_epi64(d, d)];
                for (h, (acc, d)) in acc.iter_mut().zip(halves).enumerate() {
                    let index = _mm256_cvtepu8_epi32(d);
                    let v = _mm256_i32gather_ps::<4>(exp_table.as_ptr(), index);
                    _mm256_storeu_ps(e.as_mut_ptr().add(i + h * 8), v);
                    *acc = _mm256_add_ps(*acc, v);
                }
            }
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds 16 values.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        }
        for ((lane, e), &c) in lanes.iter_mut().zip(&mut e[whole..]).zip(&row[whole..]) {
            *e = exp_table[(max - c) as usize];
            *lane += *e;
        }
        lanes.iter().sum::<f32>()
    }

    /// `quantize(e / sum)` for a row of `e`, 8 at a time (the scalar code for the last
    /// `n % 8`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_quotients(
        e: &[f32],
        sum: f32,
        out_scale: f32,
        out_zero: i32,
        out: &mut [u8],
    ) {
        let n = e.len();
        let whole = n - n % COLUMNS;
        let (lo, hi) = (_mm256_set1_ps(-512.0), _mm256_set1_ps(512.0));
        let (sum_v, out_scale_v) = (_mm256_set1_ps(sum), _mm256_set1_ps(out_scale));
        let out_zero_v = _mm256_set1_epi32(out_zero);
        for j in (0..whole).step_by(COLUMNS) {
            // SAFETY: `e` and `out` hold n ≥ j + 8 values.
            unsafe {
                let p = _mm256_div_ps(_mm256_loadu_ps(e.as_ptr().add(j)), sum_v);
                let q = clamp(_mm256_div_ps(p, out_scale_v), lo, hi);
                _mm_storel_epi64(out.as_mut_ptr().add(j).cast(), to_code(q, out_zero_v));
            }
        }
        for j in whole..n {
            out[j] = super::quantize(e[j] / sum, out_scale, out_zero);
        }
    }

    /// `q.clamp(lo, hi)` as `f32::clamp` does it, NaN kept (`vmaxps` and `vminps` return
    /// their second operand where one is NaN).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn clamp(q: __m256, lo: __m256, hi: __m256) -> __m256 {
        _mm256_min_ps(hi, _mm256_max_ps(lo, q))
    }

    /// [`super::quantize`]'s rounding of clamped quotients: half to even by the float adder,
    /// truncated (NaN to 0, as `as i32` does), plus the zero point, saturated to 0..=255 (the
    /// signed packs saturate below); the 8 codes in the low 8 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn to_code(q: __m256, zero: __m256i) -> __m128i {
        let shift = _mm256_set1_ps(12_582_912.0);
        let rounded = _mm256_sub_ps(_mm256_add_ps(q, shift), shift);
        let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(rounded, rounded);
        let r = _mm256_cvttps_epi32(_mm256_and_ps(rounded, ordered));
        let r = _mm256_min_epi32(_mm256_add_epi32(r, zero), _mm256_set1_epi32(255));
        let words = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
        _mm_packus_epi16(words, words)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{GROUP, PANEL, PackedI8, TILE_ROWS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn gemm(a: &[u8], rows: usize, b: &PackedI8, out: &mut [i32]) {
        let (k, n) = (b.k, b.n);
        for p in 0..b.panels() {
            let panel = b.panel(p).as_ptr();
            let columns = PANEL.min(n - p * PANEL);
            let mut r0 = 0;
            while r0 < rows {
                let tile = TILE_ROWS.min(rows - r0);
                let (a, out) = (a[r0 * k..].as_ptr(), out[r0 * n + p * PANEL..].as_mut_ptr());
                // SAFETY: rows r0..r0 + tile of `a` (k codes each) and of `out` (n sums each,
                // `columns` of them from this panel's first column) exist; the panel holds
                // `groups · 256` values.
                unsafe {
                    match tile {
                        6 => tile_rows::<6>(a, k, panel, out, n, columns),
                        5 => tile_rows::<5>(a, k, panel, out, n, columns),
                        4 => tile_rows::<4>(a, k, panel, out, n, columns),
                        3 => tile_rows::<3>(a, k, panel, out, n, columns),
                        2 => tile_rows::<2>(a, k, panel, out, n, columns),
                        _ => tile_rows::<1>(a, k, panel, out, n, columns),
                    }
                }
                r0 += tile;
            }
        }
    }

    /// [`super::requantize`] of one row, 16 columns at a time (the tail masked).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn requantize_row(
        c: &super::Columns,
        a_sum: i32,
        sums: &[i32],
        codes: &mut [u8],
    ) {
        let n = sums.len();
        let a_sum = _mm512_set1_epi32(a_sum);
        let (lo, hi) = (_mm512_set1_ps(-512.0), _mm512_set1_ps(512.0));
        let out_scale = _mm512_set1_ps(c.out_scale);
        let out_zero = _mm512_set1_epi32(c.out_zero);
        let mut j = 0;
        while j < n {
            let len = (n - j).min(16);
            let mask: __mmask16 = if len == 16 { !0 } else { (1u16 << len) - 1 };
            // SAFETY: lanes j .. j + len of each slice exist (all hold n values); the rest
            // are masked off.
            unsafe {
                let load_i = |p: *const i32| _mm512_maskz_loadu_epi32(mask, p);
                let load_f = |p: *const f32| _mm512_maskz_loadu_ps(mask, p);
                let exact = _mm512_add_epi32(
                    _mm512_sub_epi32(
                        load_i(sums.as_ptr().add(j)),
                        _mm512_mullo_epi32(load_i(c.b_zero.as_ptr().add(j)), a_sum),
                    ),
                    load_i(c.offset.as_ptr().add(j)),
                );
                let value = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(exact), load_f(c.scale.as_ptr().add(j))),
                    load_f(c.bias.as_ptr().add(j)),
                );
                let q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(value, out_scale), lo), hi);
                let code = to_code(q, out_zero);
                _mm_mask_storeu_epi8(codes.as_mut_ptr().add(j).cast(), mask, code);
            }
            j += len;
        }
    }

    /// `quantize(e / sum)` for a row of `e`, 16 at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_quotients(
        e: &[f32],
        sum: f32,
        out_scale: f32,
        out_zero: i32,
        out: &mut [u8],
    ) {
        let n = e.len();
        let (lo, hi) = (_mm512_set1_ps(-512.0), _mm512_set1_ps(512.0));
        let (sum, out_scale) = (_mm512_set1_ps(sum), _mm512_set1_ps(out_scale));
        let out_zero = _mm512_set1_epi32(out_zero);
        let mut j = 0;
        while j < n {
            let len = (n - j).min(16);
            let mask: __mmask16 = if len == 16 { !0 } else { (1u16 << len) - 1 };
            // SAFETY: lanes j .. j + len of `e` and `out` exist; the rest are masked off.
            unsafe {
                let p = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, e.as_ptr().add(j)), sum);
                let q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(p, out_scale), lo), hi);
                _mm_mask_storeu_epi8(out.as_mut_ptr().add(j).cast(), mask, to_code(q, out_zero));
            }
            j += len;
        }
    }

    /// Rounded half to even (the default rounding mode, as `round_half_even`), plus the zero
    /// point, saturated to 0..=255, narrowed to bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn to_code(q: __m512, zero: __m512i) -> __m128i {
        let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
        let r = _mm512_add_epi32(r, zero);
        let r = _mm512_min_epi32(
            _mm512_max_epi32(r, _mm512_setzero_si512()),
            _mm512_set1_epi32(255),
        );
        _mm512_cvtepi32_epi8(r)
    }

    /// Rows `0..R` of `a` against one panel: four accumulators per row, the panel's groups
    /// streamed once, each row's four codes broadcast to every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile_rows<const R: usize>(
        a: *const u8,
        k: usize,
        panel: *const i8,
        out: *mut i32,
        n: usize,
        columns: usize,
    ) {
        const { assert!(R <= TILE_ROWS) };
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        let whole = k / GROUP;
        // SAFETY (all reads): group g < k / 4 of the panel is 256 values from g · 256, and each
        // row's codes 4g .. 4g + 4 are below k; the tail reads only the codes below k.
        for g in 0..whole {
            let w: [__m512i; 4] = std::array::from_fn(|v| unsafe {
                _mm512_loadu_si512(panel.add(g * GROUP * PANEL + v * 16 * GROUP).cast())
            });
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let x = unsafe { a.add(r * k + g * GROUP).cast::<i32>().read_unaligned() };
                let x = _mm512_set1_epi32(x);
                for (s, wv) in acc_row.iter_mut().zip(w) {
                    *s = _mm512_dpbusd_epi32(*s, x, wv);
                }
            }
        }
        let tail = k % GROUP;
        if tail > 0 {
            let w: [__m512i; 4] = std::array::from_fn(|v| unsafe {
                _mm512_loadu_si512(panel.add(whole * GROUP * PANEL + v * 16 * GROUP).cast())
            });
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let mut bytes = [0u8; GROUP];
                for (i, byte) in bytes.iter_mut().take(tail).enumerate() {
                    *byte = unsafe { *a.add(r * k + whole * GROUP + i) };
                }
                let x = _mm512_set1_epi32(i32::from_le_bytes(bytes));
                for (s, wv) in acc_row.iter_mut().zip(w) {
                    *s = _mm512_dpbusd_epi32(*s, x, wv);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, s) in acc_row.iter().enumerate() {
                let first = v * 16;
                if first >= columns {
                    break;
                }
                // SAFETY: row r's sums `first .. first + 16` (masked to `columns`) are inside
                // `out`, as `gemm` checked.
                unsafe {
                    let dst = out.add(r * n + first);
                    if columns - first >= 16 {
                        _mm512_storeu_si512(dst.cast(), *s);
                    } else {
                        let mask: __mmask16 = (1u16 << (columns - first)) - 1;
                        _mm512_mask_storeu_epi32(dst, mask, *s);
                    }
                }
            }
        }
    }
}

/// How the sums of a [`gemm_u8i8`] become the codes of a uint8 activation: the rows are the
/// codes of an activation with zero point `a_zero`, the columns of `b` have zero points
/// `b_zero` (values `b - zero`), one unit of the exact sum is worth `scale[j]`, `bias[j]` is
/// added, and the result is quantized as ONNX's QuantizeLinear does (a true division by
/// `out_scale`, rounded half to even, plus `out_zero`, saturated to 0..=255).
#[derive(Debug, Clone, Copy)]
pub struct Requantize<'a> {
    pub a_zero: i32,
    pub b_zero: &'a [i32],
    pub scale: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub out_scale: f32,
    pub out_zero: i32,
}

/// The codes of `sums` (`a.len() / k` rows of `n`, from [`gemm_u8i8`] of `a` and `b`) under
/// `rq`: `Σ (a - a_zero)(b - b_zero)` from the raw sums, then as [`Requantize`] says. Every
/// level gives the same codes (the same float operations, lane by lane).
///
/// # Panics
/// When the lengths do not agree.
pub fn requantize(
    level: Int8Level,
    a: &[u8],
    b: &PackedI8,
    sums: &[i32],
    rq: &Requantize,
    codes: &mut [u8],
) {
    let (k, n) = (b.k, b.n);
    let rows = a.len() / k;
    assert!(a.len() == rows * k && sums.len() == rows * n && codes.len() == rows * n);
    assert!(rq.b_zero.len() == n && rq.scale.len() == n);
    assert!(rq.bias.is_none_or(|b| b.len() == n));
    // per column: the terms of the zero points that do not depend on the row
    let column_offset: Vec<i32> = (0..n)
        .map(|j| k as i32 * rq.a_zero * rq.b_zero[j] - rq.a_zero * b.sums[j])
        .collect();
    let zero_bias = vec![0f32; n];
    let columns = Columns {
        b_zero: rq.b_zero,
        offset: &column_offset,
        scale: rq.scale,
        bias: rq.bias.unwrap_or(&zero_bias),
        out_scale: rq.out_scale,
        out_zero: rq.out_zero,
    };
    let level = level.or_below();
    for ((a_row, sum_row), code_row) in a
        .chunks_exact(k)
        .zip(sums.chunks_exact(n))
        .zip(codes.chunks_exact_mut(n))
    {
        let a_sum: i32 = a_row.iter().map(|&x| x as i32).sum();
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` checked that the CPU has AVX-512F/BW/VL; every slice holds
            // n values.
            Int8Level::Avx512Vnni => unsafe {
                vnni::requantize_row(&columns, a_sum, sum_row, code_row)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` checked that the CPU has AVX2; every slice holds n values.
            Int8Level::Avx2 => unsafe { avx2::requantize_row(&columns, a_sum, sum_row, code_row) },
            _ => {
                for j in 0..n {
                    code_row[j] = columns.code(j, a_sum, sum_row[j]);
                }
            }
        }
    }
}

/// The per-column terms of one [`requantize`].
struct Columns<'a> {
    b_zero: &'a [i32],
    offset: &'a [i32],
    scale: &'a [f32],
    bias: &'a [f32],
    out_scale: f32,
    out_zero: i32,
}

impl Columns<'_> {
    #[inline]
    fn code(&self, j: usize, a_sum: i32, sum: i32) -> u8 {
        let exact = sum - self.b_zero[j] * a_sum + self.offset[j];
        quantize(
            exact as f32 * self.scale[j] + self.bias[j],
            self.out_scale,
            self.out_zero,
        )
    }
}

/// ONNX QuantizeLinear to uint8: `value / scale` rounded half to even, plus `zero`, saturated.
#[inline]
pub fn quantize(value: f32, scale: f32, zero: i32) -> u8 {
    // the clamp first keeps NaN and huge values out of the rounding; it cannot move a code
    // inside 0..=255 (|value / scale| ≥ 512 saturates either way)
    let q = (value / scale).clamp(-512.0, 512.0);
    (round_half_even(q) as i32 + zero).clamp(0, 255) as u8
}

/// Half-to-even rounding of `|x| < 2^22` by the float adder (vectorises without SSE4.1).
#[inline]
fn round_half_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + SHIFT) - SHIFT
}

/// Lanes of a softmax row's partial sums: the sum is taken in this order at every level.
const SUM_LANES: usize = 16;

/// Softmax of each row of uint8 codes of scale `scale` (the values `(c - zero) · scale`; the
/// zero point cancels), quantized to the codes of `out` (scale, zero). `exp_table[d]` is
/// `exp(-d · scale)`: every difference to the row's largest code is one of 256 values. Every
/// level gives the same codes.
pub fn softmax_rows(
    level: Int8Level,
    codes: &[u8],
    row_len: usize,
    exp_table: &[f32; 256],
    out_scale: f32,
    out_zero: i32,
    out: &mut [u8],
) {
    assert!(row_len > 0 && codes.len().is_multiple_of(row_len) && out.len() == codes.len());
    let level = level.or_below();
    let mut e = vec![0f32; row_len];
    for (row, out_row) in codes
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(row_len))
    {
        let sum = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` checked that the CPU has AVX2; `e` is one row.
            Int8Level::Avx2 => unsafe { avx2::exponentials(row, exp_table, &mut e) },
            _ => exponentials(row, exp_table, &mut e),
        };
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` checked that the CPU has AVX-512F/BW/VL; `e` and `out_row`
            // are one row.
            Int8Level::Avx512Vnni => unsafe {
                vnni::quantize_quotients(&e, sum, out_scale, out_zero, out_row)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `or_below` checked that the CPU has AVX2; `e` and `out_row` are one row.
            Int8Level::Avx2 => unsafe {
                avx2::quantize_quotients(&e, sum, out_scale, out_zero, out_row)
            },
            _ => {
                for (o, &e) in out_row.iter_mut().zip(&e) {
                    *o = quantize(e / sum, out_scale, out_zero);
                }
            }
        }
    }
}

/// `e[i] = exp_table[max - row[i]]` over the row's largest code, and their sum, taken in
/// [`SUM_LANES`] partial sums (lane `i % SUM_LANES` adds `e[i]` in turn), then the lanes in
/// order.
fn exponentials(row: &[u8], exp_table: &[f32; 256], e: &mut [f32]) -> f32 {
    let max = *row.iter().max().unwrap_or(&0);
    let mut lanes = [0f32; SUM_LANES];
    for (e, c) in e.chunks_mut(SUM_LANES).zip(row.chunks(SUM_LANES)) {
        for ((lane, e), &c) in lanes.iter_mut().zip(e).zip(c) {
            *e = exp_table[(max - c) as usize];
            *lane += *e;
        }
    }
    lanes.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes.
    fn bytes(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 11) as u8
            })
            .collect()
    }

    /// The plain product in i64.
    fn plain(a: &[u8], b: &[i8], k: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for a_row in a.chunks_exact(k) {
            for b_row in b.chunks_exact(k) {
                out.push(
                    a_row
                        .iter()
                        .zip(b_row)
                        .map(|(&x, &w)| x as i64 * w as i64)
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    fn every_level_matches_the_plain_product_on_odd_shapes() {
        // k below, at and past a group and not a multiple of it, n = 1, n past a panel and
        // not a multiple of 16, rows = 1 and past a tile; the extreme codes (255 × -128).
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 1, 7),
            (1, 65, 4),
            (5, 1, 33),
            (7, 64, 5),
            (6, 17, 64),
            (13, 130, 257),
            (4, 7, 1031),
        ] {
            let a = bytes(rows * k, 1 + k as u32);
            let b: Vec<i8> = bytes(n * k, 7 + n as u32)
                .into_iter()
                .map(|v| v as i8)
                .collect();
            let want = plain(&a, &b, k);
            let packed = PackedI8::from_rows(&b, k);
            for level in Int8Level::ALL {
                let mut got = vec![0i32; rows * n];
                gemm_u8i8(level, &a, &packed, &mut got);
                let got: Vec<i64> = got.into_iter().map(i64::from).collect();
                assert_eq!(got, want, "{level:?} rows {rows} n {n} k {k}");
            }
        }
        let (a, b) = (vec![255u8; 3 * 1031], vec![-128i8; 2 * 1031]);
        let packed = PackedI8::from_rows(&b, 1031);
        for level in Int8Level::ALL {
            let mut got = vec![0i32; 6];
            gemm_u8i8(level, &a, &packed, &mut got);
            assert!(got.iter().all(|&s| s == -255 * 128 * 1031), "{level:?}");
        }
    }

    #[test]
    fn an_unavailable_level_falls_back() {
        assert!(Int8Level::detect().is_available());
        assert_eq!(Int8Level::Scalar.or_below(), Int8Level::Scalar);
        assert_eq!(Int8Level::Avx512Vnni.or_below(), Int8Level::detect());
    }

    #[test]
    fn requantized_codes_are_the_rounded_values() {
        let (rows, n, k) = (3, 5, 9);
        let a = bytes(rows * k, 3);
        let b: Vec<i8> = bytes(n * k, 4).into_iter().map(|v| v as i8).collect();
        let packed = PackedI8::from_rows(&b, k);
        let mut sums = vec![0i32; rows * n];
        gemm_u8i8(Int8Level::detect(), &a, &packed, &mut sums);
        let b_zero = [0, 3, -2, 7, 1];
        let scale = [0.01, 0.02, 0.005, 0.03, 0.011];
        let bias = [0.5, -0.25, 0.0, 1.0, -3.0];
        let rq = Requantize {
            a_zero: 17,
            b_zero: &b_zero,
            scale: &scale,
            bias: Some(&bias),
            out_scale: 0.07,
            out_zero: 100,
        };
        let mut codes = vec![0u8; rows * n];
        requantize(Int8Level::Scalar, &a, &packed, &sums, &rq, &mut codes);
        for r in 0..rows {
            for j in 0..n {
                let exact: i64 = (0..k)
                    .map(|i| (a[r * k + i] as i64 - 17) * (b[j * k + i] as i64 - b_zero[j] as i64))
                    .sum();
                let value = exact as f64 * scale[j] as f64 + bias[j] as f64;
                let want = ((value / 0.07).round_ties_even() + 100.0).clamp(0.0, 255.0) as u8;
                assert!(
                    (codes[r * n + j] as i32 - want as i32).abs() <= 1,
                    "{r} {j}: {} vs {want}",
                    codes[r * n + j]
                );
            }
        }
        // ties go to the even code, as QuantizeLinear's do; saturation at both ends
        assert_eq!(quantize(0.25, 0.5, 0), 0);
        assert_eq!(quantize(0.75, 0.5, 0), 2);
        assert_eq!(quantize(-0.25, 0.5, 10), 10);
        assert_eq!(quantize(1e9, 0.5, 0), 255);
        assert_eq!(quantize(-1e9, 0.5, 0), 0);
        assert_eq!(quantize(f32::NAN, 0.5, 3), 3);
    }

    #[test]
    fn every_level_requantizes_and_normalizes_to_the_same_codes() {
        // n = 1, n past a vector and not a multiple of 8 or 16; rows of one and of several
        for (rows, n, k) in [
            (1, 1, 3),
            (3, 17, 40),
            (2, 33, 7),
            (5, 64, 100),
            (4, 47, 64),
        ] {
            let a = bytes(rows * k, 11 + n as u32);
            let b: Vec<i8> = bytes(n * k, 5 + k as u32)
                .into_iter()
                .map(|v| v as i8)
                .collect();
            let packed = PackedI8::from_rows(&b, k);
            let mut sums = vec![0i32; rows * n];
            gemm_u8i8(Int8Level::detect(), &a, &packed, &mut sums);
            let b_zero: Vec<i32> = (0..n as i32).map(|j| j % 5 - 2).collect();
            let scale: Vec<f32> = (0..n).map(|j| 1e-3 * (1.0 + j as f32 * 0.37)).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.77).sin()).collect();
            let rq = Requantize {
                a_zero: 9,
                b_zero: &b_zero,
                scale: &scale,
                bias: Some(&bias),
                out_scale: 0.013,
                out_zero: 120,
            };
            // sums of -350..=350 (no zero-point terms) at half a code each: every odd sum is
            // a tie, and the codes saturate at both ends
            let small_sums: Vec<i32> = (0..rows * n).map(|i| (i * 7 % 701) as i32 - 350).collect();
            let (no_zero, halves) = (vec![0; n], vec![0.25f32; n]);
            let ties = Requantize {
                a_zero: 0,
                b_zero: &no_zero,
                scale: &halves,
                bias: None,
                out_scale: 0.5,
                out_zero: 128,
            };
            let table: [f32; 256] = std::array::from_fn(|d| (-(d as f32) * 0.05).exp());
            for (rq, sums) in [(rq, &sums), (ties, &small_sums)] {
                let (mut want, mut want_probs) = (None, None);
                for level in Int8Level::ALL {
                    let mut codes = vec![0u8; rows * n];
                    requantize(level, &a, &packed, sums, &rq, &mut codes);
                    let mut probs = vec![0u8; rows * n];
                    softmax_rows(level, &codes, n, &table, 1.0 / 255.0, 0, &mut probs);
                    assert_eq!(
                        want.get_or_insert(codes.clone()),
                        &codes,
                        "{level:?} {rows} {n}"
                    );
                    assert_eq!(want_probs.get_or_insert(probs.clone()), &probs, "{level:?}");
                }
            }
        }
    }

    #[test]
    fn softmax_of_codes_sums_to_one() {
        let scale = 0.1f32;
        let table: [f32; 256] = std::array::from_fn(|d| (-(d as f32) * scale).exp());
        let codes = [10u8, 20, 30, 30, 0, 255];
        let mut out = [0u8; 6];
        softmax_rows(
            Int8Level::Scalar,
            &codes,
            3,
            &table,
            1.0 / 255.0,
            0,
            &mut out,
        );
        let want = |row: &[u8]| -> Vec<u8> {
            let v: Vec<f64> = row.iter().map(|&c| c as f64 * scale as f64).collect();
            let max = v.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = v.iter().map(|x| (x - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter()
                .map(|x| ((x / s) * 255.0).round_ties_even() as u8)
                .collect()
        };
        assert_eq!(&out[..3], want(&codes[..3]).as_slice());
        assert_eq!(&out[3..], want(&codes[3..]).as_slice());
    }
}
