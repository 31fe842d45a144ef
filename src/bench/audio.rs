//! Audio-path benchmark: log-mel front end against real time, the audio tower per 2-s block at
//! the published shapes (random weights, no files), and how many Thinker tokens a block becomes.

use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::bench::{Achieved, Measurement, median_time, median_time_and_work};
use crate::media::mel::{FloorPolicy, LogMel};
use crate::model::config::{Config, FeatureExtractorConfig};
use crate::model::linear::ProductWork;
use crate::model::random_weights::RandomWeights;
use crate::model::thinker::audio_encoder::{AudioEncoder, output_len};

/// Seconds of audio the front end is timed on.
const MEL_CLIP_SECS: usize = 30;
/// Piece size of the streamed front end: one 20 ms packet of a call.
const STREAM_PIECE_SECS: f64 = 0.02;
/// Blocks encoded in one batch for the throughput figure (a 30-s file).
const BATCH_BLOCKS: usize = 15;

/// Deterministic speech-like test audio: a gliding tone with harmonics and some noise.
fn test_audio(samples: usize, rate: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut phase = 0f64;
    (0..samples)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5;
            let t = i as f64 / rate as f64;
            let f0 = 140.0 + 60.0 * (2.0 * std::f64::consts::PI * 0.7 * t).sin();
            phase += 2.0 * std::f64::consts::PI * f0 / rate as f64;
            let voice = (1..6)
                .map(|h| (phase * h as f64).sin() / h as f64)
                .sum::<f64>();
            (0.2 * voice + 0.01 * noise) as f32
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times the audio path for `config`'s audio tower in `dtype` on `device`.
pub fn bench_audio(
    config: &Config,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Vec<Measurement>> {
    bench_audio_on(config, dtype, device, MEL_CLIP_SECS)
}

/// [`bench_audio`] with the front end timed on `clip_secs` seconds of audio.
fn bench_audio_on(
    config: &Config,
    dtype: DType,
    device: &Device,
    clip_secs: usize,
) -> anyhow::Result<Vec<Measurement>> {
    let audio_cfg = &config.thinker_config.audio_config;
    // The published feature extractor, with the tower's number of mel bins.
    let fe = FeatureExtractorConfig {
        feature_size: audio_cfg.num_mel_bins,
        ..FeatureExtractorConfig::default()
    };
    let mel = LogMel::new(&fe).context("feature extractor")?;
    let rate = fe.sampling_rate;
    let mut rows = Vec::new();

    // Front end, whole clip and streamed in 20 ms packets.
    let clip = test_audio(clip_secs * rate, rate);
    let whole = median_time(1, 5, || mel.features(&clip).map(|f| f.len()));
    rows.push(Measurement::new(
        "mel (whole clip)",
        format!(
            "{clip_secs} s, {} bins, n_fft {}",
            fe.feature_size, fe.n_fft
        ),
        clip_secs as f64 / whole.as_secs_f64(),
        "x real time",
    ));
    let piece = (STREAM_PIECE_SECS * rate as f64).round() as usize;
    let streamed = median_time(1, 5, || -> anyhow::Result<usize> {
        let mut stream = mel.stream(FloorPolicy::Groups(2 * audio_cfg.n_window))?;
        let mut frames = 0;
        for part in clip.chunks(piece) {
            frames += stream.push(part)?.len();
        }
        Ok(frames + stream.flush().len())
    });
    rows.push(Measurement::new(
        "mel (stream)",
        format!("{clip_secs} s in {piece}-sample packets"),
        clip_secs as f64 / streamed.as_secs_f64(),
        "x real time",
    ));

    // The tower at the published shapes: one 2-s block, then a batch of blocks.
    let block_frames = config.thinker_config.seconds_per_chunk * rate / fe.hop_length;
    let vb = RandomWeights::var_builder(dtype, device);
    let encoder = AudioEncoder::new(audio_cfg, vb.pp("thinker").pp("audio_tower"))
        .context("audio tower with random weights")?;
    let shapes = format!(
        "{} layers, d_model {}, {dtype:?}, {device:?}",
        audio_cfg.encoder_layers, audio_cfg.d_model
    );
    let run = |frames: usize| -> anyhow::Result<(Duration, ProductWork)> {
        let features =
            Tensor::randn(0f32, 1.0, (audio_cfg.num_mel_bins, frames), device)?.to_dtype(dtype)?;
        let mut failure = None;
        let (time, work) = median_time_and_work(1, 5, || {
            match encoder
                .forward(&features)
                .and_then(|out| device.synchronize().map(|_| out))
            {
                Ok(out) => Some(out),
                Err(e) => {
                    failure = Some(e);
                    None
                }
            }
        });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok((time, work)),
        }
    };
    let (one, one_work) = run(block_frames)?;
    rows.push(
        Measurement::new(
            "audio encoder (one block)",
            format!(
                "{} s block = {block_frames} frames; {shapes}",
                config.thinker_config.seconds_per_chunk
            ),
            ms(one),
            "ms/block",
        )
        .achieving(Achieved::new(one_work, one)),
    );
    let (batch, batch_work) = run(BATCH_BLOCKS * block_frames)?;
    rows.push(
        Measurement::new(
            "audio encoder (batched blocks)",
            format!("{BATCH_BLOCKS} blocks in one call; {shapes}"),
            ms(batch) / BATCH_BLOCKS as f64,
            "ms/block",
        )
        .achieving(Achieved::new(batch_work, batch)),
    );
    rows.push(Measurement::new(
        "audio encoder tokens",
        format!("Thinker tokens per {block_frames}-frame block"),
        output_len(block_frames) as f64,
        "tokens/block",
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::markdown_table;

    fn config(size: &str) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(size)
            .join("config.json");
        Config::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn bench_rows_on_the_tiny_model() {
        let cfg = config("tiny");
        let rows = bench_audio_on(&cfg, DType::F32, &Device::Cpu, 2).unwrap();
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r.value.is_finite() && r.value > 0.0));
        let fe = FeatureExtractorConfig::default();
        let block = cfg.thinker_config.seconds_per_chunk * fe.sampling_rate / fe.hop_length;
        assert_eq!(rows[4].value, output_len(block) as f64);
        println!("{}", markdown_table(&rows));
    }

    /// Full-size 3B audio tower in f32 on the CPU (about 3 GB of random weights): run with
    /// `flock /work/.bench.lock cargo test --lib bench::audio -- --ignored --nocapture`.
    #[test]
    #[ignore = "full-size benchmark; run under the bench lock"]
    fn bench_audio_3b_f32_cpu() {
        let rows = bench_audio(&config("3b"), DType::F32, &Device::Cpu).unwrap();
        println!("{}", markdown_table(&rows));
    }
}
