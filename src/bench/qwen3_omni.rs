//! Qwen3-Omni speech-out figures at the published shapes with random weights: the Talker's
//! prefill and decode step, the code predictor's pass per frame (its residual codebooks), and
//! Code2Wav per streamed frame (with the reference's 25-frame left context) and offline; from
//! them, the first-audio schedule in milliseconds.
//!
//! The Thinker (30B-A3B: 30 B parameters, about 61 GB in bf16) does not fit a 24 GB machine and is
//! not measured here; its time to the first answer token comes before this schedule.

use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{Measurement, median_time};
use crate::model::loading::ModelFamily;
use crate::model::qwen3_omni::code2wav::{Code2Wav, Code2WavStream};
use crate::model::qwen3_omni::config::Config;
use crate::model::qwen3_omni::pipeline::{CODE2WAV_LEFT_CONTEXT, SAMPLE_RATE};
use crate::model::qwen3_omni::rope_index::decode_positions;
use crate::model::qwen3_omni::talker::Talker;
use crate::model::random_weights::RandomWeights;

/// How much work each figure is measured on.
#[derive(Debug, Clone, Copy)]
pub struct Qwen3SpeechBenchSizes {
    /// Talker prompt rows (the user turn and the assistant prefix).
    pub prompt_rows: usize,
    /// Timed Talker decode steps.
    pub decode_steps: usize,
    /// Timed code predictor passes.
    pub predictor_frames: usize,
    /// Frames of the offline Code2Wav decode.
    pub offline_frames: usize,
}

impl Default for Qwen3SpeechBenchSizes {
    fn default() -> Self {
        Self {
            prompt_rows: 256,
            decode_steps: 8,
            predictor_frames: 4,
            offline_frames: 50,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(stage: &str, setup: String, value: f64, unit: &str) -> Measurement {
    Measurement {
        stage: stage.into(),
        setup,
        value,
        unit: unit.into(),
        achieved: None,
    }
}

fn deterministic(shape: (usize, usize, usize), device: &Device, dtype: DType) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618).sin() * 0.5) as f32)
        .collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// Every figure at the shapes of `config` (the Talker and code predictor in `dtype`, Code2Wav
/// in f32 as the reference runs it).
pub fn bench_qwen3_speech(
    config: &Config,
    dtype: DType,
    device: &Device,
    sizes: Qwen3SpeechBenchSizes,
) -> Result<Vec<Measurement>> {
    config.validate().context("qwen3-omni bench config")?;
    let tc = &config.talker_config;
    let hidden = tc.text_config.hidden_size;
    let mut rows = Vec::new();
    let vb = RandomWeights::var_builder(dtype, device);
    let mut talker = Talker::new(tc, vb.pp("talker")).context("random Talker")?;

    // Talker prefill and decode.
    let prompt = deterministic((1, sizes.prompt_rows, hidden), device, dtype)?;
    let prompt_positions = decode_positions(0, 0.0, sizes.prompt_rows, device)?;
    let prefill = median_time(1, 2, || -> Result<Tensor> {
        talker.clear_cache();
        let h = talker.forward_hidden(&prompt, &prompt_positions)?;
        Ok(talker.codec_logits(&h.narrow(1, sizes.prompt_rows - 1, 1)?)?)
    });
    rows.push(row(
        "qwen3 talker prefill",
        format!("{} rows, {dtype:?}", sizes.prompt_rows),
        ms(prefill),
        "ms",
    ));
    let step_input = deterministic((1, 1, hidden), device, dtype)?;
    let step = median_time(1, sizes.decode_steps, || -> Result<Tensor> {
        let positions = decode_positions(talker.cache_len(), 0.0, 1, device)?;
        let h = talker.forward_hidden(&step_input, &positions)?;
        Ok(talker.codec_logits(&h)?)
    });
    rows.push(row(
        "qwen3 talker decode step",
        format!("after {} rows, {dtype:?}", sizes.prompt_rows),
        ms(step),
        "ms/frame",
    ));

    // The code predictor: one pass per frame, greedy.
    let code0_embedding = talker.embed_codes(&Tensor::new(&[[0u32]], device)?)?;
    let past_hidden = step_input.clone();
    let predictor = median_time(1, sizes.predictor_frames, || {
        talker
            .code_predictor_mut()
            .generate(&past_hidden, &code0_embedding, |logits| {
                logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()
            })
    });
    rows.push(row(
        "qwen3 code predictor",
        format!("{} residual codebooks, {dtype:?}", tc.num_code_groups - 1),
        ms(predictor),
        "ms/frame",
    ));
    drop(talker);

    // Code2Wav: a streamed frame with the full left context, the first frame, and offline.
    let vb32 = RandomWeights::var_builder(DType::F32, device);
    let mut code2wav =
        Code2Wav::new(&config.code2wav_config, vb32.pp("code2wav")).context("random Code2Wav")?;
    let q = config.code2wav_config.num_quantizers;
    let frame: Vec<u32> = (0..q as u32).collect();
    let mut stream = Code2WavStream::new(CODE2WAV_LEFT_CONTEXT);
    let first = median_time(0, 1, || stream.push_frame(&mut code2wav, &frame));
    let first_samples = stream.emitted();
    for _ in 1..CODE2WAV_LEFT_CONTEXT {
        stream.push_frame(&mut code2wav, &frame)?;
    }
    let streamed = median_time(0, 3, || stream.push_frame(&mut code2wav, &frame));
    rows.push(row(
        "qwen3 code2wav first frame",
        "1 frame, f32".into(),
        ms(first),
        "ms",
    ));
    rows.push(row(
        "qwen3 code2wav first frame audio",
        format!(
            "of {} samples per frame (the causal decoder holds back the rest until the next)",
            code2wav.samples_per_frame()
        ),
        first_samples as f64 / SAMPLE_RATE as f64 * 1e3,
        "ms",
    ));
    rows.push(row(
        "qwen3 code2wav streamed frame",
        format!("{CODE2WAV_LEFT_CONTEXT} frames of left context, f32"),
        ms(streamed),
        "ms/frame",
    ));
    let codes: Vec<u32> = (0..q * sizes.offline_frames)
        .map(|i| (i % config.code2wav_config.codebook_size) as u32)
        .collect();
    let codes = Tensor::from_vec(codes, (1, q, sizes.offline_frames), device)?;
    let offline = median_time(0, 1, || code2wav.forward(&codes));
    let seconds =
        sizes.offline_frames as f64 * code2wav.samples_per_frame() as f64 / SAMPLE_RATE as f64;
    rows.push(row(
        "qwen3 code2wav offline",
        format!("{} frames ({seconds:.1} s), f32", sizes.offline_frames),
        seconds / offline.as_secs_f64(),
        "x real time",
    ));

    // The schedule: first audio = prefill (which chooses code 0) + one predictor pass + the
    // first Code2Wav frame; each later frame = decode step + predictor + streamed Code2Wav,
    // against the frame's own duration.
    let frame_ms = code2wav.samples_per_frame() as f64 / SAMPLE_RATE as f64 * 1e3;
    let first_audio = ms(prefill) + ms(predictor) + ms(first);
    let per_frame = ms(step) + ms(predictor) + ms(streamed);
    rows.push(row(
        "qwen3 first audio after the answer's first token",
        "talker prefill + code predictor + code2wav first frame".into(),
        first_audio,
        "ms",
    ));
    rows.push(row(
        "qwen3 per frame, streaming",
        format!("decode step + code predictor + code2wav, vs {frame_ms:.0} ms of audio"),
        per_frame,
        "ms/frame",
    ));
    Ok(rows)
}

/// The Qwen3-Omni config a `bench model --config` spec names: `qwen3-omni` (the published
/// 30B-A3B shapes), or a config.json / model folder whose `model_type` is this family's; `None`
/// for other specs.
pub fn qwen3_config_from_spec(spec: &str) -> Result<Option<Config>> {
    if spec == "qwen3-omni" {
        return Config::published_30b_a3b().map(Some);
    }
    let path = std::path::Path::new(spec);
    let path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    if ModelFamily::of_config(&text).ok() != Some(ModelFamily::Qwen3Omni) {
        return Ok(None);
    }
    Config::from_json(&text)
        .with_context(|| format!("{} is not a valid Qwen3-Omni config", path.display()))
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_measured_on_the_tiny_config() {
        let config =
            Config::from_json(include_str!("../../models/tiny-qwen3-omni/config.json")).unwrap();
        let sizes = Qwen3SpeechBenchSizes {
            prompt_rows: 16,
            decode_steps: 2,
            predictor_frames: 2,
            offline_frames: 4,
        };
        let rows = bench_qwen3_speech(&config, DType::F32, &Device::Cpu, sizes).unwrap();
        assert_eq!(rows.len(), 9);
        for r in &rows {
            assert!(
                r.value.is_finite() && r.value > 0.0,
                "{}: {}",
                r.stage,
                r.value
            );
        }
    }

    #[test]
    fn specs_of_this_family_are_recognised() {
        assert!(qwen3_config_from_spec("qwen3-omni").unwrap().is_some());
        let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-qwen3-omni");
        assert!(qwen3_config_from_spec(tiny).unwrap().is_some());
        let qwen25 = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny");
        assert!(qwen3_config_from_spec(qwen25).unwrap().is_none());
        assert!(qwen3_config_from_spec("3b").unwrap().is_none());
    }
}
