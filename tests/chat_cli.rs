//! `omnicall chat` on the tiny model: text, audio + image, MP4 video with its sound track, a
//! folder of frames, the spoken answer written to a WAV, and bad input. The binary's answer is
//! compared with the library pipeline's (which the reference parity tests pin down) for the
//! same files, so the command line is checked to lay out and encode its inputs the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use omnicall::media::offline::MediaPreparer;
use omnicall::model::chat::{Content, Conversation, Message, Role, SPEECH_SYSTEM_PROMPT};
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::model::sampling::SamplingOptions;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_dir() -> PathBuf {
    root().join("models/tiny")
}

fn media(name: &str) -> PathBuf {
    root().join("tests/media").join(name)
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("omnicall-chat-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Greedy answers of a few tokens on the tiny model.
const MAX_TOKENS: usize = 6;

fn run_chat(args: &[&str]) -> Output {
    let tiny = tiny_dir();
    let max_tokens = MAX_TOKENS.to_string();
    Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args([
            "chat",
            "--model",
            tiny.to_str().unwrap(),
            "--max-tokens",
            &max_tokens,
            "--temperature",
            "0",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("the omnicall binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "omnicall chat failed ({:?}):\n{}",
        out.status,
        stderr(out)
    );
}

/// A media item as the command line names it.
enum Item<'a> {
    Audio(&'a Path),
    Image(&'a Path),
    Video(&'a Path),
}

fn load_tiny() -> OmniModel {
    OmniModel::load(
        &ModelFiles::from_dir(&tiny_dir()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The library's greedy answer to the same message: (text, prompt tokens).
fn library_answer(
    items: &[Item<'_>],
    use_audio_in_video: bool,
    system: Option<&str>,
    text: &str,
) -> (String, usize) {
    let mut model = load_tiny();
    let preparer = MediaPreparer::new(&model.processor, 2.0).unwrap();
    let inputs: Vec<_> = items
        .iter()
        .map(|item| match item {
            Item::Audio(p) => preparer.audio_file(p).unwrap(),
            Item::Image(p) => preparer.image_file(p).unwrap(),
            Item::Video(p) => preparer.video_file(p, use_audio_in_video).unwrap(),
        })
        .collect();
    let encoded = model.encode_media(&inputs).unwrap();
    let mut content = encoded.content;
    content.push(Content::Text(text.into()));
    let mut conversation = Conversation::default();
    if let Some(system) = system {
        conversation.push(Message::text(Role::System, system));
    }
    conversation.push(Message::new(Role::User, content));
    let options = model.generation_options(MAX_TOKENS, SamplingOptions::greedy());
    let answer = model
        .answer(&conversation, &encoded.embeds, &options, |_| Ok(()))
        .unwrap();
    (answer.reply.text, answer.reply.prompt_tokens)
}

/// The binary's answer and its prompt length (from its log line).
fn cli_answer(out: &Output) -> (String, usize) {
    assert_ok(out);
    let text = stdout(out);
    let text = text
        .strip_suffix('\n')
        .expect("the answer ends with a newline");
    let log = stderr(out);
    let prompt_tokens = log
        .lines()
        .find_map(|l| {
            let (before, _) = l.split_once(" prompt tokens")?;
            before.rsplit(' ').next()?.parse::<usize>().ok()
        })
        .unwrap_or_else(|| panic!("no prompt token count in the log:\n{log}"));
    (text.to_string(), prompt_tokens)
}

#[test]
fn text_chat_streams_the_libraries_answer() {
    let out = run_chat(&["Hello there"]);
    let got = cli_answer(&out);
    assert_eq!(got, library_answer(&[], false, None, "Hello there"));
    assert!(
        stderr(&out).contains(&format!("{MAX_TOKENS} answer tokens")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn audio_and_image_in_command_line_order() {
    let wav = media("speech.wav");
    let png = media("src_a.png");
    let out = run_chat(&[
        "--audio",
        wav.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "What do you hear and see?",
    ]);
    let audio_first = cli_answer(&out);
    assert_eq!(
        audio_first,
        library_answer(
            &[Item::Audio(&wav), Item::Image(&png)],
            false,
            None,
            "What do you hear and see?"
        )
    );
    // The image first: the same tokens in another order.
    let out = run_chat(&[
        "--image",
        png.to_str().unwrap(),
        "--audio",
        wav.to_str().unwrap(),
        "What do you hear and see?",
    ]);
    let image_first = cli_answer(&out);
    assert_eq!(
        image_first,
        library_answer(
            &[Item::Image(&png), Item::Audio(&wav)],
            false,
            None,
            "What do you hear and see?"
        )
    );
    assert_eq!(image_first.1, audio_first.1);
    // 3.8 s of speech and a 15-token image make a long prompt.
    assert!(audio_first.1 > 100, "{} prompt tokens", audio_first.1);
}

#[test]
fn mp4_video_with_its_sound_track() {
    let mp4 = media("speech.mp4");
    let out = run_chat(&[
        "--video",
        mp4.to_str().unwrap(),
        "--use-audio-in-video",
        "What happens?",
    ]);
    let with_audio = cli_answer(&out);
    assert_eq!(
        with_audio,
        library_answer(&[Item::Video(&mp4)], true, None, "What happens?")
    );
    let out = run_chat(&["--video", mp4.to_str().unwrap(), "What happens?"]);
    let silent = cli_answer(&out);
    assert_eq!(
        silent,
        library_answer(&[Item::Video(&mp4)], false, None, "What happens?")
    );
    // The sound track adds its audio tokens and two markers.
    let model = load_tiny();
    let preparer = MediaPreparer::new(&model.processor, 2.0).unwrap();
    let track = preparer.audio_file(&mp4).unwrap();
    let omnicall::model::pipeline::MediaInput::Audio { features } = track else {
        panic!("audio")
    };
    let audio_tokens =
        omnicall::model::thinker::audio_encoder::output_len(features.dim(1).unwrap());
    assert_eq!(with_audio.1, silent.1 + audio_tokens + 2);
}

#[test]
fn a_folder_of_frames_is_a_video() {
    let dir = scratch("frames");
    for i in 0..4 {
        std::fs::copy(media("src_a.png"), dir.join(format!("frame{i}.png"))).unwrap();
    }
    let out = run_chat(&["--video", dir.to_str().unwrap(), "What is shown?"]);
    assert_eq!(
        cli_answer(&out),
        library_answer(&[Item::Video(&dir)], false, None, "What is shown?")
    );
    let out = run_chat(&[
        "--video",
        dir.to_str().unwrap(),
        "--use-audio-in-video",
        "What is shown?",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no sound track"), "{}", stderr(&out));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn speak_writes_a_wav_of_every_speech_token() {
    let dir = scratch("speak");
    let wav = dir.join("answer.wav");
    let out = run_chat(&[
        "--speak",
        wav.to_str().unwrap(),
        "--voice",
        "Ethan",
        "--max-speech-tokens",
        "30",
        "Say something.",
    ]);
    // The speech system prompt is the default with --speak.
    let (text, prompt_tokens) = cli_answer(&out);
    assert_eq!(
        (text, prompt_tokens),
        library_answer(&[], false, Some(SPEECH_SYSTEM_PROMPT), "Say something.")
    );
    let log = stderr(&out);
    let codes: usize = log
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("wrote ")?;
            let (_, rest) = rest.split_once(": ")?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no speech summary in the log:\n{log}"));
    assert!((1..=30).contains(&codes), "{codes} speech tokens");

    let model = load_tiny();
    let token2wav = &model.speech().unwrap().token2wav;
    let reader = hound::WavReader::open(&wav).expect("a WAV file");
    let spec = reader.spec();
    assert_eq!(spec.sample_rate, token2wav.sample_rate());
    assert_eq!(spec.channels, 1);
    assert_eq!(
        reader.len() as usize,
        codes * token2wav.samples_per_code(),
        "samples for {codes} codes"
    );
    // Greedy with the same seed: the same speech again.
    let again = dir.join("again.wav");
    let out = run_chat(&[
        "--speak",
        again.to_str().unwrap(),
        "--voice",
        "Ethan",
        "--max-speech-tokens",
        "30",
        "Say something.",
    ]);
    assert_ok(&out);
    assert_eq!(std::fs::read(&wav).unwrap(), std::fs::read(&again).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Fails with a non-zero exit and an error naming `needle`, writing no WAV.
fn assert_fails(args: &[&str], needles: &[&str]) {
    let out = run_chat(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {:?}", out.status);
    let err = stderr(&out);
    for needle in needles {
        assert!(err.contains(needle), "{args:?}: {needle:?} not in\n{err}");
    }
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn bad_files_and_unknown_voices_are_clear_errors() {
    let dir = scratch("bad");
    let wav = dir.join("out.wav");
    let path = |name: &str| media(name).to_str().unwrap().to_string();
    assert_fails(
        &["--speak", wav.to_str().unwrap(), "--voice", "Nobody", "hi"],
        &["unknown voice \"Nobody\"", "Chelsie", "Ethan"],
    );
    assert!(!wav.exists());
    assert_fails(&["--image", &path("speech.wav"), "hi"], &["speech.wav"]);
    assert_fails(&["--audio", &path("src_a.png"), "hi"], &["src_a.png"]);
    assert_fails(
        &["--video", &path("hevc.mp4"), "hi"],
        &["hevc.mp4", "HEVC", "H.264"],
    );
    assert_fails(&["--video", &path("vp9.mp4"), "hi"], &["vp9.mp4", "VP9"]);
    assert_fails(&["--video", &path("speech.wav"), "hi"], &["not an MP4"]);
    assert_fails(
        &[
            "--video",
            &path("video_only.mp4"),
            "--use-audio-in-video",
            "hi",
        ],
        &["video_only.mp4", "sound track"],
    );
    // A truncated MP4.
    let cut = dir.join("cut.mp4");
    let bytes = std::fs::read(media("speech.mp4")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    assert_fails(&["--video", cut.to_str().unwrap(), "hi"], &["cut.mp4"]);
    assert_fails(
        &["--audio", dir.join("missing.wav").to_str().unwrap(), "hi"],
        &["missing.wav"],
    );
    assert_fails(
        &[
            "--speak",
            dir.join("no/such/dir.wav").to_str().unwrap(),
            "hi",
        ],
        &["does not exist"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `omnicall bench model` (the binary's other model command): stages by name, one table.
#[test]
fn bench_model_prints_one_table_of_the_stages_asked_for() {
    let bench = |stages: &str| {
        Command::new(env!("CARGO_BIN_EXE_omnicall"))
            .args(["bench", "model", "--config"])
            .arg(tiny_dir())
            .args(["--random-weights", "--device", "cpu", "--dtype", "f32"])
            .args(["--stages", stages])
            .output()
            .expect("the omnicall binary runs")
    };
    let out = bench("thinker");
    assert_ok(&out);
    let printed = stdout(&out);
    // The machine's measured limits first, then the table with each figure's achieved rate.
    let (peak, table) = printed.split_once('\n').unwrap_or_default();
    assert!(
        peak.starts_with("machine peak on") && peak.contains("GFLOP/s") && peak.contains("GB/s"),
        "{printed}"
    );
    assert!(
        table.starts_with("| stage | setup | value | unit | achieved"),
        "{printed}"
    );
    assert!(table.contains("% of FMA peak"), "{printed}");
    for row in ["| thinker prefill |", "| thinker decode |"] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    let out = bench("thinker,lungs");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("\"lungs\"") && err.contains("engine-input"),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "nothing measured before the error");
}
