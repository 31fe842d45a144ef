//! Block-local attention of the token2wav DiT for one (batch item, head, query block): the
//! queries of block `qb` attend to the keys of blocks `qb - back ..= qb + ahead` that exist,
//! a contiguous range of frames, so nothing outside it is computed or masked. q, k and v are
//! read in place from the projections' `[frames, heads · head_dim]` rows (no transpose to
//! heads-first); the head's rotary embedding (interleaved pairs, `rope_i`) is applied while
//! the block's rows are copied into scratch.

use crate::Level;

/// Shape of one attention call: `frames` rows of `heads · head_dim` values per input.
#[derive(Debug, Clone, Copy)]
pub struct BandShape {
    pub frames: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub block: usize,
    pub back: usize,
    pub ahead: usize,
    /// Multiplies `q · k` before the softmax.
    pub scale: f32,
}

impl BandShape {
    pub fn blocks(&self) -> usize {
        self.frames.div_ceil(self.block)
    }

    /// The key frames `[start, end)` of query block `qb`.
    pub fn key_range(&self, qb: usize) -> (usize, usize) {
        let start = qb.saturating_sub(self.back) * self.block;
        let end = ((qb + self.ahead + 1) * self.block).min(self.frames);
        (start, end)
    }
}

/// The rotary table of a head: `cos`, `sin` `[frames, head_dim / 2]`.
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// Reusable buffers of [`band_attention`] (one per thread).
#[derive(Debug, Default)]
pub struct BandScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// Query block `qb` of head `head`: `out` receives the block's rows, `[rows, head_dim]` (rows =
/// the block's frames), from `q`, `k`, `v` `[frames, heads · head_dim]` of one batch item.
/// `rope` rotates this head's queries and keys (the DiT rotates head 0 only).
///
/// # Panics
/// When the buffers do not have the shape's sizes, `head_dim` is odd with a rope, or `qb`
/// is past the last block.
#[allow(clippy::too_many_arguments)]
pub fn band_attention(
    level: Level,
    shape: &BandShape,
    head: usize,
    qb: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    rope: Option<Rope>,
    out: &mut [f32],
    scratch: &mut BandScratch,
) {
    let width = shape.heads * shape.head_dim;
    let n = shape.frames * width;
    assert!(
        q.len() == n && k.len() == n && v.len() == n,
        "band attention: input sizes"
    );
    assert!(
        head < shape.heads && qb < shape.blocks(),
        "band attention: head or block"
    );
    let rows = shape.block.min(shape.frames - qb * shape.block);
    assert_eq!(
        out.len(),
        rows * shape.head_dim,
        "band attention: output size"
    );
    if let Some(r) = rope {
        let half = shape.frames * (shape.head_dim / 2);
        assert!(
            shape.head_dim.is_multiple_of(2) && r.cos.len() == half && r.sin.len() == half,
            "band attention: rotary table"
        );
    }
    let args = Args {
        shape,
        head,
        qb,
        q,
        k,
        v,
        rope,
    };
    match level.or_below() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `or_below` returned a level this CPU has.
        Level::Avx512Bf16 => unsafe { run_avx512(&args, out, scratch) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2Fma => unsafe { run_avx2(&args, out, scratch) },
        _ => run_generic(&args, out, scratch),
    }
}

struct Args<'a> {
    shape: &'a BandShape,
    head: usize,
    qb: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    rope: Option<Rope<'a>>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run_avx512(args: &Args, out: &mut [f32], scratch: &mut BandScratch) {
    run_generic(args, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(args: &Args, out: &mut [f32], scratch: &mut BandScratch) {
    run_generic(args, out, scratch)
}

/// Copies rows `[start, end)` of head `head` into `dst` (`[end - start, head_dim]`), rotated
/// by `rope` when given.
#[inline(always)]
fn gather_head(
    src: &[f32],
    shape: &BandShape,
    head: usize,
    (start, end): (usize, usize),
    rope: Option<Rope>,
    dst: &mut Vec<f32>,
) {
    let (d, width) = (shape.head_dim, shape.heads * shape.head_dim);
    dst.clear();
    dst.resize((end - start) * d, 0.0);
    for (frame, row) in (start..end).zip(dst.chunks_exact_mut(d)) {
        let x = &src[frame * width + head * d..][..d];
        match rope {
            None => row.copy_from_slice(x),
            Some(r) => {
                let half = d / 2;
                let (cos, sin) = (
                    &r.cos[frame * half..][..half],
                    &r.sin[frame * half..][..half],
                );
                for (((pair, x), &c), &s) in row
                    .chunks_exact_mut(2)
                    .zip(x.chunks_exact(2))
                    .zip(cos)
                    .zip(sin)
                {
                    pair[0] = x[0] * c - x[1] * s;
                    pair[1] = x[0] * s + x[1] * c;
                }
            }
        }
    }
}

/// Lanes of the dot products' partial sums: a fixed-width array the compiler keeps in vector
/// registers (a plain sum would have to run in order, one lane).
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let whole = a.len() - a.len() % LANES;
    for (ca, cb) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut sum = 0f32;
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += x * y;
    }
    acc.iter().sum::<f32>() + sum
}

#[inline(always)]
fn run_generic(args: &Args, out: &mut [f32], scratch: &mut BandScratch) {
    let &Args {
        shape,
        head,
        qb,
        q,
        k,
        v,
        rope,
    } = args;
    let (d, width) = (shape.head_dim, shape.heads * shape.head_dim);
    let q_range = (
        qb * shape.block,
        (qb * shape.block + shape.block).min(shape.frames),
    );
    let (k0, k1) = shape.key_range(qb);
    let keys = k1 - k0;
    gather_head(q, shape, head, q_range, rope, &mut scratch.q);
    gather_head(k, shape, head, (k0, k1), rope, &mut scratch.k);

    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(keys, 0.0);
    let acc = &mut scratch.out;
    acc.clear();
    acc.resize(d, 0.0);
    for (q_row, out_row) in scratch.q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut max = f32::NEG_INFINITY;
        for (s, k_row) in scores.iter_mut().zip(scratch.k.chunks_exact(d)) {
            *s = dot(q_row, k_row) * shape.scale;
            max = max.max(*s);
        }
        let mut total = 0f32;
        for s in scores.iter_mut() {
            *s = crate::activation::exp(*s - max);
            total += *s;
        }
        acc.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let v_row = &v[(k0 + j) * width + head * d..][..d];
            for (a, &x) in acc.iter_mut().zip(v_row) {
                *a += p * x;
            }
        }
        let inv = 1.0 / total;
        for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, phase: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.731 + phase).sin()) * 1.5)
            .collect()
    }

    /// Full attention with the boolean block mask, in f64, rotary on `rope_head`.
    fn reference(
        shape: &BandShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rope: Option<(usize, Rope)>,
    ) -> Vec<f64> {
        let (n, h, d) = (shape.frames, shape.heads, shape.head_dim);
        let width = h * d;
        let rotate = |x: &[f32], head: usize, frame: usize| -> Vec<f64> {
            let row: Vec<f64> = x[frame * width + head * d..][..d]
                .iter()
                .map(|&v| v as f64)
                .collect();
            match rope {
                Some((rh, r)) if rh == head => (0..d)
                    .map(|i| {
                        let p = i / 2;
                        let (c, s) = (
                            r.cos[frame * d / 2 + p] as f64,
                            r.sin[frame * d / 2 + p] as f64,
                        );
                        let (a, b) = (row[2 * p], row[2 * p + 1]);
                        if i % 2 == 0 {
                            a * c - b * s
                        } else {
                            a * s + b * c
                        }
                    })
                    .collect(),
                _ => row,
            }
        };
        let mut out = vec![0f64; n * width];
        for head in 0..h {
            for p in 0..n {
                let qr = rotate(q, head, p);
                let allowed: Vec<usize> = (0..n)
                    .filter(|&f| {
                        let diff = (f / shape.block) as i64 - (p / shape.block) as i64;
                        diff >= -(shape.back as i64) && diff <= shape.ahead as i64
                    })
                    .collect();
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&f| {
                        let kr = rotate(k, head, f);
                        qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>() * shape.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for (&f, w) in allowed.iter().zip(&e) {
                    for i in 0..d {
                        out[p * width + head * d + i] +=
                            w / total * v[f * width + head * d + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_level_matches_masked_full_attention() {
        for (frames, heads, head_dim, block, back, ahead) in [
            (1, 1, 2, 3, 0, 0),
            (5, 2, 6, 3, 1, 0),
            (9, 3, 4, 3, 0, 1),
            (10, 2, 18, 3, 1, 1),
            (17, 2, 34, 4, 2, 1),
            (48, 2, 64, 24, 1, 1),
        ] {
            let shape = BandShape {
                frames,
                heads,
                head_dim,
                block,
                back,
                ahead,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let n = frames * heads * head_dim;
            let (q, k, v) = (values(n, 0.1), values(n, 1.7), values(n, 2.9));
            let half = frames * head_dim / 2;
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..half)
                .map(|i| ((i as f32 * 0.3).cos(), (i as f32 * 0.3).sin()))
                .unzip();
            let rope = Rope {
                cos: &cos,
                sin: &sin,
            };
            let want = reference(&shape, &q, &k, &v, Some((0, rope)));
            for level in Level::ALL {
                let mut scratch = BandScratch::default();
                for head in 0..heads {
                    for qb in 0..shape.blocks() {
                        let rows = block.min(frames - qb * block);
                        let mut out = vec![f32::NAN; rows * head_dim];
                        let r = (head == 0).then_some(rope);
                        band_attention(
                            level,
                            &shape,
                            head,
                            qb,
                            (&q, &k, &v),
                            r,
                            &mut out,
                            &mut scratch,
                        );
                        for (i, row) in out.chunks_exact(head_dim).enumerate() {
                            let frame = qb * block + i;
                            for (j, &g) in row.iter().enumerate() {
                                let w = want[frame * heads * head_dim + head * head_dim + j];
                                assert!(
                                    (g as f64 - w).abs() < 1e-5,
                                    "{level:?} {shape:?} head {head} frame {frame}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
