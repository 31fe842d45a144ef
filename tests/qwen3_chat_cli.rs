//! `omnicall chat` on the tiny Qwen3-Omni model (`models/tiny-qwen3-omni`, the family picked from
//! its config's `model_type`): text, audio, an image and a video in, the spoken answer written to
//! a 24 kHz WAV. The binary's output is compared with the library pipeline's for the same input
//! (the parity tests pin the pipeline's stages to the reference).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use omnicall::media::offline::MediaPreparer;
use omnicall::model::loading::ModelFiles;
use omnicall::model::qwen3_omni::pipeline::{Qwen3Omni, SAMPLE_RATE};
use omnicall::model::sampling::SamplingOptions;

/// Greedy answers of a few tokens.
const MAX_TOKENS: usize = 6;
const MAX_FRAMES: usize = 8;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("models/tiny-qwen3-omni")
}

fn media(name: &str) -> PathBuf {
    root().join("tests/media").join(name)
}

fn scratch(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("omnicall-qwen3-chat-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_chat(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args(["chat", "--model", model_dir().to_str().unwrap()])
        .args([
            "--max-tokens",
            &MAX_TOKENS.to_string(),
            "--temperature",
            "0",
        ])
        .args(args)
        .output()
        .expect("the omnicall binary runs");
    assert!(
        out.status.success(),
        "omnicall chat failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

enum Item<'a> {
    Audio(&'a Path),
    Image(&'a Path),
    Video(&'a Path),
}

fn load() -> Qwen3Omni {
    Qwen3Omni::load(
        &ModelFiles::from_dir(&model_dir()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The library's greedy answer and, with `speak`, its greedy waveform.
fn library_turn(items: &[Item<'_>], text: &str, speak: bool) -> (String, Vec<f32>) {
    let mut model = load();
    let preparer = MediaPreparer::new(&model.processor, 2.0).unwrap();
    let inputs: Vec<_> = items
        .iter()
        .map(|item| match item {
            Item::Audio(p) => preparer.audio_file(p).unwrap(),
            Item::Image(p) => preparer.image_file(p).unwrap(),
            Item::Video(p) => preparer.video_file(p, false).unwrap(),
        })
        .collect();
    let prompt = model.prompt(None, &inputs, text).unwrap();
    let answer = model
        .answer(&prompt, MAX_TOKENS, SamplingOptions::greedy())
        .unwrap();
    let mut waveform = Vec::new();
    if speak {
        let options = SamplingOptions {
            repetition_penalty: 1.05,
            ..SamplingOptions::greedy()
        };
        let spoken = model
            .speak(
                &answer.answer,
                &prompt.layout,
                "Chelsie",
                MAX_FRAMES,
                options,
                |_| Ok(()),
            )
            .unwrap();
        waveform = spoken.waveform;
    }
    (answer.text, waveform)
}

fn answer_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

#[test]
fn qwen3_chat_hello_speaks_a_24khz_wav() {
    let dir = scratch("hello");
    let wav = dir.join("out.wav");
    let out = run_chat(&[
        "hello",
        "--speak",
        wav.to_str().unwrap(),
        "--max-speech-tokens",
        &MAX_FRAMES.to_string(),
    ]);
    let (text, want) = library_turn(&[], "hello", true);
    assert_eq!(answer_line(&out), text);
    let mut reader = hound::WavReader::open(&wav).expect("a WAV file");
    assert_eq!(reader.spec().sample_rate, SAMPLE_RATE);
    assert_eq!(reader.spec().channels, 1);
    let got: Vec<f32> = reader
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    assert!(!got.is_empty(), "an empty WAV");
    assert_eq!(got.len(), want.len(), "samples");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    // 16-bit PCM: within one quantisation step.
    assert!(worst <= 1.5 / 32768.0, "WAV vs library waveform: {worst:e}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("first audio"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn qwen3_chat_takes_audio_an_image_and_a_video() {
    let audio = media("hello16k.wav");
    let image = media("src_a.png");
    let video = media("video_only.mp4");
    let out = run_chat(&[
        "--audio",
        audio.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--video",
        video.to_str().unwrap(),
        "What is this?",
    ]);
    let (text, _) = library_turn(
        &[
            Item::Audio(&audio),
            Item::Image(&image),
            Item::Video(&video),
        ],
        "What is this?",
        false,
    );
    assert_eq!(answer_line(&out), text);
}

#[test]
fn qwen3_chat_speaks_an_answer_to_an_image() {
    let dir = scratch("image");
    let wav = dir.join("out.wav");
    let image = media("src_b.png");
    run_chat(&[
        "--image",
        image.to_str().unwrap(),
        "What is this?",
        "--speak",
        wav.to_str().unwrap(),
        "--max-speech-tokens",
        &MAX_FRAMES.to_string(),
    ]);
    let (_, want) = library_turn(&[Item::Image(&image)], "What is this?", true);
    let reader = hound::WavReader::open(&wav).expect("a WAV file");
    assert_eq!(reader.len() as usize, want.len());
    std::fs::remove_dir_all(dir).unwrap();
}
