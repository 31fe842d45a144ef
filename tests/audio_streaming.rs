//! The live audio path, samples -> streaming log-mel -> streaming audio tower, against the
//! whole-clip path (processor features + tower), on the fixture waveform and on espeak-ng
//! speech, with the samples pushed in odd-sized pieces.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use omnicall::media::audio_file::load_audio;
use omnicall::media::mel::{FloorPolicy, LogMel, MelFrames};
use omnicall::model::config::{Config, ProcessorConfig};
use omnicall::model::thinker::audio_encoder::{AudioEncoder, output_len};

use common::Cases;

/// Streaming and whole-clip embeddings are the same function of the same frames; only matmul
/// shapes differ, which can move float rounding.
const ROUNDING: f32 = 1e-5;

/// Odd piece sizes, cycled: smaller than a hop, between hop and window, larger than a chunk.
const PIECES: [usize; 6] = [37, 161, 1, 999, 4099, 250];

fn front_end() -> (LogMel, AudioEncoder) {
    let dir = common::model_dir();
    let processor = ProcessorConfig::from_json(
        &std::fs::read_to_string(dir.join("processor_config.json")).unwrap(),
    )
    .unwrap();
    let mel = LogMel::new(&processor.feature_extractor).unwrap();
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
    let encoder = AudioEncoder::new(
        &cfg.thinker_config.audio_config,
        vb.pp("thinker").pp("audio_tower"),
    )
    .unwrap();
    (mel, encoder)
}

fn fixture_waveform() -> Vec<f32> {
    Cases::load()
        .f32("inputs.waveform")
        .to_vec1::<f32>()
        .unwrap()
}

fn speech() -> Vec<f32> {
    load_audio(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/speech.wav")).unwrap()
}

/// What the live path produced for one utterance.
struct Streamed {
    mel: MelFrames,
    /// Embedding rows, in order.
    embeddings: Vec<Vec<f32>>,
    /// (samples pushed so far, embeddings emitted so far) after every push.
    progress: Vec<(usize, usize)>,
}

fn run_stream(mel: &LogMel, encoder: &AudioEncoder, policy: FloorPolicy, x: &[f32]) -> Streamed {
    let mut mel_stream = mel.stream(policy).unwrap();
    let mut enc_stream = encoder.stream();
    let mut out = Streamed {
        mel: MelFrames::new(mel.n_mels()),
        embeddings: Vec::new(),
        progress: Vec::new(),
    };
    let mut feed = |frames: MelFrames, out: &mut Streamed| {
        out.mel.append(&frames);
        let emitted = enc_stream
            .push(encoder, &frames.to_tensor(&Device::Cpu).unwrap())
            .unwrap();
        if let Some(e) = emitted {
            out.embeddings.extend(e.to_vec2::<f32>().unwrap());
        }
    };
    let mut start = 0;
    let mut k = 0;
    while start < x.len() {
        let n = PIECES[k % PIECES.len()].min(x.len() - start);
        let frames = mel_stream.push(&x[start..start + n]).unwrap();
        feed(frames, &mut out);
        start += n;
        k += 1;
        out.progress.push((start, out.embeddings.len()));
    }
    feed(mel_stream.flush(), &mut out);
    if let Some(e) = enc_stream.flush(encoder).unwrap() {
        out.embeddings.extend(e.to_vec2::<f32>().unwrap());
    }
    out
}

fn whole_clip(mel: &LogMel, encoder: &AudioEncoder, x: &[f32]) -> (MelFrames, Vec<Vec<f32>>) {
    let features = mel.features(x).unwrap();
    let embeddings = encoder
        .forward(&features.to_tensor(&Device::Cpu).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    (features, embeddings)
}

fn row_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Embedding rows per chunk of `chunk` frames: a full chunk has `conv` tokens, pooled by pairs.
fn chunks_of_row(row: usize, chunk_tokens: usize) -> [usize; 2] {
    [(2 * row) / chunk_tokens, (2 * row + 1) / chunk_tokens]
}

#[test]
fn held_utterance_stream_equals_whole_clip() {
    let (mel, encoder) = front_end();
    for (name, x) in [("fixture", fixture_waveform()), ("speech", speech())] {
        let (features, want) = whole_clip(&mel, &encoder, &x);
        let got = run_stream(&mel, &encoder, FloorPolicy::Utterance, &x);
        assert!(got.mel == features, "{name}: held mel frames differ");
        assert_eq!(got.embeddings.len(), output_len(features.len()), "{name}");
        assert_eq!(got.embeddings.len(), want.len(), "{name}");
        let worst = got
            .embeddings
            .iter()
            .zip(&want)
            .map(|(a, b)| row_diff(a, b))
            .fold(0f32, f32::max);
        eprintln!("{name}: {} embeddings, max diff {worst:e}", want.len());
        assert!(worst <= ROUNDING, "{name}: {worst:e}");
    }
}

#[test]
fn live_stream_emits_each_chunk_at_once_and_matches_once_the_maximum_is_seen() {
    let (mel, encoder) = front_end();
    let chunk = encoder.chunk_frames();
    let chunk_tokens = chunk.div_ceil(2);
    let (hop, half) = (mel.hop_length(), mel.n_fft() / 2);
    for (name, x) in [("fixture", fixture_waveform()), ("speech", speech())] {
        let (features, want) = whole_clip(&mel, &encoder, &x);
        let got = run_stream(&mel, &encoder, FloorPolicy::Groups(chunk), &x);
        assert_eq!(got.mel.len(), features.len(), "{name}");
        assert_eq!(got.embeddings.len(), want.len(), "{name}");

        // Latency: once the last frame of chunk c is defined (its window's right half has
        // arrived), the embeddings of chunks 0..=c are out.
        for &(pushed, emitted) in &got.progress {
            let frames_defined = if pushed > half {
                (pushed - half) / hop + 1
            } else {
                0
            };
            let chunks_done = frames_defined / chunk;
            let due = (chunks_done * chunk_tokens) / 2;
            assert!(
                emitted >= due,
                "{name}: {pushed} samples, {emitted} < {due} embeddings"
            );
        }

        // Mel: the grouped floor is never above the whole clip's and exact once the maximum
        // is seen; chunks with exact frames give the whole clip's embeddings.
        let n_chunks = features.len().div_ceil(chunk);
        let whole_max = features.as_slice().iter().copied().fold(f32::MIN, f32::max);
        let mut exact_chunk = vec![true; n_chunks];
        for t in 0..features.len() {
            let (s, w) = (got.mel.frame(t), features.frame(t));
            for (a, b) in s.iter().zip(w) {
                assert!(b - a >= -1e-6, "{name}: frame {t} above the whole clip");
            }
            if s != w {
                exact_chunk[t / chunk] = false;
            }
        }
        let mut seen_max = f32::MIN;
        for (c, &exact) in exact_chunk.iter().enumerate() {
            let frames = c * chunk..((c + 1) * chunk).min(features.len());
            seen_max = frames
                .flat_map(|t| got.mel.frame(t).iter().copied())
                .fold(seen_max, f32::max);
            if seen_max == whole_max {
                assert!(exact, "{name}: chunk {c} after the maximum differs");
            }
        }
        let mut exact_rows = 0;
        for (row, (a, b)) in got.embeddings.iter().zip(&want).enumerate() {
            if chunks_of_row(row, chunk_tokens)
                .iter()
                .all(|&c| exact_chunk[c])
            {
                assert!(row_diff(a, b) <= ROUNDING, "{name}: row {row}");
                exact_rows += 1;
            }
        }
        let first_exact = exact_chunk.iter().position(|&e| e);
        let mel_gap = got
            .mel
            .as_slice()
            .iter()
            .zip(features.as_slice())
            .map(|(a, b)| b - a)
            .fold(0f32, f32::max);
        let row_gap = got
            .embeddings
            .iter()
            .zip(&want)
            .map(|(a, b)| row_diff(a, b))
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: {} of {} chunks exact (first {first_exact:?}), {exact_rows} of {} \
             embeddings; largest mel gap {mel_gap:.4}, largest embedding difference {row_gap:.4}",
            exact_chunk.iter().filter(|&&e| e).count(),
            n_chunks,
            want.len()
        );
        assert!(
            exact_rows > 0,
            "{name}: no chunk reached the utterance maximum"
        );
    }
}

#[test]
fn encoder_stream_over_whole_clip_features_equals_forward() {
    // The tower alone: frames of the whole clip pushed in odd-sized pieces.
    let (mel, encoder) = front_end();
    for (name, x) in [("fixture", fixture_waveform()), ("speech", speech())] {
        let features = mel.features(&x).unwrap().to_tensor(&Device::Cpu).unwrap();
        let want = encoder.forward(&features).unwrap();
        let mut stream = encoder.stream();
        let mut parts = Vec::new();
        let (mut start, mut k) = (0, 0);
        let frames = features.dim(1).unwrap();
        while start < frames {
            let n = [3usize, 17, 1, 40][k % 4].min(frames - start);
            parts.extend(
                stream
                    .push(&encoder, &features.narrow(1, start, n).unwrap())
                    .unwrap(),
            );
            start += n;
            k += 1;
        }
        parts.extend(stream.flush(&encoder).unwrap());
        let got = Tensor::cat(&parts, 0).unwrap();
        common::assert_close(name, &got, &want, ROUNDING);
    }
}
