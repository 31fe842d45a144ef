//! Smart Turn v3.2 on a turn's audio: the probability that the speaker has finished.
//!
//! Audio preparation as pipecat's `LocalSmartTurnAnalyzerV3` does it: the last 8 s of 16 kHz
//! audio (shorter turns zero-padded at the front), normalised to zero mean and unit variance,
//! then Whisper's 80-bin log-mel (`WhisperFeatureExtractor(chunk_length=8)`: n_fft 400, hop
//! 160, 800 frames), then the network ([`crate::model::smart_turn`]). The weights ship in the
//! binary (`models/smart-turn/`, BSD-2; `scripts/extract_smart_turn.py` extracted them from the
//! pipecat-ai 1.14.0 wheel); they are loaded once per process and shared between sessions.
//!
//! Why candle and not an ONNX runtime: `tract-onnx` 0.23.9 runs this QDQ graph but answers
//! wrongly (0.43 where onnxruntime says 0.98) and four times slower than onnxruntime; `ort`
//! downloads its runtime at build time. The network is a Whisper-tiny encoder, which the model
//! stack already has the pieces for.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::media::mel::LogMel;
use crate::model::config::FeatureExtractorConfig;
use crate::model::smart_turn::{SMART_TURN_FRAMES, SMART_TURN_MELS, SmartTurnNet};

/// Sample rate of the audio Smart Turn takes.
pub const SMART_TURN_SAMPLE_RATE: u32 = 16_000;
/// Seconds of audio the model sees: the end of the turn.
pub const SMART_TURN_SECONDS: usize = 8;
/// Samples the model sees.
pub const SMART_TURN_SAMPLES: usize = SMART_TURN_SECONDS * SMART_TURN_SAMPLE_RATE as usize;
/// The waveform normalisation's variance floor (`WhisperFeatureExtractor`'s 1e-7).
const NORMALIZE_EPS: f64 = 1e-7;

/// The shipped weights (smart-turn-v3.2-cpu.onnx from pipecat-ai 1.14.0).
static SHIPPED_WEIGHTS: &[u8] =
    include_bytes!("../../models/smart-turn/smart_turn_v3.2_int8.safetensors");

/// The end-of-turn model; cheap to create per session (the weights are shared).
#[derive(Clone)]
pub struct SmartTurn {
    net: Arc<SmartTurnNet>,
    mel: LogMel,
    buffer: Vec<f32>,
}

impl std::fmt::Debug for SmartTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartTurn").finish_non_exhaustive()
    }
}

impl SmartTurn {
    /// The shipped model; the weights are loaded on the first call and shared after.
    pub fn new() -> anyhow::Result<Self> {
        static NET: OnceLock<Arc<SmartTurnNet>> = OnceLock::new();
        let net = match NET.get() {
            Some(net) => net.clone(),
            None => {
                let vb =
                    VarBuilder::from_slice_safetensors(SHIPPED_WEIGHTS, DType::F32, &Device::Cpu)?;
                let net = Arc::new(load(vb)?);
                NET.get_or_init(|| net).clone()
            }
        };
        Self::with_net(net)
    }

    /// Weights from a safetensors file as `scripts/extract_smart_turn.py` writes it.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path)
            .with_context(|| format!("reading Smart Turn weights {}", path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, &Device::Cpu)
            .with_context(|| {
                format!("Smart Turn weights {} are not safetensors", path.display())
            })?;
        let net = load(vb).with_context(|| format!("Smart Turn weights {}", path.display()))?;
        Self::with_net(Arc::new(net))
    }

    fn with_net(net: Arc<SmartTurnNet>) -> anyhow::Result<Self> {
        let config = FeatureExtractorConfig {
            feature_size: SMART_TURN_MELS,
            sampling_rate: SMART_TURN_SAMPLE_RATE as usize,
            n_fft: 400,
            hop_length: 160,
            chunk_length: SMART_TURN_SECONDS,
            dither: 0.0,
        };
        let mel = LogMel::new(&config)?;
        debug_assert_eq!(mel.padded_frames(), SMART_TURN_FRAMES);
        Ok(Self {
            net,
            mel,
            buffer: Vec::with_capacity(SMART_TURN_SAMPLES),
        })
    }

    /// Probability (0..1) that the turn whose audio so far is `audio_16k` (mono, 16 kHz, -1..1)
    /// is complete. Only the last 8 s count; a turn with no audio is refused.
    pub fn complete_probability(&mut self, audio_16k: &[f32]) -> anyhow::Result<f32> {
        if audio_16k.is_empty() {
            bail!("Smart Turn needs some audio of the turn, got none");
        }
        if let Some(k) = audio_16k.iter().position(|s| !s.is_finite()) {
            bail!(
                "Smart Turn audio sample {k} is not a finite number ({})",
                audio_16k[k]
            );
        }
        let tail = &audio_16k[audio_16k.len().saturating_sub(SMART_TURN_SAMPLES)..];
        self.buffer.clear();
        self.buffer.resize(SMART_TURN_SAMPLES - tail.len(), 0.0);
        self.buffer.extend_from_slice(tail);
        normalize(&mut self.buffer);
        let frames = self.mel.padded_features(&self.buffer, SMART_TURN_FRAMES)?;
        let features = frames.to_tensor(self.net.device())?.unsqueeze(0)?;
        Ok(self.net.forward(&features)?)
    }
}

/// Zero mean, unit variance (over the padded 8 s, as the feature extractor does).
fn normalize(x: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&s| s as f64).sum::<f64>() / n;
    let var = x.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + NORMALIZE_EPS).sqrt();
    for s in x {
        *s = ((*s as f64 - mean) * inv) as f32;
    }
}

fn load(vb: VarBuilder) -> anyhow::Result<SmartTurnNet> {
    SmartTurnNet::new(vb).context("Smart Turn weights do not fit the v3.2 network")
}

#[cfg(test)]
mod tests {
    use omnicall_kernels::int8::Int8Level;

    use super::*;

    #[test]
    fn bad_audio_is_refused_with_the_reason() {
        let mut turn = SmartTurn::new().unwrap();
        assert!(
            turn.complete_probability(&[])
                .unwrap_err()
                .to_string()
                .contains("no")
        );
        let err = turn
            .complete_probability(&[0.0, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample 1"), "{err}");
        let err = SmartTurn::from_file("/nonexistent/st.safetensors").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/st.safetensors"));
    }

    #[test]
    fn only_the_last_eight_seconds_count() {
        let mut turn = SmartTurn::new().unwrap();
        let tone: Vec<f32> = (0..SMART_TURN_SAMPLES)
            .map(|k| 0.1 * (k as f32 * 0.05).sin() * ((k / 4000) % 2) as f32)
            .collect();
        let mut longer = vec![0.3; 16_000];
        longer.extend(&tone);
        let a = turn.complete_probability(&tone).unwrap();
        let b = turn.complete_probability(&longer).unwrap();
        assert_eq!(a, b);
        assert!((0.0..=1.0).contains(&a));
    }

    #[test]
    fn the_portable_int8_kernel_gives_the_same_probability() {
        // the products are exact integer sums at every kernel level, so the answers are equal
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/turn/silero_utterance.wav");
        let audio = crate::bench::turn::load_wav(&path).unwrap();
        let vb =
            VarBuilder::from_slice_safetensors(SHIPPED_WEIGHTS, DType::F32, &Device::Cpu).unwrap();
        let portable = load(vb).unwrap().with_int8_level(Int8Level::Scalar);
        let mut portable = SmartTurn::with_net(Arc::new(portable)).unwrap();
        let mut detected = SmartTurn::new().unwrap();
        assert_eq!(
            detected.complete_probability(&audio).unwrap(),
            portable.complete_probability(&audio).unwrap()
        );
    }

    #[test]
    fn a_session_is_send() {
        fn send<T: Send>() {}
        send::<SmartTurn>();
    }
}
