//! Parity of the turn-taking models with onnxruntime on committed recordings: Silero VAD's
//! speech probability per frame (fixture by scripts/silero_vad_reference.py) and Smart Turn's
//! end-of-turn probability per clip (fixture by scripts/smart_turn_reference.py).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use omnicall::media::silero::{SILERO_FRAME_SAMPLES, SileroVad};
use omnicall::media::smart_turn::SmartTurn;
use omnicall::media::vad::{VadBackend, VadConfig, VadDecision, VoiceDetector};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/turn")
        .join(name)
}

fn load_wav(path: &Path) -> Vec<f32> {
    let mut reader =
        hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(reader.spec().sample_rate, 16_000, "{}", path.display());
    reader
        .samples::<i16>()
        .map(|s| s.expect("sample") as f32 / 32768.0)
        .collect()
}

fn load_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn silero_matches_onnxruntime_on_every_frame() {
    let reference = load_json(&fixture("silero_utterance.json"));
    assert_eq!(reference["frame_samples"], SILERO_FRAME_SAMPLES);
    let expected: Vec<f64> = reference["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    let audio = load_wav(&fixture(reference["wav"].as_str().unwrap()));
    let mut vad = SileroVad::new().unwrap();
    let got: Vec<f32> = audio
        .chunks_exact(SILERO_FRAME_SAMPLES)
        .map(|frame| vad.speech_probability(frame).unwrap())
        .collect();
    assert_eq!(got.len(), expected.len());
    let mut worst = (0.0f64, 0);
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        let diff = (*g as f64 - e).abs();
        if diff > worst.0 {
            worst = (diff, k);
        }
    }
    println!(
        "Silero vs onnxruntime: max |diff| {:.2e} (frame {})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-4, "frame {}: |diff| {:.2e}", worst.1, worst.0);
    // the recording has both speech and silence, so the parity covers both ends
    assert!(expected.iter().any(|p| *p > 0.9) && expected.iter().any(|p| *p < 0.05));
}

struct SmartTurnPoint {
    file: String,
    end: f64,
    complete: bool,
    fused: f64,
    qdq: f64,
}

fn smart_turn_points() -> Vec<SmartTurnPoint> {
    let reference = load_json(&fixture("smart_turn.json"));
    reference["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| SmartTurnPoint {
            file: p["file"].as_str().unwrap().to_string(),
            end: p["end"].as_f64().unwrap(),
            complete: p["complete"].as_bool().unwrap(),
            fused: p["onnxruntime"].as_f64().unwrap(),
            qdq: p["onnxruntime_qdq"].as_f64().unwrap(),
        })
        .collect()
}

/// The turn's audio from the start of the clip to `end` seconds.
fn turn_audio(file: &str, end: f64) -> Vec<f32> {
    let audio = load_wav(&fixture("set").join(file));
    let n = ((end * 16_000.0).round() as usize).min(audio.len());
    audio[..n].to_vec()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The int8 graph rounds its activations at 78 points, and one rounding that falls the other
/// way (a float sum in another order) moves the answer, by up to a few tenths on some clips:
/// onnxruntime's two execution paths of the same graph (fused int8 kernels as pipecat runs it,
/// plain QDQ ops) differ that much on these clips, so the 1e-3 is out of reach of any
/// implementation that is not onnxruntime's own kernels. What is checked, against bounds read
/// from the fixture: at every point this implementation is no further from onnxruntime's QDQ
/// execution than onnxruntime's fused execution is at its worst; in the median, within twice
/// onnxruntime's own median spread; and it takes the same side of 0.5 as onnxruntime wherever
/// onnxruntime's two paths take the same side.
#[test]
fn smart_turn_is_as_close_to_onnxruntime_as_onnxruntime_is_to_itself() {
    let points = smart_turn_points();
    assert!(points.iter().any(|p| p.complete) && points.iter().any(|p| !p.complete));
    let mut model = SmartTurn::new().unwrap();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut to_fused = Vec::new();
    for p in &points {
        let got = model
            .complete_probability(&turn_audio(&p.file, p.end))
            .unwrap() as f64;
        ours.push((got - p.qdq).abs());
        theirs.push((p.fused - p.qdq).abs());
        to_fused.push((got - p.fused).abs());
        println!(
            "{:18} {:5.2} s complete={:5} ours {got:.4} onnxruntime {:.4} qdq {:.4}",
            p.file, p.end, p.complete, p.fused, p.qdq
        );
        if (p.fused >= 0.5) == (p.qdq >= 0.5) {
            assert_eq!(
                got >= 0.5,
                p.fused >= 0.5,
                "{} at {} s: {got:.4}",
                p.file,
                p.end
            );
        }
    }
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (worst_ours, worst_theirs) = (max(&ours), max(&theirs));
    println!(
        "|ours - qdq|: median {:.4} max {worst_ours:.4}; |ours - fused|: median {:.4} max {:.4}; \
         |fused - qdq|: median {:.4} max {worst_theirs:.4}",
        median(ours.clone()),
        median(to_fused.clone()),
        max(&to_fused),
        median(theirs.clone())
    );
    assert!(
        worst_ours <= worst_theirs,
        "max {worst_ours:.4} > {worst_theirs:.4}"
    );
    assert!(
        median(ours.clone()) <= 2.0 * median(theirs.clone()),
        "median {:.4} over twice onnxruntime's own spread {:.4}",
        median(ours),
        median(theirs)
    );
}

struct Clip {
    file: String,
    kind: String,
    speech: Vec<(f64, f64)>,
}

fn turn_set() -> Vec<Clip> {
    load_json(&fixture("set/segments.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Clip {
            file: c["file"].as_str().unwrap().to_string(),
            kind: c["kind"].as_str().unwrap().to_string(),
            speech: c["speech"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s[0].as_f64().unwrap(), s[1].as_f64().unwrap()))
                .collect(),
        })
        .collect()
}

/// Media time (s) from which the detector says silence, for speech that really ends at `end`
/// (and starts again at `next`, if it does): the end of the last speech frame before `next`,
/// looking at most 600 ms past `end`.
fn speech_end_decision(decisions: &[VadDecision], end: f64, next: Option<f64>) -> Option<f64> {
    let horizon = Duration::from_secs_f64(next.unwrap_or(f64::MAX).min(end + 0.6));
    let horizon = decisions
        .iter()
        .position(|d| d.end() > horizon)
        .unwrap_or(decisions.len());
    let last = decisions[..horizon].iter().rposition(|d| d.speech)?;
    Some(decisions[last].end().as_secs_f64())
}

/// Figures for the end-of-turn policy (run with `--ignored --nocapture`, release build for the
/// timings): Smart Turn's probability in each pause and at each true end of the spoken set,
/// Silero's and WebRTC's speech-end delays, what each detector makes of the backchannels, and
/// the CPU time of VAD + turn model.
#[test]
#[ignore = "prints measurements; run with --ignored --nocapture"]
fn turn_set_figures() {
    let clips = turn_set();
    let mut model = SmartTurn::new().unwrap();
    let (mut in_pause, mut at_end) = (Vec::new(), Vec::new());
    let mut turn_calls = Vec::new();
    println!("clip                point          p(complete)");
    for clip in clips
        .iter()
        .filter(|c| c.kind == "complete" || c.kind == "pause")
    {
        for (k, &(_, end)) in clip.speech.iter().enumerate() {
            let audio = turn_audio(&clip.file, end + 0.2);
            let started = Instant::now();
            let p = model.complete_probability(&audio).unwrap();
            turn_calls.push(started.elapsed());
            let last = k + 1 == clip.speech.len();
            println!(
                "{:18}  {:13}  {p:.3}",
                clip.file,
                if last {
                    "end + 200 ms"
                } else {
                    "pause + 200 ms"
                }
            );
            if last {
                at_end.push(p)
            } else {
                in_pause.push(p)
            }
        }
    }
    println!("threshold  pauses kept open (p < t)  ends confirmed (p >= t)");
    for t in [0.1f32, 0.2, 0.3, 0.5, 0.7, 0.9] {
        let open = in_pause.iter().filter(|p| **p < t).count();
        let done = at_end.iter().filter(|p| **p >= t).count();
        println!(
            "{t:9.1}  {open:2}/{}  {done:2}/{}",
            in_pause.len(),
            at_end.len()
        );
    }

    for backend in [VadBackend::Silero, VadBackend::WebRtc] {
        let mut delays = Vec::new();
        let mut audio_seconds = 0.0;
        let mut vad_time = Duration::ZERO;
        let mut blips = Vec::new();
        for clip in &clips {
            let audio = load_wav(&fixture("set").join(&clip.file));
            let mut vad =
                VoiceDetector::new(VadConfig::for_backend(backend), 16_000, Duration::ZERO)
                    .unwrap();
            let started = Instant::now();
            let decisions: Vec<VadDecision> = audio
                .chunks(320)
                .flat_map(|piece| vad.push(piece))
                .collect();
            vad_time += started.elapsed();
            audio_seconds += audio.len() as f64 / 16_000.0;
            match clip.kind.as_str() {
                "complete" | "pause" => {
                    for (k, &(_, end)) in clip.speech.iter().enumerate() {
                        let next = clip.speech.get(k + 1).map(|s| s.0);
                        match speech_end_decision(&decisions, end, next) {
                            Some(at) => delays.push(((at - end) * 1000.0).round() as i64),
                            None => println!(
                                "{backend:?}: no speech found before {end} s in {}",
                                clip.file
                            ),
                        }
                    }
                }
                "backchannel" => {
                    let speech: Duration = decisions
                        .iter()
                        .filter(|d| d.speech)
                        .map(|d| d.duration)
                        .sum();
                    blips.push(format!("{}: {} ms", clip.file, speech.as_millis()));
                }
                _ => {}
            }
        }
        delays.sort();
        println!(
            "{backend:?}: speech-end delay (last speech frame end - true end) median {} ms, min {} ms, max {} ms over {} ends",
            delays[delays.len() / 2],
            delays[0],
            delays[delays.len() - 1],
            delays.len()
        );
        println!("{backend:?}: speech in backchannels: {}", blips.join(", "));
        println!(
            "{backend:?}: CPU {:.2} ms per second of audio",
            vad_time.as_secs_f64() * 1000.0 / audio_seconds
        );
    }
    turn_calls.sort();
    println!(
        "Smart Turn: {} calls, median {:.1} ms, max {:.1} ms",
        turn_calls.len(),
        turn_calls[turn_calls.len() / 2].as_secs_f64() * 1000.0,
        turn_calls[turn_calls.len() - 1].as_secs_f64() * 1000.0
    );
}
