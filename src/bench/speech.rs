//! Speech-out benchmark at full-size shapes with random weights: Talker codec tokens per second
//! after a realistic prefill, token2wav real-time factor offline and streaming, and the
//! first-chunk latency of the streaming decoder.
//!
//! The Talker runs in the requested dtype; token2wav always runs in float32, as the reference
//! does. The streamed and the offline waveform of the same codes and noise are also compared
//! (with random weights this says how much the chunking changes the output, not how it sounds).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{Measurement, median_time};
use crate::model::config::Config;
use crate::model::random_weights::RandomWeights;
use crate::model::speakers::Voice;
use crate::model::talker::{
    Talker, TalkerOptions, TalkerPrompt, TalkerStep, TalkerTextRows, TalkerTurn,
};
use crate::model::thinker::decoder::sequential_positions;
use crate::model::token2wav::dit::SamplerOptions;
use crate::model::token2wav::streaming::{
    StreamNoise, StreamingDecoder, StreamingOptions, waveform_distance,
};
use crate::model::token2wav::{MEL_FRAMES_PER_SECOND, Token2Wav};

/// Codec tokens per second of speech (2 mel frames each at 100 frames/s).
const CODES_PER_SECOND: f64 = 50.0;

/// How much work each figure is measured on.
#[derive(Debug, Clone, Copy)]
pub struct SpeechBenchSizes {
    /// Thinker prompt rows before the Talker's first code (system prompt, a few seconds of
    /// audio and a camera frame).
    pub prompt_rows: usize,
    /// Timed Talker decode steps.
    pub decode_steps: usize,
    /// Length of the rendered utterance in codec tokens.
    pub utterance_codes: usize,
    /// Length of the reference mel of the benchmark voice.
    pub reference_mel_frames: usize,
}

impl Default for SpeechBenchSizes {
    fn default() -> Self {
        Self {
            prompt_rows: 512,
            decode_steps: 32,
            // 96 codes = 1.92 s of speech: eight 24-frame DiT blocks.
            utterance_codes: 96,
            // The published voices have 400 reference frames.
            reference_mel_frames: 400,
        }
    }
}

/// Every speech figure at the shapes of `config`, with random weights, on `device`.
pub fn bench_speech(config: &Config, dtype: DType, device: &Device) -> Result<Vec<Measurement>> {
    bench_speech_with(config, dtype, device, SpeechBenchSizes::default())
}

fn deterministic_rows(rows: usize, width: usize, phase: f64, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..rows * width)
        .map(|i| ((i as f64 * 0.618 + phase).sin() * 0.5) as f32)
        .collect();
    Ok(Tensor::from_vec(values, (rows, width), device)?)
}

/// [`bench_speech`] with chosen sizes.
pub fn bench_speech_with(
    config: &Config,
    dtype: DType,
    device: &Device,
    sizes: SpeechBenchSizes,
) -> Result<Vec<Measurement>> {
    config.validate().context("speech bench config")?;
    let mut rows = bench_talker(config, dtype, device, sizes).context("talker bench")?;
    rows.extend(bench_token2wav(config, device, sizes).context("token2wav bench")?);
    Ok(rows)
}

fn bench_talker(
    config: &Config,
    dtype: DType,
    device: &Device,
    sizes: SpeechBenchSizes,
) -> Result<Vec<Measurement>> {
    let cfg = &config.talker_config;
    let vb = RandomWeights::var_builder(dtype, device);
    let mut talker = Talker::new(cfg, vb.pp("talker"))?;
    let e = cfg.embedding_size;
    let setup = format!(
        "{} layers, hidden {}, {dtype:?}, prompt {} rows",
        cfg.num_hidden_layers, cfg.hidden_size, sizes.prompt_rows
    );
    let text = TalkerTextRows {
        speaker_bos: deterministic_rows(1, e, 1.0, device)?.squeeze(0)?,
        text_end: deterministic_rows(1, e, 2.0, device)?.squeeze(0)?,
        text_pad: deterministic_rows(1, e, 3.0, device)?.squeeze(0)?,
    };
    // Each try samples with a seed of its own: with one seed every try would end alike.
    let new_turn = |talker: &Talker, seed: u64| -> Result<TalkerTurn> {
        Ok(TalkerTurn::new(
            talker,
            TalkerPrompt {
                rows: deterministic_rows(sizes.prompt_rows, e, 0.0, device)?,
                positions: sequential_positions(0, sizes.prompt_rows + 2, device)?,
                rope_delta: 0,
            },
            text.clone(),
            TalkerOptions::reference(seed, config.token2wav_config.dit_config.num_embeds),
        )?)
    };
    let reply_row = deterministic_rows(1, e, 4.0, device)?;

    let mut prefill_times = Vec::new();
    let mut step_times = Vec::new();
    // Random weights may pick an end code early: start another turn until enough steps ran.
    while step_times.len() < sizes.decode_steps && prefill_times.len() < 8 {
        let mut turn = new_turn(&talker, 7 + prefill_times.len() as u64)?;
        turn.push_reply_row(reply_row.clone())?;
        let start = Instant::now();
        let first = turn.step(&mut talker)?;
        prefill_times.push(start.elapsed());
        if !matches!(first, TalkerStep::Code(_)) {
            continue;
        }
        while step_times.len() < sizes.decode_steps {
            turn.push_reply_row(reply_row.clone())?;
            let start = Instant::now();
            let step = turn.step(&mut talker)?;
            if !matches!(step, TalkerStep::Code(_)) {
                break;
            }
            step_times.push(start.elapsed());
        }
    }
    anyhow::ensure!(
        !step_times.is_empty(),
        "the random Talker ended every turn at once"
    );
    let median = |mut v: Vec<Duration>| -> Duration {
        v.sort();
        v[v.len() / 2]
    };
    let prefill = median(prefill_times);
    let step = median(step_times.clone());
    let tokens_per_s = 1.0 / step.as_secs_f64();
    Ok(vec![
        Measurement::new(
            "talker prefill",
            setup.clone(),
            prefill.as_secs_f64() * 1e3,
            "ms",
        ),
        Measurement::new(
            "talker decode",
            format!("{setup}, median of {} steps", step_times.len()),
            tokens_per_s,
            "codec tokens/s",
        ),
        Measurement::new(
            "talker decode",
            setup,
            tokens_per_s / CODES_PER_SECOND,
            "x real time",
        ),
    ])
}

fn bench_token2wav(
    config: &Config,
    device: &Device,
    sizes: SpeechBenchSizes,
) -> Result<Vec<Measurement>> {
    let t2w_cfg = &config.token2wav_config;
    let dit_cfg = &t2w_cfg.dit_config;
    let vb = RandomWeights::var_builder(DType::F32, device);
    let t2w = Token2Wav::new(t2w_cfg, vb.pp("token2wav"))?;
    let voice = Voice {
        name: "bench".into(),
        bos_token: 0,
        cond: deterministic_rows(1, dit_cfg.enc_emb_dim, 5.0, device)?,
        // Log-mel-like values around -5.
        ref_mel: deterministic_rows(sizes.reference_mel_frames, dit_cfg.mel_dim, 6.0, device)?
            .affine(4.0, -5.0)?
            .unsqueeze(0)?,
    };
    let speaker = t2w.speaker(&voice)?;
    let schedule = t2w.schedule(&SamplerOptions::default())?;
    let rows = (dit_cfg.num_embeds + 1) as u32;
    // A fixed pseudo-random code sequence (Knuth's multiplicative hash of the index).
    let codes: Vec<u32> = (0..sizes.utterance_codes as u32)
        .map(|i| (i.wrapping_add(1).wrapping_mul(2_654_435_761) >> 7) % rows)
        .collect();
    let frames = codes.len() * t2w.frames_per_code();
    let audio_s = frames as f64 / MEL_FRAMES_PER_SECOND as f64;
    let seed = 3;
    let noise = t2w.noise_source(seed).take_tensor(frames, device)?;
    let setup = format!(
        "DiT {} layers x {}, BigVGAN {} ch, f32, {} codes = {audio_s:.2} s, {} ODE steps",
        dit_cfg.num_hidden_layers,
        dit_cfg.hidden_size,
        t2w_cfg.bigvgan_config.upsample_initial_channel,
        codes.len(),
        schedule.options().steps
    );
    let mut out = Vec::new();

    // Offline: the whole utterance, DiT and vocoder timed apart.
    let mut mel = None;
    let dit_time = median_time(0, 1, || {
        mel = Some(t2w.mel(&speaker, &codes, &noise, &schedule));
    });
    let mel = mel.expect("ran once")?;
    let mut offline = None;
    let vocoder_time = median_time(0, 1, || offline = Some(t2w.vocode(&mel)));
    let offline = offline.expect("ran once")?;
    let rtf = |d: Duration| d.as_secs_f64() / audio_s;
    out.push(Measurement::new(
        "token2wav offline",
        setup.clone(),
        rtf(dit_time + vocoder_time),
        "s compute / s audio",
    ));
    out.push(Measurement::new(
        "token2wav offline: DiT",
        setup.clone(),
        rtf(dit_time),
        "s compute / s audio",
    ));
    out.push(Measurement::new(
        "token2wav offline: BigVGAN",
        setup.clone(),
        rtf(vocoder_time),
        "s compute / s audio",
    ));

    // Streaming: codes pushed one at a time, as the Talker makes them.
    for (name, options) in [
        ("low latency", StreamingOptions::low_latency()),
        ("reference chunks", StreamingOptions::reference()),
    ] {
        let first_after = options.first_audio_after_codes(dit_cfg);
        let mut decoder = StreamingDecoder::new(
            &t2w,
            speaker.clone(),
            schedule.clone(),
            options,
            StreamNoise::seeded(&t2w, seed),
        )?;
        let mut streamed = Vec::new();
        let mut total = Duration::ZERO;
        let mut first_chunk = None;
        for (i, &code) in codes.iter().enumerate() {
            let start = Instant::now();
            let samples = decoder.push_codes(&t2w, &[code])?;
            let took = start.elapsed();
            total += took;
            if first_chunk.is_none() && !samples.is_empty() {
                first_chunk = Some((i + 1, took, samples.len()));
            }
            streamed.extend(samples);
        }
        let start = Instant::now();
        let tail = decoder.finish(&t2w)?;
        total += start.elapsed();
        if first_chunk.is_none() && !tail.is_empty() {
            first_chunk = Some((codes.len(), start.elapsed(), tail.len()));
        }
        streamed.extend(tail);
        let stream_setup = format!("{setup}, {name}");
        out.push(Measurement::new(
            &format!("token2wav streaming ({name})"),
            stream_setup.clone(),
            rtf(total),
            "s compute / s audio",
        ));
        if let Some((after, took, samples)) = first_chunk {
            out.push(Measurement::new(
                &format!("token2wav streaming ({name}): first chunk compute"),
                format!(
                    "{stream_setup}, chunk of {:.0} ms audio",
                    samples as f64 * 1e3 / t2w.sample_rate() as f64
                ),
                took.as_secs_f64() * 1e3,
                "ms",
            ));
            out.push(Measurement::new(
                &format!("token2wav streaming ({name}): first chunk after"),
                format!("{stream_setup}, documented {first_after}"),
                after as f64,
                "codec tokens",
            ));
        }
        let (max, rel) = waveform_distance(&streamed, &offline)?;
        out.push(Measurement::new(
            &format!("token2wav streaming ({name}) vs offline"),
            format!("{stream_setup}, random weights, same noise, max abs {max:.2e}"),
            rel as f64,
            "relative RMS error",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_reported_on_the_tiny_shapes() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let config = Config::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let sizes = SpeechBenchSizes {
            prompt_rows: 8,
            decode_steps: 3,
            utterance_codes: 24,
            reference_mel_frames: 40,
        };
        let rows = bench_speech_with(&config, DType::F32, &Device::Cpu, sizes)?;
        for stage in [
            "talker prefill",
            "talker decode",
            "token2wav offline",
            "token2wav streaming (low latency)",
            "token2wav streaming (low latency): first chunk compute",
            "token2wav streaming (reference chunks) vs offline",
        ] {
            let row = rows
                .iter()
                .find(|r| r.stage == stage)
                .unwrap_or_else(|| panic!("no row {stage}: {rows:?}"));
            assert!(row.value.is_finite() && row.value >= 0.0, "{row:?}");
        }
        Ok(())
    }

    /// The full-size figures (minutes of CPU, ~4 GB): run under `flock /work/.bench.lock` with
    /// `cargo test --lib bench::speech -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn full_size_3b_figures() -> Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/3b/config.json");
        let config = Config::from_json(&std::fs::read_to_string(path)?)?;
        let rows = bench_speech(&config, DType::F32, &Device::Cpu)?;
        println!("{}", crate::bench::markdown_table(&rows));
        assert!(rows.iter().all(|r| r.value.is_finite() && r.value >= 0.0));
        Ok(())
    }

    /// One DiT evaluation (the CFG pair) of a whole 96-code utterance and of the first
    /// streaming window, and BigVGAN on the utterance's mel, at 3B shapes: the pieces of the
    /// token2wav figures, short enough to profile (`perf record -g` on the test binary).
    /// `cargo test --release --lib bench::speech -- --ignored --nocapture token2wav_pieces`.
    #[test]
    #[ignore]
    fn token2wav_pieces_3b() -> Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/3b/config.json");
        let config = Config::from_json(&std::fs::read_to_string(path)?)?;
        let device = Device::Cpu;
        let t2w_cfg = &config.token2wav_config;
        let dit_cfg = &t2w_cfg.dit_config;
        let vb = RandomWeights::var_builder(DType::F32, &device);
        let t2w = Token2Wav::new(t2w_cfg, vb.pp("token2wav"))?;
        let voice = Voice {
            name: "bench".into(),
            bos_token: 0,
            cond: deterministic_rows(1, dit_cfg.enc_emb_dim, 5.0, &device)?,
            ref_mel: deterministic_rows(400, dit_cfg.mel_dim, 6.0, &device)?
                .affine(4.0, -5.0)?
                .unsqueeze(0)?,
        };
        let speaker = t2w.speaker(&voice)?;
        let parts = std::env::var("PIECES").unwrap_or_else(|_| "dit,window,bigvgan".into());
        for (name, codes) in [("dit", 96usize), ("window", 24)] {
            if !parts.contains(name) {
                continue;
            }
            let ids: Vec<u32> = (0..codes as u32).map(|i| (i * 37 + 5) % 1000).collect();
            let codes_t = t2w.codes_tensor(&ids)?;
            let frames = codes * t2w.frames_per_code();
            let x = t2w.noise_source(1).take_tensor(frames, &device)?;
            let mut out = None;
            let took = median_time(1, 3, || {
                out = Some(t2w.dit().forward_cfg(&x, &speaker, &codes_t, 0.3));
            });
            out.expect("ran")?;
            println!(
                "DiT evaluation, CFG pair, {codes} codes ({frames} frames): {:.1} ms",
                took.as_secs_f64() * 1e3
            );
        }
        if parts.contains("bigvgan") {
            let mel = (deterministic_rows(dit_cfg.mel_dim, 192, 2.0, &device)? * 2.0)?
                .affine(1.0, -5.0)?
                .unsqueeze(0)?;
            let mut out = None;
            let took = median_time(1, 2, || out = Some(t2w.vocode(&mel)));
            let samples = out.expect("ran")?.len();
            println!(
                "BigVGAN, 192 frames ({:.2} s of audio): {:.1} ms",
                samples as f64 / t2w.sample_rate() as f64,
                took.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}
