//! The vision encoder (`thinker.visual.*`), as the reference's `Qwen3OmniMoeVisionEncoder` runs it
//! (SigLIP2-style): patches of `temporal_patch_size x patch_size^2` pixels through a linear patch
//! embedding (the checkpoint's Conv3d), a learned square position table resampled bilinearly
//! (align corners) to each grid, an axial 2-D rotary embedding, LayerNorm blocks with full
//! attention within each temporal patch (frame), then the merger (`spatial_merge_size^2` patches to
//! one token). The outputs of the blocks in `deepstack_visual_indexes` go through their own
//! mergers (LayerNorm after the merge) and are added to the first decoder layers' outputs at the
//! visual positions (DeepStack).
//!
//! Patches come in the processor's order: merge block by merge block, row-major inside a block.

use crate::model::activation;
use crate::model::norm::{LayerNorm, layer_norm};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use crate::model::linear::{Linear, linear};
use crate::model::qwen3_omni::config::VisionEncoderConfig;

/// The merged tokens of one call and the DeepStack features.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// (tokens, out_hidden_size).
    pub embeds: Tensor,
    /// One (tokens, out_hidden_size) per entry of `deepstack_visual_indexes`.
    pub deepstack: Vec<Tensor>,
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// `x` (n, d); `cos`/`sin` (n, head_dim); attention within each `segments` range.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let head_dim = d / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((n, 3, self.heads, head_dim))?;
        let rope = |t: Tensor| -> Result<Tensor> {
            let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            let t = t.to_dtype(DType::F32)?;
            t.broadcast_mul(&c)? + rotate_half(&t)?.broadcast_mul(&s)?
        };
        let dtype = x.dtype();
        let q = rope(qkv.i((.., 0))?)?.to_dtype(dtype)?.transpose(0, 1)?;
        let k = rope(qkv.i((.., 1))?)?.to_dtype(dtype)?.transpose(0, 1)?;
        let v = qkv.i((.., 2))?.transpose(0, 1)?;
        let scale = (head_dim as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, end) in segments {
            let len = end - start;
            let q = q.narrow(1, start, len)?.contiguous()?;
            let k = k.narrow(1, start, len)?.contiguous()?;
            let v = v.narrow(1, start, len)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs =
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
            outs.push(probs.matmul(&v)?);
        }
        let out = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, d))?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    attn: Attention,
    linear_fc1: Linear,
    linear_fc2: Linear,
}

impl Block {
    fn new(c: &VisionEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            norm1: layer_norm(d, 1e-6, vb.pp("norm1"))?,
            norm2: layer_norm(d, 1e-6, vb.pp("norm2"))?,
            attn: Attention {
                qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
                proj: linear(d, d, vb.pp("attn.proj"))?,
                heads: c.num_heads,
            },
            linear_fc1: linear(d, c.intermediate_size, vb.pp("mlp.linear_fc1"))?,
            linear_fc2: linear(c.intermediate_size, d, vb.pp("mlp.linear_fc2"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.norm1.forward(x)?, cos, sin, segments)?)?;
        let h = activation::gelu_tanh(&self.linear_fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.linear_fc2.forward(&h)?
    }
}

/// `Qwen3OmniMoeVisionPatchMerger`: LayerNorm per patch (or, after the shuffle, per merged
/// group), `merge^2` patches concatenated, Linear-GELU-Linear.
#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    merged: usize,
    norm_after_shuffle: bool,
}

impl PatchMerger {
    fn new(c: &VisionEncoderConfig, norm_after_shuffle: bool, vb: VarBuilder) -> Result<Self> {
        let merged = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        let norm = if norm_after_shuffle {
            merged
        } else {
            c.hidden_size
        };
        Ok(Self {
            ln_q: layer_norm(norm, 1e-6, vb.pp("ln_q"))?,
            fc1: linear(merged, merged, vb.pp("mlp.0"))?,
            fc2: linear(merged, c.out_hidden_size, vb.pp("mlp.2"))?,
            merged,
            norm_after_shuffle,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.norm_after_shuffle {
            self.ln_q.forward(&x.reshape(((), self.merged))?)?
        } else {
            self.ln_q.forward(x)?.reshape(((), self.merged))?
        };
        self.fc2
            .forward(&activation::gelu_erf(&self.fc1.forward(&x)?)?)
    }
}

/// `thinker.visual`.
#[derive(Debug, Clone)]
pub struct VisionEncoder {
    patch_embed: Linear,
    pos_embed: Embedding,
    blocks: Vec<Block>,
    merger: PatchMerger,
    deepstack_mergers: Vec<PatchMerger>,
    deepstack_visual_indexes: Vec<usize>,
    inv_freq: Vec<f32>,
    grid_per_side: usize,
    merge: usize,
    patch_dim: usize,
}

impl VisionEncoder {
    pub fn new(c: &VisionEncoderConfig, vb: VarBuilder) -> Result<Self> {
        if c.hidden_act != "gelu_pytorch_tanh" {
            candle_core::bail!(
                "vision_config.hidden_act {:?} is not supported (the reference uses gelu_pytorch_tanh)",
                c.hidden_act
            );
        }
        let grid_per_side = (c.num_position_embeddings as f64).sqrt() as usize;
        if grid_per_side * grid_per_side != c.num_position_embeddings {
            candle_core::bail!(
                "vision_config.num_position_embeddings {} is not a square grid",
                c.num_position_embeddings
            );
        }
        if let Some(&bad) = c.deepstack_visual_indexes.iter().find(|&&i| i >= c.depth) {
            candle_core::bail!(
                "vision_config.deepstack_visual_indexes has {bad}, past depth {}",
                c.depth
            );
        }
        let patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
        let proj = vb.pp("patch_embed.proj");
        let weight = proj
            .get(
                (
                    c.hidden_size,
                    c.in_channels,
                    c.temporal_patch_size,
                    c.patch_size,
                    c.patch_size,
                ),
                "weight",
            )?
            .reshape((c.hidden_size, patch_dim))?;
        let bias = proj.get(c.hidden_size, "bias")?;
        let head_dim = c.hidden_size / c.num_heads;
        let spatial = head_dim / 2;
        let theta = c.rope.theta(10000.0);
        let inv_freq = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32))
            .collect();
        Ok(Self {
            patch_embed: Linear::new(weight, Some(bias)),
            pos_embed: embedding(c.num_position_embeddings, c.hidden_size, vb.pp("pos_embed"))?,
            blocks: (0..c.depth)
                .map(|i| Block::new(c, vb.pp("blocks").pp(i)))
                .collect::<Result<_>>()?,
            merger: PatchMerger::new(c, false, vb.pp("merger"))?,
            deepstack_mergers: (0..c.deepstack_visual_indexes.len())
                .map(|i| PatchMerger::new(c, true, vb.pp("merger_list").pp(i)))
                .collect::<Result<_>>()?,
            deepstack_visual_indexes: c.deepstack_visual_indexes.clone(),
            inv_freq,
            grid_per_side,
            merge: c.spatial_merge_size,
            patch_dim,
        })
    }

    /// (row, column) of every patch of `grids`, in the processor's merge-block order.
    fn patch_rows_cols(&self, grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
        let m = self.merge;
        let mut out = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                out.push((bh * m + ih, bw * m + iw));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The position table resampled to each grid: per patch, the bilinear (align corners, clamped
    /// at the border) mix of its four nearest table entries.
    fn position_embeddings(&self, grids: &[[usize; 3]], device: &Device) -> Result<Tensor> {
        let side = self.grid_per_side;
        let axis = |index: usize, size: usize| -> [(usize, f32); 2] {
            let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
            let floor = src.floor();
            [0, 1].map(|o| {
                let tap = (floor as i64 + o).clamp(0, side as i64 - 1) as usize;
                let weight = (1.0 - (src - floor - o as f32).abs()).max(0.0);
                (tap, weight)
            })
        };
        let mut index = Vec::new();
        let mut weight = Vec::new();
        let mut grid_of_patch = Vec::new();
        for &g in grids {
            grid_of_patch.extend(std::iter::repeat_n(g, g[0] * g[1] * g[2]));
        }
        for ((row, col), g) in self.patch_rows_cols(grids).into_iter().zip(grid_of_patch) {
            for (h_tap, h_w) in axis(row, g[1]) {
                for (w_tap, w_w) in axis(col, g[2]) {
                    index.push((h_tap * side + w_tap) as u32);
                    weight.push(h_w * w_w);
                }
            }
        }
        let n = index.len() / 4;
        let index = Tensor::from_vec(index, n * 4, device)?;
        let weight = Tensor::from_vec(weight, (n, 4, 1), device)?;
        let table = self.pos_embed.embeddings().to_dtype(DType::F32)?;
        table
            .index_select(&index, 0)?
            .reshape((n, 4, ()))?
            .broadcast_mul(&weight)?
            .sum(1)
    }

    /// cos and sin (patches, head_dim) of the axial rotary embedding.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let mut freqs = Vec::new();
        for (row, col) in self.patch_rows_cols(grids) {
            let h = self.inv_freq.iter().map(|f| row as f32 * f);
            let w = self.inv_freq.iter().map(|f| col as f32 * f);
            let hw: Vec<f32> = h.chain(w).collect();
            freqs.extend_from_slice(&hw);
            freqs.extend_from_slice(&hw);
        }
        let n = freqs.len() / (4 * self.inv_freq.len());
        let freqs = Tensor::from_vec(freqs, (n, 4 * self.inv_freq.len()), device)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Encodes `pixels` (patches, channels * temporal_patch * patch^2) of images or videos with
    /// patch grids `grids` (t, h, w each); returns the merged tokens and DeepStack features.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<VisionOutput> {
        let (n, dim) = pixels.dims2()?;
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if dim != self.patch_dim || n != expected {
            candle_core::bail!(
                "vision input is ({n}, {dim}); the grids {grids:?} want ({expected}, {})",
                self.patch_dim
            );
        }
        if let Some(g) = grids
            .iter()
            .find(|g| g[1] % self.merge != 0 || g[2] % self.merge != 0)
        {
            candle_core::bail!(
                "vision grid {g:?} is not a multiple of spatial_merge_size {}",
                self.merge
            );
        }
        let device = pixels.device();
        let dtype = self.pos_embed.embeddings().dtype();
        let x = self.patch_embed.forward(&pixels.to_dtype(dtype)?)?;
        let mut x = (x + self.position_embeddings(grids, device)?.to_dtype(dtype)?)?;
        let (cos, sin) = self.rotary(grids, device)?;
        let mut segments = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                segments.push((start, start + h * w));
                start += h * w;
            }
        }
        let mut deepstack = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &cos, &sin, &segments)?;
            if let Some(k) = self.deepstack_visual_indexes.iter().position(|&d| d == i) {
                deepstack.push(self.deepstack_mergers[k].forward(&x)?);
            }
        }
        Ok(VisionOutput {
            embeds: self.merger.forward(&x)?,
            deepstack,
        })
    }
}
