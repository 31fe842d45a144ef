//! Smart Turn v3.2 (BSD-2, pipecat-ai/smart-turn), the int8 CPU model.
//!
//! A Whisper-tiny encoder (two convolutions, 4 pre-norm layers of 6 heads × 64, 400 positions:
//! 8 s of 80-bin log-mel) and a head that pools the encoder's frames by attention (Linear,
//! tanh, Linear, softmax over time) and classifies the pooled vector (Linear, LayerNorm, GELU,
//! Linear, GELU, Linear, sigmoid) into the probability that the speaker's turn is complete.
//!
//! The published model is statically quantized: int8 weights per output channel, and uint8
//! activations at fixed points of the graph (QuantizeLinear → DequantizeLinear pairs). The
//! classifier was calibrated with those roundings, and the float model without them is a
//! different classifier (0.93 instead of 0.08 on an unfinished sentence), so this runs the
//! graph as written, on the codes: every product is uint8 codes × int8 weights (or × the codes
//! of another activation) summed exactly in i32 (`omnicall_kernels::int8`, AVX-512 VNNI where the
//! CPU has it), its value `sum · scale_in · scale_w` rounded to the next point's codes. Between
//! two points an activation is one of 256 values per channel (a code, plus the channel's bias),
//! so each element-wise step there (bias, GELU, tanh, the query/key scale, the next rounding)
//! is one lookup in a table made at load with candle's ops; a softmax over codes takes its
//! exponentials from a 256-entry table. The residual stream and the LayerNorms are f32, the
//! head's small vectors f32 on candle. The tensor names are the PyTorch module's;
//! `scripts/extract_smart_turn.py` writes them from the ONNX graph.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use omnicall_kernels::int8::{
    Int8Level, PackedI8, Requantize, gemm_u8i8, quantize, requantize, softmax_rows,
};

/// Mel bins of the input.
pub const SMART_TURN_MELS: usize = 80;
/// Mel frames of the input (8 s at a 10 ms hop).
pub const SMART_TURN_FRAMES: usize = 800;

const POSITIONS: usize = SMART_TURN_FRAMES / 2;
const WIDTH: usize = 384;
const HEADS: usize = 6;
const HEAD_DIM: usize = WIDTH / HEADS;
const FFN: usize = 1536;
const POOL: usize = 256;
const LAYER_NORM_EPS: f64 = 1e-5;
/// Values of a uint8 code.
const CODES: usize = 256;
/// A uint8 code as an int8 operand is the code − 128, its zero point moved with it; the
/// weights are stored that way too (their int8 value + 128).
const INT8_OFFSET: i32 = 128;

/// Scale and zero point of a uint8 activation.
#[derive(Debug, Clone, Copy)]
struct QuantPoint {
    scale: f32,
    zero_point: i32,
}

impl QuantPoint {
    fn load(vb: &VarBuilder, name: &str) -> Result<Self> {
        let v: Vec<f32> = vb.get(2, &format!("{name}_q"))?.to_vec1()?;
        if v[0].is_nan() || v[0] <= 0.0 || !(0.0..=255.0).contains(&v[1]) || v[1].fract() != 0.0 {
            candle_core::bail!("{name}_q: scale {} zero point {} out of range", v[0], v[1]);
        }
        Ok(Self {
            scale: v[0],
            zero_point: v[1] as i32,
        })
    }

    /// `QuantizeLinear`.
    fn code(&self, x: f32) -> u8 {
        quantize(x, self.scale, self.zero_point)
    }

    /// `DequantizeLinear`.
    fn value(&self, code: u8) -> f32 {
        (code as i32 - self.zero_point) as f32 * self.scale
    }

    fn codes(&self, x: &[f32]) -> Vec<u8> {
        x.iter().map(|&x| self.code(x)).collect()
    }

    /// The codes `self.code(f(v))` for a table of values `v`, `f` a candle op.
    fn codes_of(&self, values: &[f32], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<u8>> {
        let t = f(&Tensor::new(values, &Device::Cpu)?)?;
        Ok(self.codes(&t.to_vec1()?))
    }
}

/// Where a layer's bias is added: inside the rounding of its product (the graph's Gemm and
/// Conv) or after it (MatMul → Q → DQ → Add).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bias {
    None,
    Inside,
    After,
}

/// A Linear (or a convolution as one, over its windows) of the graph on uint8 codes: int8
/// weights per output channel, the product rounded to `output`, its [`Bias`] inside or after.
#[derive(Debug, Clone)]
struct QuantLinear {
    weight: PackedI8,
    weight_zero: Vec<i32>,
    input_zero: i32,
    /// The value of one unit of the exact integer sum: input scale × weight scale, per channel.
    unit: Vec<f32>,
    bias_inside: Option<Vec<f32>>,
    output: QuantPoint,
    /// The value of each output code, per channel, with the bias after the rounding:
    /// `output_values[o · 256 + code]`.
    output_values: Vec<f32>,
}

impl QuantLinear {
    /// `weight_at(o, i)` is the stored u8 of output `o`'s input `i`.
    fn load_with(
        vb: &VarBuilder,
        input: QuantPoint,
        outputs: usize,
        inputs: usize,
        bias: Bias,
        weight_at: impl Fn(&[u8], usize, usize) -> u8,
    ) -> Result<Self> {
        let stored = vb.get_unchecked_dtype("weight", DType::U8)?;
        if stored.elem_count() != outputs * inputs || stored.dim(0)? != outputs {
            candle_core::bail!(
                "weight of shape {:?}, expected {outputs} outputs × {inputs} inputs",
                stored.dims()
            );
        }
        let stored: Vec<u8> = stored.flatten_all()?.to_vec1()?;
        let scale: Vec<f32> = vb.get(outputs, "weight_scale")?.to_vec1()?;
        let zero: Vec<f32> = vb.get(outputs, "weight_zero_point")?.to_vec1()?;
        if zero
            .iter()
            .any(|z| !(0.0..=255.0).contains(z) || z.fract() != 0.0)
        {
            candle_core::bail!("weight zero points outside uint8");
        }
        let weight = PackedI8::new(outputs, inputs, |o, i| {
            (weight_at(&stored, o, i) as i32 - INT8_OFFSET) as i8
        });
        let bias_values = match bias {
            Bias::None => vec![0.0; outputs],
            Bias::Inside | Bias::After => vb.get(outputs, "bias")?.to_vec1()?,
        };
        let (bias_inside, bias_after) = match bias {
            Bias::Inside => (Some(bias_values), vec![0.0; outputs]),
            Bias::None | Bias::After => (None, bias_values),
        };
        let output = QuantPoint::load(vb, "output")?;
        let output_values = bias_after
            .iter()
            .flat_map(|bias| (0..CODES).map(move |c| output.value(c as u8) + bias))
            .collect();
        Ok(Self {
            weight,
            weight_zero: zero.iter().map(|&z| z as i32 - INT8_OFFSET).collect(),
            input_zero: input.zero_point,
            unit: scale.iter().map(|&s| input.scale * s).collect(),
            bias_inside,
            output,
            output_values,
        })
    }

    /// A Linear `(outputs, inputs)` whose input codes are `input`'s.
    fn load(
        vb: VarBuilder,
        input: QuantPoint,
        inputs: usize,
        outputs: usize,
        bias: Bias,
    ) -> Result<Self> {
        Self::load_with(&vb, input, outputs, inputs, bias, |w, o, i| {
            w[o * inputs + i]
        })
    }

    /// A convolution of kernel 3 `(outputs, inputs, 3)` as a Linear over windows laid out
    /// tap-major (`[frame - 1 | frame | frame + 1]`), bias inside the rounding.
    fn load_conv(vb: VarBuilder, input: QuantPoint, inputs: usize, outputs: usize) -> Result<Self> {
        Self::load_with(&vb, input, outputs, 3 * inputs, Bias::Inside, |w, o, i| {
            let (tap, channel) = (i / inputs, i % inputs);
            w[(o * inputs + channel) * 3 + tap]
        })
    }

    fn outputs(&self) -> usize {
        self.weight.n()
    }

    /// The output codes of rows of input codes.
    fn forward(&self, level: Int8Level, x: &[u8]) -> Vec<u8> {
        let rows = x.len() / self.weight.k();
        let mut sums = vec![0i32; rows * self.outputs()];
        gemm_u8i8(level, x, &self.weight, &mut sums);
        let mut codes = vec![0u8; sums.len()];
        let rq = Requantize {
            a_zero: self.input_zero,
            b_zero: &self.weight_zero,
            scale: &self.unit,
            bias: self.bias_inside.as_deref(),
            out_scale: self.output.scale,
            out_zero: self.output.zero_point,
        };
        requantize(level, x, &self.weight, &sums, &rq, &mut codes);
        codes
    }

    /// The output values through `f` (a candle op), rounded to `next`'s codes, per channel.
    fn output_codes(
        &self,
        next: QuantPoint,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<u8>> {
        next.codes_of(&self.output_values, f)
    }

    /// The output values of rows of input codes.
    fn forward_values(&self, level: Int8Level, x: &[u8]) -> Vec<f32> {
        look_up(&self.forward(level, x), self.outputs(), &self.output_values)
    }
}

/// `table[channel · 256 + code]` for each of the codes, channel = index mod `channels`.
fn look_up<T: Copy>(codes: &[u8], channels: usize, table: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(codes.len());
    for row in codes.chunks_exact(channels) {
        out.extend(
            row.iter()
                .zip(table.chunks_exact(CODES))
                .map(|(&c, values)| values[c as usize]),
        );
    }
    out
}

/// A LayerNorm whose output is rounded to uint8 codes. It divides by the deviation, as
/// onnxruntime's LayerNormalization does (candle's multiplies by its inverse): the codes are
/// rounded from these values, and one that falls the other way moves every layer after it.
#[derive(Debug, Clone)]
struct QuantLayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    output: QuantPoint,
}

impl QuantLayerNorm {
    fn load(vb: VarBuilder, size: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_vec1()?,
            bias: vb.get(size, "bias")?.to_vec1()?,
            output: QuantPoint::load(&vb, "output")?,
        })
    }

    /// The codes of the normed rows of `x`.
    fn forward(&self, x: &[f32]) -> Vec<u8> {
        let size = self.weight.len();
        let mut codes = Vec::with_capacity(x.len());
        for row in x.chunks_exact(size) {
            let (sum, squares) = row
                .iter()
                .fold((0f32, 0f32), |(s, q), &v| (s + v, q + v * v));
            let mean = sum / size as f32;
            let deviation = (squares / size as f32 - mean * mean + LAYER_NORM_EPS as f32).sqrt();
            codes.extend(
                row.iter()
                    .zip(self.weight.iter().zip(&self.bias))
                    .map(|(&v, (w, b))| self.output.code((v - mean) / deviation * w + b)),
            );
        }
        codes
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: QuantLinear,
    k_proj: QuantLinear,
    v_proj: QuantLinear,
    out_proj: QuantLinear,
    /// Output code → query / key / value code, per channel (bias and `head_dim ** -0.25` in).
    query_codes: Vec<u8>,
    key_codes: Vec<u8>,
    value_codes: Vec<u8>,
    /// The value of one unit of a score's and of a context's integer sum.
    score_unit: f32,
    context_unit: f32,
    key_zero: i32,
    value_zero: i32,
    query_zero: i32,
    scores: QuantPoint,
    /// `exp(-d · scores.scale)`: a softmax's exponentials over its row's largest code.
    score_exp: [f32; CODES],
    probs: QuantPoint,
    context: QuantPoint,
    /// Context code → merged code (the graph rounds the heads' merged output again).
    merged_codes: [u8; CODES],
}

impl Attention {
    fn load(vb: VarBuilder, input: QuantPoint) -> Result<Self> {
        let proj = |name: &str, bias: Bias, input: QuantPoint| {
            QuantLinear::load(vb.pp(name), input, WIDTH, WIDTH, bias)
        };
        let point = |name: &str| QuantPoint::load(&vb, name);
        let qk_scale = vb.get(1, "qk_scale")?.to_vec1::<f32>()?[0] as f64;
        let (query, key, value) = (point("query")?, point("key")?, point("value")?);
        let (scores, probs, context) = (point("scores")?, point("probs")?, point("context")?);
        let merged = point("merged")?;
        let q_proj = proj("q_proj", Bias::After, input)?;
        let k_proj = proj("k_proj", Bias::None, input)?;
        let v_proj = proj("v_proj", Bias::After, input)?;
        Ok(Self {
            query_codes: q_proj.output_codes(query, |v| v.affine(qk_scale, 0.0))?,
            key_codes: k_proj.output_codes(key, |v| v.affine(qk_scale, 0.0))?,
            value_codes: v_proj.output_codes(value, |v| Ok(v.clone()))?,
            q_proj,
            k_proj,
            v_proj,
            out_proj: proj("out_proj", Bias::After, merged)?,
            score_unit: query.scale * key.scale,
            context_unit: probs.scale * value.scale,
            key_zero: key.zero_point,
            value_zero: value.zero_point,
            query_zero: query.zero_point,
            scores,
            score_exp: std::array::from_fn(|d| (-(d as f32 * scores.scale)).exp()),
            probs,
            context,
            merged_codes: std::array::from_fn(|c| merged.code(context.value(c as u8))),
        })
    }

    /// `h`: codes of the normed frames (t × width) → the attention's output values, which
    /// are added to `x`.
    fn forward(&self, level: Int8Level, h: &[u8], x: &mut [f32]) {
        let t = h.len() / WIDTH;
        let q = look_up(&self.q_proj.forward(level, h), WIDTH, &self.query_codes);
        let k = look_up(&self.k_proj.forward(level, h), WIDTH, &self.key_codes);
        let v = look_up(&self.v_proj.forward(level, h), WIDTH, &self.value_codes);
        let mut merged = vec![0u8; t * WIDTH];
        let mut sums = vec![0i32; t * t];
        let mut score_codes = vec![0u8; t * t];
        let mut prob_codes = vec![0u8; t * t];
        let mut context_codes = vec![0u8; t * HEAD_DIM];
        let operand = |codes: &[u8], at: usize| (codes[at] as i32 - INT8_OFFSET) as i8;
        for head in 0..HEADS {
            let column = |frame: usize, d: usize| frame * WIDTH + head * HEAD_DIM + d;
            let q_head: Vec<u8> = (0..t)
                .flat_map(|f| q[column(f, 0)..column(f, HEAD_DIM)].iter().copied())
                .collect();
            let keys = PackedI8::new(t, HEAD_DIM, |f, d| operand(&k, column(f, d)));
            gemm_u8i8(level, &q_head, &keys, &mut sums);
            let key_zero = vec![self.key_zero - INT8_OFFSET; t];
            let unit = vec![self.score_unit; t];
            let rq = Requantize {
                a_zero: self.query_zero,
                b_zero: &key_zero,
                scale: &unit,
                bias: None,
                out_scale: self.scores.scale,
                out_zero: self.scores.zero_point,
            };
            requantize(level, &q_head, &keys, &sums, &rq, &mut score_codes);
            softmax_rows(
                level,
                &score_codes,
                t,
                &self.score_exp,
                self.probs.scale,
                self.probs.zero_point,
                &mut prob_codes,
            );
            let values = PackedI8::new(HEAD_DIM, t, |d, f| operand(&v, column(f, d)));
            let context_sums = &mut sums[..t * HEAD_DIM];
            gemm_u8i8(level, &prob_codes, &values, context_sums);
            let value_zero = [self.value_zero - INT8_OFFSET; HEAD_DIM];
            let unit = [self.context_unit; HEAD_DIM];
            let rq = Requantize {
                a_zero: self.probs.zero_point,
                b_zero: &value_zero,
                scale: &unit,
                bias: None,
                out_scale: self.context.scale,
                out_zero: self.context.zero_point,
            };
            requantize(
                level,
                &prob_codes,
                &values,
                context_sums,
                &rq,
                &mut context_codes,
            );
            for (f, row) in context_codes.chunks_exact(HEAD_DIM).enumerate() {
                for (d, &c) in row.iter().enumerate() {
                    merged[column(f, d)] = self.merged_codes[c as usize];
                }
            }
        }
        add_output(&self.out_proj, level, &merged, x);
    }
}

/// `x += linear(codes)`'s values (the residual add after a Linear).
fn add_output(linear: &QuantLinear, level: Int8Level, codes: &[u8], x: &mut [f32]) {
    let out = linear.forward(level, codes);
    let table = &linear.output_values;
    let n = linear.outputs();
    for (x_row, out_row) in x.chunks_exact_mut(n).zip(out.chunks_exact(n)) {
        for (j, (x, &c)) in x_row.iter_mut().zip(out_row).enumerate() {
            *x += table[j * CODES + c as usize];
        }
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    attention_norm: QuantLayerNorm,
    attention: Attention,
    ffn_norm: QuantLayerNorm,
    fc1: QuantLinear,
    /// fc1's output code → the GELU's code, per channel.
    gelu_codes: Vec<u8>,
    fc2: QuantLinear,
}

impl EncoderLayer {
    fn load(vb: VarBuilder) -> Result<Self> {
        let attention_norm = QuantLayerNorm::load(vb.pp("self_attn_layer_norm"), WIDTH)?;
        let ffn_norm = QuantLayerNorm::load(vb.pp("final_layer_norm"), WIDTH)?;
        let fc1 = QuantLinear::load(vb.pp("fc1"), ffn_norm.output, WIDTH, FFN, Bias::After)?;
        let gelu = QuantPoint::load(&vb.pp("fc1"), "gelu")?;
        Ok(Self {
            attention: Attention::load(vb.pp("self_attn"), attention_norm.output)?,
            gelu_codes: fc1.output_codes(gelu, |v| v.gelu_erf())?,
            fc2: QuantLinear::load(vb.pp("fc2"), gelu, FFN, WIDTH, Bias::After)?,
            attention_norm,
            ffn_norm,
            fc1,
        })
    }

    fn forward(&self, level: Int8Level, x: &mut [f32]) {
        let h = self.attention_norm.forward(x);
        self.attention.forward(level, &h, x);
        let h = self.ffn_norm.forward(x);
        let hidden = look_up(&self.fc1.forward(level, &h), FFN, &self.gelu_codes);
        add_output(&self.fc2, level, &hidden, x);
    }
}

/// The windows of a convolution of kernel 3, padding 1, over rows of `frames` (each
/// `channels` codes), one window per output frame, tap-major: `[f·s - 1 | f·s | f·s + 1]`.
/// The padding is the code of 0.
fn windows(frames: &[u8], channels: usize, stride: usize, zero_code: u8) -> Vec<u8> {
    let count = frames.len() / channels;
    let out_frames = count.div_ceil(stride);
    let mut out = vec![zero_code; out_frames * 3 * channels];
    for (f, window) in out.chunks_exact_mut(3 * channels).enumerate() {
        for (tap, slot) in window.chunks_exact_mut(channels).enumerate() {
            if let Some(src) = (f * stride + tap).checked_sub(1).filter(|&s| s < count) {
                slot.copy_from_slice(&frames[src * channels..(src + 1) * channels]);
            }
        }
    }
    out
}

/// The whole network: log-mel `(1, 80, 800)` → probability that the turn is complete.
#[derive(Debug, Clone)]
pub struct SmartTurnNet {
    level: Int8Level,
    input: QuantPoint,
    conv1: QuantLinear,
    conv1_gelu: QuantPoint,
    /// conv1's output code → its GELU's code.
    conv1_gelu_codes: Vec<u8>,
    conv2: QuantLinear,
    /// conv2's output code → its GELU's value.
    conv2_gelu: Vec<f32>,
    positions: Vec<f32>,
    layers: Vec<EncoderLayer>,
    final_norm: QuantLayerNorm,
    pool_hidden: QuantLinear,
    /// pool_hidden's output code → tanh's code, per channel.
    pool_tanh_codes: Vec<u8>,
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
        let input = QuantPoint::load(&enc, "input")?;
        let conv1 = QuantLinear::load_conv(enc.pp("conv1"), input, SMART_TURN_MELS, WIDTH)?;
        let conv1_gelu = QuantPoint::load(&enc.pp("conv1"), "gelu")?;
        let conv2 = QuantLinear::load_conv(enc.pp("conv2"), conv1_gelu, WIDTH, WIDTH)?;
        let final_norm = QuantLayerNorm::load(enc.pp("layer_norm"), WIDTH)?;
        let pool_hidden = QuantLinear::load(
            vb.pp("pool_attention.0"),
            final_norm.output,
            WIDTH,
            POOL,
            Bias::After,
        )?;
        let pool_tanh = QuantPoint::load(&vb.pp("pool_attention.0"), "tanh")?;
        let pooled = QuantPoint::load(&vb.pp("pool_attention"), "pooled")?;
        let classifier_hidden_in = QuantPoint::load(&vb.pp("classifier.4"), "input")?;
        let classifier_out_in = QuantPoint::load(&vb.pp("classifier.6"), "input")?;
        let classifier = |k: usize, input: QuantPoint, inputs: usize, outputs: usize| {
            QuantLinear::load(
                vb.pp(format!("classifier.{k}")),
                input,
                inputs,
                outputs,
                Bias::Inside,
            )
        };
        let conv2_gelu = Tensor::new(conv2.output_values.as_slice(), &Device::Cpu)?
            .gelu_erf()?
            .to_vec1()?;
        Ok(Self {
            level: Int8Level::detect(),
            input,
            conv1_gelu_codes: conv1.output_codes(conv1_gelu, |v| v.gelu_erf())?,
            conv1,
            conv1_gelu,
            conv2_gelu,
            conv2,
            positions: enc
                .get((POSITIONS, WIDTH), "embed_positions.weight")?
                .flatten_all()?
                .to_vec1()?,
            layers,
            pool_tanh_codes: pool_hidden.output_codes(pool_tanh, |v| v.tanh())?,
            pool_score: QuantLinear::load(
                vb.pp("pool_attention.2"),
                pool_tanh,
                POOL,
                1,
                Bias::After,
            )?,
            pool_hidden,
            final_norm,
            pooled,
            classifier_in: classifier(0, pooled, WIDTH, POOL)?,
            classifier_norm: LayerNorm::new(
                vb.get(POOL, "classifier.1.weight")?,
                vb.get(POOL, "classifier.1.bias")?,
                LAYER_NORM_EPS,
            ),
            classifier_hidden: classifier(4, classifier_hidden_in, POOL, 64)?,
            classifier_hidden_in,
            classifier_out: classifier(6, classifier_out_in, 64, 1)?,
            classifier_out_in,
        })
    }

    /// The same network with its int8 products run at `level` (lowered to what the CPU has):
    /// the tests force the portable kernel with it. Every level gives the same probability.
    pub fn with_int8_level(mut self, level: Int8Level) -> Self {
        self.level = level.or_below();
        self
    }

    pub fn device(&self) -> &Device {
        &Device::Cpu
    }

    /// Probability that the turn is complete, for log-mel features `(1, 80, 800)`.
    pub fn forward(&self, features: &Tensor) -> Result<f32> {
        let level = self.level;
        let (_, mels, frames) = features.dims3()?;
        if (mels, frames) != (SMART_TURN_MELS, SMART_TURN_FRAMES) {
            candle_core::bail!(
                "Smart Turn features of {mels} × {frames}, expected {SMART_TURN_MELS} × {SMART_TURN_FRAMES}"
            );
        }
        // the convolutions run over frames as rows of channels
        let x: Vec<f32> = features.squeeze(0)?.t()?.flatten_all()?.to_vec1()?;
        let x = self.input.codes(&x);
        let x = self.conv1.forward(
            level,
            &windows(&x, SMART_TURN_MELS, 1, self.input.code(0.0)),
        );
        let x = look_up(&x, WIDTH, &self.conv1_gelu_codes);
        let x = self
            .conv2
            .forward(level, &windows(&x, WIDTH, 2, self.conv1_gelu.code(0.0)));
        let mut x: Vec<f32> = x
            .iter()
            .zip(&self.positions)
            .map(|(&c, p)| self.conv2_gelu[c as usize] + p)
            .collect();
        for layer in &self.layers {
            layer.forward(level, &mut x);
        }
        let h = self.final_norm.forward(&x);
        // attention pooling over the frames
        let a = look_up(
            &self.pool_hidden.forward(level, &h),
            POOL,
            &self.pool_tanh_codes,
        );
        let scores = self.pool_score.forward_values(level, &a);
        let device = self.device();
        let weights = candle_nn::ops::softmax(&Tensor::new(scores, device)?, 0)?;
        let h: Vec<f32> = h.iter().map(|&c| self.final_norm.output.value(c)).collect();
        let h = Tensor::from_vec(h, (POSITIONS, WIDTH), device)?;
        let pooled: Vec<f32> = h.broadcast_mul(&weights.unsqueeze(1)?)?.sum(0)?.to_vec1()?;
        let c = self
            .classifier_in
            .forward_values(level, &self.pooled.codes(&pooled));
        let c = self
            .classifier_norm
            .forward(&Tensor::new(c, device)?.unsqueeze(0)?)?
            .gelu_erf()?;
        let c = self
            .classifier_hidden_in
            .codes(&c.flatten_all()?.to_vec1()?);
        let c = self.classifier_hidden.forward_values(level, &c);
        let c = Tensor::new(c, device)?.gelu_erf()?;
        let c = self.classifier_out_in.codes(&c.to_vec1()?);
        let logit = self.classifier_out.forward_values(level, &c);
        candle_nn::ops::sigmoid(&Tensor::new(logit, device)?)?
            .get(0)?
            .to_scalar::<f32>()
    }
}
