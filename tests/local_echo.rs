//! The half-duplex gate: the microphone is silenced while the speaker plays the model's voice
//! (and for a short tail after), except when it is louder than the barge-in level, in which
//! case it passes and stays open for the hold time.

use std::sync::Arc;
use std::time::Duration;

use omnicall::local::echo::{GateConfig, HalfDuplexGate, SpeakerActivity};

const RATE: u32 = 16_000;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A 300 Hz tone at `dbfs` RMS, `length` long.
fn tone(dbfs: f32, length: Duration) -> Vec<f32> {
    let amplitude = 10f32.powf(dbfs / 20.0) * std::f32::consts::SQRT_2;
    let n = (length.as_secs_f64() * RATE as f64) as usize;
    (0..n)
        .map(|i| amplitude * (2.0 * std::f32::consts::PI * 300.0 * i as f32 / RATE as f32).sin())
        .collect()
}

fn silent(x: &[f32]) -> bool {
    x.iter().all(|&v| v == 0.0)
}

fn gate() -> HalfDuplexGate {
    HalfDuplexGate::new(GateConfig {
        barge_in_level_dbfs: -30.0,
        tail: ms(150),
        hold: ms(400),
    })
    .unwrap()
}

#[test]
fn without_the_speaker_the_microphone_passes_untouched() {
    let mut g = gate();
    let speaker = SpeakerActivity::new();
    let quiet = tone(-50.0, ms(200));
    let mut x = quiet.clone();
    g.process(ms(1000), RATE, &mut x, &speaker);
    assert_eq!(x, quiet);
    assert_eq!(g.stats().gated, Duration::ZERO);
}

#[test]
fn echo_below_the_level_is_silenced_while_the_speaker_plays_and_for_the_tail() {
    let mut g = gate();
    let speaker = SpeakerActivity::new();
    speaker.record(ms(1000), ms(2000));
    // 1.8 s to 2.4 s of quiet microphone: gated up to the end of the tail (2.15 s)
    let mut x = tone(-40.0, ms(600));
    g.process(ms(1800), RATE, &mut x, &speaker);
    let cut = (0.35 * RATE as f64) as usize;
    assert!(silent(&x[..cut]), "gated while playing and in the tail");
    assert!(
        x[cut + 160..].iter().any(|&v| v != 0.0),
        "open after the tail"
    );
    assert_eq!(g.stats().gated, ms(350));
    assert_eq!(g.stats().passed_over_speaker, Duration::ZERO);
}

#[test]
fn speech_above_the_level_barges_through_and_holds_the_gate_open() {
    let mut g = gate();
    let speaker = SpeakerActivity::new();
    speaker.record(ms(0), ms(10_000));
    // loud for 200 ms, then a 300 ms quieter stretch (between syllables), then 600 ms quiet
    let mut x = tone(-15.0, ms(200));
    x.extend(tone(-40.0, ms(900)));
    let original = x.clone();
    g.process(ms(3000), RATE, &mut x, &speaker);
    let hold_end = ((0.2 + 0.4) * RATE as f64) as usize;
    assert_eq!(
        &x[..hold_end],
        &original[..hold_end],
        "loud part and the hold pass"
    );
    assert!(silent(&x[hold_end..]), "gated again after the hold");
    assert_eq!(g.stats().passed_over_speaker, ms(600));
    assert_eq!(g.stats().gated, ms(500));
}

#[test]
fn the_gate_works_on_pieces_across_calls_and_at_any_rate() {
    let mut g = gate();
    let speaker = SpeakerActivity::new();
    speaker.record(ms(0), ms(5000));
    // a loud piece opens the gate; the next piece (another call) is within the hold
    let rate = 44_100;
    let mut loud = vec![0.3f32; 441];
    g.process(ms(1000), rate, &mut loud, &speaker);
    assert!(!silent(&loud));
    let mut quiet = vec![0.001f32; 44_100];
    g.process(ms(1010), rate, &mut quiet, &speaker);
    assert!(
        quiet[..441 * 40].iter().all(|&v| v == 0.001),
        "held open for 400 ms after the loud 10 ms"
    );
    assert!(silent(&quiet[441 * 40..]), "closed after the hold");
}

#[test]
fn speaker_activity_is_shared_between_threads() {
    let speaker = Arc::new(SpeakerActivity::new());
    let writer = {
        let speaker = speaker.clone();
        std::thread::spawn(move || {
            for k in 0..1000u64 {
                speaker.record(ms(k * 10), ms(k * 10 + 10));
            }
        })
    };
    writer.join().unwrap();
    assert!(speaker.overlaps(ms(5000), ms(5010)));
    assert_eq!(speaker.last_end(), Some(ms(10_000)));
    assert!(!speaker.overlaps(ms(10_001), ms(10_100)));
}

#[test]
fn bad_gate_settings_are_refused_with_a_reason() {
    let err = HalfDuplexGate::new(GateConfig {
        tail: Duration::from_secs(10),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("tail"), "{err}");
}
