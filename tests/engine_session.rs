//! The running session on the tiny model (f32, CPU) in simulated time, driven
//! deterministically: a scripted conversation with barge-in, streaming prefill against the
//! reference, robustness to a stalled camera, gaps and late frames, and the context policy.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device, IndexOp, Tensor};
use omnicall::engine::context::{Context, Entry, EntryKind, MarkerIds};
use omnicall::engine::end_of_turn::{EndOfTurn, EndOfTurnFactory};
use omnicall::engine::heard::{SpokenAnswer, tokens_heard};
use omnicall::engine::pacer::FRAME;
use omnicall::engine::session::{
    AudioInput, Control, ReplyMode, SessionConfig, SessionEvent, VideoInput,
};
use omnicall::engine::simulated::SimulatedSession;
use omnicall::engine::turn::{TurnDetection, TurnState};
use omnicall::media::vad::VadConfig;
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::model::thinker::rope::{PositionIds, RopeIndexConfig};
use omnicall::model::thinker::{LogitsFor, MultimodalEmbeds};

const RATE: u32 = 16_000;
const PIECE: Duration = Duration::from_millis(20);

fn model() -> &'static OmniModel {
    static MODEL: OnceLock<OmniModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        OmniModel::load(
            &ModelFiles::from_dir(&common::model_dir()).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn load(name: &str) -> Vec<f32> {
    common::load_16k(name)
}

/// A session and every event it gave, with the session-clock time at which it was seen.
struct Call {
    session: SimulatedSession,
    log: Vec<(Duration, SessionEvent)>,
}

impl Call {
    fn new(config: SessionConfig) -> Self {
        Self {
            session: SimulatedSession::spawn(model(), config).unwrap(),
            log: Vec::new(),
        }
    }

    fn collect(&mut self) {
        let now = self.session.now();
        for e in self.session.events() {
            self.log.push((now, e));
        }
    }

    /// Plays `samples` in 20 ms pieces, each sent when its last sample was captured on the
    /// session clock; `until` stops early once it holds for the log.
    fn talk_until(&mut self, samples: &[f32], until: impl Fn(&Call) -> bool) {
        let piece = (RATE as u128 * PIECE.as_millis() / 1000) as usize;
        for chunk in samples.chunks(piece) {
            let at = self.session.now();
            self.session.advance(PIECE).unwrap();
            self.collect();
            self.session
                .push_audio(AudioInput {
                    at,
                    sample_rate: RATE,
                    samples: chunk.to_vec(),
                })
                .unwrap();
            self.session.settle().unwrap();
            self.collect();
            if until(self) {
                return;
            }
        }
    }

    fn talk(&mut self, samples: &[f32]) {
        self.talk_until(samples, |_| false);
    }

    fn silence_until(&mut self, length: Duration, until: impl Fn(&Call) -> bool) {
        let n = (length.as_secs_f64() * RATE as f64) as usize;
        self.talk_until(&vec![0.0; n], until);
    }

    fn events(&self) -> impl Iterator<Item = &SessionEvent> {
        self.log.iter().map(|(_, e)| e)
    }

    fn answer_done(&self, turn: u64) -> bool {
        self.events()
            .any(|e| matches!(e, SessionEvent::AnswerDone { turn: t } if *t == turn))
    }

    fn frames(&self, turn: u64) -> Vec<(u64, Duration)> {
        self.events()
            .filter_map(|e| match e {
                SessionEvent::Audio {
                    turn: t, index, at, ..
                } if *t == turn => Some((*index, *at)),
                _ => None,
            })
            .collect()
    }

    fn text(&self, turn: u64) -> String {
        self.events()
            .filter_map(|e| match e {
                SessionEvent::AssistantText { turn: t, delta } if *t == turn => {
                    Some(delta.as_str())
                }
                _ => None,
            })
            .collect()
    }

    fn errors(&self) -> Vec<String> {
        self.events()
            .filter_map(|e| match e {
                SessionEvent::Error(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The scripted calls' settings: the silence rule and WebRTC's VAD, which their recordings'
/// timings were set for (the real Smart Turn and Silero have their own tests below).
fn config() -> SessionConfig {
    let mut config = SessionConfig {
        max_answer_tokens: 40,
        max_speech: Duration::from_secs(6),
        seed: 7,
        ..SessionConfig::default()
    };
    config.turn.detection = TurnDetection::Silence;
    config.vad = VadConfig::webrtc();
    config
}

/// A compact name of each event but audio frames, in order.
fn kinds(call: &Call, turn: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in call.events() {
        let k = match e {
            SessionEvent::State(s) => format!("{s:?}"),
            SessionEvent::UserTurn { turn: t, .. } if *t == turn => "UserTurn".into(),
            SessionEvent::AssistantText { turn: t, .. } if *t == turn => "Text".into(),
            SessionEvent::Audio { turn: t, .. } if *t == turn => "Audio".into(),
            SessionEvent::Interrupted { turn: t, .. } if *t == turn => "Interrupted".into(),
            SessionEvent::AnswerDone { turn: t } if *t == turn => "AnswerDone".into(),
            SessionEvent::Timings(t) if t.turn == turn => "Timings".into(),
            SessionEvent::Error(e) => format!("Error({e})"),
            _ => continue,
        };
        if out.last() != Some(&k) || !matches!(k.as_str(), "Text" | "Audio") {
            out.push(k);
        }
    }
    out
}

/// The caches of the Thinker and the Talker hold the context entry for entry.
fn assert_caches_in_step(call: &Call) {
    let view = call.session.probe.context();
    assert_eq!(view.thinker_cache, view.entries.len(), "Thinker cache");
    assert_eq!(view.talker_cache, Some(view.entries.len()), "Talker cache");
}

fn answer_ids(entries: &[Entry], turn: u64) -> Vec<u32> {
    common::answer_ids(entries, turn)
}

#[test]
fn a_spoken_turn_is_answered_in_order_with_frames_paced_at_20_ms() {
    let mut call = Call::new(config());
    let speech = load("speech.wav");
    call.talk(&speech);
    call.silence_until(Duration::from_secs(8), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    assert_eq!(
        kinds(&call, 1),
        [
            "UserSpeaking",
            "UserTurn",
            "Thinking",
            "Text",
            "Speaking",
            "Audio",
            "AnswerDone",
            "Timings",
            "Listening"
        ]
    );
    // Frames: consecutive, 20 ms of audio each, released 20 ms apart.
    let rate = model().speech().unwrap().token2wav.sample_rate();
    let frames: Vec<(u64, Duration, usize)> = call
        .events()
        .filter_map(|e| match e {
            SessionEvent::Audio {
                index,
                at,
                pcm,
                sample_rate,
                ..
            } => {
                assert_eq!(*sample_rate, rate);
                Some((*index, *at, pcm.len()))
            }
            _ => None,
        })
        .collect();
    assert!(frames.len() > 5, "{} frames", frames.len());
    for (k, (index, at, len)) in frames.iter().enumerate() {
        assert_eq!(*index, k as u64);
        assert_eq!(*len, (rate as u128 * FRAME.as_millis() / 1000) as usize);
        assert_eq!(*at, frames[0].1 + FRAME * k as u32);
    }
    // Frames were seen no earlier than their release time, and the turn's marks are in order.
    for (seen, e) in &call.log {
        if let SessionEvent::Audio { at, .. } = e {
            assert!(seen >= at);
        }
    }
    let timings = call
        .events()
        .find_map(|e| match e {
            SessionEvent::Timings(t) if t.turn == 1 => Some(t.clone()),
            _ => None,
        })
        .unwrap();
    let marks = [
        timings.speech_end,
        timings.end_of_turn,
        timings.prefill_done,
        timings.first_text_token,
        timings.first_codec_token,
        timings.first_waveform_chunk,
        timings.first_audio_frame,
    ]
    .map(|m| m.expect("every mark of a spoken answer"));
    assert!(marks.windows(2).all(|w| w[0] <= w[1]), "{timings:?}");
    assert_eq!(timings.first_audio_frame, Some(frames[0].1));
    assert!(
        timings.end_of_turn.unwrap() - timings.speech_end.unwrap() >= Duration::from_millis(500)
    );
    // The user's turn: about the recording's length.
    let (audio, video_frames) = call
        .events()
        .find_map(|e| match e {
            SessionEvent::UserTurn {
                turn: 1,
                audio,
                video_frames,
                text: None,
            } => Some((*audio, *video_frames)),
            _ => None,
        })
        .unwrap();
    assert_eq!(video_frames, 0);
    let length = Duration::from_secs_f64(speech.len() as f64 / RATE as f64);
    assert!(
        audio > length / 2 && audio < length + Duration::from_secs(1),
        "{audio:?}"
    );
    // The context: system prompt, the user turn's audio in 2-s blocks, the whole answer.
    let view = call.session.probe.context();
    let turn: Vec<&Entry> = view.entries.iter().filter(|e| e.turn == 1).collect();
    let audio_tokens = turn
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Audio { .. }))
        .count();
    let seconds = audio.as_secs_f64();
    assert!(
        (audio_tokens as f64 - seconds * 25.0).abs() <= 3.0,
        "{audio_tokens} audio tokens for {seconds} s"
    );
    let blocks: std::collections::BTreeSet<usize> = turn
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::Audio { block } => Some(block),
            _ => None,
        })
        .collect();
    let block_count = (seconds / 2.0).ceil() as usize;
    assert!(block_count >= 2);
    assert_eq!(blocks.first(), Some(&0));
    assert!(
        blocks.len() >= block_count - 1 && *blocks.last().unwrap() < block_count,
        "{blocks:?}"
    );
    let answer = answer_ids(&view.entries, 1);
    assert!(!answer.is_empty());
    assert_eq!(model().tokenizer.decode(&answer).unwrap(), call.text(1));
    assert_caches_in_step(&call);
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    call.session.close().unwrap();
}

#[test]
fn speech_over_the_answer_stops_it_at_once_and_keeps_what_was_heard() {
    let mut call = Call::new(config());
    call.talk(&load("speech.wav"));
    // Let a few frames of the answer play, then speak over it.
    call.silence_until(Duration::from_secs(8), |c| c.frames(1).len() >= 10);
    let speech = load("speech.wav");
    call.talk_until(&speech, |c| {
        c.events()
            .any(|e| matches!(e, SessionEvent::Interrupted { .. }))
    });
    // The voice paused at the VAD's first speech decision over it; the stop decision came
    // later, when the speech had gone on long enough to be a barge-in.
    let speaking = call
        .log
        .iter()
        .position(|(_, e)| matches!(e, SessionEvent::State(TurnState::Speaking)))
        .unwrap();
    let stop = speaking
        + call.log[speaking..]
            .iter()
            .position(|(_, e)| matches!(e, SessionEvent::State(TurnState::UserSpeaking)))
            .expect("a barge-in");
    let pause = speaking
        + call.log[speaking..]
            .iter()
            .position(|(_, e)| matches!(e, SessionEvent::Paused { turn: 1 }))
            .expect("paused first");
    assert!(pause < stop);
    let stopped_at = call.log[pause].0;
    // Play on for a while: nothing more of the answer comes.
    call.talk(&speech[speech.len() / 2..]);
    call.silence_until(Duration::from_secs(8), |c| c.answer_done(2));
    let frames = call.frames(1);
    let last = frames.last().unwrap().1;
    // Nothing released after the stop (events come in the order the session took them).
    assert!(
        !call.log[stop..]
            .iter()
            .any(|(_, e)| matches!(e, SessionEvent::Audio { turn: 1, .. }))
    );
    assert!(
        last <= stopped_at,
        "frame at {last:?} after the stop at {stopped_at:?}"
    );
    assert!(
        !call.log[pause..stop]
            .iter()
            .any(|(_, e)| matches!(e, SessionEvent::Audio { turn: 1, .. })),
        "nothing played while paused"
    );
    // Frames kept flowing until the pause: it stopped within one frame of it (the
    // decision is taken on a 20 ms piece of microphone audio).
    assert!(
        last + FRAME >= stopped_at,
        "last frame {last:?}, stop {stopped_at:?}"
    );
    let (heard, kept_text) = call
        .events()
        .find_map(|e| match e {
            SessionEvent::Interrupted {
                turn: 1,
                heard,
                kept_text,
            } => Some((*heard, kept_text.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(heard, FRAME * frames.len() as u32);
    assert!(!call.answer_done(1));
    // What was kept: the estimate of what was heard, nothing after it.
    let view = call.session.probe.context();
    let cut = &view.cut_answers[0];
    assert_eq!(cut.turn, 1);
    let t2w = &model().speech().unwrap().token2wav;
    let frame_samples = (t2w.sample_rate() as u128 * FRAME.as_millis() / 1000) as usize;
    assert_eq!(
        cut.heard_codes,
        frames.len() * frame_samples / t2w.samples_per_code()
    );
    let expected = tokens_heard(SpokenAnswer {
        cumulative_chars: &cut.cumulative_chars,
        heard_codes: cut.heard_codes,
        total_codes: cut.total_codes,
        heard,
    });
    assert_eq!(cut.kept, expected);
    assert!(
        0 < cut.kept && cut.kept < cut.generated.len(),
        "kept {} of {}",
        cut.kept,
        cut.generated.len()
    );
    let kept = &cut.generated[..cut.kept];
    assert_eq!(answer_ids(&view.entries, 1), kept);
    assert_eq!(model().tokenizer.decode(kept).unwrap(), kept_text);
    // The cut answer is closed with the template's end, and the next turn follows it.
    let s = model().tokenizer.special();
    let closing: Vec<u32> = model()
        .tokenizer
        .encode(&format!("{}\n", s.im_end.text))
        .unwrap();
    let after: Vec<u32> = view
        .entries
        .iter()
        .skip_while(|e| !(e.turn == 1 && e.kind == EntryKind::Answer))
        .skip(cut.kept)
        .take(closing.len())
        .map(|e| e.id)
        .collect();
    assert_eq!(after, closing);
    assert!(view.entries.iter().any(|e| e.turn == 2));
    // The barge-in is a turn of its own, answered.
    assert!(call.answer_done(2), "{:?}", kinds(&call, 2));
    assert_caches_in_step(&call);
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    call.session.close().unwrap();
}

#[test]
fn a_stop_control_and_a_typed_message_cut_the_answer_too() {
    let mut call = Call::new(config());
    call.talk(&load("speech.wav"));
    call.silence_until(Duration::from_secs(8), |c| c.frames(1).len() >= 5);
    call.session.control(Control::Interrupt).unwrap();
    call.silence_until(Duration::from_secs(1), |_| false);
    let frames = call.frames(1).len();
    assert!(call.events().any(|e| matches!(
        e,
        SessionEvent::Interrupted { turn: 1, heard, .. } if *heard == FRAME * frames as u32
    )));
    // A typed message while the answer is spoken: the answer stops, the message is answered,
    // in text now.
    call.session
        .control(Control::ReplyMode(ReplyMode::Text))
        .unwrap();
    call.session
        .control(Control::Text("hello there".into()))
        .unwrap();
    call.silence_until(Duration::from_secs(2), |c| c.answer_done(2));
    assert!(call.answer_done(2), "{:?}", kinds(&call, 2));
    assert!(call.frames(2).is_empty(), "a text answer has no audio");
    let user = call.events().find_map(|e| match e {
        SessionEvent::UserTurn {
            turn: 2,
            text: Some(t),
            ..
        } => Some(t.clone()),
        _ => None,
    });
    assert_eq!(user.as_deref(), Some("hello there"));
    let view = call.session.probe.context();
    assert!(
        view.entries
            .iter()
            .any(|e| e.turn == 2 && e.kind == EntryKind::UserText)
    );
    // An unknown voice is an error event; the session goes on.
    call.session
        .control(Control::Voice("Nobody".into()))
        .unwrap();
    call.silence_until(Duration::from_millis(100), |_| false);
    assert!(call.errors().iter().any(|e| e.contains("Nobody")));
    assert_caches_in_step(&call);
    call.session.close().unwrap();
}

/// The reference's video+audio prompt (`rope.video_audio`) laid out and prefilled block by
/// block as the session does it (the audio tokens of an encoder chunk that straddles a block
/// edge come with the next block), against the reference's layout and logits.
#[test]
fn streaming_prefill_block_by_block_equals_the_reference_prompt() {
    let cases = common::Cases::load();
    let ids: Vec<u32> = cases
        .i64_vec("rope.video_audio.input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    let want_positions = cases.i64_vec("rope.video_audio.position_ids");
    let grid = cases.i64_vec("rope.video_audio.video_grid_thw");
    let second_per_grid = cases
        .f32("rope.video_audio.second_per_grid")
        .to_vec1::<f32>()
        .unwrap()[0];
    let video = cases.f32("video.embeds");
    let audio = cases.f32("audio_encoder.output");
    let want_logits = cases.f32("thinker_av.logits");

    let m = model();
    let cfg = &m.config.thinker_config;
    let s = m.tokenizer.special();
    let mut context = Context::new(
        RopeIndexConfig::from(cfg),
        RopeIndexConfig::from(&m.config.talker_config),
        MarkerIds {
            audio: s.audio.id,
            video: s.video.id,
            audio_bos: s.audio_bos.id,
            audio_eos: s.audio_eos.id,
            vision_bos: s.vision_bos.id,
            vision_eos: s.vision_eos.id,
        },
    )
    .unwrap();
    let bos = ids.iter().position(|&i| i == s.vision_bos.id).unwrap();
    let eos = ids.iter().position(|&i| i == s.vision_eos.id).unwrap();
    let (t, h, w) = (grid[0] as usize, grid[1] as usize, grid[2] as usize);
    let merge = cfg.vision_config.spatial_merge_size;
    let grid_tokens = h * w / (merge * merge);
    let audio_tokens = audio.dim(0).unwrap();
    let per_block = RopeIndexConfig::from(cfg).ids_per_chunk() as usize;
    // Audio tokens the streaming encoder has ready when block k closes: whole encoder chunks
    // of the audio so far.
    let chunk_tokens = m.audio_encoder.chunk_frames() / 4;
    let ready = |k: usize| ((k + 1) * per_block / chunk_tokens * chunk_tokens).min(audio_tokens);
    // Time ids of the grids: which block each one belongs to.
    let grid_block = |g: usize| {
        (g as f64 * second_per_grid as f64 * cfg.position_id_per_seconds as f64) as usize
            / per_block
    };
    let blocks = audio_tokens.div_ceil(per_block).max(grid_block(t - 1) + 1);

    let mut thinker = m.thinker.clone();
    thinker.clear_cache();
    let mut positions = PositionIds::default();
    let (mut audio_taken, mut grids_taken) = (0, 0);
    let mut batches = Vec::new();
    context.push_text(&ids[..bos], EntryKind::Template, 1);
    context.open_segment(1, Some(second_per_grid)).unwrap();
    for k in 0..blocks {
        let last = k + 1 == blocks;
        let (mut a, mut v) = (Vec::new(), Vec::new());
        // the previous block's straggling audio tokens first
        let n = (k * per_block).saturating_sub(audio_taken);
        if n > 0 {
            context.push_audio(n, 1, k - 1).unwrap();
            a.push(audio.narrow(0, audio_taken, n).unwrap());
            audio_taken += n;
        }
        let block_grids: Vec<usize> = (grids_taken..t).filter(|&g| grid_block(g) == k).collect();
        if !block_grids.is_empty() {
            context
                .push_video(&vec![(h, w); block_grids.len()], 1, k)
                .unwrap();
            v.push(
                video
                    .narrow(
                        0,
                        grids_taken * grid_tokens,
                        block_grids.len() * grid_tokens,
                    )
                    .unwrap(),
            );
            grids_taken += block_grids.len();
        }
        let upto = if last { audio_tokens } else { ready(k) };
        let n = upto.saturating_sub(audio_taken);
        if n > 0 {
            context.push_audio(n, 1, k).unwrap();
            a.push(audio.narrow(0, audio_taken, n).unwrap());
            audio_taken += n;
        }
        if last {
            context.close_segment(1).unwrap();
            context.push_text(&ids[eos + 1..], EntryKind::Template, 1);
        }
        let batch = context.take_batch();
        let cat = |parts: Vec<Tensor>| (!parts.is_empty()).then(|| Tensor::cat(&parts, 0).unwrap());
        let embeds = thinker
            .embed_prompt(
                &batch.ids,
                &MultimodalEmbeds {
                    audio: cat(a),
                    image: None,
                    video: cat(v),
                },
            )
            .unwrap();
        let out = thinker
            .forward(
                &embeds,
                &batch.positions.to_tensor(&Device::Cpu).unwrap(),
                LogitsFor::All,
            )
            .unwrap();
        positions.extend(&batch.positions);
        batches.push((batch.start, out.logits.unwrap()));
    }
    assert!(batches.len() >= 2, "the prompt spans several blocks");
    assert_eq!(grids_taken, t);
    assert_eq!(context.ids().collect::<Vec<_>>(), ids);
    let mut got = positions.t.clone();
    got.extend(&positions.h);
    got.extend(&positions.w);
    assert_eq!(got, want_positions, "block positions vs rope.video_audio");
    for (start, logits) in batches {
        let n = logits.dim(0).unwrap();
        let want = want_logits.i(start..start + n).unwrap();
        common::assert_close(
            &format!("logits of the batch at {start}"),
            &logits,
            &want,
            1e-4,
        );
    }
}

/// A camera that stalls, a gap in the microphone audio and a burst of late frames: the turn
/// is still taken and answered, its blocks carry the frozen picture.
#[test]
fn a_stalled_camera_an_audio_gap_and_late_frames_neither_crash_nor_stall() {
    let mut call = Call::new(SessionConfig {
        video_min_pixels: 4 * 28 * 28,
        video_max_pixels: 16 * 28 * 28,
        ..config()
    });
    let speech = load("utterance_long.wav");
    let (width, height) = (112, 84);
    let frame = |at: Duration, shade: u8| VideoInput {
        at,
        width,
        height,
        rgb: Arc::new(vec![shade; width * height * 3]),
    };
    let piece = (RATE as u128 * PIECE.as_millis() / 1000) as usize;
    let gap = Duration::from_millis(1500)..Duration::from_millis(1800);
    for (k, chunk) in speech.chunks(piece).enumerate() {
        let at = PIECE * k as u32;
        call.session.advance(PIECE).unwrap();
        call.collect();
        // 10 fps for the first second, then the camera stalls.
        if at < Duration::from_secs(1) && k % 5 == 0 {
            call.session.push_video(frame(at, 40 + k as u8)).unwrap();
        }
        // 300 ms of audio never arrive.
        if !gap.contains(&at) {
            call.session
                .push_audio(AudioInput {
                    at,
                    sample_rate: RATE,
                    samples: chunk.to_vec(),
                })
                .unwrap();
        }
        // A burst of late frames, dated at the start of the call.
        if at == Duration::from_millis(3000) {
            for j in 0..20u32 {
                call.session
                    .push_video(frame(Duration::from_millis(50) * j, 200))
                    .unwrap();
            }
        }
        call.session.settle().unwrap();
        call.collect();
    }
    call.silence_until(Duration::from_secs(8), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    let view = call.session.probe.context();
    let video_blocks: std::collections::BTreeSet<usize> = view
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::Video { block } if e.turn == 1 => Some(block),
            _ => None,
        })
        .collect();
    // Every block of the turn shows a picture, the frozen one after the stall.
    let audio_blocks: std::collections::BTreeSet<usize> = view
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::Audio { block } if e.turn == 1 => Some(block),
            _ => None,
        })
        .collect();
    assert!(video_blocks.len() >= 3, "{video_blocks:?}");
    assert!(
        audio_blocks.is_subset(&video_blocks),
        "{audio_blocks:?} {video_blocks:?}"
    );
    let frames = call.events().find_map(|e| match e {
        SessionEvent::UserTurn {
            turn: 1,
            video_frames,
            ..
        } => Some(*video_frames),
        _ => None,
    });
    assert!(frames.unwrap() >= 6);
    assert_caches_in_step(&call);
    // The session goes on: a typed turn is answered.
    call.session
        .control(Control::Text("and now?".into()))
        .unwrap();
    call.silence_until(Duration::from_secs(8), |c| c.answer_done(2));
    assert!(call.answer_done(2));
    call.session.close().unwrap();
}

/// A spoken turn of `speech.wav` with a camera on (one small frame a 200 ms).
fn camera_turn(call: &mut Call) {
    let speech = load("speech.wav");
    let piece = (RATE as u128 * PIECE.as_millis() / 1000) as usize;
    for (k, chunk) in speech.chunks(piece).enumerate() {
        let at = PIECE * k as u32;
        call.session.advance(PIECE).unwrap();
        if k % 10 == 0 {
            call.session
                .push_video(VideoInput {
                    at,
                    width: 56,
                    height: 56,
                    rgb: Arc::new(vec![90; 56 * 56 * 3]),
                })
                .unwrap();
        }
        call.session
            .push_audio(AudioInput {
                at,
                sample_rate: RATE,
                samples: chunk.to_vec(),
            })
            .unwrap();
        call.session.settle().unwrap();
        call.collect();
    }
    call.silence_until(Duration::from_secs(4), |c| c.answer_done(1));
    assert!(call.answer_done(1));
}

fn count(entries: &[Entry], f: impl Fn(&Entry) -> bool) -> usize {
    entries.iter().filter(|e| f(e)).count()
}

/// With a small `max_context` the oldest video goes first, then the oldest exchanges; the
/// system prompt stays, both caches follow, and a limit too small for a turn is an error
/// event, not a crash.
#[test]
fn the_context_policy_keeps_the_context_within_max_context() {
    let max_answer = 6;
    let base = SessionConfig {
        reply_mode: ReplyMode::Text,
        max_answer_tokens: max_answer,
        video_min_pixels: 4 * 28 * 28,
        video_max_pixels: 4 * 28 * 28,
        ..config()
    };
    // Sizes of the conversation without a limit.
    let mut call = Call::new(base.clone());
    let system = call.session.probe.context().entries.len();
    camera_turn(&mut call);
    let after_first = call.session.probe.context().entries.len();
    call.session.close().unwrap();
    let tok = &model().tokenizer;
    let s = tok.special();
    let len = |text: String| tok.encode(&text).unwrap().len();
    let header = len(format!("{}\n{}assistant\n", s.im_end.text, s.im_start.text));
    let reserve = header + max_answer + len(format!("{}\n", s.im_end.text));
    let message = |turn: u64| format!("ok {turn}");
    let typed = len(format!("{}user\n", s.im_start.text)) + len(message(2)) + header;
    // One token short for the second turn: the oldest video block must go.
    let limit = after_first + typed + reserve - 1;
    let mut call = Call::new(SessionConfig {
        max_context: limit,
        ..base.clone()
    });
    camera_turn(&mut call);
    let view = call.session.probe.context();
    assert_eq!(view.entries.len(), after_first, "no room needed yet");
    let first_video = count(&view.entries, |e| matches!(e.kind, EntryKind::Video { .. }));
    let first_audio = count(&view.entries, |e| {
        e.turn == 1 && matches!(e.kind, EntryKind::Audio { .. })
    });
    let first_rest = count(&view.entries, |e| e.turn == 1) - first_video - first_audio;
    assert!(first_video > 0);
    let mut turn = 1;
    while turn < 12 {
        turn += 1;
        call.session.control(Control::Text(message(turn))).unwrap();
        call.silence_until(Duration::from_secs(4), |c| c.answer_done(turn));
        assert!(call.answer_done(turn), "turn {turn}: {:?}", call.errors());
        let view = call.session.probe.context();
        assert!(
            view.entries.len() <= limit,
            "{} > {limit}",
            view.entries.len()
        );
        assert_eq!(count(&view.entries, |e| e.turn == 0), system);
        assert_caches_in_step(&call);
        let video = count(&view.entries, |e| matches!(e.kind, EntryKind::Video { .. }));
        let audio = count(&view.entries, |e| {
            e.turn == 1 && matches!(e.kind, EntryKind::Audio { .. })
        });
        let rest = count(&view.entries, |e| e.turn == 1) - video - audio;
        if turn == 2 {
            // only video went
            assert!(video < first_video);
            assert_eq!((audio, rest), (first_audio, first_rest));
        }
        assert!(
            video == 0 || audio == first_audio,
            "audio went before the video"
        );
        if rest == 0 {
            break;
        }
    }
    assert!(
        !call
            .session
            .probe
            .context()
            .entries
            .iter()
            .any(|e| e.turn == 1),
        "the oldest exchange was forgotten"
    );
    assert!(turn > 2);
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    call.session.close().unwrap();

    // A limit that cannot hold a single typed turn: an error, and the session answers on.
    let mut call = Call::new(SessionConfig {
        max_context: system + reserve + 4,
        ..base
    });
    call.session
        .control(Control::Text("too long for this context".into()))
        .unwrap();
    call.silence_until(Duration::from_secs(2), |c| c.answer_done(1));
    assert!(call.answer_done(1));
    assert!(
        call.errors().iter().any(|e| e.contains("max_context")),
        "{:?}",
        call.errors()
    );
    assert_eq!(call.session.probe.context().entries.len(), system);
    assert_caches_in_step(&call);
    call.session.close().unwrap();
}

#[test]
fn dropping_every_handle_ends_the_session_threads() {
    let clock = Arc::new(omnicall::engine::clock::SimulatedClock::new());
    let (handle, probe) =
        omnicall::engine::runtime::spawn_probed(model(), config(), clock.clone()).unwrap();
    let copy = handle.clone();
    assert!(copy.push_audio(AudioInput {
        at: Duration::ZERO,
        sample_rate: RATE,
        samples: vec![0.0; 320],
    }));
    drop(handle);
    drop(copy);
    assert!(probe.join(Duration::from_secs(60)), "threads still running");
    // A session that cannot be built is an error, not a panic.
    let err = omnicall::engine::runtime::spawn(
        model(),
        SessionConfig {
            voice: "Nobody".into(),
            ..config()
        },
        clock,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("Nobody"), "{err:#}");
}

/// A deterministic end-of-turn model for the turn machinery's tests: an utterance is complete
/// once the turn's audio so far is `after` long (the real model, Smart Turn, has its own
/// tests).
struct CompleteAfter(Duration);

impl EndOfTurn for CompleteAfter {
    fn complete_probability(&mut self, audio_16k: &[f32]) -> anyhow::Result<f32> {
        let heard = Duration::from_secs_f64(audio_16k.len() as f64 / 16_000.0);
        Ok(if heard >= self.0 { 1.0 } else { 0.0 })
    }
}

fn smart_config(complete_after: Duration) -> SessionConfig {
    let mut config = config();
    config.turn.detection = TurnDetection::Smart;
    config.end_of_turn = Some(EndOfTurnFactory::new(move || {
        Ok(Box::new(CompleteAfter(complete_after)))
    }));
    config
}

/// Index in the log of the first event that `f` matches.
fn first(call: &Call, f: impl Fn(&SessionEvent) -> bool) -> Option<usize> {
    call.log.iter().position(|(_, e)| f(e))
}

fn timings(call: &Call, turn: u64) -> omnicall::engine::session::TurnTimings {
    call.events()
        .find_map(|e| match e {
            SessionEvent::Timings(t) if t.turn == turn => Some(t.clone()),
            _ => None,
        })
        .expect("the turn's timings")
}

#[test]
fn a_preemptive_answer_is_held_then_released_at_once_when_the_turn_is_confirmed() {
    // speech.wav's last word ends at about 3.44 s; its pauses before are not complete
    let mut call = Call::new(smart_config(Duration::from_millis(3300)));
    call.talk(&load("speech.wav"));
    call.silence_until(Duration::from_secs(8), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    let t = timings(&call, 1);
    let (speculated, confirmed) = (t.speculated_at.unwrap(), t.end_of_turn.unwrap());
    assert!(speculated < confirmed, "{t:?}");
    assert_eq!(call.session.probe.speculations(), (1, 0));
    let smart = &config().turn.smart;
    assert!(confirmed - t.speech_end.unwrap() >= smart.complete_silence);
    // the answer was ready before the confirmation: its first frame left at once
    assert!(t.prefill_done.unwrap() <= confirmed && t.first_waveform_chunk.unwrap() <= confirmed);
    assert_eq!(t.first_audio_frame, Some(confirmed));
    // nothing of it reached the user before its turn was taken
    let user_turn = first(&call, |e| {
        matches!(e, SessionEvent::UserTurn { turn: 1, .. })
    })
    .unwrap();
    let answer = first(&call, |e| {
        matches!(
            e,
            SessionEvent::AssistantText { turn: 1, .. } | SessionEvent::Audio { turn: 1, .. }
        )
    })
    .unwrap();
    assert!(user_turn < answer);
    assert_eq!(
        kinds(&call, 1),
        [
            "UserSpeaking",
            "UserTurn",
            "Thinking",
            "Text",
            "Speaking",
            "Audio",
            "AnswerDone",
            "Timings",
            "Listening"
        ]
    );
    assert_caches_in_step(&call);
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    call.session.close().unwrap();
}

/// One spoken turn (speech.wav) under the smart rule with a long confirmation, so that the
/// 440 ms pause inside it starts a speculative answer that the next words drop when the model
/// calls the utterance complete after `complete_after`.
fn turn_with_a_pause(complete_after: Duration) -> Call {
    let mut config = smart_config(complete_after);
    let smart = &mut config.turn.smart;
    smart.complete_silence = Duration::from_millis(600);
    smart.likely_silence = smart.likely_silence.max(smart.complete_silence);
    let mut call = Call::new(config);
    call.talk(&load("speech.wav"));
    call.silence_until(Duration::from_secs(10), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    call
}

/// "yes", a 740 ms pause, "yes": a turn shorter than one block, so a speculation at the
/// pause starts before anything of the turn was prefilled (its user header still waits in the
/// context).
fn two_short_words(complete_after: Duration) -> Call {
    let mut config = smart_config(complete_after);
    let smart = &mut config.turn.smart;
    smart.complete_silence = Duration::from_millis(1000);
    smart.likely_silence = smart.likely_silence.max(smart.complete_silence);
    let mut call = Call::new(config);
    let yes = load("w_yes.wav");
    let mut audio = yes.clone();
    audio.extend(vec![0.0; RATE as usize / 2]);
    audio.extend(&yes);
    call.talk(&audio);
    call.silence_until(Duration::from_secs(10), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    call
}

#[test]
fn a_preemptive_answer_dropped_before_the_turns_first_block_leaves_no_trace() {
    // speculates at the pause (and drops it), then at the end
    let dropped = two_short_words(Duration::from_millis(300));
    // speculates at the end only
    let plain = two_short_words(Duration::from_millis(1300));
    let (started, gone) = dropped.session.probe.speculations();
    assert!(
        gone >= 1 && started == gone + 1,
        "{started} started, {gone} dropped"
    );
    assert_eq!(plain.session.probe.speculations(), (1, 0));
    for call in [&dropped, &plain] {
        assert!(call.errors().is_empty(), "{:?}", call.errors());
        assert_caches_in_step(call);
    }
    let (a, b) = (
        dropped.session.probe.context(),
        plain.session.probe.context(),
    );
    assert_eq!(a.entries, b.entries);
    assert_eq!(dropped.text(1), plain.text(1));
    for call in [dropped, plain] {
        call.session.close().unwrap();
    }
}

#[test]
fn a_dropped_preemptive_answer_leaves_no_trace() {
    // speculates at the pause at 1.9 s (and drops it), then again at the end
    let dropped = turn_with_a_pause(Duration::from_millis(1800));
    // speculates at the end only
    let plain = turn_with_a_pause(Duration::from_millis(3300));
    let speculations = |call: &Call| call.session.probe.context();
    let (a, b) = (speculations(&dropped), speculations(&plain));
    // the same context, token for token and position for position, in both caches
    assert_eq!(a.entries, b.entries);
    assert_eq!(a.thinker_cache, b.thinker_cache);
    assert_eq!(a.talker_cache, b.talker_cache);
    assert_caches_in_step(&dropped);
    // the same answer, frame for frame
    assert_eq!(dropped.text(1), plain.text(1));
    let pcm = |call: &Call| -> Vec<Vec<f32>> {
        call.events()
            .filter_map(|e| match e {
                SessionEvent::Audio { turn: 1, pcm, .. } => Some(pcm.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(pcm(&dropped), pcm(&plain));
    // no text nor frame of the dropped answer came out before the turn was taken
    let user_turn = first(&dropped, |e| {
        matches!(e, SessionEvent::UserTurn { turn: 1, .. })
    });
    let answer = first(&dropped, |e| {
        matches!(
            e,
            SessionEvent::AssistantText { turn: 1, .. } | SessionEvent::Audio { turn: 1, .. }
        )
    });
    assert!(user_turn.unwrap() < answer.unwrap());
    assert_eq!(
        dropped
            .events()
            .filter(|e| matches!(e, SessionEvent::UserTurn { .. }))
            .count(),
        1
    );
    // it did speculate at the pause and drop that answer; the other only at the end
    let (started, gone) = dropped.session.probe.speculations();
    assert!(
        gone >= 1 && started == gone + 1,
        "{started} started, {gone} dropped"
    );
    assert_eq!(plain.session.probe.speculations(), (1, 0));
    let (t_dropped, t_plain) = (timings(&dropped, 1), timings(&plain, 1));
    assert_eq!(
        t_dropped, t_plain,
        "the dropped answer's marks are forgotten"
    );
    for call in [dropped, plain] {
        assert!(call.errors().is_empty(), "{:?}", call.errors());
        call.session.close().unwrap();
    }
}

#[test]
fn a_backchannel_pauses_the_answer_then_it_plays_on_with_the_context_unchanged() {
    let mut call = Call::new(config());
    call.talk(&load("speech.wav"));
    call.silence_until(Duration::from_secs(8), |c| c.frames(1).len() >= 10);
    let before = call.session.probe.context();
    call.talk(&load("w_yes.wav"));
    call.silence_until(Duration::from_secs(10), |c| c.answer_done(1));
    assert!(call.answer_done(1), "{:?}", kinds(&call, 1));
    let paused = first(&call, |e| matches!(e, SessionEvent::Paused { turn: 1 })).expect("paused");
    let resumed =
        first(&call, |e| matches!(e, SessionEvent::Resumed { turn: 1 })).expect("resumed");
    assert!(paused < resumed);
    assert!(
        !call.log[paused..resumed]
            .iter()
            .any(|(_, e)| matches!(e, SessionEvent::Audio { .. })),
        "silent while paused"
    );
    assert!(
        !call
            .events()
            .any(|e| matches!(e, SessionEvent::Interrupted { .. }))
    );
    assert!(
        !call
            .events()
            .any(|e| matches!(e, SessionEvent::UserTurn { turn: 2, .. }))
    );
    // it played on from where it paused: every frame once, in order
    let frames = call.frames(1);
    assert!(frames.iter().enumerate().all(|(k, (i, _))| *i == k as u64));
    let gap = frames.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    assert!(
        gap > FRAME * 10,
        "the pause shows in the release times ({gap:?})"
    );
    // the context is the one before the backchannel
    let after = call.session.probe.context();
    assert_eq!(after.entries, before.entries);
    assert_caches_in_step(&call);
    assert!(call.errors().is_empty(), "{:?}", call.errors());
    call.session.close().unwrap();
}

/// A clip of the spoken turn set (`tests/fixtures/turn/set`, 16 kHz) and where its prompt ends.
fn turn_set_clip(name: &str) -> (Vec<f32>, Duration) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/turn/set");
    let segments: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("segments.json")).unwrap()).unwrap();
    let clip = segments
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == name)
        .unwrap_or_else(|| panic!("{name} is not in segments.json"));
    let end = Duration::from_secs_f64(clip["prompt_end"].as_f64().unwrap());
    let mut reader = hound::WavReader::open(dir.join(name)).unwrap();
    assert_eq!(reader.spec().sample_rate, RATE);
    let samples = reader
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    (samples, end)
}

/// The defaults, Smart Turn and Silero, on the spoken set: a complete question (Smart Turn:
/// 0.95 at its end) is answered speculatively, its first frame out at the confirmation; a
/// question with a 0.6 s pause in the middle (0.02 in the pause) is answered only once it is
/// over.
#[test]
fn smart_turn_answers_a_complete_question_and_waits_through_a_mid_sentence_pause() {
    let defaults = SessionConfig {
        max_answer_tokens: 20,
        max_speech: Duration::from_secs(4),
        seed: 7,
        ..SessionConfig::default()
    };
    assert_eq!(defaults.turn.detection, TurnDetection::Smart);
    for (clip, speculative) in [("complete_1.wav", true), ("pause_2.wav", false)] {
        let (audio, prompt_end) = turn_set_clip(clip);
        let mut call = Call::new(defaults.clone());
        call.talk(&audio);
        call.silence_until(Duration::from_secs(8), |c| c.answer_done(1));
        assert!(call.answer_done(1), "{clip}: {:?}", kinds(&call, 1));
        let turns: Vec<Duration> = call
            .log
            .iter()
            .filter(|(_, e)| matches!(e, SessionEvent::UserTurn { .. }))
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(turns.len(), 1, "{clip}: one turn, taken after the prompt");
        assert!(turns[0] > prompt_end, "{clip}: taken at {:?}", turns[0]);
        let t = timings(&call, 1);
        let confirmed = t.end_of_turn.unwrap();
        eprintln!(
            "{clip}: prompt end {prompt_end:?}, {t:?}, speculations {:?}",
            call.session.probe.speculations()
        );
        if speculative {
            let speculated = t.speculated_at.expect("answered speculatively");
            assert!(
                speculated > prompt_end && speculated <= confirmed,
                "{clip}: {t:?}"
            );
            assert_eq!(t.first_audio_frame, Some(confirmed), "{clip}: {t:?}");
        }
        assert!(call.errors().is_empty(), "{:?}", call.errors());
        call.session.close().unwrap();
    }
}

/// The turn-taking figures on the whole spoken set, with the defaults (Smart Turn, Silero) on
/// the simulated clock, so model compute takes no time: endpointing delay (end of the prompt →
/// turn confirmed) and speculation on the complete questions, false cut-offs on the pause set
/// (run with `--ignored --nocapture`).
#[test]
#[ignore = "prints measurements; run with --ignored --nocapture"]
fn turn_set_policy_figures() {
    let defaults = SessionConfig {
        max_answer_tokens: 30,
        max_speech: Duration::from_secs(6),
        seed: 7,
        ..SessionConfig::default()
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/turn/set");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".wav"))
        .collect();
    names.sort();
    let of = |kind: &str| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.starts_with(kind))
            .cloned()
            .collect()
    };
    for kind in ["complete", "pause"] {
        let (mut cut_offs, mut delays, mut speculated) = (0, Vec::new(), 0);
        for name in of(kind) {
            let (audio, prompt_end) = turn_set_clip(&name);
            let mut call = Call::new(defaults.clone());
            call.talk(&audio);
            call.silence_until(Duration::from_secs(6), |c| c.answer_done(1));
            let first_turn = call
                .log
                .iter()
                .find(|(_, e)| matches!(e, SessionEvent::UserTurn { .. }))
                .map(|(at, _)| *at);
            let cut_off = first_turn.is_some_and(|at| at < prompt_end);
            cut_offs += usize::from(cut_off);
            let t = timings(&call, 1);
            let delay = t.end_of_turn.unwrap().as_secs_f64() - prompt_end.as_secs_f64();
            delays.push(delay * 1e3);
            speculated += usize::from(t.speculated_at.is_some());
            println!(
                "{name:18} end of turn {:+6.0} ms  speculations {:?}  false cut-off {cut_off}",
                delay * 1e3,
                call.session.probe.speculations()
            );
            call.session.close().unwrap();
        }
        delays.sort_by(f64::total_cmp);
        println!(
            "{kind}: {} clips, false cut-offs {cut_offs}, answered speculatively {speculated}, \
             endpointing median {:.0} ms (min {:.0}, max {:.0})",
            delays.len(),
            delays[delays.len() / 2],
            delays[0],
            delays[delays.len() - 1]
        );
    }
}

#[test]
fn a_session_behind_its_input_sheds_camera_frames_first_and_says_so() {
    let mut session = SimulatedSession::spawn(model(), config()).unwrap();
    // the control thread busy with a minute of 48 kHz audio in one piece: what comes meanwhile
    // waits in its queue
    let mic = 48_000;
    let minute = Duration::from_secs(60);
    session
        .push_audio(AudioInput {
            at: session.now(),
            sample_rate: mic,
            samples: vec![0.0; mic as usize * 60],
        })
        .unwrap();
    for k in 0..omnicall::engine::queues::SHED_VIDEO_DEPTH as u32 {
        session
            .push_audio(AudioInput {
                at: minute + PIECE * k,
                sample_rate: mic,
                samples: vec![0.0; mic as usize / 50],
            })
            .unwrap();
    }
    session
        .push_video(VideoInput {
            at: session.now(),
            width: 2,
            height: 2,
            rgb: Arc::new(vec![0; 12]),
        })
        .unwrap();
    let queues = session.handle.queues();
    assert_eq!(queues.shed_video_frames, 1, "{queues:?}");
    assert_eq!(queues.shed_audio_pieces, 0, "audio goes before any frame");

    // the session takes all the audio, and says at its next tick what it shed
    session.advance(PIECE * 2).unwrap();
    let errors: Vec<String> = session
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Error(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("shed 1 camera frame "), "{}", errors[0]);
    assert!(!errors[0].contains("audio piece"), "{}", errors[0]);
    let queues = session.handle.queues();
    assert_eq!(queues.input_depth, 0);
    assert_eq!(
        queues.retimed_audio,
        omnicall::engine::queues::SHED_VIDEO_DEPTH as u64,
        "the pieces stamped a minute ahead were placed on the clock, not dropped"
    );
    session.close().unwrap();
}

/// The spoken set's sounds over an answer (`tests/fixtures/turn/set`: backchannels and a
/// cough, interruptions), each spoken 300 ms into the answer to a question, through the real
/// engine with its defaults (Silero VAD, Smart Turn, the interruption rule), on the simulated
/// clock: whether the answer paused and played on or was cut, and how soon its voice went
/// silent after the sound's onset. The figures of issue 13 (`README.md`, *Turn-taking*).
#[test]
#[ignore = "prints measurements; run with --ignored --nocapture"]
fn over_the_answer_figures() {
    let defaults = SessionConfig {
        max_answer_tokens: 40,
        max_speech: Duration::from_secs(8),
        seed: 7,
        ..SessionConfig::default()
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/turn/set");
    let segments: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("segments.json")).unwrap()).unwrap();
    let mut clips: Vec<(String, String, Duration)> = segments
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "backchannel" || c["kind"] == "interruption")
        .map(|c| {
            (
                c["file"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
                Duration::from_secs_f64(c["speech"][0][0].as_f64().unwrap()),
            )
        })
        .collect();
    clips.sort();
    let (mut kept, mut backchannels, mut cut, mut interruptions) = (0, 0, 0, 0);
    let mut silent_after = Vec::new();
    for (name, kind, onset_in_clip) in clips {
        let (clip, _) = turn_set_clip(&name);
        let mut call = Call::new(defaults.clone());
        call.talk(&load("speech.wav"));
        call.silence_until(Duration::from_secs(8), |c| c.frames(1).len() >= 15);
        let onset = call.session.now() + onset_in_clip;
        let playing = !call.answer_done(1);
        call.talk(&clip);
        call.silence_until(Duration::from_secs(12), |c| {
            c.answer_done(1)
                || c.events()
                    .any(|e| matches!(e, SessionEvent::Interrupted { .. }))
        });
        let at = |f: &dyn Fn(&SessionEvent) -> bool| {
            call.log.iter().find(|(_, e)| f(e)).map(|(at, _)| *at)
        };
        let paused = at(&|e| matches!(e, SessionEvent::Paused { turn: 1 }));
        let resumed = at(&|e| matches!(e, SessionEvent::Resumed { turn: 1 })).is_some();
        let interrupted = at(&|e| matches!(e, SessionEvent::Interrupted { turn: 1, .. })).is_some();
        let last_audible = call
            .events()
            .filter_map(|e| match e {
                SessionEvent::Audio { turn: 1, at, .. } => Some(*at),
                _ => None,
            })
            .filter(|&at| interrupted && at >= onset)
            .max();
        let outcome = match (playing, interrupted, paused.is_some(), resumed) {
            (false, ..) => "the answer had ended",
            (_, true, ..) => "cut",
            (_, false, true, true) => "paused, played on",
            (_, false, false, _) => "played on, no pause",
            (_, false, true, false) => "paused, never resumed",
        };
        let pause_ms = paused.map(|p| (p.as_secs_f64() - onset.as_secs_f64()) * 1e3);
        let silent_ms = last_audible
            .map(|a| ((a + FRAME).as_secs_f64() - onset.as_secs_f64()) * 1e3)
            .or(pause_ms);
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
        println!(
            "{name:20} {kind:12} {outcome:24} paused {:>6} after the onset, voice silent {:>6} \
             after it",
            ms(pause_ms),
            ms(silent_ms)
        );
        if kind == "backchannel" && playing {
            backchannels += 1;
            kept += usize::from(!interrupted && (resumed || paused.is_none()));
        }
        if kind == "interruption" && playing {
            interruptions += 1;
            cut += usize::from(interrupted);
            silent_after.extend(silent_ms);
        }
        assert!(call.errors().is_empty(), "{name}: {:?}", call.errors());
        call.session.close().unwrap();
    }
    silent_after.sort_by(f64::total_cmp);
    println!(
        "backchannels: {kept} of {backchannels} answers kept going; interruptions: {cut} of \
         {interruptions} cut, the voice silent {:?} ms after the onset",
        silent_after.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
}
