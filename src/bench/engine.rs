//! Cost of the engine's input stage per second of call: resampling the microphone to the
//! model's rate, WebRTC's VAD, the turn machine, the pre-roll history and block assembly, with
//! a camera. Runs on simulated time as fast as it can; one thread, so wall time is CPU time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Measurement;
use crate::engine::blocks::BlockConfig;
use crate::engine::clock::SimulatedClock;
use crate::engine::input::{InputConfig, InputEvent, InputStage};
use crate::engine::session::{AudioInput, SessionConfig, VideoInput};
use crate::media::resample::StreamResampler;
use crate::media::vad::{VadConfig, VoiceDetector};

const MIC_RATE: u32 = 48_000;
const PIECE_MS: u64 = 20;
const CAMERA_FPS: u64 = 30;
const CAMERA_SIZE: (usize, usize) = (640, 480);

/// A voice-like test signal: 3 s of a 120 Hz harmonic complex with a syllable-rate envelope,
/// then 2 s of silence, repeated; at the microphone's rate.
fn voice_like(seconds: u64) -> Vec<f32> {
    let rate = MIC_RATE as f32;
    (0..seconds * MIC_RATE as u64)
        .map(|i| {
            let t = i as f32 / rate;
            if t % 5.0 >= 3.0 {
                return 0.0;
            }
            let envelope = 0.5 - 0.5 * (2.0 * std::f32::consts::PI * 4.0 * t).cos();
            let voice: f32 = (1..=20)
                .map(|h| (2.0 * std::f32::consts::PI * 120.0 * h as f32 * t).sin() / h as f32)
                .sum();
            0.1 * envelope * voice
        })
        .collect()
}

/// Runs `seconds` of a call through the input stage for the model blocks `blocks`, and the
/// resampler and the VAD alone; reports milliseconds of CPU per second of call.
pub fn input_stage_cost(blocks: &BlockConfig, seconds: u64) -> anyhow::Result<Vec<Measurement>> {
    let mic = voice_like(seconds);
    let piece = (MIC_RATE as u64 * PIECE_MS / 1000) as usize;
    let per_second = |elapsed: Duration| elapsed.as_secs_f64() * 1000.0 / seconds as f64;
    let mut rows = Vec::new();

    let start = Instant::now();
    let mut resampler = StreamResampler::new(MIC_RATE, blocks.sample_rate)?;
    let mut resampled = Vec::with_capacity(mic.len());
    for chunk in mic.chunks(piece) {
        resampled.extend(resampler.push(chunk)?);
    }
    rows.push(Measurement::new(
        "input: resample",
        format!("{MIC_RATE} -> {} Hz, 20 ms pieces", blocks.sample_rate),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));

    let vad_config = VadConfig::default();
    let start = Instant::now();
    let mut vad = VoiceDetector::new(vad_config.clone(), blocks.sample_rate, Duration::ZERO)?;
    let mut speech = 0;
    for chunk in resampled.chunks(piece / 3) {
        speech += vad.push(chunk).iter().filter(|d| d.speech).count();
    }
    rows.push(Measurement::new(
        "input: VAD",
        format!(
            "WebRTC {:?}, {:?} frames, {speech} speech frames",
            vad_config.aggressiveness, vad_config.frame
        ),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));

    let clock = Arc::new(SimulatedClock::new());
    let mut stage = InputStage::new(
        InputConfig::new(blocks.clone(), &SessionConfig::default()),
        clock.clone(),
    )?;
    let picture = Arc::new(vec![128u8; CAMERA_SIZE.0 * CAMERA_SIZE.1 * 3]);
    let (mut turns, mut block_count) = (0, 0);
    let mut count = |events: Vec<InputEvent>, stage: &mut InputStage| {
        for e in events {
            match e {
                InputEvent::TurnEnded { turn, .. } => {
                    turns += 1;
                    // the answer is over at once, so that the next burst is a new turn
                    stage.answer_finished(turn);
                    block_count += 1;
                }
                InputEvent::Block { .. } => block_count += 1,
                _ => {}
            }
        }
    };
    let mut next_frame = 0u64;
    let start = Instant::now();
    for (k, chunk) in mic.chunks(piece).enumerate() {
        let at = Duration::from_millis(k as u64 * PIECE_MS);
        let end = at + Duration::from_millis(PIECE_MS);
        clock.set(end);
        while Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS) < end {
            let events = stage.push_video(VideoInput {
                at: Duration::from_nanos(next_frame * 1_000_000_000 / CAMERA_FPS),
                width: CAMERA_SIZE.0,
                height: CAMERA_SIZE.1,
                rgb: picture.clone(),
            })?;
            count(events, &mut stage);
            next_frame += 1;
        }
        let events = stage.push_audio(AudioInput {
            at,
            sample_rate: MIC_RATE,
            samples: chunk.to_vec(),
        })?;
        count(events, &mut stage);
        let events = stage.tick()?;
        count(events, &mut stage);
    }
    rows.push(Measurement::new(
        "input: whole stage",
        format!(
            "{seconds} s call, {MIC_RATE} Hz mic in 20 ms pieces, {CAMERA_FPS} fps {}x{} camera, \
             {turns} turns, {block_count} blocks",
            CAMERA_SIZE.0, CAMERA_SIZE.1
        ),
        per_second(start.elapsed()),
        "ms CPU / s of call",
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_run_takes_turns_and_reports_three_stages() {
        let blocks = BlockConfig {
            sample_rate: 16_000,
            block_len: Duration::from_secs(2),
            video_fps: 2.0,
            temporal_patch_size: 2,
        };
        let rows = input_stage_cost(&blocks, 10).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.value > 0.0));
        // two bursts of the voice-like signal: two turns
        assert!(rows[2].setup.contains("2 turns"), "{}", rows[2].setup);
    }
}
