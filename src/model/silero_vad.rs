//! Silero VAD v5, the 16 kHz network (MIT, snakers4/silero-vad), on candle.
//!
//! One call scores one window of [`SILERO_WINDOW_SAMPLES`] samples (the 512-sample frame after
//! the last [`SILERO_CONTEXT_SAMPLES`] samples of the frame before) and carries the LSTM state:
//!
//! - STFT as a strided convolution with a fixed basis (`stft.forward_basis_buffer`, 258 filters
//!   of 256 taps, hop 128) after reflect-padding 64 samples on the right; magnitude of the
//!   129 real/imaginary pairs: 4 time steps.
//! - Encoder: four 3-tap convolutions with ReLU (129→128, 128→64 stride 2, 64→64 stride 2,
//!   64→128), down to one step of 128 channels.
//! - Decoder: an LSTM cell (128→128), ReLU, a 1×1 convolution to one channel, sigmoid.
//!
//! Tensor names are the PyTorch module's, as `scripts/extract_silero_vad.py` writes them from the
//! ONNX graph's 16 kHz branch.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::rnn::{LSTM, LSTMConfig, LSTMState, RNN};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};

/// Samples of one scored frame at 16 kHz.
pub const SILERO_FRAME_SAMPLES: usize = 512;
/// Samples of the frame before that the model sees in front of each frame.
pub const SILERO_CONTEXT_SAMPLES: usize = 64;
/// Samples of one network input: context and frame.
pub const SILERO_WINDOW_SAMPLES: usize = SILERO_CONTEXT_SAMPLES + SILERO_FRAME_SAMPLES;
/// Width of the LSTM state.
pub const SILERO_STATE_SIZE: usize = 128;

const STFT_FILTER: usize = 256;
const STFT_HOP: usize = 128;
/// Reflect padding on the right of the window before the STFT.
const STFT_RIGHT_PAD: usize = 64;
/// (input channels, output channels, stride) of the encoder's convolutions.
const ENCODER: [(usize, usize, usize); 4] =
    [(129, 128, 1), (128, 64, 2), (64, 64, 2), (64, 128, 1)];

/// The network's weights; [`SileroVadNet::forward`] is pure, the state is the caller's.
#[derive(Debug, Clone)]
pub struct SileroVadNet {
    stft_basis: Tensor,
    /// Gather indices of the reflect-padded window.
    pad_index: Tensor,
    encoder: Vec<Conv1d>,
    rnn: LSTM,
    decoder: Conv1d,
}

impl SileroVadNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stft_basis = vb.get(
            (2 * (STFT_FILTER / 2 + 1), 1, STFT_FILTER),
            "stft.forward_basis_buffer",
        )?;
        let encoder = ENCODER
            .iter()
            .enumerate()
            .map(|(k, &(inputs, outputs, stride))| {
                let config = Conv1dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                };
                candle_nn::conv1d(
                    inputs,
                    outputs,
                    3,
                    config,
                    vb.pp(format!("encoder.{k}.reparam_conv")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // candle's LSTM reads PyTorch's nn.LSTM names (`weight_ih_l0`); Silero has an LSTMCell
        let rnn_vb = vb
            .clone()
            .rename_f(|name| name.trim_end_matches("_l0").to_string())
            .pp("decoder.rnn");
        let rnn = candle_nn::rnn::lstm(
            SILERO_STATE_SIZE,
            SILERO_STATE_SIZE,
            LSTMConfig::default(),
            rnn_vb,
        )?;
        let decoder = candle_nn::conv1d(
            SILERO_STATE_SIZE,
            1,
            1,
            Conv1dConfig::default(),
            vb.pp("decoder.decoder.2"),
        )?;
        let n = SILERO_WINDOW_SAMPLES;
        let pad: Vec<u32> = (0..n)
            .chain((0..STFT_RIGHT_PAD).map(|k| n - 2 - k))
            .map(|k| k as u32)
            .collect();
        let pad_index = Tensor::from_vec(pad, n + STFT_RIGHT_PAD, vb.device())?;
        Ok(Self {
            stft_basis,
            pad_index,
            encoder,
            rnn,
            decoder,
        })
    }

    /// The state before the first frame.
    pub fn zero_state(&self) -> Result<LSTMState> {
        self.rnn.zero_state(1)
    }

    pub fn device(&self) -> &Device {
        self.stft_basis.device()
    }

    /// Speech probability of one window `(1, SILERO_WINDOW_SAMPLES)` (f32) and the next state.
    pub fn forward(&self, window: &Tensor, state: &LSTMState) -> Result<(f32, LSTMState)> {
        let padded = window.index_select(&self.pad_index, 1)?.unsqueeze(1)?;
        let spectrum = padded.conv1d(&self.stft_basis, 0, STFT_HOP, 1, 1)?;
        let bins = STFT_FILTER / 2 + 1;
        let real = spectrum.narrow(1, 0, bins)?;
        let imaginary = spectrum.narrow(1, bins, bins)?;
        let mut x = (real.sqr()? + imaginary.sqr()?)?.sqrt()?;
        for conv in &self.encoder {
            x = conv.forward(&x)?.relu()?;
        }
        // (1, 128, 1) → one LSTM step
        let state = self.rnn.step(&x.squeeze(D::Minus1)?, state)?;
        let logit = self
            .decoder
            .forward(&state.h.relu()?.unsqueeze(D::Minus1)?)?;
        let probability = candle_nn::ops::sigmoid(&logit)?
            .mean_all()?
            .to_dtype(DType::F32)?;
        Ok((probability.to_scalar::<f32>()?, state))
    }
}
