//! Streaming token2wav on the fixture model: chunk by chunk against the offline decode of the
//! same codes and noise, when the first audio comes, and the reference schedule against a
//! direct transcription of the original streaming decoder.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use omnicall::model::config::Config;
use omnicall::model::speakers::Voices;
use omnicall::model::token2wav::Token2Wav;
use omnicall::model::token2wav::dit::{OdeSchedule, SamplerOptions, SpeakerCondition};
use omnicall::model::token2wav::streaming::{
    StreamNoise, StreamingDecoder, StreamingOptions, VocoderEdge, waveform_distance,
};

/// Documented bounds (README, "Streaming token2wav"): the largest sample difference and the
/// relative RMS error of a streamed waveform against the offline one, on the fixture model.
const MAX_ABS_BOUND: f32 = 1e-2;
const REL_RMS_BOUND: f32 = 1e-2;

struct Setup {
    cfg: Config,
    t2w: Token2Wav,
    speaker: SpeakerCondition,
    schedule: OdeSchedule,
}

fn setup() -> Setup {
    let dir = common::model_dir();
    let cfg =
        Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let t2w = Token2Wav::new(&cfg.token2wav_config, vb.pp("token2wav")).unwrap();
    let voices = Voices::load(&dir, &Device::Cpu).unwrap();
    let speaker = t2w.speaker(voices.default_voice().unwrap()).unwrap();
    let schedule = t2w.schedule(&SamplerOptions::default()).unwrap();
    Setup {
        cfg,
        t2w,
        speaker,
        schedule,
    }
}

/// Deterministic pseudo-random codes inside the DiT's codec range.
fn codes(n: usize, range: usize, seed: u64) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % range as u64) as u32
        })
        .collect()
}

/// Streams `codes` one at a time; returns (codes received when each chunk came out, chunk).
fn stream(
    s: &Setup,
    codes: &[u32],
    options: &StreamingOptions,
    seed: u64,
) -> Vec<(usize, Vec<f32>)> {
    let mut dec = StreamingDecoder::new(
        &s.t2w,
        s.speaker.clone(),
        s.schedule.clone(),
        options.clone(),
        StreamNoise::seeded(&s.t2w, seed),
    )
    .unwrap();
    let mut chunks = Vec::new();
    for (i, &c) in codes.iter().enumerate() {
        let out = dec.push_codes(&s.t2w, &[c]).unwrap();
        if !out.is_empty() {
            chunks.push((i + 1, out));
        }
    }
    let tail = dec.finish(&s.t2w).unwrap();
    if !tail.is_empty() {
        chunks.push((codes.len(), tail));
    }
    chunks
}

fn offline(s: &Setup, codes: &[u32], seed: u64) -> Vec<f32> {
    let frames = codes.len() * s.t2w.frames_per_code();
    let noise = s
        .t2w
        .noise_source(seed)
        .take_tensor(frames, &Device::Cpu)
        .unwrap();
    s.t2w
        .synthesize(&s.speaker, codes, &noise, &s.schedule)
        .unwrap()
}

fn low_latency_hold_back() -> StreamingOptions {
    StreamingOptions {
        vocoder_edge: VocoderEdge::HoldBack,
        ..StreamingOptions::low_latency()
    }
}

#[test]
fn streamed_chunks_stay_within_the_bound_of_the_offline_decode() {
    let s = setup();
    let range = s.cfg.token2wav_config.dit_config.num_embeds + 1;
    let block_codes = s.cfg.token2wav_config.dit_config.block_size / s.t2w.frames_per_code();
    // Long enough for every option set to reach its full chunk size several times.
    let n = 40 * block_codes + block_codes / 2 + 1;
    let seed = 11;
    let utterance = codes(n, range, 3);
    let reference = offline(&s, &utterance, seed);
    assert_eq!(reference.len(), n * s.t2w.samples_per_code());
    for (name, options) in [
        ("low_latency", StreamingOptions::low_latency()),
        ("low_latency + hold back", low_latency_hold_back()),
        ("reference", StreamingOptions::reference()),
    ] {
        let chunks = stream(&s, &utterance, &options, seed);
        let mut at = 0;
        let (mut worst_max, mut all) = (0f32, Vec::new());
        for (i, (_, chunk)) in chunks.iter().enumerate() {
            let (max, _) = waveform_distance(chunk, &reference[at..at + chunk.len()]);
            assert!(max <= MAX_ABS_BOUND, "{name}: chunk {i} max abs diff {max}");
            worst_max = worst_max.max(max);
            at += chunk.len();
            all.extend_from_slice(chunk);
        }
        assert_eq!(all.len(), reference.len(), "{name}: streamed length");
        let (max, rel) = waveform_distance(&all, &reference);
        eprintln!(
            "{name}: {} chunks, max abs diff {max:.2e}, relative RMS error {rel:.2e} (offline RMS {:.4})",
            chunks.len(),
            (reference.iter().map(|x| x * x).sum::<f32>() / reference.len() as f32).sqrt()
        );
        assert!(rel <= REL_RMS_BOUND, "{name}: relative RMS error {rel}");
    }
}

#[test]
fn first_chunk_comes_after_the_documented_number_of_codes() {
    let s = setup();
    let dit = &s.cfg.token2wav_config.dit_config;
    let range = dit.num_embeds + 1;
    for options in [
        StreamingOptions::low_latency(),
        low_latency_hold_back(),
        StreamingOptions::reference(),
    ] {
        let promised = options.first_audio_after_codes(dit);
        let utterance = codes(promised + 3 * dit.block_size, range, 5);
        let chunks = stream(&s, &utterance, &options, 2);
        let (first_at, first) = &chunks[0];
        assert!(
            *first_at <= promised,
            "{options:?}: first audio after {first_at} codes, documented {promised}"
        );
        assert!(!first.is_empty());
    }
    // The default is below the reference's 48 codes of the published model.
    let published: Config = Config::from_json(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/3b/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pdit = &published.token2wav_config.dit_config;
    assert_eq!(
        StreamingOptions::reference().first_audio_after_codes(pdit),
        48
    );
    assert_eq!(
        StreamingOptions::default().first_audio_after_codes(pdit),
        24
    );
}

#[test]
fn utterance_shorter_than_the_first_chunk_is_the_offline_decode() {
    let s = setup();
    let dit = &s.cfg.token2wav_config.dit_config;
    let options = StreamingOptions::low_latency();
    let n = options.first_window_after_codes(dit) - 1;
    let utterance = codes(n, dit.num_embeds + 1, 9);
    let chunks = stream(&s, &utterance, &options, 4);
    assert_eq!(chunks.len(), 1, "one piece at finish()");
    let (max, _) = waveform_distance(&chunks[0].1, &offline(&s, &utterance, 4));
    assert!(max < 1e-5, "max abs diff {max}");
}

/// The original decoder (`Qwen2Code2wav.fast_forward` / vllm-omni `process_chunk`), written out
/// on the whole code sequence in frames: chunk, past, future and vocoder overlap.
fn reference_decoder(
    s: &Setup,
    codes: &[u32],
    noise: &Tensor,
    chunk: usize,
    past: usize,
    future: usize,
    overlap: usize,
) -> Vec<f32> {
    let f = s.t2w.frames_per_code();
    let hop = s.t2w.bigvgan().hop_length();
    let total = codes.len() * f;
    let dit = |start: usize, end: usize| -> Tensor {
        s.t2w
            .mel(
                &s.speaker,
                &codes[start / f..end / f],
                &noise.narrow(1, start, end - start).unwrap(),
                &s.schedule,
            )
            .unwrap()
    };
    if total <= chunk + future {
        return s.t2w.vocode(&dit(0, total)).unwrap();
    }
    let n_iter = (total - future).div_ceil(chunk);
    let mut out = Vec::new();
    let mut prev: Option<Tensor> = None;
    for i in 0..n_iter {
        let finished = i == n_iter - 1;
        let start = (i * chunk).saturating_sub(past);
        let end = ((i + 1) * chunk + future).min(total);
        let generated = dit(start, end);
        let width = generated.dim(2).unwrap();
        let tail = |p: &Tensor| {
            let w = p.dim(2).unwrap();
            p.narrow(2, w - 2 * overlap, 2 * overlap).unwrap()
        };
        let mel = if i == 0 {
            generated.narrow(2, 0, chunk).unwrap()
        } else if finished {
            let kept = generated.narrow(2, past, width - past).unwrap();
            Tensor::cat(&[tail(prev.as_ref().unwrap()), kept], 2).unwrap()
        } else {
            let from = if start == 0 { i * chunk } else { past };
            let kept = generated.narrow(2, from, width - future - from).unwrap();
            Tensor::cat(&[tail(prev.as_ref().unwrap()), kept], 2).unwrap()
        };
        let audio = s.t2w.vocode(&mel).unwrap();
        let n = audio.len();
        if i == 0 {
            out.extend_from_slice(&audio[..n - overlap * hop]);
        } else if finished {
            out.extend_from_slice(&audio[overlap * hop..]);
        } else {
            out.extend_from_slice(&audio[overlap * hop..n - overlap * hop]);
        }
        prev = Some(mel);
    }
    out
}

#[test]
fn reference_options_reproduce_the_original_streaming_decoder() {
    let s = setup();
    let dit = &s.cfg.token2wav_config.dit_config;
    let block = dit.block_size;
    let f = s.t2w.frames_per_code();
    // The published overlap (20 frames) needs chunks of 72 frames; scale it to this model's
    // blocks so that the original algorithm's slicing stays valid (2 overlaps <= a chunk).
    let options = StreamingOptions {
        vocoder_overlap_frames: block,
        ..StreamingOptions::reference()
    };
    let (chunk, past, future) = (
        options.max_chunk_blocks * block,
        options.past_blocks * block,
        options.future_blocks * block,
    );
    // A length whose last chunk is not a whole chunk, where both schedules cut the same way.
    let mut n = 7 * chunk / f + 1;
    while (n * f - future).is_multiple_of(chunk) {
        n += 1;
    }
    let utterance = codes(n, dit.num_embeds + 1, 21);
    let noise = s
        .t2w
        .noise_source(6)
        .take_tensor(n * f, &Device::Cpu)
        .unwrap();
    let want = reference_decoder(&s, &utterance, &noise, chunk, past, future, block);

    let mut dec = StreamingDecoder::new(
        &s.t2w,
        s.speaker.clone(),
        s.schedule.clone(),
        options,
        StreamNoise::Given(noise),
    )
    .unwrap();
    let mut got = Vec::new();
    for &c in &utterance {
        got.extend(dec.push_codes(&s.t2w, &[c]).unwrap());
    }
    got.extend(dec.finish(&s.t2w).unwrap());
    assert_eq!(got.len(), want.len());
    let (max, _) = waveform_distance(&got, &want);
    assert!(max < 1e-5, "max abs diff {max}");
}

#[test]
fn misuse_is_a_clear_error() {
    let s = setup();
    let dit = &s.cfg.token2wav_config.dit_config;
    let mut dec = StreamingDecoder::new(
        &s.t2w,
        s.speaker.clone(),
        s.schedule.clone(),
        StreamingOptions::low_latency(),
        StreamNoise::Given(Tensor::zeros((1, 3, dit.mel_dim), DType::F32, &Device::Cpu).unwrap()),
    )
    .unwrap();
    let err = dec
        .push_codes(&s.t2w, &codes(64, dit.num_embeds + 1, 1))
        .unwrap_err();
    assert!(err.to_string().contains("noise has 3 frames"), "{err}");
    let mut dec = StreamingDecoder::new(
        &s.t2w,
        s.speaker.clone(),
        s.schedule.clone(),
        StreamingOptions::low_latency(),
        StreamNoise::seeded(&s.t2w, 0),
    )
    .unwrap();
    assert!(dec.finish(&s.t2w).unwrap().is_empty());
    assert!(dec.push_codes(&s.t2w, &[1]).is_err());
    let bad = StreamingDecoder::new(
        &s.t2w,
        s.speaker.clone(),
        s.schedule.clone(),
        StreamingOptions {
            first_chunk_blocks: 0,
            ..StreamingOptions::low_latency()
        },
        StreamNoise::seeded(&s.t2w, 0),
    );
    assert!(bad.is_err());
}
