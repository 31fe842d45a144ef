//! Echo handling of `omnicall local` end to end, on a simulated loudspeaker: the binary, the tiny
//! model and the real engine, a spoken WAV file in place of the microphone and one in place of
//! the speaker, and `--simulate-echo` feeding the model's voice, as written, back into the
//! input 60 ms late, 12 dB down, through a short room response.
//!
//! - `--echo off`: the model hears its own voice and interrupts itself (the test can fail);
//! - `--echo aec`: it does not, over a whole answer;
//! - `--echo aec`: a real interruption spoken 10 dB quieter than the echo still stops the answer
//!   while it is spoken;
//! - `--echo gate`: that quiet interruption is lost (the gate's documented limit), the gate's
//!   level set above the echo as the README says.
//!
//! The tiny model speaks random-weight babble: not words, but voiced, syllable-like sound at
//! speech levels (about -15 dBFS), which is what an echo canceller and a voice detector care
//! about. On a loaded CPU it comes in bursts with pauses; the gate's tail is stretched to cover
//! them, so that the gate test shows the gate's limit and not the pauses. The calls run one at
//! a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use omnicall::media::audio_file::{WavFormat, load_audio_at, write_wav};

const RATE: u32 = 16_000;
const OUT_RATE: u32 = 24_000;
/// The simulated echo: 60 ms late, 12 dB under what is played.
const ECHO_DELAY_MS: u32 = 60;
const ECHO_GAIN_DB: f32 = -12.0;
/// The gate's barge-in level: above the echo (its 10 ms peaks stay under -20 dBFS).
const GATE_LEVEL_DBFS: f32 = -18.0;
/// The level the tiny model speaks at, to make the quiet interruption (checked after the call).
const VOICE_LEVEL_DBFS: f64 = -15.0;
/// The quiet interruption, under the echo's level (at least 10 dB is checked).
const QUIET_BELOW_ECHO_DB: f64 = 10.5;

/// One call at a time: two would slow the model's voice down further.
static ONE_CALL_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("omnicall-local-aec-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn speech() -> Vec<f32> {
    load_audio_at(root().join("tests/media/utterance_short.wav"), RATE).unwrap()
}

/// A real interruption: speech that goes on past the barge-in decision (a short one over the
/// answer is a backchannel, and the answer resumes after it).
fn long_speech() -> Vec<f32> {
    load_audio_at(root().join("tests/media/utterance_long.wav"), RATE).unwrap()
}

/// Level of the sounding part of `x`: the power of its 20 ms windows within 30 dB of the
/// loudest, in dBFS.
fn active_level_db(x: &[f32], rate: u32) -> f64 {
    let window = (rate / 50) as usize;
    let powers: Vec<f64> = x
        .chunks(window)
        .map(|w| w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64)
        .collect();
    let loudest = powers.iter().cloned().fold(0.0, f64::max);
    let active: Vec<f64> = powers.into_iter().filter(|&p| p > loudest * 1e-3).collect();
    10.0 * (active.iter().sum::<f64>() / active.len().max(1) as f64).log10()
}

fn scaled(x: &[f32], db: f32) -> Vec<f32> {
    let g = 10f32.powf(db / 20.0);
    x.iter().map(|&v| v * g).collect()
}

/// The question, then `gap` seconds of silence, then (optionally) `interruption`, then 3 s of
/// silence. Returns when the interruption starts.
fn input_file(path: &Path, gap: f64, interruption: Option<&[f32]>) -> f64 {
    let mut samples = speech();
    samples.extend(std::iter::repeat_n(0.0, (gap * RATE as f64) as usize));
    let at = samples.len() as f64 / RATE as f64;
    if let Some(interruption) = interruption {
        samples.extend(interruption);
    }
    samples.extend(std::iter::repeat_n(0.0, 3 * RATE as usize));
    write_wav(path, &samples, RATE, WavFormat::Pcm16).unwrap();
    at
}

struct Call {
    /// Transcript and summary.
    log: String,
    /// The model's voice as written, at `OUT_RATE`.
    voice: Vec<f32>,
}

impl Call {
    fn level(&self, from: f64, to: f64) -> f32 {
        let (a, b) = (
            ((from * OUT_RATE as f64) as usize).min(self.voice.len()),
            ((to * OUT_RATE as f64) as usize).min(self.voice.len()),
        );
        self.voice[a..b].iter().map(|x| x.abs()).fold(0.0, f32::max)
    }

    /// When the transcript first has a line holding `text`, in seconds of the call.
    fn said_at(&self, text: &str) -> Option<f64> {
        let line = self
            .log
            .lines()
            .find(|l| l.starts_with('[') && l.contains(text))?;
        line.trim_start_matches('[')
            .split(']')
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// When the transcript says the answer to `turn` was done.
    fn answer_done(&self, turn: u64) -> Option<f64> {
        self.said_at(&format!("] (answer to turn {turn} done)"))
    }

    /// Times speech over the answer cut its voice: paused (the answer goes on after a short
    /// sound) or interrupted (stopped for a new turn).
    fn interrupted(&self) -> usize {
        self.log.matches("[interrupted] answer to turn").count()
            + self.log.matches("[paused] answer to turn").count()
    }
}

/// The voice detector a call listens with. The tiny model's random-weight babble is not speech
/// to Silero (the default), so its echo could never interrupt it whatever the echo handling:
/// the self-interruption test listens with WebRTC's VAD, which hears the babble as Silero hears
/// a real model's voice. The user's quiet interruption is real speech, heard by Silero.
#[derive(Clone, Copy)]
enum Vad {
    HearsBabble,
    Default,
}

fn call(dir: &Path, input: &Path, echo: &str, vad: Vad) -> Call {
    let _one = ONE_CALL_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = dir.join(format!("out-{echo}.wav"));
    let run = Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .args(["local", "--model"])
        .arg(root().join("models/tiny"))
        .args(["--no-keyboard", "--verbose", "--input-file"])
        .arg(input)
        .arg("--output-file")
        .arg(&output)
        .args([
            "--simulate-echo",
            &format!("{ECHO_DELAY_MS},{ECHO_GAIN_DB}"),
        ])
        .args(["--echo", echo])
        .args(match vad {
            Vad::HearsBabble => ["--vad", "webrtc"],
            Vad::Default => ["--vad", "silero"],
        })
        // the timings below assume the silence rule's 600 ms end of turn (a debug build's Smart
        // Turn is slow enough on 2 cores that its policy waits its longest silence)
        .args(["--turn-detection", "silence"])
        .arg(format!("--barge-in-level={GATE_LEVEL_DBFS}"))
        .args(["--gate-tail-ms", "2000"])
        .args(["--max-answer-tokens", "600", "--answer-timeout", "300"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running omnicall local");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("--- --echo {echo}\n{log}");
    assert!(run.status.success(), "omnicall local failed: {log}");
    let voice = load_audio_at(&output, OUT_RATE).unwrap();
    Call { log, voice }
}

#[test]
fn without_echo_handling_the_model_interrupts_itself_and_the_canceller_stops_that() {
    let dir = temp_dir("self");
    let input = dir.join("in.wav");
    input_file(&input, 10.0, None);

    let off = call(&dir, &input, "off", Vad::HearsBabble);
    assert!(off.log.contains("simulated echo"), "{}", off.log);
    assert!(
        off.interrupted() >= 1,
        "with --echo off its own voice should have cut the answer: {}",
        off.log
    );

    let aec = call(&dir, &input, "aec", Vad::HearsBabble);
    assert_eq!(aec.interrupted(), 0, "the echo got through: {}", aec.log);
    assert!(aec.log.contains("1 user turns"), "{}", aec.log);
    assert!(aec.log.contains("echo canceller (AEC3)"), "{}", aec.log);
    // --verbose shows the canceller's state as it goes: it found the echo's delay
    assert!(
        aec.log
            .lines()
            .any(|line| line.contains("-- echo canceller: estimated delay")
                && !line.contains("delay 0 ms")),
        "{}",
        aec.log
    );
    // the whole answer was heard, and the canceller had work to do
    assert!(aec.log.contains("(answer to turn 1 done)"), "{}", aec.log);
    let answer = active_level_db(&aec.voice, OUT_RATE);
    let seconds = aec.voice.iter().filter(|x| x.abs() > 1e-3).count() as f64 / OUT_RATE as f64;
    eprintln!("answer: {seconds:.1} s of voice at {answer:.1} dBFS");
    assert!(seconds > 1.0, "only {seconds:.1} s of voice");
    std::fs::remove_dir_all(dir).ok();
}

/// A call with the quiet interruption at `at` whose answer had been playing for a second when
/// the interruption began (the canceller needs to have heard some of the voice) and was not
/// over before the interruption could be heard. The babble's length and start vary from call
/// to call (its first block is cut where the real-time input falls), and an answer that misses
/// the interruption tests nothing; up to six calls.
fn call_answering_at(dir: &Path, input: &Path, echo: &str, at: f64) -> Call {
    for _ in 0..6 {
        let call = call(dir, input, echo, Vad::Default);
        let started = call.said_at("] (speaking)");
        let done = call.answer_done(1);
        if started.is_some_and(|start| start <= at - 1.0)
            && done.is_none_or(|done| done >= at + 0.6)
        {
            return call;
        }
        eprintln!(
            "--echo {echo}: the answer (from {started:?} to {done:?}) did not play over the \
             interruption at {at:.2} s; calling again"
        );
    }
    panic!("--echo {echo}: in six calls the answer never played over the interruption");
}

#[test]
fn a_quiet_interruption_stops_the_answer_with_the_canceller_but_not_with_the_gate() {
    let dir = temp_dir("quiet");
    let input = dir.join("in.wav");
    let echo_level = VOICE_LEVEL_DBFS + ECHO_GAIN_DB as f64;
    let talk = long_speech();
    let gain = (echo_level - QUIET_BELOW_ECHO_DB - active_level_db(&talk, RATE)) as f32;
    let quiet = scaled(&talk, gain);
    let quiet_level = active_level_db(&quiet, RATE);
    // the end of turn comes 600 ms into the gap, the answer starts about a second later and
    // lasts two to three seconds; the user speaks 2.5 s into the gap, once the canceller has
    // heard a second of the voice (its linear filter converges over the first seconds of a
    // call; until then its suppressor holds the echo down and muffles speech over it more), and
    // goes on past the barge-in decision (a short sound would only pause the answer)
    let at = input_file(&input, 2.5, Some(&quiet));

    let aec = call_answering_at(&dir, &input, "aec", at);
    // the premise: the interruption was at least 10 dB under the echo of the answer it cut
    let played = active_level_db(
        &aec.voice[(1.8 * OUT_RATE as f64) as usize..(at * OUT_RATE as f64) as usize],
        OUT_RATE,
    );
    let echo = played + ECHO_GAIN_DB as f64;
    eprintln!("echo {echo:.1} dBFS, interruption {quiet_level:.1} dBFS");
    assert!(
        echo - quiet_level >= 10.0,
        "the interruption ({quiet_level:.1} dBFS) was not 10 dB under the echo ({echo:.1} dBFS)"
    );
    assert!(
        aec.log.contains("[interrupted] answer to turn 1"),
        "the quiet interruption did not stop the answer: {}",
        aec.log
    );
    assert!(aec.log.contains("you (turn 2)"), "{}", aec.log);
    assert!(aec.level(1.8, at) > 0.0, "no voice before the interruption");
    // the same bound as tests/local_e2e.rs: the voice stops within a second of the onset
    let paused = aec
        .said_at("[paused] answer to turn 1")
        .unwrap_or_else(|| panic!("the voice was never paused: {}", aec.log));
    assert!(
        paused <= at + 1.0,
        "the voice paused {:.2} s after the onset",
        paused - at
    );
    // Speech this quiet comes out of the canceller's suppressor with gaps, so the answer may
    // resume once before the barge-in is decided: decided while the user still speaks, and
    // silent from then on.
    let cut = aec.said_at("[interrupted] answer to turn 1").unwrap();
    let spoken = talk.len() as f64 / RATE as f64;
    assert!(
        cut < at + spoken,
        "the barge-in came {:.2} s after the onset, after the interruption's end",
        cut - at
    );
    assert_eq!(
        aec.level(cut + 0.1, cut + 0.7),
        0.0,
        "the cut answer went on playing"
    );

    let gate = call_answering_at(&dir, &input, "gate", at);
    assert!(
        !gate.log.contains("[interrupted] answer to turn 1")
            && !gate.log.contains("[paused] answer to turn 1"),
        "the gate let the quiet interruption through: {}",
        gate.log
    );
    // the answer played on over the lost interruption to its own end
    assert!(gate.log.contains("(answer to turn 1 done)"), "{}", gate.log);
    assert!(
        gate.level(at, at + 1.0) > 0.0,
        "the answer should have played on over the lost interruption"
    );
    std::fs::remove_dir_all(dir).ok();
}
