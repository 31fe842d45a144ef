//! token2wav: codec tokens to a 24 kHz waveform (`Qwen2_5OmniToken2WavModel`, at `token2wav`).
//!
//! The flow-matching DiT ([`dit`]) samples a natural-log mel (`repeats` = 2 frames per code,
//! 100 frames per second) from noise, conditioned on the codes and the voice; BigVGAN
//! ([`bigvgan`]) turns the mel into the waveform. [`Token2Wav`] does the whole utterance at
//! once; [`streaming::StreamingDecoder`] does it chunk by chunk as codes arrive.
//!
//! Codes without a DiT codec embedding (`>= num_embeds + 1`, e.g. an end id that slipped
//! through) are rendered as code 0, as vllm-omni does.

pub mod bigvgan;
pub mod dit;
pub mod ecapa;
pub mod streaming;

use crate::model::linear::{WeightFormat, with_weight_format};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng, rngs::StdRng};

use self::bigvgan::BigVgan;
use self::dit::{Dit, OdeSchedule, SamplerOptions, SpeakerCondition};
use crate::model::config::Token2WavConfig;
use crate::model::speakers::Voice;

/// Mel frames per second of the DiT's output (10 ms hop), which BigVGAN upsamples by its
/// `prod(upsample_rates)` to the waveform rate.
pub const MEL_FRAMES_PER_SECOND: u32 = 100;

/// Standard-normal noise drawn frame by frame from a seeded generator: the same seed gives the
/// same frames whether they are taken all at once or a few at a time.
#[derive(Debug, Clone)]
pub struct NoiseSource {
    rng: StdRng,
    mel_dim: usize,
    spare: Option<f32>,
}

impl NoiseSource {
    pub fn new(seed: u64, mel_dim: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            mel_dim,
            spare: None,
        }
    }

    fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // Box-Muller: two independent normals from two uniforms in (0, 1].
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * a.sin()) as f32);
        (r * a.cos()) as f32
    }

    /// The next `frames` frames, `frames * mel_dim` values in frame-major order.
    pub fn take(&mut self, frames: usize) -> Vec<f32> {
        (0..frames * self.mel_dim).map(|_| self.normal()).collect()
    }

    /// The next `frames` frames as `[1, frames, mel_dim]`.
    pub fn take_tensor(&mut self, frames: usize, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.take(frames), (1, frames, self.mel_dim), device)
    }
}

/// The DiT and the vocoder.
#[derive(Debug, Clone)]
pub struct Token2Wav {
    dit: Dit,
    bigvgan: BigVgan,
    cfg: Token2WavConfig,
}

impl Token2Wav {
    /// `vb` at `token2wav` (the reference runs it in float32 whatever the checkpoint holds).
    pub fn new(cfg: &Token2WavConfig, vb: VarBuilder) -> Result<Self> {
        let dit_cfg = &cfg.dit_config;
        if dit_cfg.repeats == 0 || !dit_cfg.block_size.is_multiple_of(dit_cfg.repeats) {
            candle_core::bail!(
                "token2wav config: block_size ({}) must be a multiple of repeats ({})",
                dit_cfg.block_size,
                dit_cfg.repeats
            );
        }
        if cfg.bigvgan_config.mel_dim != dit_cfg.mel_dim {
            candle_core::bail!(
                "token2wav config: the DiT makes {} mel bins, BigVGAN takes {}",
                dit_cfg.mel_dim,
                cfg.bigvgan_config.mel_dim
            );
        }
        // The reference runs token2wav in f32; q8 weights are for the Thinker and the Talker.
        let dit = with_weight_format(WeightFormat::Dense, || {
            Dit::new(dit_cfg, vb.pp("code2wav_dit_model"))
        })?;
        Ok(Self {
            dit,
            bigvgan: BigVgan::new(&cfg.bigvgan_config, vb.pp("code2wav_bigvgan_model"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn dit(&self) -> &Dit {
        &self.dit
    }

    pub fn bigvgan(&self) -> &BigVgan {
        &self.bigvgan
    }

    pub fn config(&self) -> &Token2WavConfig {
        &self.cfg
    }

    /// Waveform samples per second (24 000 for the published model).
    pub fn sample_rate(&self) -> u32 {
        MEL_FRAMES_PER_SECOND * self.bigvgan.hop_length() as u32
    }

    /// Mel frames per codec token.
    pub fn frames_per_code(&self) -> usize {
        self.cfg.dit_config.repeats
    }

    /// Waveform samples per codec token (480 for the published model: 20 ms).
    pub fn samples_per_code(&self) -> usize {
        self.frames_per_code() * self.bigvgan.hop_length()
    }

    /// Prepares a voice for the DiT (runs ECAPA once).
    pub fn speaker(&self, voice: &Voice) -> Result<SpeakerCondition> {
        self.dit.speaker_condition(&voice.cond, &voice.ref_mel)
    }

    /// Precomputes the sampler's time conditioning (reuse it for every utterance).
    pub fn schedule(&self, options: &SamplerOptions) -> Result<OdeSchedule> {
        self.dit.schedule(options)
    }

    /// Fresh seeded noise for this model's mel width.
    pub fn noise_source(&self, seed: u64) -> NoiseSource {
        NoiseSource::new(seed, self.cfg.dit_config.mel_dim)
    }

    /// `codes` as the DiT's `[1, n]` input, ids without a codec embedding mapped to 0.
    pub fn codes_tensor(&self, codes: &[u32]) -> Result<Tensor> {
        let rows = (self.cfg.dit_config.num_embeds + 1) as u32;
        let mapped: Vec<u32> = codes
            .iter()
            .map(|&c| if c < rows { c } else { 0 })
            .collect();
        Tensor::from_vec(mapped, (1, codes.len()), &Device::Cpu)
    }

    /// The mel `[1, mel_dim, repeats n]` of `codes` from the initial state `noise`
    /// `[1, repeats n, mel_dim]`.
    pub fn mel(
        &self,
        speaker: &SpeakerCondition,
        codes: &[u32],
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> Result<Tensor> {
        if codes.is_empty() {
            candle_core::bail!("token2wav: no codes to render");
        }
        self.dit
            .sample_scheduled(speaker, &self.codes_tensor(codes)?, noise, schedule)
    }

    /// The waveform of `mel` `[1, mel_dim, T]`: `T * hop` samples in [-1, 1].
    pub fn vocode(&self, mel: &Tensor) -> Result<Vec<f32>> {
        self.bigvgan
            .forward(mel)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()
    }

    /// The whole utterance at once: codes -> mel -> waveform (`n * samples_per_code` samples).
    pub fn synthesize(
        &self,
        speaker: &SpeakerCondition,
        codes: &[u32],
        noise: &Tensor,
        schedule: &OdeSchedule,
    ) -> Result<Vec<f32>> {
        self.vocode(&self.mel(speaker, codes, noise, schedule)?)
    }

    /// [`Token2Wav::synthesize`] with the reference's sampler settings and noise from `seed`.
    pub fn synthesize_voice(&self, codes: &[u32], voice: &Voice, seed: u64) -> Result<Vec<f32>> {
        let speaker = self.speaker(voice)?;
        let schedule = self.schedule(&SamplerOptions::default())?;
        let frames = codes.len() * self.frames_per_code();
        let noise = self.noise_source(seed).take_tensor(frames, &Device::Cpu)?;
        self.synthesize(&speaker, codes, &noise, &schedule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_standard_normal_and_chunk_independent() {
        let mut a = NoiseSource::new(7, 5);
        let all = a.take(400);
        let mut b = NoiseSource::new(7, 5);
        let mut parts = b.take(3);
        parts.extend(b.take(1));
        parts.extend(b.take(396));
        assert_eq!(all, parts);
        let n = all.len() as f64;
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((var - 1.0).abs() < 0.1, "var {var}");
        assert_ne!(NoiseSource::new(8, 5).take(4), all[..20].to_vec());
    }
}
