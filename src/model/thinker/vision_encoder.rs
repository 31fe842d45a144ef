//! The Qwen2.5-VL style vision tower of the Thinker (`thinker.visual`): Conv3d patch embedding,
//! 2-D rotary embedding over (row, column) patch positions, blocks of RMSNorm + attention +
//! SwiGLU where most layers attend within windows of `window_size` pixels and the layers of
//! `fullatt_block_indexes` within whole frames (one temporal grid), then the patch merger that
//! turns each `merge x merge` group of patches into one Thinker embedding.
//!
//! The blocks run in *window order*: merged-token groups are permuted so that every attention
//! window (and every frame) is a contiguous run of rows, and the merger output is permuted back.
//! Attention is block-diagonal: equal-length windows are batched together and attended
//! separately, so no mask over all patches is ever built.

use crate::model::activation;
use crate::model::linear::attention_dtype;
use crate::model::norm::{RmsNorm, rms_norm};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use crate::model::config::VisionEncoderConfig;
use crate::model::linear::{Linear, linear};

/// The reference hard-codes this epsilon for every RMSNorm of the vision tower.
const RMS_EPS: f64 = 1e-6;
/// Largest attention score tensor (elements) computed at once; longer segments are split
/// along the queries, which leaves each softmax row whole.
const SCORE_BUDGET: usize = 1 << 26;

/// Where every patch goes in window order and which rows attend together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLayout {
    /// Merged-token indices (groups of `merge^2` patch rows) in window order.
    pub window_index: Vec<usize>,
    /// Cumulative patch counts of the attention windows, in window order.
    pub cu_window_seqlens: Vec<usize>,
    /// Cumulative patch counts of the frames (one temporal grid each): full-attention blocks.
    pub cu_seqlens: Vec<usize>,
}

impl WindowLayout {
    /// The layout of `grids` ((t, h, w) in patches each) for a tower with these settings: the
    /// merged grid is cut into windows of `window_size / merge / patch` merged tokens a side
    /// (padding the last row and column of windows), enumerated row-major per frame.
    pub fn new(
        grids: &[[usize; 3]],
        spatial_merge_size: usize,
        window_size: usize,
        patch_size: usize,
    ) -> Result<Self> {
        let m = spatial_merge_size;
        let side = window_size / m / patch_size;
        if m == 0 || side == 0 {
            candle_core::bail!(
                "vision window_size {window_size} is smaller than one merged token ({m} x {patch_size} px)"
            );
        }
        let unit = m * m;
        let mut window_index = Vec::new();
        let mut cu_window_seqlens = vec![0usize];
        let mut cu_seqlens = vec![0usize];
        let mut offset = 0;
        for &[t, h, w] in grids {
            if t == 0 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
                candle_core::bail!(
                    "vision grid (t {t}, h {h}, w {w}) must be positive with h and w multiples of the merge size {m}"
                );
            }
            let (gh, gw) = (h / m, w / m);
            // The reference always pads, by a whole window when the side divides evenly; the
            // empty windows that leaves contribute no rows.
            let (nh, nw) = (
                (gh + side - gh % side) / side,
                (gw + side - gw % side) / side,
            );
            for frame in 0..t {
                for wy in 0..nh {
                    for wx in 0..nw {
                        let mut count = 0;
                        for y in wy * side..((wy + 1) * side).min(gh) {
                            for x in wx * side..((wx + 1) * side).min(gw) {
                                window_index.push(offset + (frame * gh + y) * gw + x);
                                count += 1;
                            }
                        }
                        let last = *cu_window_seqlens.last().expect("starts with 0");
                        if count > 0 {
                            cu_window_seqlens.push(last + count * unit);
                        }
                    }
                }
                let last = *cu_seqlens.last().expect("starts with 0");
                cu_seqlens.push(last + h * w);
            }
            offset += t * gh * gw;
        }
        Ok(Self {
            window_index,
            cu_window_seqlens,
            cu_seqlens,
        })
    }

    /// Patch rows in window order: each merged token expanded to its `unit` patch rows.
    fn patch_order(&self, unit: usize) -> Vec<u32> {
        self.window_index
            .iter()
            .flat_map(|&g| (g * unit..(g + 1) * unit).map(|r| r as u32))
            .collect()
    }
}

/// (row, column) of every patch in processor order: merge groups contiguous, frames repeated.
pub fn patch_positions(grids: &[[usize; 3]], spatial_merge_size: usize) -> Vec<(usize, usize)> {
    let m = spatial_merge_size;
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for hb in 0..h / m {
                for wb in 0..w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            out.push((hb * m + mh, wb * m + mw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Segments of rows that attend only among themselves, grouped by length so that each group
/// runs as one batched attention.
#[derive(Debug, Clone)]
struct Segments {
    groups: Vec<SegmentGroup>,
    /// Rows of the concatenated group outputs back in input order (None when already in order).
    restore: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct SegmentGroup {
    len: usize,
    count: usize,
    rows: GroupRows,
}

/// Where a group's rows are: one run when its segments are back to back, else gathered.
#[derive(Debug, Clone)]
enum GroupRows {
    Run(usize),
    Gather(Tensor),
}

impl SegmentGroup {
    /// The group's rows of `t` (rows, heads, d) as (count, heads, len, d).
    fn take(&self, t: &Tensor) -> Result<Tensor> {
        let (_, heads, d) = t.dims3()?;
        let rows = match &self.rows {
            GroupRows::Run(start) => t.narrow(0, *start, self.count * self.len)?,
            GroupRows::Gather(index) => t.index_select(index, 0)?,
        };
        rows.reshape((self.count, self.len, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    }
}

impl Segments {
    fn new(cu: &[usize], device: &Device) -> Result<Self> {
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for pair in cu.windows(2) {
            if pair[1] > pair[0] {
                by_len.entry(pair[1] - pair[0]).or_default().push(pair[0]);
            }
        }
        let total = cu.last().copied().unwrap_or(0);
        let mut groups = Vec::with_capacity(by_len.len());
        let mut order: Vec<u32> = Vec::with_capacity(total);
        for (len, starts) in by_len {
            let contiguous = starts.windows(2).all(|s| s[1] == s[0] + len);
            let rows: Vec<u32> = starts
                .iter()
                .flat_map(|&s| (s..s + len).map(|r| r as u32))
                .collect();
            let group_rows = if contiguous {
                GroupRows::Run(starts[0])
            } else {
                GroupRows::Gather(Tensor::from_slice(&rows, rows.len(), device)?)
            };
            order.extend_from_slice(&rows);
            groups.push(SegmentGroup {
                len,
                count: starts.len(),
                rows: group_rows,
            });
        }
        let in_order = order.iter().enumerate().all(|(i, &r)| r as usize == i);
        let restore = if in_order {
            None
        } else {
            let mut inverse = vec![0u32; order.len()];
            for (pos, &row) in order.iter().enumerate() {
                inverse[row as usize] = pos as u32;
            }
            Some(Tensor::from_slice(&inverse, inverse.len(), device)?)
        };
        Ok(Self { groups, restore })
    }
}

/// `softmax(q k^T * scale) v` over (n, heads, len, d) with f32 scores, split along the queries
/// when the score tensor would be too large.
fn batched_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (dtype, product_dtype) = (v.dtype(), attention_dtype(v));
    if product_dtype != dtype {
        let (q, k, v) = (
            q.to_dtype(product_dtype)?,
            k.to_dtype(product_dtype)?,
            v.to_dtype(product_dtype)?,
        );
        return batched_attention(&q, &k, &v, scale)?.to_dtype(dtype);
    }
    let (n, heads, len, _) = q.dims4()?;
    let k_t = k.t()?;
    let attend = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&k_t)? * scale)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        probs.matmul(v)
    };
    let per_query = n * heads * len;
    if per_query * len <= SCORE_BUDGET {
        return attend(q);
    }
    let chunk = (SCORE_BUDGET / per_query).max(1);
    let mut outs = Vec::with_capacity(len.div_ceil(chunk));
    let mut start = 0;
    while start < len {
        let rows = chunk.min(len - start);
        outs.push(attend(&q.narrow(2, start, rows)?.contiguous()?)?);
        start += rows;
    }
    Tensor::cat(&outs, 2)
}

/// Rotary tables of the patches in window order: (cos, sin), each (n, head_dim), f32.
#[derive(Debug, Clone)]
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

/// Axial 2-D RoPE: `head_dim / 4` frequencies applied to the row and the same to the column,
/// the two halves concatenated and the whole repeated over the head (rotate-half layout).
#[derive(Debug, Clone)]
struct VisionRotary {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl VisionRotary {
    fn new(head_dim: usize, theta: f64) -> Result<Self> {
        if !head_dim.is_multiple_of(4) {
            candle_core::bail!("vision head_dim {head_dim} must be a multiple of 4 for 2-D RoPE");
        }
        let spatial = head_dim / 2;
        // As the reference: base ** (arange(0, spatial, 2) / spatial) in f32.
        let inv_freq = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32))
            .collect();
        Ok(Self { inv_freq, head_dim })
    }

    fn tables(&self, positions: &[(usize, usize)], device: &Device) -> Result<RotaryTables> {
        let (n, d) = (positions.len(), self.head_dim);
        let quarter = self.inv_freq.len();
        let mut cos = vec![0f32; n * d];
        let mut sin = vec![0f32; n * d];
        for (i, &(row, col)) in positions.iter().enumerate() {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let (ah, aw) = (row as f32 * f, col as f32 * f);
                for rep in [0, 2 * quarter] {
                    cos[i * d + rep + j] = ah.cos();
                    sin[i * d + rep + j] = ah.sin();
                    cos[i * d + rep + quarter + j] = aw.cos();
                    sin[i * d + rep + quarter + j] = aw.sin();
                }
            }
        }
        Ok(RotaryTables {
            cos: Tensor::from_vec(cos, (n, 1, d), device)?,
            sin: Tensor::from_vec(sin, (n, 1, d), device)?,
        })
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// q * cos + rotate_half(q) * sin on (n, heads, d), in f32, back to the input dtype.
fn apply_rotary(x: &Tensor, rotary: &RotaryTables) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let out = (x.broadcast_mul(&rotary.cos)? + rotate_half(&x)?.broadcast_mul(&rotary.sin)?)?;
    out.to_dtype(dtype)
}

#[derive(Debug, Clone)]
struct VisionAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(cfg: &VisionEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q: linear(h, h, vb.pp("q"))?,
            k: linear(h, h, vb.pp("k"))?,
            v: linear(h, h, vb.pp("v"))?,
            proj: linear(h, h, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, segments: &Segments, rotary: &RotaryTables) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (heads, d) = (self.num_heads, self.head_dim);
        let q = apply_rotary(&self.q.forward(x)?.reshape((n, heads, d))?, rotary)?;
        let k = apply_rotary(&self.k.forward(x)?.reshape((n, heads, d))?, rotary)?;
        let v = self.v.forward(x)?.reshape((n, heads, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.groups.len());
        for g in &segments.groups {
            let out = batched_attention(&g.take(&q)?, &g.take(&k)?, &g.take(&v)?, scale)?;
            outs.push(out.transpose(1, 2)?.reshape((g.count * g.len, heads * d))?);
        }
        let mut out = if outs.len() == 1 {
            outs.pop().expect("one group")
        } else {
            Tensor::cat(&outs, 0)?
        };
        if let Some(restore) = &segments.restore {
            out = out.index_select(restore, 0)?;
        }
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl VisionMlp {
    fn new(cfg: &VisionEncoderConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, i, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, vb.pp("up_proj"))?,
            down_proj: linear(i, h, vb.pp("down_proj"))?,
            act,
        })
    }
}

impl Module for VisionMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let h = match self.act {
            Activation::Silu => activation::silu_mul(&gate, &up)?,
            act => (activation::apply(act, &gate)? * up)?,
        };
        self.down_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: VisionAttention,
    mlp: VisionMlp,
}

impl VisionBlock {
    fn new(cfg: &VisionEncoderConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: rms_norm(cfg.hidden_size, RMS_EPS, vb.pp("norm1"))?,
            norm2: rms_norm(cfg.hidden_size, RMS_EPS, vb.pp("norm2"))?,
            attn: VisionAttention::new(cfg, vb.pp("attn"))?,
            mlp: VisionMlp::new(cfg, act, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, segments: &Segments, rotary: &RotaryTables) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.norm1.forward(x)?, segments, rotary)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// `merger`: RMSNorm per patch, `merge^2` patches concatenated, Linear-GELU-Linear.
#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    merged_width: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let merged_width = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: rms_norm(cfg.hidden_size, RMS_EPS, vb.pp("ln_q"))?,
            fc1: linear(merged_width, merged_width, vb.pp("mlp").pp(0))?,
            fc2: linear(merged_width, cfg.out_hidden_size, vb.pp("mlp").pp(2))?,
            merged_width,
        })
    }
}

impl Module for PatchMerger {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_q.forward(x)?.reshape(((), self.merged_width))?;
        let x = activation::gelu_erf(&self.fc1.forward(&x)?)?;
        self.fc2.forward(&x)
    }
}

/// What the parity tests look at besides the output.
#[derive(Debug, Clone)]
pub struct VisionTrace {
    /// Patch embeddings in processor order, (n_patches, hidden).
    pub patch_embed: Tensor,
    /// The last block's output in window order, (n_patches, hidden).
    pub blocks_output: Tensor,
    /// Merged embeddings in processor order, (n_patches / merge^2, out_hidden).
    pub embeds: Tensor,
    pub layout: WindowLayout,
}

/// The vision tower (`thinker.visual`).
#[derive(Debug, Clone)]
pub struct VisionEncoder {
    /// Conv3d kernel (stride = kernel) flattened to (hidden, C * tp * p * p): a product per row.
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    rotary: VisionRotary,
    fullatt_block_indexes: Vec<usize>,
    spatial_merge_size: usize,
    window_size: usize,
    patch_size: usize,
    patch_dim: usize,
}

impl VisionEncoder {
    /// `vb` points at `thinker.visual`.
    pub fn new(cfg: &VisionEncoderConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            candle_core::bail!(
                "vision hidden_size {} is not a multiple of num_heads {}",
                cfg.hidden_size,
                cfg.num_heads
            );
        }
        let act: Activation =
            serde_json::from_value(serde_json::Value::String(cfg.hidden_act.clone())).map_err(
                |e| candle_core::Error::Msg(format!("vision hidden_act {:?}: {e}", cfg.hidden_act)),
            )?;
        let (c, tp, p) = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size);
        let patch_dim = c * tp * p * p;
        let patch_embed = vb
            .pp("patch_embed")
            .pp("proj")
            .get((cfg.hidden_size, c, tp, p, p), "weight")?
            .reshape((cfg.hidden_size, patch_dim))?;
        let patch_embed = Linear::new(patch_embed, None);
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(cfg, act, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            blocks,
            merger: PatchMerger::new(cfg, vb.pp("merger"))?,
            rotary: VisionRotary::new(cfg.head_dim(), cfg.rope_theta())?,
            fullatt_block_indexes: cfg.fullatt_block_indexes.clone(),
            spatial_merge_size: cfg.spatial_merge_size,
            window_size: cfg.window_size,
            patch_size: cfg.patch_size,
            patch_dim,
        })
    }

    /// Window permutation and attention blocks for `grids`.
    pub fn layout(&self, grids: &[[usize; 3]]) -> Result<WindowLayout> {
        WindowLayout::new(
            grids,
            self.spatial_merge_size,
            self.window_size,
            self.patch_size,
        )
    }

    /// Embeddings of one or several images/videos: `pixel_values` (n_patches, C*tp*p*p) with
    /// the rows of each grid in turn; returns (n_patches / merge^2, out_hidden) in the same
    /// order, ready to replace the Thinker's image/video placeholder tokens.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        Ok(self.forward_traced(pixel_values, grids)?.embeds)
    }

    /// [`Self::forward`] keeping the intermediate results the reference fixtures record.
    pub fn forward_traced(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
    ) -> Result<VisionTrace> {
        let (n, width) = pixel_values.dims2()?;
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if width != self.patch_dim || n != expected || n == 0 {
            candle_core::bail!(
                "pixel_values ({n}, {width}) do not match the grids {grids:?}: expected ({expected}, {})",
                self.patch_dim
            );
        }
        let device = pixel_values.device();
        let layout = self.layout(grids)?;
        let unit = self.spatial_merge_size * self.spatial_merge_size;

        let x = pixel_values.to_dtype(self.patch_embed.weight().dtype())?;
        let patch_embed = self.patch_embed.forward(&x)?;

        let order = layout.patch_order(unit);
        let order_t = Tensor::from_slice(&order, order.len(), device)?;
        let mut x = patch_embed.index_select(&order_t, 0)?;

        let positions = patch_positions(grids, self.spatial_merge_size);
        let ordered: Vec<(usize, usize)> = order.iter().map(|&r| positions[r as usize]).collect();
        let rotary = self.rotary.tables(&ordered, device)?;

        let windows = Segments::new(&layout.cu_window_seqlens, device)?;
        let frames = Segments::new(&layout.cu_seqlens, device)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if self.fullatt_block_indexes.contains(&i) {
                &frames
            } else {
                &windows
            };
            x = block.forward(&x, segments, &rotary)?;
        }

        let merged = self.merger.forward(&x)?;
        let mut reverse = vec![0u32; layout.window_index.len()];
        for (pos, &g) in layout.window_index.iter().enumerate() {
            reverse[g] = pos as u32;
        }
        let reverse = Tensor::from_slice(&reverse, reverse.len(), device)?;
        let embeds = merged.index_select(&reverse, 0)?;
        Ok(VisionTrace {
            patch_embed,
            blocks_output: x,
            embeds,
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_layout_of_a_small_grid() {
        // merged grid 3x5, windows of 2x2 merged tokens: 2x3 windows, sizes 4,4,2,2,2,1.
        let l = WindowLayout::new(&[[1, 6, 10]], 2, 56, 14).unwrap();
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 32, 40, 48, 56, 60]);
        assert_eq!(l.cu_seqlens, vec![0, 60]);
        assert_eq!(&l.window_index[..6], &[0, 1, 5, 6, 2, 3]);
        let mut sorted = l.window_index.clone();
        sorted.sort();
        assert_eq!(sorted, (0..15).collect::<Vec<_>>());
    }

    #[test]
    fn windows_of_several_frames_and_images_stay_apart() {
        // evenly divisible sides get a whole padding window (empty, dropped)
        let l = WindowLayout::new(&[[2, 4, 4], [1, 2, 6]], 2, 56, 14).unwrap();
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 32, 40, 44]);
        assert_eq!(l.cu_seqlens, vec![0, 16, 32, 44]);
        assert_eq!(l.window_index, (0..11).collect::<Vec<_>>());
        assert!(WindowLayout::new(&[[1, 3, 4]], 2, 56, 14).is_err());
    }

    #[test]
    fn block_diagonal_attention_matches_a_masked_one() -> Result<()> {
        let dev = Device::Cpu;
        let (n, heads, d) = (11usize, 2usize, 4usize);
        let cu = [0usize, 3, 7, 10, 11];
        let q = Tensor::randn(0f32, 1.0, (n, heads, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (n, heads, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (n, heads, d), &dev)?;
        let segments = Segments::new(&cu, &dev)?;
        let scale = 0.5;
        let mut outs = Vec::new();
        for g in &segments.groups {
            let o = batched_attention(&g.take(&q)?, &g.take(&k)?, &g.take(&v)?, scale)?;
            outs.push(o.transpose(1, 2)?.reshape((g.count * g.len, heads * d))?);
        }
        let got = Tensor::cat(&outs, 0)?.index_select(segments.restore.as_ref().unwrap(), 0)?;

        // Dense attention with a block mask.
        let seg_of = |i: usize| cu.windows(2).position(|w| i >= w[0] && i < w[1]).unwrap();
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| {
                if seg_of(i) == seg_of(j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, n, n), &dev)?;
        let (qh, kh, vh) = (
            q.transpose(0, 1)?.contiguous()?,
            k.transpose(0, 1)?.contiguous()?,
            v.transpose(0, 1)?.contiguous()?,
        );
        let scores = ((qh.matmul(&kh.t()?)? * scale)?).broadcast_add(&mask)?;
        let want = candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&vh)?
            .transpose(0, 1)?
            .reshape((n, heads * d))?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn query_chunking_gives_the_same_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 1, 9000, 2), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 9000, 2), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 9000, 2), &dev)?;
        // 9000^2 scores exceed the budget, so this runs in query chunks.
        const { assert!(9000 * 9000 > SCORE_BUDGET) };
        let chunked = batched_attention(&q, &k, &v, 0.7)?;
        let head = q.narrow(2, 0, 100)?.contiguous()?;
        let direct =
            candle_nn::ops::softmax_last_dim(&(head.matmul(&k.t()?)? * 0.7)?)?.matmul(&v)?;
        let diff = (chunked.narrow(2, 0, 100)? - direct)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
