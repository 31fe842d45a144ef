//! Audio files: every supported container/codec decodes to the same speech at 16 kHz, WAVs
//! round-trip, and bad files are rejected with errors that name them.

use std::path::{Path, PathBuf};

use omnicall::media::audio_file::{
    self, AudioFileError, MODEL_SAMPLE_RATE, WavFormat, decode_file, load_audio, write_wav,
};

fn media(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name)
}

/// A fresh scratch folder for files made by one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("omnicall-audio-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// Largest normalised cross-correlation of two clips within +-`max_lag` samples.
fn best_correlation(a: &[f32], b: &[f32], max_lag: usize) -> (f32, isize) {
    let mut best = (f32::MIN, 0);
    for lag in -(max_lag as isize)..=(max_lag as isize) {
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (i, &x) in a.iter().enumerate() {
            let j = i as isize + lag;
            if j < 0 || j as usize >= b.len() {
                continue;
            }
            let y = b[j as usize];
            dot += x as f64 * y as f64;
            na += x as f64 * x as f64;
            nb += y as f64 * y as f64;
        }
        let c = (dot / (na.sqrt() * nb.sqrt()).max(1e-12)) as f32;
        if c > best.0 {
            best = (c, lag);
        }
    }
    best
}

#[test]
fn every_format_decodes_to_the_same_speech() {
    let reference = load_audio(media("speech.wav")).unwrap();
    let native = decode_file(media("speech.wav")).unwrap();
    assert_eq!(
        (native.sample_rate, native.channels),
        (MODEL_SAMPLE_RATE, 1)
    );
    assert_eq!(
        reference, native.samples,
        "16 kHz WAV passes through untouched"
    );
    assert!(rms(&reference) > 0.01, "the speech is audible");

    // (file, source rate, channels, least correlation with the WAV)
    let cases = [
        ("speech_stereo.flac", 16_000, 2, 0.999),
        ("speech.mp3", 24_000, 1, 0.9),
        ("speech.ogg", 16_000, 1, 0.9),
        ("speech.mp4", 48_000, 2, 0.9),
    ];
    for (name, rate, channels, least) in cases {
        let decoded = decode_file(media(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decoded.sample_rate, rate, "{name}");
        assert_eq!(decoded.channels, channels, "{name}");
        let audio = load_audio(media(name)).unwrap();
        let seconds = audio.len() as f64 / MODEL_SAMPLE_RATE as f64;
        let want = reference.len() as f64 / MODEL_SAMPLE_RATE as f64;
        assert!(
            (seconds - want).abs() < 0.03,
            "{name}: {seconds:.3} s vs {want:.3} s"
        );
        let (corr, lag) = best_correlation(&reference, &audio, 400);
        eprintln!("{name}: {seconds:.3} s, correlation {corr:.4} at lag {lag}");
        assert!(corr >= least, "{name}: correlation {corr} at lag {lag}");
        // Encoder delay and priming are trimmed (MP3 gapless info, the MP4 edit list).
        assert!(lag.abs() <= 16, "{name}: shifted by {lag} samples");
    }
}

#[test]
fn wav_writer_round_trips() {
    let dir = scratch("roundtrip");
    let tone: Vec<f32> = (0..2400)
        .map(|i| 0.5 * (i as f32 * 2.0 * std::f32::consts::PI * 440.0 / 24_000.0).sin())
        .collect();
    let float = dir.join("tone_f32.wav");
    write_wav(&float, &tone, 24_000, WavFormat::Float32).unwrap();
    let back = decode_file(&float).unwrap();
    assert_eq!((back.sample_rate, back.channels), (24_000, 1));
    assert_eq!(back.samples, tone, "float WAV is lossless");

    let pcm = dir.join("tone_s16.wav");
    write_wav(&pcm, &tone, 24_000, WavFormat::Pcm16).unwrap();
    let back = decode_file(&pcm).unwrap();
    let worst = back
        .samples
        .iter()
        .zip(&tone)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1.0 / 32767.0, "16-bit quantisation error {worst}");

    // Read back at the model rate: 0.1 s at 24 kHz is 0.1 s at 16 kHz.
    assert_eq!(load_audio(&pcm).unwrap().len(), 1600);
    std::fs::remove_dir_all(dir).unwrap();
}

fn expect_err(path: &Path) -> AudioFileError {
    match load_audio(path) {
        Ok(samples) => panic!("{} loaded {} samples", path.display(), samples.len()),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(&path.display().to_string()),
                "error does not name the file: {text}"
            );
            e
        }
    }
}

#[test]
fn missing_file_is_named() {
    let e = expect_err(&media("no_such_file.wav"));
    assert!(matches!(e, AudioFileError::Open { .. }), "{e}");
}

#[test]
fn corrupt_files_are_rejected() {
    let dir = scratch("corrupt");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for name in ["garbage.wav", "garbage.mp3", "garbage.flac", "garbage.bin"] {
        let path = dir.join(name);
        std::fs::write(&path, &garbage).unwrap();
        let e = expect_err(&path);
        assert!(
            matches!(
                e,
                AudioFileError::Unsupported { .. } | AudioFileError::Corrupt { .. }
            ),
            "{name}: {e}"
        );
    }
    // A WAV cut inside its header.
    let wav = std::fs::read(media("speech.wav")).unwrap();
    let cut = dir.join("cut_header.wav");
    std::fs::write(&cut, &wav[..30]).unwrap();
    expect_err(&cut);
    // A FLAC whose frames are overwritten after the stream header.
    let mut flac = std::fs::read(media("speech_stereo.flac")).unwrap();
    for b in flac.iter_mut().skip(8192) {
        *b = 0x5a;
    }
    let damaged = dir.join("damaged.flac");
    std::fs::write(&damaged, &flac).unwrap();
    // Damaged frames are skipped (with a warning) or the file is rejected; never a panic.
    if let Ok(samples) = load_audio(&damaged) {
        assert!(samples.iter().all(|x| x.is_finite()));
    }
    // Empty file.
    let empty = dir.join("empty.ogg");
    std::fs::write(&empty, b"").unwrap();
    expect_err(&empty);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn zero_length_audio_is_rejected() {
    let dir = scratch("zero");
    let path = dir.join("zero.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    hound::WavWriter::create(&path, spec)
        .unwrap()
        .finalize()
        .unwrap();
    let e = expect_err(&path);
    assert!(matches!(e, AudioFileError::Empty { .. }), "{e}");
    assert!(e.to_string().contains("zero samples"), "{e}");
    // A video without a sound track.
    let e = expect_err(&media("video_only.mp4"));
    assert!(matches!(e, AudioFileError::NoAudioTrack { .. }), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn absurd_sample_rates_are_rejected() {
    let dir = scratch("rates");
    for rate in [1u32, 10, 5_000_000] {
        let path = dir.join(format!("rate_{rate}.wav"));
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for i in 0..1000 {
            w.write_sample((i % 100) as i16 * 100).unwrap();
        }
        w.finalize().unwrap();
        let e = expect_err(&path);
        assert!(
            matches!(e, AudioFileError::SampleRate { rate: r, .. } if r == rate),
            "{rate} Hz: {e}"
        );
        assert!(e.to_string().contains("absurd sample rate"), "{e}");
    }
    // The writer refuses them too, and non-finite samples.
    let out = dir.join("out.wav");
    let e = write_wav(&out, &[0.0; 10], 0, WavFormat::Pcm16).unwrap_err();
    assert!(
        matches!(e, AudioFileError::SampleRate { rate: 0, .. }),
        "{e}"
    );
    let e = write_wav(&out, &[0.0, f32::NAN], 16_000, WavFormat::Float32).unwrap_err();
    assert!(e.to_string().contains("sample 1"), "{e}");
    assert!(audio_file::wav_bytes(&[0.0; 4], 9_000_000, WavFormat::Pcm16).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}
