//! Smart Turn v3.2 (BSD-2, pipecat-ai/smart-turn), the int8 CPU model, on candle.
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
//! graph as written: weights dequantized once at load, and every activation rounded to its
//! uint8 grid (`fake_quant`) where the graph rounds it, in f32 math otherwise. The tensor names
//! are the PyTorch module's; `scripts/extract_smart_turn.py` writes them from the ONNX graph.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// Mel bins of the input.
pub const SMART_TURN_MELS: usize = 80;
/// Mel frames of the input (8 s at a 10 ms hop).
pub const SMART_TURN_FRAMES: usize = 800;

const WIDTH: usize = 384;
const HEADS: usize = 6;
const FFN: usize = 1536;
const POOL: usize = 256;
const LAYER_NORM_EPS: f64 = 1e-5;

/// Scale and zero point of a uint8 activation.
#[derive(Debug, Clone, Copy)]
struct QuantPoint {
    scale: f64,
    zero_point: f64,
}

impl QuantPoint {
    fn load(vb: &VarBuilder, name: &str) -> Result<Self> {
        let v: Vec<f32> = vb.get(2, &format!("{name}_q"))?.to_vec1()?;
        Ok(Self {
            scale: v[0] as f64,
            zero_point: v[1] as f64,
        })
    }

    /// `DequantizeLinear(QuantizeLinear(x))`: `x` rounded to the nearest of the 256 values
    /// `(q - zero_point) * scale`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        // a true division, as QuantizeLinear does (not a product with the reciprocal)
        let scale = Tensor::new(self.scale as f32, x.device())?;
        x.broadcast_div(&scale)?
            .round()?
            .clamp(-self.zero_point, 255.0 - self.zero_point)?
            .affine(self.scale, 0.0)
    }
}

/// An int8 weight, dequantized: `(w - zero_point) * scale` per output channel.
fn dequantized_weight(vb: &VarBuilder, shape: &[usize]) -> Result<Tensor> {
    let w = vb.get(shape, "weight")?;
    let mut channel_shape = vec![1; shape.len()];
    channel_shape[0] = shape[0];
    let scale = vb
        .get(shape[0], "weight_scale")?
        .reshape(channel_shape.as_slice())?;
    let zero = vb
        .get(shape[0], "weight_zero_point")?
        .reshape(channel_shape.as_slice())?;
    w.broadcast_sub(&zero)?.broadcast_mul(&scale)
}

/// A linear layer whose product is rounded before its bias is added (the graph's MatMul → Q →
/// DQ → Add), or with the bias inside the rounding (`bias_inside`: the graph's Gemm).
#[derive(Debug, Clone)]
struct QuantLinear {
    weight: Tensor,
    bias: Option<Tensor>,
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
            weight: dequantized_weight(&vb, &[outputs, inputs])?,
            bias: if bias {
                Some(vb.get(outputs, "bias")?)
            } else {
                None
            },
            output: QuantPoint::load(&vb, "output")?,
            bias_inside,
        })
    }
}

impl Module for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match (&self.bias, self.bias_inside) {
            (Some(b), true) => self.output.apply(&y.broadcast_add(b)?),
            (Some(b), false) => self.output.apply(&y)?.broadcast_add(b),
            (None, _) => self.output.apply(&y),
        }
    }
}

#[derive(Debug, Clone)]
struct QuantConv1d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    output: QuantPoint,
}

impl QuantConv1d {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            weight: dequantized_weight(&vb, &[outputs, inputs, 3])?,
            bias: vb.get(outputs, "bias")?.reshape((1, outputs, 1))?,
            stride,
            output: QuantPoint::load(&vb, "output")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x
            .conv1d(&self.weight, 1, self.stride, 1, 1)?
            .broadcast_add(&self.bias)?;
        self.output.apply(&y)
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
    qk_scale: f64,
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
            qk_scale: vb.get(1, "qk_scale")?.to_vec1::<f32>()?[0] as f64,
            query: point("query")?,
            key: point("key")?,
            value: point("value")?,
            scores: point("scores")?,
            probs: point("probs")?,
            context: point("context")?,
            merged: point("merged")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, HEADS, WIDTH / HEADS))?.transpose(1, 2)
        };
        let q = self
            .query
            .apply(&heads(self.q_proj.forward(x)?)?.affine(self.qk_scale, 0.0)?)?;
        let k = heads(self.k_proj.forward(x)?)?.affine(self.qk_scale, 0.0)?;
        let k = self.key.apply(&k.transpose(2, 3)?)?;
        let v = self.value.apply(&heads(self.v_proj.forward(x)?)?)?;
        let scores = self
            .scores
            .apply(&q.contiguous()?.matmul(&k.contiguous()?)?)?;
        let probs = self
            .probs
            .apply(&candle_nn::ops::softmax_last_dim(&scores)?)?;
        let context = self.context.apply(&probs.matmul(&v.contiguous()?)?)?;
        let merged = self
            .merged
            .apply(&context.transpose(1, 2)?.reshape((b, t, WIDTH))?)?;
        self.out_proj.forward(&merged)
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .attention_norm
            .1
            .apply(&self.attention_norm.0.forward(x)?)?;
        let x = (x + self.attention.forward(&h)?)?;
        let h = self.ffn_norm.1.apply(&self.ffn_norm.0.forward(&x)?)?;
        let h = self.gelu.apply(&self.fc1.forward(&h)?.gelu_erf()?)?;
        x + self.fc2.forward(&h)?
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
            positions: enc.get((SMART_TURN_FRAMES / 2, WIDTH), "embed_positions.weight")?,
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
        let x = self.input.apply(features)?;
        let x = self
            .conv1_gelu
            .apply(&self.conv1.forward(&x)?.gelu_erf()?)?;
        let x = self.conv2.forward(&x)?.gelu_erf()?;
        let mut x = x.transpose(1, 2)?.broadcast_add(&self.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let h = self.final_norm.1.apply(&self.final_norm.0.forward(&x)?)?;
        // attention pooling over the frames
        let a = self
            .pool_tanh
            .apply(&self.pool_hidden.forward(&h)?.tanh()?)?;
        let weights = candle_nn::ops::softmax(&self.pool_score.forward(&a)?, 1)?;
        let pooled = self.pooled.apply(&h.broadcast_mul(&weights)?.sum(1)?)?;
        let c = self.classifier_in.forward(&pooled)?;
        let c = self.classifier_norm.forward(&c)?.gelu_erf()?;
        let c = self
            .classifier_hidden
            .forward(&self.classifier_hidden_in.apply(&c)?)?;
        let c = self.classifier_out_in.apply(&c.gelu_erf()?)?;
        let logit = self.classifier_out.forward(&c)?;
        candle_nn::ops::sigmoid(&logit)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .get(0)?
            .to_scalar::<f32>()
    }
}
