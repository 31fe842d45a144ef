//! Smart Turn v3.2 (BSD-2, pipecat-ai/smart-turn), the int8 CPU model, on candle.
//!
//! A Whisper-tiny encoder (two convolutions, 4 pre-norm layers of 6 heads × 64, 400 positions:
//! 8 s of 80-bin log-mel) and a head that pools the encoder's frames by attention (Linear,
//! tanh, Linear, softmax over time) and classifies the pooled vector (Linear, LayerNorm, GELU,
//! Linear, GELU, Linear, sigmoid) into the probability that the speaker's turn is complete.
//!
//! The published model is statically quantized: uint8 weights (zero point 128) per output
//! channel, and uint8 activations at fixed points of the graph (QuantizeLinear →
//! DequantizeLinear pairs). The classifier was calibrated with those roundings, and the float
//! model without them is a different classifier (0.93 instead of 0.08 on an unfinished
//! sentence), so this runs the graph as written. Every product of the graph takes two rounded
//! operands, so each is computed as onnxruntime's int8 kernels do: on the uint8 codes, summed
//! exactly in i32 ([`int8`]: AVX-512 VNNI where the CPU has it), then scaled once and rounded to
//! the next point in the same pass. Norms, GELU, softmax and residuals are f32. The tensor names
//! are the PyTorch module's; `scripts/extract_smart_turn.py` writes them from the ONNX graph.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// Mel bins of the input.
pub const SMART_TURN_MELS: usize = 80;
/// Mel frames of the input (8 s at a 10 ms hop).
pub const SMART_TURN_FRAMES: usize = 800;

const WIDTH: usize = 384;
const HEADS: usize = 6;
const HEAD_DIM: usize = WIDTH / HEADS;
const FFN: usize = 1536;
const POOL: usize = 256;
const LAYER_NORM_EPS: f64 = 1e-5;
/// Positions of the encoder (the second convolution halves the frames).
const POSITIONS: usize = SMART_TURN_FRAMES / 2;

/// Scale and zero point of a uint8 activation.
#[derive(Debug, Clone, Copy)]
struct QuantPoint {
    scale: f32,
    zero_point: i32,
}

impl QuantPoint {
    fn load(vb: &VarBuilder, name: &str) -> Result<Self> {
        let v: Vec<f32> = vb.get(2, &format!("{name}_q"))?.to_vec1()?;
        if !(0.0..=255.0).contains(&v[1]) || v[1].fract() != 0.0 || v[0] <= 0.0 {
            candle_core::bail!(
                "{name}_q: scale {} / zero point {} out of range",
                v[0],
                v[1]
            );
        }
        Ok(Self {
            scale: v[0],
            zero_point: v[1] as i32,
        })
    }

    /// `QuantizeLinear`: a true division (not a product with the reciprocal), rounded half
    /// to even, saturated to uint8.
    fn code(&self, x: f32) -> u8 {
        ((x / self.scale).round_ties_even() as i32 + self.zero_point).clamp(0, 255) as u8
    }

    /// `DequantizeLinear`.
    fn value(&self, code: u8) -> f32 {
        (code as i32 - self.zero_point) as f32 * self.scale
    }

    /// The code of an integer product sum `sum` whose value is `sum * scale`, requantized as
    /// onnxruntime's int8 kernels do: one product with `scale / self.scale`, rounded half to
    /// even.
    fn requantized(&self, sum: f32, scale: f32) -> u8 {
        ((sum * (scale / self.scale)).round_ties_even() as i32 + self.zero_point).clamp(0, 255)
            as u8
    }

    /// The codes of a 2-D `x` (rows, columns).
    fn codes(&self, x: &Tensor) -> Result<int8::Codes> {
        let (rows, cols) = x.dims2()?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        Ok(int8::Codes {
            data: v.iter().map(|&x| self.code(x)).collect(),
            rows,
            cols,
            point: *self,
        })
    }
}

/// A Linear layer of the graph: uint8 weights per output channel, the product rounded before
/// its bias is added (the graph's MatMul → Q → DQ → Add), or with the bias inside the
/// rounding (`bias_inside`: the graph's Gemm).
#[derive(Debug, Clone)]
struct QuantLinear {
    weight: int8::Packed,
    bias: Vec<f32>,
    output: QuantPoint,
    bias_inside: bool,
}

impl QuantLinear {
    fn load(
        vb: VarBuilder,
        inputs: usize,
        outputs: usize,
        bias: bool,
        bias_inside: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: packed_weight(&vb, outputs, inputs)?,
            bias: if bias {
                vb.get(outputs, "bias")?.to_vec1()?
            } else {
                vec![0.0; outputs]
            },
            output: QuantPoint::load(&vb, "output")?,
            bias_inside,
        })
    }

    /// The layer's output (rows × outputs), f32. A bias inside the rounding is added to the
    /// integer sum in its units (`round(bias / scale)`), as the int8 Gemm and Conv do.
    fn forward(&self, x: &int8::Codes) -> Result<Vec<f32>> {
        let (out, bias) = (self.output, &self.bias);
        let inside = self.bias_inside;
        int8::product(x, &self.weight, |_, n, sum, scale| {
            if inside {
                out.value(out.requantized(sum + (bias[n] / scale).round_ties_even(), scale))
            } else {
                out.value(out.requantized(sum, scale)) + bias[n]
            }
        })
    }

    fn forward_tensor(&self, x: &int8::Codes, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.forward(x)?, (x.rows, self.weight.n), device)
    }
}

/// A uint8 weight `(outputs, inputs...)` flattened per output channel, with its per-channel
/// scale and zero point, packed for [`int8::product`].
fn packed_weight(vb: &VarBuilder, outputs: usize, inputs: usize) -> Result<int8::Packed> {
    let w = vb.get_unchecked_dtype("weight", DType::F32)?;
    if w.elem_count() != outputs * inputs || w.dim(0)? != outputs {
        candle_core::bail!(
            "weight of shape {:?}, expected {outputs} outputs × {inputs} inputs",
            w.dims()
        );
    }
    let w: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let scale: Vec<f32> = vb.get(outputs, "weight_scale")?.to_vec1()?;
    let zero: Vec<f32> = vb.get(outputs, "weight_zero_point")?.to_vec1()?;
    if w.iter().chain(&zero).any(|v| !(0.0..=255.0).contains(v)) {
        candle_core::bail!("weight codes or zero points outside uint8");
    }
    // uint8 code c with zero point z is (c - 128) with zero point (z - 128) as int8
    let zero: Vec<i32> = zero.iter().map(|&z| z as i32 - 128).collect();
    int8::Packed::new(outputs, inputs, scale, zero, |n, k| {
        (w[n * inputs + k] as i32 - 128) as i8
    })
}

/// A convolution of kernel 3, padding 1, as a product over the frames' windows.
#[derive(Debug, Clone)]
struct QuantConv1d {
    linear: QuantLinear,
    inputs: usize,
    stride: usize,
}

impl QuantConv1d {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            linear: QuantLinear::load(vb, inputs * 3, outputs, true, true)?,
            inputs,
            stride,
        })
    }

    /// `x`: codes of (frames, inputs) → (frames / stride, outputs), f32.
    fn forward(&self, x: &int8::Codes) -> Result<Vec<f32>> {
        let frames = x.rows.div_ceil(self.stride);
        let pad = x.point.code(0.0);
        // a window's row is the weight's (channel, tap) order
        let mut data = vec![pad; frames * self.inputs * 3];
        for t in 0..frames {
            let row = &mut data[t * self.inputs * 3..(t + 1) * self.inputs * 3];
            for tap in 0..3 {
                let Some(src) = (t * self.stride + tap).checked_sub(1) else {
                    continue;
                };
                if src >= x.rows {
                    continue;
                }
                let src = &x.data[src * x.cols..(src + 1) * x.cols];
                for (c, &code) in src.iter().enumerate() {
                    row[c * 3 + tap] = code;
                }
            }
        }
        let windows = int8::Codes {
            data,
            rows: frames,
            cols: self.inputs * 3,
            point: x.point,
        };
        self.linear.forward(&windows)
    }
}

fn layer_norm(vb: VarBuilder, size: usize) -> Result<(LayerNorm, QuantPoint)> {
    let norm = LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        LAYER_NORM_EPS,
    );
    Ok((norm, QuantPoint::load(&vb, "output")?))
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: QuantLinear,
    k_proj: QuantLinear,
    v_proj: QuantLinear,
    out_proj: QuantLinear,
    /// `head_dim ** -0.25`, applied to queries and keys each.
    qk_scale: f32,
    query: QuantPoint,
    key: QuantPoint,
    value: QuantPoint,
    scores: QuantPoint,
    probs: QuantPoint,
    context: QuantPoint,
    merged: QuantPoint,
}

impl Attention {
    fn load(vb: VarBuilder) -> Result<Self> {
        let proj =
            |name: &str, bias: bool| QuantLinear::load(vb.pp(name), WIDTH, WIDTH, bias, false);
        let point = |name: &str| QuantPoint::load(&vb, name);
        Ok(Self {
            q_proj: proj("q_proj", true)?,
            k_proj: proj("k_proj", false)?,
            v_proj: proj("v_proj", true)?,
            out_proj: proj("out_proj", true)?,
            qk_scale: vb.get(1, "qk_scale")?.to_vec1::<f32>()?[0],
            query: point("query")?,
            key: point("key")?,
            value: point("value")?,
            scores: point("scores")?,
            probs: point("probs")?,
            context: point("context")?,
            merged: point("merged")?,
        })
    }

    /// `h`: codes of the normed frames (t, width) → the attention's output (t, width).
    fn forward(&self, h: &int8::Codes, device: &Device) -> Result<Tensor> {
        let t = h.rows;
        let scaled_codes = |proj: &QuantLinear, point: QuantPoint, scale: f32| -> Result<_> {
            let y = proj.forward(h)?;
            Ok(int8::Codes {
                data: y.iter().map(|&y| point.code(y * scale)).collect(),
                rows: t,
                cols: WIDTH,
                point,
            })
        };
        let q = scaled_codes(&self.q_proj, self.query, self.qk_scale)?;
        let k = scaled_codes(&self.k_proj, self.key, self.qk_scale)?;
        let v = scaled_codes(&self.v_proj, self.value, 1.0)?;
        let mut merged = int8::Codes {
            data: vec![0; t * WIDTH],
            rows: t,
            cols: WIDTH,
            point: self.merged,
        };
        let mut row = vec![0f32; t];
        for head in 0..HEADS {
            let columns = head * HEAD_DIM..(head + 1) * HEAD_DIM;
            let q_head = q.columns(columns.clone());
            let keys = int8::Packed::from_codes(&k.columns(columns.clone()), false)?;
            // scores rounded, softmax over the keys, probabilities rounded to their codes
            let scores = int8::product(&q_head, &keys, |_, _, sum, scale| {
                self.scores.value(self.scores.requantized(sum, scale))
            })?;
            let mut probs = int8::Codes {
                data: vec![0; t * t],
                rows: t,
                cols: t,
                point: self.probs,
            };
            for (i, s) in scores.chunks_exact(t).enumerate() {
                let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (r, &x) in row.iter_mut().zip(s) {
                    *r = (x - max).exp();
                    sum += *r;
                }
                let out = &mut probs.data[i * t..(i + 1) * t];
                for (o, &r) in out.iter_mut().zip(&row) {
                    *o = self.probs.code(r / sum);
                }
            }
            let values = int8::Packed::from_codes(&v.columns(columns.clone()), true)?;
            let (context, merged_point) = (self.context, self.merged);
            let merged_data = &mut merged.data;
            int8::product(&probs, &values, |i, d, sum, scale| {
                let value = context.value(context.requantized(sum, scale));
                merged_data[i * WIDTH + head * HEAD_DIM + d] = merged_point.code(value);
                0.0
            })?;
        }
        self.out_proj.forward_tensor(&merged, device)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    attention_norm: (LayerNorm, QuantPoint),
    attention: Attention,
    ffn_norm: (LayerNorm, QuantPoint),
    fc1: QuantLinear,
    gelu: QuantPoint,
    fc2: QuantLinear,
}

impl EncoderLayer {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention_norm: layer_norm(vb.pp("self_attn_layer_norm"), WIDTH)?,
            attention: Attention::load(vb.pp("self_attn"))?,
            ffn_norm: layer_norm(vb.pp("final_layer_norm"), WIDTH)?,
            fc1: QuantLinear::load(vb.pp("fc1"), WIDTH, FFN, true, false)?,
            gelu: QuantPoint::load(&vb.pp("fc1"), "gelu")?,
            fc2: QuantLinear::load(vb.pp("fc2"), FFN, WIDTH, true, false)?,
        })
    }

    /// `x`: the frames (t, width).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let device = x.device();
        let h = self
            .attention_norm
            .1
            .codes(&self.attention_norm.0.forward(x)?)?;
        let x = (x + self.attention.forward(&h, device)?)?;
        let h = self.ffn_norm.1.codes(&self.ffn_norm.0.forward(&x)?)?;
        let hidden = self.fc1.forward_tensor(&h, device)?.gelu_erf()?;
        let hidden = self.gelu.codes(&hidden)?;
        x + self.fc2.forward_tensor(&hidden, device)?
    }
}

/// The whole network: log-mel `(1, 80, 800)` → probability that the turn is complete.
#[derive(Debug, Clone)]
pub struct SmartTurnNet {
    input: QuantPoint,
    conv1: QuantConv1d,
    conv1_gelu: QuantPoint,
    conv2: QuantConv1d,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: (LayerNorm, QuantPoint),
    pool_hidden: QuantLinear,
    pool_tanh: QuantPoint,
    pool_score: QuantLinear,
    pooled: QuantPoint,
    classifier_in: QuantLinear,
    classifier_norm: LayerNorm,
    classifier_hidden_in: QuantPoint,
    classifier_hidden: QuantLinear,
    classifier_out_in: QuantPoint,
    classifier_out: QuantLinear,
}

impl SmartTurnNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let enc = vb.pp("encoder");
        let layers = (0..)
            .take_while(|l| enc.contains_tensor(&format!("layers.{l}.fc1.weight")))
            .map(|l| EncoderLayer::load(enc.pp(format!("layers.{l}"))))
            .collect::<Result<Vec<_>>>()?;
        if layers.is_empty() {
            candle_core::bail!("no encoder layers (encoder.layers.0.fc1.weight missing)");
        }
        let classifier = |k: usize, inputs: usize, outputs: usize| {
            QuantLinear::load(
                vb.pp(format!("classifier.{k}")),
                inputs,
                outputs,
                true,
                true,
            )
        };
        Ok(Self {
            input: QuantPoint::load(&enc, "input")?,
            conv1: QuantConv1d::load(enc.pp("conv1"), SMART_TURN_MELS, WIDTH, 1)?,
            conv1_gelu: QuantPoint::load(&enc.pp("conv1"), "gelu")?,
            conv2: QuantConv1d::load(enc.pp("conv2"), WIDTH, WIDTH, 2)?,
            positions: enc.get((POSITIONS, WIDTH), "embed_positions.weight")?,
            layers,
            final_norm: layer_norm(enc.pp("layer_norm"), WIDTH)?,
            pool_hidden: QuantLinear::load(vb.pp("pool_attention.0"), WIDTH, POOL, true, false)?,
            pool_tanh: QuantPoint::load(&vb.pp("pool_attention.0"), "tanh")?,
            pool_score: QuantLinear::load(vb.pp("pool_attention.2"), POOL, 1, true, false)?,
            pooled: QuantPoint::load(&vb.pp("pool_attention"), "pooled")?,
            classifier_in: classifier(0, WIDTH, POOL)?,
            classifier_norm: LayerNorm::new(
                vb.get(POOL, "classifier.1.weight")?,
                vb.get(POOL, "classifier.1.bias")?,
                LAYER_NORM_EPS,
            ),
            classifier_hidden_in: QuantPoint::load(&vb.pp("classifier.4"), "input")?,
            classifier_hidden: classifier(4, POOL, 64)?,
            classifier_out_in: QuantPoint::load(&vb.pp("classifier.6"), "input")?,
            classifier_out: classifier(6, 64, 1)?,
        })
    }

    pub fn device(&self) -> &Device {
        self.positions.device()
    }

    /// Probability that the turn is complete, for log-mel features `(1, 80, 800)`.
    pub fn forward(&self, features: &Tensor) -> Result<f32> {
        let device = self.device();
        let (_, mels, frames) = features.dims3()?;
        if mels != SMART_TURN_MELS || frames != SMART_TURN_FRAMES {
            candle_core::bail!(
                "Smart Turn features of {mels} × {frames}, expected {SMART_TURN_MELS} × {SMART_TURN_FRAMES}"
            );
        }
        // the convolutions run over frames as rows
        let x = self.input.codes(&features.squeeze(0)?.t()?)?;
        let x = Tensor::from_vec(self.conv1.forward(&x)?, (frames, WIDTH), device)?.gelu_erf()?;
        let x = self.conv1_gelu.codes(&x)?;
        let x = Tensor::from_vec(self.conv2.forward(&x)?, (POSITIONS, WIDTH), device)?;
        let mut x = (x.gelu_erf()? + &self.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let h = self.final_norm.1.codes(&self.final_norm.0.forward(&x)?)?;
        // attention pooling over the frames
        let a = self.pool_hidden.forward_tensor(&h, device)?.tanh()?;
        let scores = self
            .pool_score
            .forward_tensor(&self.pool_tanh.codes(&a)?, device)?;
        let weights = candle_nn::ops::softmax(&scores, 0)?;
        let h = Tensor::from_vec(
            h.data.iter().map(|&c| h.point.value(c)).collect(),
            (h.rows, h.cols),
            device,
        )?;
        let pooled = h.broadcast_mul(&weights)?.sum_keepdim(0)?;
        let c = self
            .classifier_in
            .forward_tensor(&self.pooled.codes(&pooled)?, device)?;
        let c = self.classifier_norm.forward(&c)?.gelu_erf()?;
        let c = self
            .classifier_hidden
            .forward_tensor(&self.classifier_hidden_in.codes(&c)?, device)?;
        let c = self.classifier_out_in.codes(&c.gelu_erf()?)?;
        let logit = self.classifier_out.forward_tensor(&c, device)?;
        candle_nn::ops::sigmoid(&logit)?
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()
    }
}

/// Products of uint8 codes with int8 operands, summed exactly in i32: what onnxruntime's
/// quantized kernels compute for this graph's MatMul and Conv nodes.
mod int8 {
    use candle_core::Result;

    use super::QuantPoint;

    /// Columns of a packed panel: two 16-lane i32 vectors.
    const PANEL: usize = 32;
    /// Rows of one kernel call.
    const ROWS: usize = 8;

    /// A uint8 activation as its codes, row-major.
    #[derive(Debug, Clone)]
    pub struct Codes {
        pub data: Vec<u8>,
        pub rows: usize,
        pub cols: usize,
        pub point: QuantPoint,
    }

    impl Codes {
        /// A copy of columns `range` of every row.
        pub fn columns(&self, range: std::ops::Range<usize>) -> Codes {
            let data = self
                .data
                .chunks_exact(self.cols)
                .flat_map(|row| &row[range.clone()])
                .copied()
                .collect();
            Codes {
                data,
                rows: self.rows,
                cols: range.len(),
                point: self.point,
            }
        }
    }

    /// The right operand `B (n × k)` of `A · Bᵀ`: int8 values `b` with per-row scale and zero
    /// point (the value is `(b - zero) * scale`), packed in panels of 32 rows, 4 k at a time
    /// (the layout of VNNI's `vpdpbusd`), with the sums `Σ_k b` the zero-point terms need.
    #[derive(Debug, Clone)]
    pub struct Packed {
        pub n: usize,
        pub k: usize,
        data: Vec<i8>,
        sums: Vec<i32>,
        scale: Vec<f32>,
        zero: Vec<i32>,
    }

    impl Packed {
        pub fn new(
            n: usize,
            k: usize,
            scale: Vec<f32>,
            zero: Vec<i32>,
            value: impl Fn(usize, usize) -> i8,
        ) -> Result<Self> {
            if k % 4 != 0 || k == 0 {
                candle_core::bail!("int8 product over {k} inputs: needs a positive multiple of 4");
            }
            if scale.len() != n || zero.len() != n {
                candle_core::bail!("int8 operand of {n} rows with {} scales", scale.len());
            }
            let panels = n.div_ceil(PANEL);
            let mut data = vec![0i8; panels * PANEL * k];
            let mut sums = vec![0i32; n];
            for (j, sum) in sums.iter_mut().enumerate() {
                let (panel, lane) = (j / PANEL, j % PANEL);
                for kk in 0..k {
                    let b = value(j, kk);
                    *sum += b as i32;
                    data[panel * PANEL * k + (kk / 4) * PANEL * 4 + lane * 4 + kk % 4] = b;
                }
            }
            Ok(Self {
                n,
                k,
                data,
                sums,
                scale,
                zero,
            })
        }

        /// Activation codes as the right operand: `codes` is `B` (`transposed`: `Bᵀ`).
        pub fn from_codes(codes: &Codes, transposed: bool) -> Result<Self> {
            let (n, k) = if transposed {
                (codes.cols, codes.rows)
            } else {
                (codes.rows, codes.cols)
            };
            let p = codes.point;
            let at = |j: usize, kk: usize| {
                if transposed {
                    codes.data[kk * codes.cols + j]
                } else {
                    codes.data[j * codes.cols + kk]
                }
            };
            // a uint8 code c is (c - 128) as int8, its zero point moves with it
            Self::new(
                n,
                k,
                vec![p.scale; n],
                vec![p.zero_point - 128; n],
                |j, kk| (at(j, kk) as i32 - 128) as i8,
            )
        }
    }

    /// `epilogue(m, n, sum, scale)` for every element of `A · Bᵀ`, whose value is `sum *
    /// scale` (`sum` the exact integer sum with the zero points taken out, as f32); returns
    /// what it returns, row-major (`a.rows × b.n`).
    pub fn product(
        a: &Codes,
        b: &Packed,
        mut epilogue: impl FnMut(usize, usize, f32, f32) -> f32,
    ) -> Result<Vec<f32>> {
        if a.cols != b.k || a.data.len() != a.rows * a.cols {
            candle_core::bail!(
                "int8 product of {} × {} codes with an operand over {} inputs",
                a.rows,
                a.cols,
                b.k
            );
        }
        let (m, n, k) = (a.rows, b.n, b.k);
        let width = b.data.len() / k;
        let mut sums = vec![0i32; ROWS * width];
        let mut out = vec![0f32; m * n];
        let za = a.point.zero_point;
        for row0 in (0..m).step_by(ROWS) {
            let rows = ROWS.min(m - row0);
            let a_rows = &a.data[row0 * k..(row0 + rows) * k];
            integer_sums(a_rows, rows, k, &b.data, width, &mut sums);
            for r in 0..rows {
                let a_sum: i32 = a_rows[r * k..(r + 1) * k].iter().map(|&c| c as i32).sum();
                for j in 0..n {
                    let zb = b.zero[j];
                    let exact =
                        sums[r * width + j] - zb * a_sum - za * b.sums[j] + k as i32 * za * zb;
                    let scale = a.point.scale * b.scale[j];
                    out[(row0 + r) * n + j] = epilogue(row0 + r, j, exact as f32, scale);
                }
            }
        }
        Ok(out)
    }

    /// `sums[r][j] = Σ_k a[r][k] · b[j][k]` for `rows` ≤ 8 rows of `a` and every panel of `b`.
    fn integer_sums(a: &[u8], rows: usize, k: usize, b: &[i8], width: usize, sums: &mut [i32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            for panel in 0..width / PANEL {
                let b = &b[panel * PANEL * k..(panel + 1) * PANEL * k];
                let sums = &mut sums[panel * PANEL..];
                // SAFETY: the CPU has the features; the slices hold `rows × k` codes, a panel
                // of `PANEL × k` values and `rows` output rows of `width` sums.
                unsafe { vnni::panel(a, rows, k, b, sums, width) };
            }
            return;
        }
        portable_sums(a, rows, k, b, width, sums);
    }

    /// The same sums without VNNI.
    fn portable_sums(a: &[u8], rows: usize, k: usize, b: &[i8], width: usize, sums: &mut [i32]) {
        for panel in 0..width / PANEL {
            let b = &b[panel * PANEL * k..(panel + 1) * PANEL * k];
            for r in 0..rows {
                let mut acc = [0i32; PANEL];
                for (g, group) in b.chunks_exact(PANEL * 4).enumerate() {
                    let a4 = &a[r * k + 4 * g..r * k + 4 * g + 4];
                    for (lane, acc) in acc.iter_mut().enumerate() {
                        let b4 = &group[lane * 4..lane * 4 + 4];
                        *acc += (0..4).map(|i| a4[i] as i32 * b4[i] as i32).sum::<i32>();
                    }
                }
                sums[r * width + panel * PANEL..r * width + (panel + 1) * PANEL]
                    .copy_from_slice(&acc);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod vnni {
        use std::arch::x86_64::*;

        use super::{PANEL, ROWS};

        /// One panel (32 columns) for up to 8 rows: 16 accumulators in registers, the panel's
        /// 4-k groups streamed once.
        #[target_feature(enable = "avx512f,avx512vnni")]
        pub unsafe fn panel(
            a: &[u8],
            rows: usize,
            k: usize,
            b: &[i8],
            sums: &mut [i32],
            width: usize,
        ) {
            match rows {
                8 => unsafe { rows_of::<8>(a, k, b, sums, width) },
                7 => unsafe { rows_of::<7>(a, k, b, sums, width) },
                6 => unsafe { rows_of::<6>(a, k, b, sums, width) },
                5 => unsafe { rows_of::<5>(a, k, b, sums, width) },
                4 => unsafe { rows_of::<4>(a, k, b, sums, width) },
                3 => unsafe { rows_of::<3>(a, k, b, sums, width) },
                2 => unsafe { rows_of::<2>(a, k, b, sums, width) },
                _ => unsafe { rows_of::<1>(a, k, b, sums, width) },
            }
        }

        #[target_feature(enable = "avx512f,avx512vnni")]
        unsafe fn rows_of<const R: usize>(
            a: &[u8],
            k: usize,
            b: &[i8],
            sums: &mut [i32],
            width: usize,
        ) {
            debug_assert!(R <= ROWS && a.len() >= R * k && b.len() >= PANEL * k);
            debug_assert!(sums.len() >= (R - 1) * width + PANEL);
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            let a = a.as_ptr();
            let b = b.as_ptr();
            for g in 0..k / 4 {
                // SAFETY: g < k / 4, so the panel's group g and each row's 4 codes are inside
                // the slices checked above.
                unsafe {
                    let b0 = _mm512_loadu_si512(b.add(g * PANEL * 4) as *const __m512i);
                    let b1 = _mm512_loadu_si512(b.add(g * PANEL * 4 + 64) as *const __m512i);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a4 = (a.add(r * k + 4 * g) as *const i32).read_unaligned();
                        let a4 = _mm512_set1_epi32(a4);
                        acc[0] = _mm512_dpbusd_epi32(acc[0], a4, b0);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], a4, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let out = &mut sums[r * width..r * width + PANEL];
                // SAFETY: `out` holds 32 i32.
                unsafe {
                    _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, acc[0]);
                    _mm512_storeu_si512(out.as_mut_ptr().add(16) as *mut __m512i, acc[1]);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn point(scale: f32, zero_point: i32) -> QuantPoint {
            QuantPoint { scale, zero_point }
        }

        /// The product against the plain formula `Σ (a - za)(b - zb) · sa · sb`, over shapes
        /// with partial row blocks and partial panels, on every kernel this CPU has.
        #[test]
        fn products_are_exact_on_every_shape() {
            let mut seed = 12345u32;
            let mut next = move || {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 24) as u8
            };
            for &(m, n, k) in &[
                (1, 1, 4),
                (3, 33, 8),
                (8, 32, 64),
                (13, 70, 240),
                (17, 5, 1152),
            ] {
                let a = Codes {
                    data: (0..m * k).map(|_| next()).collect(),
                    rows: m,
                    cols: k,
                    point: point(0.02, 37),
                };
                let bv: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
                let zero: Vec<i32> = (0..n).map(|j| (j as i32 % 7) - 3).collect();
                let scale: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
                let b =
                    Packed::new(n, k, scale.clone(), zero.clone(), |j, kk| bv[j * k + kk]).unwrap();
                let got = product(&a, &b, |_, _, sum, scale| sum * scale).unwrap();
                let width = b.data.len() / k;
                let mut portable = vec![0; ROWS * width];
                for i in 0..m {
                    for j in 0..n {
                        let exact: i64 = (0..k)
                            .map(|kk| {
                                (a.data[i * k + kk] as i64 - 37)
                                    * (bv[j * k + kk] as i64 - zero[j] as i64)
                            })
                            .sum();
                        let want = exact as f32 * (0.02 * scale[j]);
                        assert_eq!(got[i * n + j], want, "{m}×{n}×{k} at {i},{j}");
                    }
                }
                // the portable kernel gives the same integer sums
                let rows = m.min(ROWS);
                portable_sums(&a.data[..rows * k], rows, k, &b.data, width, &mut portable);
                let mut kernel = vec![0; ROWS * width];
                integer_sums(&a.data[..rows * k], rows, k, &b.data, width, &mut kernel);
                assert_eq!(portable, kernel);
            }
        }

        #[test]
        fn operands_that_do_not_fit_are_refused() {
            let err = Packed::new(2, 6, vec![1.0; 2], vec![0; 2], |_, _| 0).unwrap_err();
            assert!(err.to_string().contains("multiple of 4"), "{err}");
            let a = Codes {
                data: vec![0; 8],
                rows: 2,
                cols: 4,
                point: point(1.0, 0),
            };
            let b = Packed::new(1, 8, vec![1.0], vec![0], |_, _| 1).unwrap();
            assert!(product(&a, &b, |_, _, sum, _| sum).is_err());
        }
    }
}
