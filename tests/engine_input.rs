//! The input half of the realtime session on real speech (espeak-ng recordings) in simulated
//! time: turns and their 2-s blocks, a stalled camera, gaps, late and out-of-order input,
//! barge-in, blips, rate changes and bad input. Block settings come from the model folder of
//! the fixture set, never from constants.

mod common;

use std::sync::Arc;
use std::time::Duration;

use omnicall::engine::blocks::BlockConfig;
use omnicall::engine::clock::SimulatedClock;
use omnicall::engine::input::{
    InputBlock, InputConfig, InputError, InputEvent, InputStage, StopReason,
};
use omnicall::engine::session::{AudioInput, SessionConfig, VideoInput};
use omnicall::engine::turn::{TurnDetection, TurnState};
use omnicall::media::resample::resample;
use omnicall::media::vad::VadConfig;
use omnicall::model::config::{Config, ProcessorConfig};

const MIC_RATE: u32 = 48_000;
const PIECE: Duration = Duration::from_millis(20);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn block_config() -> BlockConfig {
    let dir = common::model_dir();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
    };
    let model = Config::from_json(&read("config.json")).unwrap();
    let processor = ProcessorConfig::from_json(&read("processor_config.json")).unwrap();
    BlockConfig::for_model(
        &model.thinker_config,
        &processor,
        SessionConfig::default().video_fps,
    )
    .unwrap()
}

/// The stage's mechanics under the silence rule and WebRTC's VAD, which these recordings'
/// timings were set for (the end-of-turn model is the session's: `tests/engine_session.rs`).
fn input_config() -> InputConfig {
    let mut config = InputConfig::new(block_config(), &SessionConfig::default());
    config.turn.detection = TurnDetection::Silence;
    config.vad = VadConfig::webrtc();
    config
}

/// A 16 kHz test recording.
fn load(name: &str) -> Vec<f32> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name);
    let mut reader = hound::WavReader::open(&path).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000);
    reader
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect()
}

fn silence(rate: u32, length: Duration) -> Vec<f32> {
    vec![0.0; (length.as_secs_f64() * rate as f64).round() as usize]
}

/// Media time of the first and last sample of `clip` louder than -40 dBFS, once the clip
/// starts at `at`.
fn loud_span(clip: &[f32], at: Duration) -> (Duration, Duration) {
    let first = clip.iter().position(|x| x.abs() > 0.01).unwrap();
    let last = clip.len() - 1 - clip.iter().rev().position(|x| x.abs() > 0.01).unwrap();
    let t = |i: usize| at + Duration::from_secs_f64(i as f64 / 16_000.0);
    (t(first), t(last))
}

/// A camera frame whose identity is its capture time.
fn frame(at: Duration) -> VideoInput {
    VideoInput {
        at,
        width: 2,
        height: 2,
        rgb: Arc::new(vec![(at.as_millis() % 251) as u8; 12]),
    }
}

struct Logged {
    /// Session clock when the event came out.
    clock: Duration,
    event: InputEvent,
}

/// A session's input stage driven like the session's input thread drives it.
struct Call {
    clock: Arc<SimulatedClock>,
    stage: InputStage,
    log: Vec<Logged>,
}

impl Call {
    fn new(config: InputConfig) -> Self {
        let clock = Arc::new(SimulatedClock::new());
        let stage = InputStage::new(config, clock.clone()).unwrap();
        Self {
            clock,
            stage,
            log: Vec::new(),
        }
    }

    fn record(&mut self, events: Vec<InputEvent>) {
        let clock = self.clock_now();
        self.log
            .extend(events.into_iter().map(|event| Logged { clock, event }));
    }

    fn clock_now(&self) -> Duration {
        use omnicall::engine::clock::Clock;
        self.clock.now()
    }

    fn tick(&mut self) {
        let events = self.stage.tick().unwrap();
        self.record(events);
    }

    fn audio(&mut self, at: Duration, rate: u32, samples: &[f32]) {
        let events = self
            .stage
            .push_audio(AudioInput {
                at,
                sample_rate: rate,
                samples: samples.to_vec(),
            })
            .unwrap();
        self.record(events);
    }

    fn video(&mut self, at: Duration) {
        let events = self.stage.push_video(frame(at)).unwrap();
        self.record(events);
    }

    /// Streams `mic` (at `rate`) from media time `start` in 20 ms pieces at real-time pace,
    /// each piece pushed once it is complete, with a camera at `camera_fps` (0: none); ticks
    /// after every piece. Returns the media time after the last piece.
    fn stream(&mut self, start: Duration, rate: u32, mic: &[f32], camera_fps: f64) -> Duration {
        let piece = (rate as u128 * PIECE.as_nanos() / 1_000_000_000) as usize;
        let mut at = start;
        for chunk in mic.chunks(piece) {
            let end = at + PIECE;
            self.clock.set(end);
            if camera_fps > 0.0 {
                for t in camera_times(at, end, camera_fps) {
                    self.video(t);
                }
            }
            self.audio(at, rate, chunk);
            self.tick();
            at = end;
        }
        at
    }

    /// Moves the clock without audio, ticking every 20 ms.
    fn idle_until(&mut self, until: Duration) {
        while self.clock_now() < until {
            self.clock.advance(PIECE);
            self.tick();
        }
    }

    fn events(&self) -> impl Iterator<Item = &InputEvent> {
        self.log.iter().map(|l| &l.event)
    }

    /// Every block of `turn` in order, the final partial one included.
    fn blocks(&self, turn: u64) -> Vec<InputBlock> {
        self.events()
            .filter_map(|e| match e {
                InputEvent::Block { turn: t, block } if *t == turn => Some(block.clone()),
                InputEvent::TurnEnded {
                    turn: t,
                    final_block: Some(block),
                    ..
                } if *t == turn => Some(block.clone()),
                _ => None,
            })
            .collect()
    }

    fn started(&self) -> Vec<(u64, Duration, Duration)> {
        self.events()
            .filter_map(|e| match e {
                InputEvent::TurnStarted { turn, from, at } => Some((*turn, *from, *at)),
                _ => None,
            })
            .collect()
    }

    fn ended(&self) -> Vec<Ended> {
        self.events()
            .filter_map(|e| match e {
                InputEvent::TurnEnded {
                    turn,
                    from,
                    speech_end,
                    decided_at,
                    end,
                    video_frames,
                    ..
                } => Some(Ended {
                    turn: *turn,
                    from: *from,
                    speech_end: *speech_end,
                    decided_at: *decided_at,
                    end: *end,
                    video_frames: *video_frames,
                }),
                _ => None,
            })
            .collect()
    }

    fn cancelled(&self) -> usize {
        self.events()
            .filter(|e| matches!(e, InputEvent::TurnCancelled { .. }))
            .count()
    }

    fn states(&self) -> Vec<TurnState> {
        self.events()
            .filter_map(|e| match e {
                InputEvent::State { state, .. } => Some(*state),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Ended {
    turn: u64,
    from: Duration,
    speech_end: Duration,
    decided_at: Duration,
    end: Duration,
    video_frames: usize,
}

/// Capture times of a camera at `fps` (frames at k / fps) within [from, to).
fn camera_times(from: Duration, to: Duration, fps: f64) -> Vec<Duration> {
    let first = (from.as_secs_f64() * fps).ceil() as u64;
    (first..)
        .map(|k| Duration::from_secs_f64(k as f64 / fps))
        .take_while(|t| *t < to)
        .collect()
}

fn to_mic(clip16: &[f32]) -> Vec<f32> {
    resample(clip16, 16_000, MIC_RATE).unwrap()
}

/// The blocks of a turn tile it from `from` to `end` on `block_len` boundaries, with the
/// audio and frame counts the model expects.
fn check_tiling(blocks: &[InputBlock], ended: &Ended, config: &BlockConfig, camera: bool) {
    let full =
        ((ended.end - ended.from).as_secs_f64() / config.block_len.as_secs_f64()).floor() as usize;
    let partial = ended.end > ended.from + config.block_len * full as u32;
    assert_eq!(blocks.len(), full + partial as usize, "blocks of {ended:?}");
    for (k, b) in blocks.iter().enumerate() {
        assert_eq!(b.index, k);
        assert_eq!(
            b.start,
            ended.from + config.block_len * k as u32,
            "block {k}"
        );
        let last = k + 1 == blocks.len();
        // only a partial final block knows it is the last; a turn that ends on a block
        // boundary has no final block, and its last full block went out before the end
        assert_eq!(b.last, last && partial);
        let duration = if last && partial {
            ended.end - b.start
        } else {
            config.block_len
        };
        assert_eq!(b.duration, duration, "block {k}");
        let samples = (duration.as_secs_f64() * config.sample_rate as f64).round() as usize;
        assert_eq!(b.audio.len(), samples, "block {k}");
        if camera {
            let frames = (duration.as_secs_f64() * config.video_fps).round().max(1.0) as usize;
            let padded = frames.div_ceil(config.temporal_patch_size) * config.temporal_patch_size;
            assert_eq!(b.frames.len(), padded, "block {k}");
        } else {
            assert!(b.frames.is_empty());
        }
    }
    assert_eq!(
        ended.video_frames,
        blocks.iter().map(|b| b.frames.len()).sum::<usize>()
    );
}

/// Relative RMS difference between the turn's block audio and the 16 kHz source laid out on
/// the same media times.
fn audio_error(blocks: &[InputBlock], source: &[f32], rate: u32) -> f32 {
    let mut diff = 0.0f64;
    let mut energy = 0.0f64;
    for b in blocks {
        let offset = (b.start.as_secs_f64() * rate as f64).round() as usize;
        for (i, s) in b.audio.iter().enumerate() {
            let want = source.get(offset + i).copied().unwrap_or(0.0);
            diff += ((s - want) as f64).powi(2);
            energy += (want as f64).powi(2);
        }
    }
    (diff / energy).sqrt() as f32
}

#[test]
fn two_utterances_make_two_turns_in_blocks_from_the_turn_start() {
    let config = input_config();
    let blocks_config = config.blocks.clone();
    let turn_config = config.turn.clone();
    let rate = blocks_config.sample_rate;
    let mut call = Call::new(config.clone());
    let long = load("utterance_long.wav");
    let short = load("utterance_short.wav");

    // the whole call at 16 kHz, for checking the blocks' audio
    let mut source = silence(16_000, ms(1000));
    let long_at = ms(1000);
    source.extend(&long);
    let pause_at = Duration::from_secs_f64(source.len() as f64 / 16_000.0);
    source.extend(silence(16_000, ms(1500)));
    let short_at = Duration::from_secs_f64(source.len() as f64 / 16_000.0);
    source.extend(&short);
    source.extend(silence(16_000, ms(1500)));

    let fps = 10.0;
    let mic = to_mic(&source);
    let split = (pause_at + ms(1200)).as_secs_f64() * MIC_RATE as f64;
    let split = split as usize / 960 * 960;
    let resume = call.stream(Duration::ZERO, MIC_RATE, &mic[..split], fps);
    // the answer to the first turn is played out during the pause
    let first = call.ended()[0];
    let answer = call.stage.answer_audible(first.turn);
    assert!(matches!(
        answer[..],
        [InputEvent::State {
            state: TurnState::Speaking,
            ..
        }]
    ));
    let done = call.stage.answer_finished(first.turn);
    call.record(answer);
    call.record(done);
    assert_eq!(call.stage.state(), TurnState::Listening);
    call.stream(resume, MIC_RATE, &mic[split..], fps);

    let started = call.started();
    let ended = call.ended();
    assert_eq!(started.len(), 2, "two turns");
    assert_eq!(ended.len(), 2);
    assert_eq!(call.cancelled(), 0);
    assert_eq!(
        call.states(),
        [
            TurnState::UserSpeaking,
            TurnState::Thinking,
            TurnState::Speaking,
            TurnState::Listening,
            TurnState::UserSpeaking,
            TurnState::Thinking
        ]
    );
    for ((turn, from, at), (clip, clip_at)) in
        started.iter().zip([(&long, long_at), (&short, short_at)])
    {
        let (onset, last_sound) = loud_span(clip, clip_at);
        let e = ended.iter().find(|e| e.turn == *turn).unwrap();
        // the first syllable is inside the turn, with the pre-roll before it
        assert!(
            *from + turn_config.pre_roll / 2 <= onset
                && onset <= *from + turn_config.pre_roll + ms(100),
            "turn {turn} from {from:?}, speech at {onset:?}"
        );
        assert!(*at >= onset + turn_config.onset && *at <= onset + turn_config.onset + ms(100));
        assert_eq!(e.from, *from);
        // the end of speech: after the last sound, within the VAD's hangover and smoothing
        assert!(
            e.speech_end > last_sound && e.speech_end <= last_sound + ms(200),
            "turn {turn} speech end {:?}, last sound {last_sound:?}",
            e.speech_end
        );
        assert_eq!(e.decided_at, e.speech_end + turn_config.end_of_turn_silence);
        // the audio ends a post-roll after the speech, unless a block boundary came between
        // that and the decision: then the whole block was already out
        let cut = e.speech_end + config.post_roll;
        let on_boundary = (e.end - e.from).as_nanos() % blocks_config.block_len.as_nanos() == 0;
        assert!(
            e.end == cut || (e.end > cut && e.end <= e.decided_at && on_boundary),
            "turn {turn}: end {:?}, speech end {:?}",
            e.end,
            e.speech_end
        );
        let blocks = call.blocks(*turn);
        check_tiling(&blocks, e, &blocks_config, true);
        let error = audio_error(&blocks, &source, rate);
        assert!(
            error < 0.05,
            "turn {turn}: block audio differs from the source by {error}"
        );
        // each sampled frame is the newest one at or before its instant; the instants before
        // the decision come from the history (kept per quarter of a sample period)
        for b in &blocks {
            for (j, f) in b
                .frames
                .iter()
                .enumerate()
                .take((b.duration.as_secs_f64() * blocks_config.video_fps).round() as usize)
            {
                let instant = b.start + Duration::from_secs_f64(j as f64 / blocks_config.video_fps);
                let ideal = *camera_times(Duration::ZERO, instant + ms(1), fps)
                    .last()
                    .unwrap();
                let slack = if instant < *at {
                    Duration::from_secs_f64(0.25 / blocks_config.video_fps)
                } else {
                    Duration::ZERO
                };
                assert!(
                    f.at <= ideal && f.at + slack >= ideal,
                    "turn {turn} block {} instant {instant:?}: frame {:?}, ideal {ideal:?}",
                    b.index,
                    f.at
                );
            }
        }
    }
    // the long utterance spans more than one block
    assert!(call.blocks(started[0].0).len() >= 2);
    // events of a turn come in order: started, blocks, ended
    let order: Vec<u8> = call
        .events()
        .filter_map(|e| match e {
            InputEvent::TurnStarted { turn: 1, .. } => Some(0),
            InputEvent::Block { turn: 1, .. } => Some(1),
            InputEvent::TurnEnded { turn: 1, .. } => Some(2),
            _ => None,
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]) && order[0] == 0);
    let stats = call.stage.stats();
    assert_eq!(stats.late_audio, Duration::ZERO);
    assert_eq!(stats.late_video_frames, 0);
    assert_eq!(stats.rate_changes, 0);
    // blocks come out as soon as the audio of their last 20 ms is through the resampler
    for l in &call.log {
        if let InputEvent::Block { block, .. } = &l.event {
            let late = l.clock - (block.start + block.duration);
            assert!(
                late <= ms(40),
                "block {} out {late:?} after its end",
                block.index
            );
        }
    }
}

#[test]
fn every_vad_frame_length_finds_the_same_turn() {
    let mut source = silence(16_000, ms(700));
    source.extend(load("utterance_short.wav"));
    source.extend(silence(16_000, ms(1200)));
    let mic = to_mic(&source);
    let (onset, last_sound) = loud_span(&load("utterance_short.wav"), ms(700));
    for frame in [10, 20, 30] {
        let mut config = input_config();
        config.vad.frame = ms(frame);
        let blocks_config = config.blocks.clone();
        let mut call = Call::new(config);
        call.stream(Duration::ZERO, MIC_RATE, &mic, 0.0);
        let ended = call.ended();
        assert_eq!(ended.len(), 1, "{frame} ms frames");
        let e = ended[0];
        assert!(
            e.from < onset && e.from + ms(400) > onset,
            "{frame} ms: {e:?}"
        );
        assert!(
            e.speech_end > last_sound && e.speech_end < last_sound + ms(250),
            "{frame} ms: {e:?}"
        );
        check_tiling(&call.blocks(e.turn), &e, &blocks_config, false);
    }
}

#[test]
fn a_stalled_camera_does_not_hold_blocks_back() {
    let config = input_config();
    let blocks_config = config.blocks.clone();
    let mut call = Call::new(config);
    let long = load("utterance_long.wav");
    let mut source = silence(16_000, ms(500));
    source.extend(&long);
    source.extend(silence(16_000, ms(1500)));
    let mic = to_mic(&source);
    // the camera runs for the first 1.3 s, freezes, and comes back 2.5 s later
    let mut at = Duration::ZERO;
    for chunk in mic.chunks(960) {
        let end = at + PIECE;
        call.clock.set(end);
        for t in camera_times(at, end, 15.0) {
            if t < ms(1300) || t >= ms(3800) {
                call.video(t);
            }
        }
        call.audio(at, MIC_RATE, chunk);
        call.tick();
        at = end;
    }
    let ended = call.ended();
    assert_eq!(ended.len(), 1);
    let blocks = call.blocks(ended[0].turn);
    check_tiling(&blocks, &ended[0], &blocks_config, true);
    let last_before_freeze = *camera_times(Duration::ZERO, ms(1300), 15.0).last().unwrap();
    for b in &blocks {
        for (j, f) in b.frames.iter().enumerate() {
            let instant = b.start + Duration::from_secs_f64(j as f64 / blocks_config.video_fps);
            if instant >= ms(1300) && instant < ms(3800) {
                assert_eq!(f.at, last_before_freeze, "frozen picture at {instant:?}");
            } else if instant >= ms(3900)
                && j < (b.duration.as_secs_f64() * blocks_config.video_fps) as usize
            {
                assert!(f.at >= ms(3800), "fresh picture at {instant:?}: {:?}", f.at);
            }
        }
    }
    for l in &call.log {
        if let InputEvent::Block { block, .. } = &l.event {
            assert!(l.clock <= block.start + block.duration + ms(40));
        }
    }
}

#[test]
fn an_audio_gap_is_silence_and_a_dead_microphone_still_ends_the_turn() {
    let config = input_config();
    let blocks_config = config.blocks.clone();
    let turn_config = config.turn.clone();
    let max_delay = config.max_audio_delay;
    let rate = blocks_config.sample_rate;
    let mut call = Call::new(config);
    let long = load("utterance_long.wav");
    let mut source = silence(16_000, ms(500));
    source.extend(&long);
    let mic = to_mic(&source);
    let (onset, _) = loud_span(&long, ms(500));
    // 300 ms lost in the middle of the speech; the microphone dies for good 1.9 s into the
    // first block, in the middle of a word
    // whole 20 ms pieces
    let lost_at = PIECE * ((onset + ms(700)).as_millis() as u32).div_ceil(20);
    let lost = (lost_at, lost_at + ms(300));
    let mut at = Duration::ZERO;
    let mut dead_at = None;
    for chunk in mic.chunks(960) {
        let end = at + PIECE;
        call.clock.set(end);
        if let Some((_, from, _)) = call.started().first()
            && at >= *from + blocks_config.block_len - ms(100)
        {
            dead_at = Some(at);
            break;
        }
        if !(at >= lost.0 && end <= lost.1) {
            call.audio(at, MIC_RATE, chunk);
        }
        call.tick();
        at = end;
    }
    let dead_at = dead_at.expect("the microphone died during the turn");
    call.idle_until(dead_at + ms(3000));

    let (turn, from, _) = call.started()[0];
    let ended = call.ended();
    assert_eq!(
        ended.len(),
        1,
        "the silence rule ends the turn without audio"
    );
    let e = ended[0];
    let blocks = call.blocks(turn);
    check_tiling(&blocks, &e, &blocks_config, false);
    // the lost stretch is silence in the block (inside it, away from the resampler's edges)
    let block = &blocks[0];
    let idx = |t: Duration| ((t - from).as_secs_f64() * rate as f64).round() as usize;
    let inside = &block.audio[idx(lost.0 + ms(5))..idx(lost.1 - ms(5))];
    assert!(inside.iter().all(|s| *s == 0.0), "lost audio is silence");
    assert!(block.audio[..idx(lost.0)].iter().any(|s| s.abs() > 0.05));
    let stats = call.stage.stats();
    assert!(stats.audio_gaps >= 2, "{stats:?}");
    assert!(stats.silence_filled >= ms(300) + ms(2000), "{stats:?}");
    // the first block closed on time though no audio came after `dead_at`
    let closed = call
        .log
        .iter()
        .find(|l| matches!(&l.event, InputEvent::Block { block, .. } if block.index == 0))
        .expect("first block");
    assert!(closed.clock <= from + blocks_config.block_len + max_delay + PIECE);
    // the speech stopped when the microphone died; the turn ended on time after it
    assert!(e.speech_end >= dead_at - ms(40) && e.speech_end <= dead_at + ms(200));
    let ended_at = call
        .log
        .iter()
        .find(|l| matches!(l.event, InputEvent::TurnEnded { .. }))
        .unwrap()
        .clock;
    assert!(ended_at <= e.speech_end + turn_config.end_of_turn_silence + max_delay + PIECE);
}

/// Runs the long utterance with a 10 fps camera, optionally disturbed; returns the call.
fn run_disturbed(disturb: bool) -> Call {
    let mut call = Call::new(input_config());
    let mut source = silence(16_000, ms(500));
    source.extend(load("utterance_long.wav"));
    source.extend(silence(16_000, ms(1500)));
    let mic = to_mic(&source);
    let pieces: Vec<(Duration, &[f32])> = mic
        .chunks(960)
        .enumerate()
        .map(|(k, c)| (PIECE * k as u32, c))
        .collect();
    let frames = camera_times(Duration::ZERO, PIECE * pieces.len() as u32, 10.0);
    let mut k = 0;
    while k < pieces.len() {
        // two pieces at a time: delivered swapped when disturbed
        let group = &pieces[k..(k + 2).min(pieces.len())];
        let end = group.last().unwrap().0 + PIECE;
        call.clock.set(end);
        let mut shown: Vec<Duration> = frames
            .iter()
            .copied()
            .filter(|t| *t >= group[0].0 && *t < end)
            .collect();
        if disturb {
            shown.reverse();
        }
        for t in shown {
            call.video(t);
        }
        let mut order: Vec<&(Duration, &[f32])> = group.iter().collect();
        if disturb {
            order.reverse();
        }
        for (at, chunk) in order {
            call.audio(*at, MIC_RATE, chunk);
        }
        if disturb && end == ms(4400) {
            // a burst of stale frames from a reconnecting camera, and a re-sent piece
            for j in 0..40u64 {
                call.video(ms(100 + j));
            }
            call.audio(ms(1500), MIC_RATE, pieces[75].1);
        }
        call.tick();
        k += 2;
    }
    call
}

#[test]
fn late_and_out_of_order_input_is_reordered_or_counted_and_dropped() {
    let clean = run_disturbed(false);
    let disturbed = run_disturbed(true);
    assert_eq!(clean.ended().len(), 1);
    assert_eq!(disturbed.ended().len(), 1);
    let (a, b) = (clean.ended()[0], disturbed.ended()[0]);
    assert_eq!((a.from, a.speech_end, a.end), (b.from, b.speech_end, b.end));
    let (ba, bb) = (clean.blocks(a.turn), disturbed.blocks(b.turn));
    assert_eq!(ba.len(), bb.len());
    for (x, y) in ba.iter().zip(&bb) {
        assert_eq!(x.start, y.start);
        assert_eq!(
            x.audio, y.audio,
            "block {}: reordered audio is the same audio",
            x.index
        );
        let at = |b: &InputBlock| b.frames.iter().map(|f| f.at).collect::<Vec<_>>();
        assert_eq!(at(x), at(y), "block {}", x.index);
    }
    let stats = disturbed.stage.stats();
    assert_eq!(stats.late_video_frames, 40, "{stats:?}");
    assert_eq!(stats.late_audio, PIECE, "{stats:?}");
    assert_eq!(stats.audio_gaps, 0, "{stats:?}");
    assert_eq!(clean.stage.stats().late_video_frames, 0);
}

#[test]
fn speech_over_the_answer_stops_it_within_a_frame() {
    let config = input_config();
    let turn_config = config.turn.clone();
    let vad_frame = config.vad.frame;
    let mut call = Call::new(config);
    let mut first = silence(16_000, ms(500));
    first.extend(load("utterance_short.wav"));
    first.extend(silence(16_000, ms(1200)));
    let at = call.stream(Duration::ZERO, MIC_RATE, &to_mic(&first), 0.0);
    let turn = call.ended()[0].turn;
    let audible = call.stage.answer_audible(turn);
    call.record(audible);
    assert_eq!(call.stage.state(), TurnState::Speaking);

    // a cough while the model speaks is not a barge-in: the answer pauses, then resumes
    let mut cough = load("cough.wav");
    cough.extend(silence(16_000, ms(800)));
    let at = call.stream(at, MIC_RATE, &to_mic(&cough), 0.0);
    assert_eq!(call.stage.state(), TurnState::Speaking);
    assert!(
        !call
            .events()
            .any(|e| matches!(e, InputEvent::StopAnswer { .. }))
    );
    let paused = call
        .events()
        .position(|e| matches!(e, InputEvent::AnswerPaused { turn: Some(t), .. } if *t == turn));
    let resumed = call
        .events()
        .position(|e| matches!(e, InputEvent::AnswerResumed { turn: Some(t), .. } if *t == turn));
    assert!(paused.expect("paused") < resumed.expect("resumed"));
    assert_eq!(
        (call.stage.stats().pauses, call.stage.stats().resumes),
        (1, 1)
    );

    // the user talks over the answer
    let before = call.log.len();
    let talk = load("utterance_long.wav");
    let (onset, _) = loud_span(&talk, at);
    let mut positions = Vec::new();
    let mut t = at;
    for chunk in to_mic(&talk).chunks(960) {
        call.clock.set(t + PIECE);
        let events = call
            .stage
            .push_audio(AudioInput {
                at: t,
                sample_rate: MIC_RATE,
                samples: chunk.to_vec(),
            })
            .unwrap();
        positions.push((call.stage.position(), events.len()));
        call.record(events);
        t += PIECE;
    }
    let new: Vec<&Logged> = call.log[before..].iter().collect();
    let speech_at = new
        .iter()
        .find_map(|l| match l.event {
            InputEvent::VoiceActivity { speech: true, at } => Some(at),
            _ => None,
        })
        .expect("speech detected");
    let (pause, pause_clock) = new
        .iter()
        .find_map(|l| match l.event {
            InputEvent::AnswerPaused { turn: paused, at } => {
                assert_eq!(paused, Some(turn));
                Some((at, l.clock))
            }
            _ => None,
        })
        .expect("paused");
    let (stop, stop_clock, stop_index) = new
        .iter()
        .enumerate()
        .find_map(|(i, l)| match l.event {
            InputEvent::StopAnswer {
                turn: stopped,
                reason,
                at,
            } => {
                assert_eq!(stopped, Some(turn));
                assert_eq!(reason, StopReason::BargeIn);
                Some((at, l.clock, i))
            }
            _ => None,
        })
        .expect("barge-in");
    assert!(speech_at >= onset - ms(40) && speech_at <= onset + ms(80));
    // paused at the VAD onset decision (the end of its first speech frame); stopped once the
    // speech over it reached barge_in_speech
    assert_eq!(pause, speech_at + vad_frame);
    assert!(stop >= speech_at + turn_config.interruption.barge_in_speech);
    // paused by the push that completed that frame: within one frame of the decision, plus
    // the resampler's lag behind the clock
    let lag = positions
        .iter()
        .map(|(p, _)| *p)
        .zip((1..).map(|k| at + PIECE * k))
        .map(|(p, clock)| clock - p)
        .max()
        .unwrap();
    assert!(lag <= ms(40), "resampler lag {lag:?}");
    assert!(
        pause_clock <= pause + vad_frame + lag,
        "pause out at {pause_clock:?}, decided at {pause:?}"
    );
    assert!(stop_clock <= stop + vad_frame + lag);
    assert!(matches!(
        new[stop_index + 1].event,
        InputEvent::TurnStarted { .. }
    ));
    assert_eq!(call.stage.state(), TurnState::UserSpeaking);
    assert_eq!(call.stage.answering(), None);
    // a late report about the stopped answer changes nothing
    assert!(call.stage.answer_finished(turn).is_empty());
    assert_eq!(call.stage.state(), TurnState::UserSpeaking);
    assert_eq!(call.stage.stats().barge_ins, 1);
}

#[test]
fn a_cough_is_not_a_turn_but_a_short_yes_is() {
    let config = input_config();
    let mut call = Call::new(config);
    let mut clip = silence(16_000, ms(500));
    clip.extend(load("cough.wav"));
    clip.extend(silence(16_000, ms(1500)));
    let at = call.stream(Duration::ZERO, MIC_RATE, &to_mic(&clip), 0.0);
    assert!(call.ended().is_empty(), "a cough is not answered");
    assert_eq!(call.stage.state(), TurnState::Listening);
    assert_eq!(call.started().len(), call.cancelled());

    let mut yes = load("w_yes.wav");
    yes.extend(silence(16_000, ms(1000)));
    call.stream(at, MIC_RATE, &to_mic(&yes), 0.0);
    assert_eq!(call.ended().len(), 1, "a one-word answer is a turn");
    assert_eq!(call.stage.state(), TurnState::Thinking);
}

#[test]
fn a_rate_change_keeps_the_timeline_continuous() {
    let config = input_config();
    let blocks_config = config.blocks.clone();
    let rate = blocks_config.sample_rate;
    let mut call = Call::new(config);
    let mut source = silence(16_000, ms(500));
    source.extend(load("utterance_long.wav"));
    source.extend(silence(16_000, ms(1500)));
    // 48 kHz for the first 2 s, then the device switches to 44.1 kHz
    let split = 32_000;
    let at = call.stream(Duration::ZERO, MIC_RATE, &to_mic(&source[..split]), 0.0);
    assert_eq!(at, ms(2000));
    let rest = resample(&source[split..], 16_000, 44_100).unwrap();
    call.stream(at, 44_100, &rest, 0.0);
    let stats = call.stage.stats();
    assert_eq!(stats.rate_changes, 1);
    assert_eq!(stats.silence_filled, Duration::ZERO, "{stats:?}");
    assert_eq!(stats.late_audio, Duration::ZERO, "{stats:?}");
    let ended = call.ended();
    assert_eq!(ended.len(), 1);
    let blocks = call.blocks(ended[0].turn);
    check_tiling(&blocks, &ended[0], &blocks_config, false);
    let error = audio_error(&blocks, &source, rate);
    assert!(
        error < 0.05,
        "block audio differs from the source by {error}"
    );
}

#[test]
fn typed_messages_and_stop_controls_drive_the_turns() {
    let mut call = Call::new(input_config());
    // typed while listening: a turn of its own
    let events = call.stage.typed_text("hello".into()).unwrap();
    assert!(matches!(&events[..], [
        InputEvent::TypedTurn { turn: 1, text, .. },
        InputEvent::State { state: TurnState::Thinking, .. }
    ] if text == "hello"));
    assert_eq!(call.stage.answering(), Some(1));
    // the stop control ends the answer, no turn starts
    let events = call.stage.interrupt();
    assert!(matches!(
        &events[..],
        [
            InputEvent::StopAnswer {
                turn: Some(1),
                reason: StopReason::Interrupt,
                ..
            },
            InputEvent::State {
                state: TurnState::Listening,
                ..
            }
        ]
    ));
    assert!(call.stage.interrupt().is_empty(), "nothing left to stop");
    // typed while the user is speaking: the spoken turn is replaced
    let mut clip = silence(16_000, ms(300));
    clip.extend(load("utterance_long.wav"));
    let mic = to_mic(&clip);
    call.stream(Duration::ZERO, MIC_RATE, &mic[..MIC_RATE as usize * 2], 0.0);
    let spoken = call.stage.open_turn().expect("speaking");
    let events = call.stage.typed_text("never mind".into()).unwrap();
    assert!(matches!(&events[..], [
        InputEvent::TurnCancelled { turn, .. },
        InputEvent::TypedTurn { .. },
        InputEvent::State { state: TurnState::Thinking, .. }
    ] if *turn == spoken));
    assert!(matches!(
        call.stage.typed_text("  ".into()),
        Err(InputError::EmptyText)
    ));
}

#[test]
fn bad_input_is_refused_with_the_reason_and_the_call_goes_on() {
    let mut call = Call::new(input_config());
    call.clock.set(ms(1000));
    let audio = |at, sample_rate, samples: Vec<f32>| AudioInput {
        at,
        sample_rate,
        samples,
    };
    let err = call
        .stage
        .push_audio(audio(ms(0), 0, vec![0.0; 10]))
        .unwrap_err();
    assert!(err.to_string().contains("sample rate 0"), "{err}");
    let err = call
        .stage
        .push_audio(audio(ms(0), 16_000, vec![0.0, f32::NAN]))
        .unwrap_err();
    assert!(err.to_string().contains("sample 1 is NaN"), "{err}");
    let mut bad = frame(ms(500));
    bad.width = 640;
    let err = call.stage.push_video(bad).unwrap_err();
    assert!(
        err.to_string()
            .contains("640x2 RGB needs 3840 bytes, got 12"),
        "{err}"
    );
    let mut empty = frame(ms(500));
    empty.height = 0;
    empty.rgb = Arc::new(Vec::new());
    assert!(call.stage.push_video(empty).is_err());
    assert!(matches!(
        call.stage.push_video(VideoInput {
            width: usize::MAX,
            height: usize::MAX,
            ..frame(ms(500))
        }),
        Err(InputError::BadVideoFrame { .. })
    ));
    // nothing of that was taken; good input still works
    assert_eq!(call.stage.stats().video_frames, 0);
    let mut clip = silence(16_000, ms(200));
    clip.extend(load("utterance_short.wav"));
    clip.extend(silence(16_000, ms(1000)));
    call.stream(ms(1000), MIC_RATE, &to_mic(&clip), 0.0);
    assert_eq!(call.ended().len(), 1);
    // bad settings are refused at construction
    let mut config = input_config();
    config.blocks.video_fps = 0.0;
    let clock = Arc::new(SimulatedClock::new());
    assert!(matches!(
        InputStage::new(config, clock.clone()),
        Err(InputError::Blocks(_))
    ));
    let mut config = input_config();
    config.blocks.sample_rate = 22_050;
    let err = InputStage::new(config, clock).err().unwrap();
    assert!(err.to_string().contains("22050"), "{err}");
}

/// The input stage's cost per second of call on this machine (resample 48 kHz -> model rate,
/// VAD, history, block assembly, with a 30 fps 640x480 camera).
/// `cargo test --test engine_input input_stage_cost -- --ignored --nocapture`
#[test]
#[ignore]
fn input_stage_cost() {
    let rows = omnicall::bench::engine::input_stage_cost(&block_config(), 60).unwrap();
    println!("{}", omnicall::bench::markdown_table(&rows));
}

#[test]
fn media_stamped_ahead_of_the_clock_is_retimed_to_it_and_nothing_is_lost() {
    let mut clip = silence(16_000, ms(300));
    clip.extend(load("utterance_short.wav"));
    clip.extend(silence(16_000, ms(1200)));
    let mic = to_mic(&clip);
    let mut on_time = Call::new(input_config());
    on_time.stream(Duration::ZERO, MIC_RATE, &mic, 0.0);

    // a transport whose stamps run well past `max_lead` ahead of the clock (its first packet
    // waited in a queue), with a camera as far ahead
    let config = input_config();
    let lead = config.max_lead * 3;
    let mut ahead = Call::new(config);
    let piece = (MIC_RATE as u128 * PIECE.as_nanos() / 1_000_000_000) as usize;
    let mut at = Duration::ZERO;
    for chunk in mic.chunks(piece) {
        let end = at + PIECE;
        ahead.clock.set(end);
        ahead.video(at + lead);
        ahead.audio(at + lead, MIC_RATE, chunk);
        ahead.tick();
        at = end;
    }
    let stats = ahead.stage.stats();
    let pieces = mic.chunks(piece).count() as u64;
    assert_eq!(stats.retimed_audio, pieces);
    assert_eq!(stats.retimed_video_frames, pieces);
    assert_eq!(stats.video_frames, pieces, "every frame was taken");
    assert_eq!(stats.late_audio, Duration::ZERO, "no audio was dropped");
    assert_eq!(on_time.stage.stats().retimed_audio, 0);

    // each piece went to the clock (the end of its capture), after the one before: the same
    // turn, one piece later
    let (expected, got) = (on_time.ended(), ahead.ended());
    assert_eq!(expected.len(), 1);
    assert_eq!(got.len(), 1, "the retimed speech is one turn");
    let near = |a: Duration, b: Duration| a.abs_diff(b) <= ms(40);
    assert!(
        near(got[0].speech_end, expected[0].speech_end + PIECE),
        "{:?} vs {:?}",
        got[0].speech_end,
        expected[0].speech_end
    );
    assert!(near(
        got[0].end - got[0].from,
        expected[0].end - expected[0].from
    ));
    let samples =
        |call: &Call, turn| -> usize { call.blocks(turn).iter().map(|b| b.audio.len()).sum() };
    let (a, b) = (
        samples(&on_time, expected[0].turn),
        samples(&ahead, got[0].turn),
    );
    assert!(a.abs_diff(b) <= 16_000 / 25, "{a} vs {b} samples");
    // the turn starts on the session clock, not a lead ahead of it
    assert!(got[0].from < expected[0].from + ms(100));
}
