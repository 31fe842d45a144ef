//! `omnicall local` end to end: the binary, the tiny model and the real engine, a WAV file in
//! place of the microphone and one in place of the speaker, on the wall clock. The user asks,
//! waits for the answer to start, and talks over it: the first answer is cut, the second one
//! is heard, and the written voice lines up with the input.

use std::path::{Path, PathBuf};
use std::process::Command;

use omnicall::media::audio_file::{WavFormat, load_audio_at, write_wav};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("omnicall-local-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Speech, `gap` seconds of silence, the same speech again.
fn two_utterances(out: &Path, gap: f64) -> (f64, f64) {
    let speech = load_audio_at(root().join("tests/media/utterance_short.wav"), 16_000).unwrap();
    let mut samples = speech.clone();
    samples.extend(std::iter::repeat_n(0.0, (gap * 16_000.0) as usize));
    let second_at = samples.len() as f64 / 16_000.0;
    samples.extend(&speech);
    write_wav(out, &samples, 16_000, WavFormat::Pcm16).unwrap();
    (second_at, samples.len() as f64 / 16_000.0)
}

#[test]
fn a_local_call_from_files_answers_and_is_interrupted() {
    let dir = temp_dir("barge-in");
    let input = dir.join("in.wav");
    let output = dir.join("out.wav");
    // the end of turn comes 600 ms into the gap; the answer must be playing when the user
    // speaks again, 2.5 s in
    let (second_at, input_seconds) = two_utterances(&input, 2.5);
    let run = Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args(["local", "--model"])
        .arg(root().join("models/tiny"))
        .args(["--no-keyboard", "--input-file"])
        .arg(&input)
        .arg("--output-file")
        .arg(&output)
        .args(["--max-answer-tokens", "600", "--answer-timeout", "300"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running omnicall local");
    // the transcript goes to stdout, the summary to stderr
    let stderr = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{stderr}");
    assert!(run.status.success(), "omnicall local failed: {stderr}");

    // two user turns; the first answer was cut by the second question, the second was heard
    assert!(stderr.contains("you (turn 1)"), "{stderr}");
    assert!(stderr.contains("you (turn 2)"), "{stderr}");
    assert!(
        stderr.contains("[interrupted] answer to turn 1"),
        "the first answer was not interrupted: {stderr}"
    );
    assert!(stderr.contains("2 user turns"), "{stderr}");
    assert!(stderr.contains("(1 interrupted)"), "{stderr}");

    // the voice file: as long as the call, voice after the first end of turn, and the cut
    // answer silent from shortly after the second question's onset until the second answer
    let voice = load_audio_at(&output, 24_000).unwrap();
    let seconds = voice.len() as f64 / 24_000.0;
    assert!(
        seconds >= input_seconds,
        "{seconds} s of output for {input_seconds} s of input"
    );
    let level = |from: f64, to: f64| {
        let (a, b) = (
            (from * 24_000.0) as usize,
            ((to * 24_000.0) as usize).min(voice.len()),
        );
        voice[a..b].iter().map(|x| x.abs()).fold(0.0f32, f32::max)
    };
    let first_answer = level(1.8, second_at);
    assert!(first_answer > 0.0, "no voice during the first answer");
    // VAD onset (a few hundred ms of speech) and the stop: well under a second
    let after_cut = level(second_at + 1.0, second_at + 1.6);
    assert_eq!(after_cut, 0.0, "the cut answer went on playing");
    assert!(
        level(second_at + 1.8, seconds) > 0.0,
        "no voice for the second answer"
    );
    std::fs::remove_dir_all(dir).ok();
}
