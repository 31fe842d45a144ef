//! Silero VAD v5 on a 16 kHz stream: the speech probability of each 512-sample (32 ms) frame.
//!
//! As in the reference wrapper (`silero_vad.utils_vad.OnnxWrapper`, pipecat's
//! `SileroOnnxModel`), each frame goes to the network behind the last 64 samples of the frame
//! before (zeros before the first), and the LSTM state is carried from frame to frame. The
//! weights ship in the binary (`models/silero-vad/`, MIT; `scripts/extract_silero_vad.py`
//! extracted them from the PyPI wheel); they are parsed once per process and shared.
//!
//! Why candle and not an ONNX runtime: the network is five convolutions and an LSTM cell, a
//! hundred lines on the model stack the project already builds; `tract-onnx` would add a second
//! inference stack to the build for it, and the Smart Turn graph it cannot run correctly (see
//! `smart_turn.rs`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::rnn::LSTMState;

pub use crate::model::silero_vad::{SILERO_CONTEXT_SAMPLES, SILERO_FRAME_SAMPLES};
use crate::model::silero_vad::{SILERO_WINDOW_SAMPLES, SileroVadNet};

/// Sample rate the network runs at.
pub const SILERO_SAMPLE_RATE: u32 = 16_000;

/// The shipped weights (the 16 kHz branch of `silero_vad.onnx` from silero-vad 6.2.3).
static SHIPPED_WEIGHTS: &[u8] =
    include_bytes!("../../models/silero-vad/silero_vad_16k.safetensors");

/// A streaming Silero VAD: one instance per stream (it holds the stream's state).
pub struct SileroVad {
    net: Arc<SileroVadNet>,
    state: LSTMState,
    /// The last [`SILERO_CONTEXT_SAMPLES`] samples of the previous frame.
    context: [f32; SILERO_CONTEXT_SAMPLES],
    window: Vec<f32>,
}

impl std::fmt::Debug for SileroVad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroVad").finish_non_exhaustive()
    }
}

impl SileroVad {
    /// The shipped model; the weights are parsed on the first call and shared after.
    pub fn new() -> anyhow::Result<Self> {
        static NET: OnceLock<Arc<SileroVadNet>> = OnceLock::new();
        let net = match NET.get() {
            Some(net) => net.clone(),
            None => {
                let net = Arc::new(load(VarBuilder::from_slice_safetensors(
                    SHIPPED_WEIGHTS,
                    DType::F32,
                    &Device::Cpu,
                )?)?);
                NET.get_or_init(|| net).clone()
            }
        };
        Self::with_net(net)
    }

    /// Weights from a safetensors file as `scripts/extract_silero_vad.py` writes it.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path)
            .with_context(|| format!("reading Silero VAD weights {}", path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, &Device::Cpu)
            .with_context(|| {
                format!("Silero VAD weights {} are not safetensors", path.display())
            })?;
        let net = load(vb).with_context(|| format!("Silero VAD weights {}", path.display()))?;
        Self::with_net(Arc::new(net))
    }

    fn with_net(net: Arc<SileroVadNet>) -> anyhow::Result<Self> {
        Ok(Self {
            state: net.zero_state()?,
            net,
            context: [0.0; SILERO_CONTEXT_SAMPLES],
            window: Vec::with_capacity(SILERO_WINDOW_SAMPLES),
        })
    }

    /// Probability (0..1) that the next frame of the stream, exactly [`SILERO_FRAME_SAMPLES`]
    /// samples at 16 kHz in -1..1, is speech.
    pub fn speech_probability(&mut self, frame: &[f32]) -> anyhow::Result<f32> {
        if frame.len() != SILERO_FRAME_SAMPLES {
            bail!(
                "Silero VAD takes frames of exactly {SILERO_FRAME_SAMPLES} samples at 16 kHz, got {}",
                frame.len()
            );
        }
        self.window.clear();
        self.window.extend_from_slice(&self.context);
        // non-finite samples would poison the carried state for good
        self.window
            .extend(frame.iter().map(|&s| if s.is_finite() { s } else { 0.0 }));
        self.context
            .copy_from_slice(&self.window[SILERO_WINDOW_SAMPLES - SILERO_CONTEXT_SAMPLES..]);
        let input =
            Tensor::from_slice(&self.window, (1, SILERO_WINDOW_SAMPLES), self.net.device())?;
        let (probability, state) = self.net.forward(&input, &self.state)?;
        self.state = state;
        Ok(probability)
    }

    /// Forgets the stream: zero state and context, as before the first frame.
    pub fn reset(&mut self) {
        // zeros of a shape already built once cannot fail to build again
        if let Ok(state) = self.net.zero_state() {
            self.state = state;
        }
        self.context = [0.0; SILERO_CONTEXT_SAMPLES];
    }
}

fn load(vb: VarBuilder) -> anyhow::Result<SileroVadNet> {
    SileroVadNet::new(vb).context("Silero VAD weights do not fit the v5 16 kHz network")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_wav(name: &str) -> Vec<f32> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/turn")
            .join(name);
        let mut reader = hound::WavReader::open(&path).expect("test wav");
        assert_eq!(reader.spec().sample_rate, SILERO_SAMPLE_RATE);
        reader
            .samples::<i16>()
            .map(|s| s.expect("sample") as f32 / 32768.0)
            .collect()
    }

    #[test]
    fn reset_gives_the_same_probabilities_again() {
        let audio = load_wav("silero_utterance.wav");
        let mut vad = SileroVad::new().unwrap();
        let run = |vad: &mut SileroVad| -> Vec<f32> {
            audio
                .chunks_exact(SILERO_FRAME_SAMPLES)
                .take(60)
                .map(|f| vad.speech_probability(f).unwrap())
                .collect()
        };
        let first = run(&mut vad);
        vad.reset();
        assert_eq!(first, run(&mut vad));
        // the state carries: the same frame scores differently after speech than after reset
        assert!(first.iter().any(|p| *p > 0.5) && first.iter().any(|p| *p < 0.1));
    }

    #[test]
    fn a_frame_of_the_wrong_length_is_refused() {
        let mut vad = SileroVad::new().unwrap();
        let err = vad.speech_probability(&[0.0; 480]).unwrap_err();
        assert!(
            err.to_string().contains("512") && err.to_string().contains("480"),
            "{err}"
        );
        let p = vad.speech_probability(&[f32::NAN; 512]).unwrap();
        assert!((0.0..=1.0).contains(&p));
        let err = SileroVad::from_file("/nonexistent/silero.safetensors").unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/silero.safetensors"),
            "{err:#}"
        );
    }

    #[test]
    fn a_session_is_send() {
        fn send<T: Send>() {}
        send::<SileroVad>();
    }
}
