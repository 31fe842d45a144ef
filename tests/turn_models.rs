//! Parity of the turn-taking models with onnxruntime on committed recordings: Silero VAD's
//! speech probability per frame (fixture by scripts/silero_vad_reference.py) and Smart Turn's
//! end-of-turn probability per clip (fixture by scripts/smart_turn_reference.py).

use std::path::{Path, PathBuf};

use omnicall::media::silero::{SILERO_FRAME_SAMPLES, SileroVad};
use omnicall::media::smart_turn::SmartTurn;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/turn")
        .join(name)
}

fn load_wav(path: &Path) -> Vec<f32> {
    omnicall::bench::turn::load_wav(path).unwrap()
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
/// implementation that is not onnxruntime's own kernels. This implementation sums its products
/// exactly in integers, as the fused kernels do, and rounds them as the QDQ ops do, so on a
/// clip where the two paths part it lands with one or the other (complete_8: 0.54 with the
/// fused 0.56, where QDQ says 0.82). What is checked, against bounds read from the fixture: at
/// every point this implementation is no further from the nearer of onnxruntime's two answers
/// than those are from each other at their worst; in the median, within twice onnxruntime's own
/// median spread of the QDQ answer and within that spread of the fused answer; and it takes the
/// same side of 0.5 as onnxruntime wherever onnxruntime's two paths take the same side.
#[test]
fn smart_turn_is_as_close_to_onnxruntime_as_onnxruntime_is_to_itself() {
    let points = smart_turn_points();
    assert!(points.iter().any(|p| p.complete) && points.iter().any(|p| !p.complete));
    let mut model = SmartTurn::new().unwrap();
    let mut to_qdq = Vec::new();
    let mut to_fused = Vec::new();
    let mut to_nearer = Vec::new();
    let mut theirs = Vec::new();
    for p in &points {
        let got = model
            .complete_probability(&turn_audio(&p.file, p.end))
            .unwrap() as f64;
        to_qdq.push((got - p.qdq).abs());
        to_fused.push((got - p.fused).abs());
        to_nearer.push((got - p.qdq).abs().min((got - p.fused).abs()));
        theirs.push((p.fused - p.qdq).abs());
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
    let (worst_nearer, worst_theirs) = (max(&to_nearer), max(&theirs));
    let spread = median(theirs.clone());
    println!(
        "|ours - qdq|: median {:.4} max {:.4}; |ours - fused|: median {:.4} max {:.4}; \
         |ours - nearer|: max {worst_nearer:.4}; |fused - qdq|: median {spread:.4} max {worst_theirs:.4}",
        median(to_qdq.clone()),
        max(&to_qdq),
        median(to_fused.clone()),
        max(&to_fused),
    );
    assert!(
        worst_nearer <= worst_theirs,
        "max {worst_nearer:.4} > {worst_theirs:.4}"
    );
    assert!(
        median(to_qdq.clone()) <= 2.0 * spread,
        "median {:.4} from QDQ, over twice onnxruntime's own spread {spread:.4}",
        median(to_qdq)
    );
    assert!(
        median(to_fused.clone()) <= spread,
        "median {:.4} from the fused answer, over onnxruntime's own spread {spread:.4}",
        median(to_fused)
    );
}
