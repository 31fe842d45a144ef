//! The input half of the realtime session: from timestamped microphone audio and camera frames
//! to the ordered events the streaming Thinker consumes (turn started, 2-s blocks, turn ended,
//! turn cancelled, stop the answer, state changes).
//!
//! [`InputStage`] is a synchronous state holder on media time; the session's input thread owns
//! it, feeds it what the transport pushes and what the output side reports, and calls
//! [`InputStage::tick`] every few tens of milliseconds so that time moves on when audio does not
//! arrive. No threads here.
//!
//! Audio path: every piece is resampled to the model's rate (one [`StreamResampler`] per
//! stretch of contiguous audio at one rate; a rate change or a gap starts a new one) and laid on
//! one continuous timeline that starts at media time 0. Out-of-order pieces wait up to
//! `max_audio_delay` for the audio before them; a gap that is still open after that is silence;
//! audio for a stretch already on the timeline is dropped and counted. The timeline feeds the
//! VAD frame by frame, the VAD feeds [`TurnTaking`], and the open turn's [`BlockAssembler`]
//! takes the same samples. A short history of audio and frames lets a turn start `pre_roll`
//! before the speech that triggered it, so its first syllable is in its first block.
//!
//! Video path: frames go to the history (thinned to four per sampled frame period) and to the
//! open turn's assembler, which samples them at the model's fps; frames too old for both are
//! dropped and counted. Blocks close on the audio timeline only, so a camera that stalls never
//! holds a block back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::blocks::{Block, BlockAssembler, BlockConfig, BlockConfigError};
use super::clock::Clock;
use super::session::{AudioInput, SessionConfig, VideoInput};
use super::turn::{TurnAction, TurnConfig, TurnInput, TurnState, TurnTaking};
use crate::media::resample::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, ResampleError, StreamResampler};
use crate::media::vad::{VadConfig, VadDecision, VadError, VoiceDetector};

/// A block of a user turn: audio at the model's rate and the camera frames sampled for it.
pub type InputBlock = Block<VideoInput>;

/// The most of a turn's audio the end-of-turn model is shown (Smart Turn reads the last 8 s).
pub const END_OF_TURN_AUDIO: Duration = Duration::from_secs(8);

/// Settings of an [`InputStage`].
#[derive(Debug, Clone, PartialEq)]
pub struct InputConfig {
    pub blocks: BlockConfig,
    pub turn: TurnConfig,
    pub vad: VadConfig,
    /// Audio kept after the end of speech in the turn's last block (the VAD's own hangover
    /// already covers the decay of the last sound; this keeps a little more).
    pub post_roll: Duration,
    /// How long missing audio is waited for (out-of-order pieces, transport jitter) before the
    /// gap counts as silence, in media time behind the session clock. Audio that comes later
    /// is dropped, so this must exceed the transport's jitter; it is also how late blocks close
    /// and turns end when the microphone sends nothing (a dead device, Opus DTX in silence).
    /// Flowing audio is never held back by it.
    pub max_audio_delay: Duration,
    /// Timestamps closer than this to where the previous piece ended count as contiguous
    /// (capture clocks jitter); further apart is a gap or an overlap.
    pub timestamp_tolerance: Duration,
    /// How far ahead of the session clock a media timestamp may be before the input is
    /// re-timed: an audio piece is placed at the session clock (after the audio already
    /// taken, when that runs ahead), a camera frame at the session clock. Nothing is dropped
    /// for it: a transport whose first packet waited in a queue stamps every later one that
    /// much ahead, and the caller's words are still the caller's words.
    pub max_lead: Duration,
    /// Audio after a block's end that must be on the timeline before the block closes (it
    /// travels with the block: see [`Block::lookahead`]). The session sets it to the feature
    /// extractor's right context (`n_fft / 2` samples) so a block's audio is encoded at once.
    pub block_lookahead: Duration,
}

impl InputConfig {
    /// The settings of a session whose model expects `blocks`.
    pub fn new(blocks: BlockConfig, session: &SessionConfig) -> Self {
        Self {
            blocks,
            turn: session.turn.clone(),
            vad: session.vad.clone(),
            post_roll: Duration::from_millis(100),
            max_audio_delay: Duration::from_millis(150),
            timestamp_tolerance: Duration::from_millis(2),
            max_lead: Duration::from_secs(2),
            block_lookahead: Duration::ZERO,
        }
    }
}

/// Why the answer is to be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The user spoke over the answer.
    BargeIn,
    /// The client sent a stop control.
    Interrupt,
    /// The client typed a new message.
    TypedMessage,
}

/// What the input stage tells the Thinker side, in media-time order. Times are media times on
/// the session clock; `at` is when the decision was taken (the end of the VAD frame that
/// triggered it, or the session clock for controls).
#[derive(Debug, Clone)]
pub enum InputEvent {
    /// The smoothed VAD decision changed at the start of the frame at `at`.
    VoiceActivity { speech: bool, at: Duration },
    /// The state shown to clients changed.
    State { state: TurnState, at: Duration },
    /// Stop the answer to `turn` now (`None`: no answer was known to be running): cancel the
    /// Thinker/Talker work in flight and stop the pacer; keep in the context only what was
    /// heard. Comes before the `TurnStarted` of a barge-in.
    StopAnswer {
        turn: Option<u64>,
        reason: StopReason,
        at: Duration,
    },
    /// A spoken user turn started; its audio begins at `from` (pre-roll included). Its blocks
    /// follow as `Block` events, then `TurnEnded` or `TurnCancelled`.
    TurnStarted {
        turn: u64,
        from: Duration,
        at: Duration,
    },
    /// A full block of the open turn closed: prefill it.
    Block { turn: u64, block: InputBlock },
    /// The spoken turn ended: the speech stopped at `speech_end`, the end-of-turn rule decided
    /// at `decided_at`; its blocks tile `from..end` (`end` is `speech_end` + post-roll, or the
    /// end of the last full block if that closed later). Prefill `final_block` (the partial
    /// last block, flagged `last`; `None` when the turn ends on a block boundary) and answer.
    /// A `speculative` end is followed by `TurnConfirmed` (release the answer) or by
    /// `SpeculationDropped` (roll back to before this event: the turn goes on, its blocks
    /// held meanwhile follow).
    TurnEnded {
        turn: u64,
        from: Duration,
        speech_end: Duration,
        decided_at: Duration,
        end: Duration,
        final_block: Option<InputBlock>,
        /// Frames in all the turn's blocks (padding included).
        video_frames: usize,
        speculative: bool,
    },
    /// A speculative end of `turn` starts: what follows up to its `TurnEnded` (and the answer)
    /// is rolled back if it is dropped.
    SpeculationStarted { turn: u64, at: Duration },
    /// The speculative end of `turn` is confirmed at `at`.
    TurnConfirmed { turn: u64, at: Duration },
    /// The user went on speaking: the speculative answer to `turn` is dropped.
    SpeculationDropped { turn: u64, at: Duration },
    /// Ask the end-of-turn model about the open turn's audio so far (the last
    /// [`END_OF_TURN_AUDIO`] of it, at the model's rate); hand the probability to
    /// [`InputStage::end_of_turn_prediction`] with `pause`.
    PredictEndOfTurn {
        turn: u64,
        pause: u64,
        audio: Vec<f32>,
        at: Duration,
    },
    /// Speech over the answer to `turn`: stop playing it for now.
    AnswerPaused { turn: Option<u64>, at: Duration },
    /// It was not a barge-in: play the answer on from where it paused.
    AnswerResumed { turn: Option<u64>, at: Duration },
    /// The spoken turn is dropped (too little speech, or a typed message replaced it): discard
    /// what was prefilled of it.
    TurnCancelled { turn: u64, at: Duration },
    /// A typed user message: a whole turn on its own; answer it.
    TypedTurn {
        turn: u64,
        text: String,
        at: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("audio at {at:?}: {source}")]
    AudioRate {
        at: Duration,
        #[source]
        source: ResampleError,
    },
    #[error("audio at {at:?}: sample {index} is {value}, not a finite number")]
    NonFiniteAudio {
        at: Duration,
        index: usize,
        value: f32,
    },
    #[error("video frame at {at:?}: {width}x{height} RGB needs {expected} bytes, got {got}")]
    BadVideoFrame {
        at: Duration,
        width: usize,
        height: usize,
        expected: usize,
        got: usize,
    },
    #[error("typed message is empty")]
    EmptyText,
    #[error("VAD: {0}")]
    Vad(#[from] VadError),
    #[error("blocks: {0}")]
    Blocks(#[from] BlockConfigError),
    #[error("input settings: {0}")]
    Config(String),
}

/// Counters of what the stage saw, for logs, metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InputStats {
    /// Audio dropped because its stretch of the timeline was already written.
    pub late_audio: Duration,
    /// Gaps in the audio laid down as silence, and their total length.
    pub audio_gaps: u64,
    pub silence_filled: Duration,
    /// Changes of the input sample rate.
    pub rate_changes: u64,
    /// Audio pieces and camera frames stamped more than `max_lead` ahead of the session
    /// clock, placed at the clock instead (see [`InputConfig::max_lead`]).
    pub retimed_audio: u64,
    pub retimed_video_frames: u64,
    pub video_frames: u64,
    /// Frames dropped because they were too old to be shown by any block.
    pub late_video_frames: u64,
    pub vad_frames: u64,
    pub speech_frames: u64,
    pub turns_started: u64,
    pub turns_cancelled: u64,
    pub blocks: u64,
    pub barge_ins: u64,
    /// End-of-turn predictions asked for, answers started speculatively and dropped again.
    pub predictions: u64,
    pub speculations: u64,
    pub speculations_dropped: u64,
    /// Answers paused by speech over them, and resumed (not barge-ins).
    pub pauses: u64,
    pub resumes: u64,
}

/// One stretch of contiguous audio at one rate and its resampler.
struct AudioSegment {
    resampler: StreamResampler,
    rate: u32,
    /// Media time of its first input sample, and the timeline index of that time.
    origin: Duration,
    origin_index: u64,
    pushed: u64,
    emitted: u64,
}

impl AudioSegment {
    fn end(&self) -> Duration {
        self.origin + samples_to_duration(self.pushed, self.rate)
    }
}

struct OpenTurn {
    id: u64,
    from: Duration,
    assembler: BlockAssembler<VideoInput>,
    video_frames: usize,
    /// The last [`END_OF_TURN_AUDIO`] of its audio, for the end-of-turn model.
    recent: VecDeque<f32>,
    /// Blocks closed while a speculative end was under way: sent if it is dropped.
    held_blocks: Vec<InputBlock>,
    speculating: bool,
}

impl OpenTurn {
    fn hear(&mut self, samples: &[f32], keep: usize) {
        self.recent.extend(samples);
        let excess = self.recent.len().saturating_sub(keep);
        self.recent.drain(..excess);
    }
}

/// The input stage of one session; see the module doc.
pub struct InputStage {
    config: InputConfig,
    clock: Arc<dyn Clock>,
    rate: u32,
    // audio intake
    segment: Option<AudioSegment>,
    last_rate: Option<u32>,
    /// Pieces that wait for the audio before them, by media time (ns).
    pending: BTreeMap<u128, AudioInput>,
    /// Input media time up to which audio is on its way to the timeline (or filled).
    committed_until: Duration,
    // the timeline at the model's rate
    written: u64,
    vad: VoiceDetector,
    speech: bool,
    history: VecDeque<f32>,
    history_start: u64,
    history_samples: usize,
    /// Recent frames, newest per quarter of a sampled frame period (bucket index → frame).
    frames: BTreeMap<u64, VideoInput>,
    history_len: Duration,
    // turns
    turns: TurnTaking,
    open: Option<OpenTurn>,
    next_turn: u64,
    answering: Option<u64>,
    stats: InputStats,
}

impl InputStage {
    pub fn new(config: InputConfig, clock: Arc<dyn Clock>) -> Result<Self, InputError> {
        config.blocks.validate()?;
        let rate = config.blocks.sample_rate;
        let vad = VoiceDetector::new(config.vad.clone(), rate, Duration::ZERO)?;
        if config.max_audio_delay > Duration::from_secs(5) {
            return Err(InputError::Config(format!(
                "max_audio_delay {:?} is over 5 s: turns would end that late",
                config.max_audio_delay
            )));
        }
        // Enough for the pre-roll of a turn decided after the longest onset and the smoothing.
        config.turn.validate().map_err(InputError::Config)?;
        let history_len = config.turn.lookback()
            + config.vad.frame * (config.vad.smoothing_frames as u32 + 2)
            + Duration::from_millis(500);
        let history_samples = duration_to_samples(history_len, rate) as usize;
        Ok(Self {
            turns: TurnTaking::new(config.turn.clone()),
            config,
            clock,
            rate,
            segment: None,
            last_rate: None,
            pending: BTreeMap::new(),
            committed_until: Duration::ZERO,
            written: 0,
            vad,
            speech: false,
            history: VecDeque::with_capacity(history_samples),
            history_start: 0,
            history_samples,
            frames: BTreeMap::new(),
            history_len,
            open: None,
            next_turn: 1,
            answering: None,
            stats: InputStats::default(),
        })
    }

    pub fn config(&self) -> &InputConfig {
        &self.config
    }

    pub fn stats(&self) -> InputStats {
        self.stats
    }

    pub fn state(&self) -> TurnState {
        self.turns.state()
    }

    /// Media time up to which audio has been through the VAD.
    pub fn position(&self) -> Duration {
        samples_to_duration(self.written, self.rate)
    }

    /// The open spoken turn, if any.
    pub fn open_turn(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.id)
    }

    /// The turn whose answer is expected or running, if any.
    pub fn answering(&self) -> Option<u64> {
        self.answering
    }

    /// Takes a piece of microphone audio. A refused piece changes nothing.
    pub fn push_audio(&mut self, mut input: AudioInput) -> Result<Vec<InputEvent>, InputError> {
        let mut events = Vec::new();
        if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&input.sample_rate) {
            return Err(InputError::AudioRate {
                at: input.at,
                source: ResampleError::Rate(input.sample_rate),
            });
        }
        if let Some((index, &value)) = input
            .samples
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_finite())
        {
            return Err(InputError::NonFiniteAudio {
                at: input.at,
                index,
                value,
            });
        }
        if input.samples.is_empty() {
            return Ok(events);
        }
        if self.too_far_ahead(input.at) {
            input.at = self.clock.now().max(self.audio_end());
            self.stats.retimed_audio += 1;
        }
        let length = samples_to_duration(input.samples.len() as u64, input.sample_rate);
        if input.at + length <= self.committed_until {
            self.stats.late_audio += length;
            return Ok(events);
        }
        match self.pending.entry(input.at.as_nanos()) {
            std::collections::btree_map::Entry::Occupied(_) => {
                // the same stretch twice (a retransmission): the first one stands
                self.stats.late_audio += length;
                return Ok(events);
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(input);
            }
        }
        self.drain_pending(None, &mut events)?;
        Ok(events)
    }

    /// Takes a camera frame. A refused frame changes nothing.
    pub fn push_video(&mut self, mut frame: VideoInput) -> Result<Vec<InputEvent>, InputError> {
        let expected = frame
            .width
            .checked_mul(frame.height)
            .and_then(|p| p.checked_mul(3))
            .unwrap_or(usize::MAX);
        if frame.width == 0 || frame.height == 0 || frame.rgb.len() != expected {
            return Err(InputError::BadVideoFrame {
                at: frame.at,
                width: frame.width,
                height: frame.height,
                expected,
                got: frame.rgb.len(),
            });
        }
        if self.too_far_ahead(frame.at) {
            frame.at = self.clock.now();
            self.stats.retimed_video_frames += 1;
        }
        self.stats.video_frames += 1;
        let kept_for_history = self.remember_frame(&frame);
        let kept_for_turn = match self.open.as_mut() {
            Some(open) => open.assembler.push_video(frame.at, frame),
            None => false,
        };
        if !kept_for_history && !kept_for_turn {
            self.stats.late_video_frames += 1;
        }
        Ok(Vec::new())
    }

    /// Moves media time on when audio is missing: whatever has not arrived by
    /// `now - max_audio_delay` is silence from then on. Call it every 10-50 ms.
    pub fn tick(&mut self) -> Result<Vec<InputEvent>, InputError> {
        let mut events = Vec::new();
        let deadline = self.clock.now().saturating_sub(self.config.max_audio_delay);
        if deadline > self.committed_until {
            self.drain_pending(Some(deadline), &mut events)?;
        }
        if deadline > self.committed_until {
            self.end_segment(&mut events)?;
            self.stats.audio_gaps += 1;
            self.stats.silence_filled += deadline - self.committed_until;
            self.committed_until = deadline;
            let target = duration_to_samples(deadline, self.rate);
            if target > self.written {
                self.process_silence(target - self.written, &mut events)?;
            }
        }
        Ok(events)
    }

    /// The first frame of the answer to `turn` was released to the user.
    pub fn answer_audible(&mut self, turn: u64) -> Vec<InputEvent> {
        let mut events = Vec::new();
        if self.answering == Some(turn) {
            let at = self.clock.now();
            // (only a state change can follow: the reason is never used)
            for action in self.turns.on(TurnInput::AnswerAudible) {
                self.act(action, at, StopReason::Interrupt, &mut events);
            }
        }
        events
    }

    /// The answer to `turn` is complete and played out. Reports about an answer that was
    /// stopped or replaced meanwhile are ignored.
    pub fn answer_finished(&mut self, turn: u64) -> Vec<InputEvent> {
        let mut events = Vec::new();
        if self.answering == Some(turn) {
            self.answering = None;
            let at = self.clock.now();
            for action in self.turns.on(TurnInput::AnswerFinished) {
                self.act(action, at, StopReason::Interrupt, &mut events);
            }
        }
        events
    }

    /// The client's stop control: the answer stops, no user turn starts.
    pub fn interrupt(&mut self) -> Vec<InputEvent> {
        let mut events = Vec::new();
        let at = self.clock.now();
        for action in self.turns.on(TurnInput::Stop) {
            self.act(action, at, StopReason::Interrupt, &mut events);
        }
        events
    }

    /// A typed user message: it stops a running answer, replaces an open spoken turn, and is
    /// a turn of its own.
    pub fn typed_text(&mut self, text: String) -> Result<Vec<InputEvent>, InputError> {
        if text.trim().is_empty() {
            return Err(InputError::EmptyText);
        }
        let mut events = Vec::new();
        let at = self.clock.now();
        let mut states = Vec::new();
        for action in self.turns.on(TurnInput::TypedMessage) {
            match action {
                TurnAction::State(_) => states.push(action),
                other => self.act(other, at, StopReason::TypedMessage, &mut events),
            }
        }
        let turn = self.next_turn;
        self.next_turn += 1;
        self.answering = Some(turn);
        events.push(InputEvent::TypedTurn { turn, text, at });
        for action in states {
            self.act(action, at, StopReason::TypedMessage, &mut events);
        }
        Ok(events)
    }

    fn too_far_ahead(&self, at: Duration) -> bool {
        at > self.clock.now() + self.config.max_lead
    }

    /// Media time where the audio taken so far ends (on the timeline or waiting for a gap).
    fn audio_end(&self) -> Duration {
        let waiting = self
            .pending
            .values()
            .map(|p| p.at + samples_to_duration(p.samples.len() as u64, p.sample_rate))
            .max()
            .unwrap_or_default();
        self.committed_until.max(waiting)
    }

    /// Commits waiting pieces in order: each one that continues the audio, or that waited
    /// long enough (more than `max_audio_delay` of audio after the gap, or media time past
    /// `deadline`), with the gap before it as silence.
    fn drain_pending(
        &mut self,
        deadline: Option<Duration>,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        while let Some(first) = self.pending.values().next() {
            let contiguous = first.at <= self.committed_until + self.config.timestamp_tolerance;
            let newest_end = self
                .pending
                .values()
                .next_back()
                .map(|p| p.at + samples_to_duration(p.samples.len() as u64, p.sample_rate))
                .unwrap_or_default();
            let waited =
                newest_end.saturating_sub(self.committed_until) > self.config.max_audio_delay;
            let overdue = deadline.is_some_and(|d| first.at <= d);
            if !(contiguous || waited || overdue) {
                break;
            }
            let (_, piece) = self.pending.pop_first().expect("a first piece");
            self.commit(piece, events)?;
        }
        Ok(())
    }

    fn commit(
        &mut self,
        piece: AudioInput,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        let tolerance = self.config.timestamp_tolerance;
        let mut samples = &piece.samples[..];
        let mut at = piece.at;
        if at + tolerance < self.committed_until {
            // The start overlaps audio already on its way: keep only what is new.
            let skip = (duration_to_samples(self.committed_until - at, piece.sample_rate) as usize)
                .min(samples.len());
            self.stats.late_audio += samples_to_duration(skip as u64, piece.sample_rate);
            samples = &samples[skip..];
            at = self.committed_until;
            if samples.is_empty() {
                return Ok(());
            }
        }
        let contiguous = at <= self.committed_until + tolerance;
        let same_rate = self
            .segment
            .as_ref()
            .is_some_and(|s| s.rate == piece.sample_rate);
        if !(contiguous && same_rate) {
            self.end_segment(events)?;
            if self.last_rate.is_some_and(|r| r != piece.sample_rate) {
                self.stats.rate_changes += 1;
            }
            let origin = if contiguous {
                self.committed_until
            } else {
                self.stats.audio_gaps += 1;
                self.stats.silence_filled += at - self.committed_until;
                at
            };
            let resampler = StreamResampler::new(piece.sample_rate, self.rate)
                .map_err(|source| InputError::AudioRate { at, source })?;
            self.last_rate = Some(piece.sample_rate);
            self.segment = Some(AudioSegment {
                resampler,
                rate: piece.sample_rate,
                origin,
                origin_index: duration_to_samples(origin, self.rate),
                pushed: 0,
                emitted: 0,
            });
        }
        let segment = self.segment.as_mut().expect("an open segment");
        let out = segment
            .resampler
            .push(samples)
            .map_err(|source| InputError::AudioRate { at, source })?;
        segment.pushed += samples.len() as u64;
        let start = segment.origin_index + segment.emitted;
        segment.emitted += out.len() as u64;
        self.committed_until = segment.end();
        self.write_timeline(start, &out, events)
    }

    /// Ends the current stretch of audio: the resampler's tail goes on the timeline.
    fn end_segment(&mut self, events: &mut Vec<InputEvent>) -> Result<(), InputError> {
        if let Some(mut segment) = self.segment.take() {
            let at = segment.end();
            let out = segment
                .resampler
                .flush()
                .map_err(|source| InputError::AudioRate { at, source })?;
            let start = segment.origin_index + segment.emitted;
            self.write_timeline(start, &out, events)?;
        }
        Ok(())
    }

    /// Lays `samples` on the timeline at index `start`: a hole before them is silence, a part
    /// already written is skipped.
    fn write_timeline(
        &mut self,
        start: u64,
        samples: &[f32],
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        if start > self.written {
            self.process_silence(start - self.written, events)?;
        }
        let skip = (self.written.saturating_sub(start) as usize).min(samples.len());
        self.process(&samples[skip..], events)
    }

    fn process_silence(
        &mut self,
        count: u64,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        let zeros = vec![0.0; self.vad.frame_samples()];
        let mut left = count;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            self.process(&zeros[..n], events)?;
            left -= n as u64;
        }
        Ok(())
    }

    /// The timeline: history, open turn, VAD and turn decisions, one VAD frame at a time.
    fn process(
        &mut self,
        mut samples: &[f32],
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        let frame = self.vad.frame_samples() as u64;
        while !samples.is_empty() {
            let room = (frame - self.written % frame) as usize;
            let (piece, rest) = samples.split_at(room.min(samples.len()));
            samples = rest;
            let at = samples_to_duration(self.written, self.rate);
            self.history.extend(piece);
            let excess = self.history.len().saturating_sub(self.history_samples);
            self.history.drain(..excess);
            self.history_start += excess as u64;
            let keep = duration_to_samples(END_OF_TURN_AUDIO, self.rate) as usize;
            if let Some(open) = self.open.as_mut() {
                open.assembler.push_audio(at, piece);
                open.hear(piece, keep);
            }
            self.written += piece.len() as u64;
            self.close_blocks(events);
            for decision in self.vad.push(piece) {
                self.on_decision(decision, events)?;
            }
        }
        self.prune_frames();
        Ok(())
    }

    fn close_blocks(&mut self, events: &mut Vec<InputEvent>) {
        let now = samples_to_duration(self.written, self.rate);
        if let Some(open) = self.open.as_mut() {
            for block in open.assembler.advance_to(now) {
                open.video_frames += block.frames.len();
                self.stats.blocks += 1;
                if open.speculating {
                    open.held_blocks.push(block);
                } else {
                    events.push(InputEvent::Block {
                        turn: open.id,
                        block,
                    });
                }
            }
        }
    }

    fn on_decision(
        &mut self,
        decision: VadDecision,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        self.stats.vad_frames += 1;
        if decision.speech {
            self.stats.speech_frames += 1;
        }
        if decision.speech != self.speech {
            self.speech = decision.speech;
            events.push(InputEvent::VoiceActivity {
                speech: decision.speech,
                at: decision.at,
            });
        }
        let actions = self.turns.on(TurnInput::Voice {
            speech: decision.speech,
            at: decision.at,
            frame: decision.duration,
        });
        self.act_all(actions, decision.end(), StopReason::BargeIn, events)
    }

    fn act_all(
        &mut self,
        actions: Vec<TurnAction>,
        at: Duration,
        reason: StopReason,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        for action in actions {
            if let TurnAction::StartUserTurn { from } = action {
                self.start_turn(from, at, events)?;
            } else {
                self.act(action, at, reason, events);
            }
        }
        Ok(())
    }

    /// The end-of-turn model's answer for `pause` (asked by a `PredictEndOfTurn` event).
    pub fn end_of_turn_prediction(
        &mut self,
        pause: u64,
        probability: f32,
    ) -> Result<Vec<InputEvent>, InputError> {
        let mut events = Vec::new();
        let actions = self
            .turns
            .on(TurnInput::EndOfTurnPrediction { pause, probability });
        let at = self.position();
        self.act_all(actions, at, StopReason::BargeIn, &mut events)?;
        Ok(events)
    }

    /// Carries out what the turn machine decided (all but starting a turn).
    fn act(
        &mut self,
        action: TurnAction,
        at: Duration,
        reason: StopReason,
        events: &mut Vec<InputEvent>,
    ) {
        match action {
            TurnAction::StartUserTurn { .. } => {}
            TurnAction::StopAnswer => {
                if reason == StopReason::BargeIn {
                    self.stats.barge_ins += 1;
                }
                events.push(InputEvent::StopAnswer {
                    turn: self.answering.take(),
                    reason,
                    at,
                });
            }
            TurnAction::CancelUserTurn => {
                if let Some(open) = self.open.take() {
                    self.stats.turns_cancelled += 1;
                    events.push(InputEvent::TurnCancelled { turn: open.id, at });
                }
            }
            TurnAction::EndUserTurn {
                speech_end,
                decided_at,
            } => self.end_turn(speech_end, decided_at, false, events),
            TurnAction::SpeculateEndOfTurn {
                speech_end,
                decided_at,
            } => self.end_turn(speech_end, decided_at, true, events),
            TurnAction::ConfirmEndOfTurn { at } => {
                if let Some(open) = self.open.take() {
                    self.answering = Some(open.id);
                    events.push(InputEvent::TurnConfirmed { turn: open.id, at });
                }
            }
            TurnAction::DropSpeculation => {
                if let Some(open) = self.open.as_mut() {
                    self.stats.speculations_dropped += 1;
                    open.speculating = false;
                    events.push(InputEvent::SpeculationDropped { turn: open.id, at });
                    for block in open.held_blocks.drain(..) {
                        events.push(InputEvent::Block {
                            turn: open.id,
                            block,
                        });
                    }
                }
            }
            TurnAction::PredictEndOfTurn { pause } => {
                if let Some(open) = self.open.as_ref() {
                    self.stats.predictions += 1;
                    events.push(InputEvent::PredictEndOfTurn {
                        turn: open.id,
                        pause,
                        audio: open.recent.iter().copied().collect(),
                        at,
                    });
                }
            }
            TurnAction::PauseAnswer => {
                self.stats.pauses += 1;
                events.push(InputEvent::AnswerPaused {
                    turn: self.answering,
                    at,
                });
            }
            TurnAction::ResumeAnswer => {
                self.stats.resumes += 1;
                events.push(InputEvent::AnswerResumed {
                    turn: self.answering,
                    at,
                });
            }
            TurnAction::State(state) => events.push(InputEvent::State { state, at }),
        }
    }

    fn start_turn(
        &mut self,
        from: Duration,
        at: Duration,
        events: &mut Vec<InputEvent>,
    ) -> Result<(), InputError> {
        let id = self.next_turn;
        self.next_turn += 1;
        self.stats.turns_started += 1;
        // on the timeline's sample grid, so that the history lands on whole samples
        let from = samples_to_duration(duration_to_samples(from, self.rate), self.rate);
        let mut assembler = BlockAssembler::with_lookahead(
            self.config.blocks.clone(),
            from,
            self.config.block_lookahead,
        )?;
        let first = duration_to_samples(from, self.rate).max(self.history_start);
        let mut recent = VecDeque::new();
        if first < self.written {
            let offset = (first - self.history_start) as usize;
            let audio = self.history.make_contiguous();
            assembler.push_audio(samples_to_duration(first, self.rate), &audio[offset..]);
            recent.extend(&audio[offset..]);
        }
        for frame in self.frames.values() {
            assembler.push_video(frame.at, frame.clone());
        }
        events.push(InputEvent::TurnStarted { turn: id, from, at });
        self.open = Some(OpenTurn {
            id,
            from,
            assembler,
            video_frames: 0,
            recent,
            held_blocks: Vec::new(),
            speculating: false,
        });
        self.close_blocks(events);
        Ok(())
    }

    /// Ends the open turn; a `speculative` end finishes a copy of its blocks and leaves it
    /// open (its later blocks held) until the end is confirmed or dropped.
    fn end_turn(
        &mut self,
        speech_end: Duration,
        decided_at: Duration,
        speculative: bool,
        events: &mut Vec<InputEvent>,
    ) {
        let open = if speculative {
            match self.open.as_mut() {
                Some(open) => {
                    self.stats.speculations += 1;
                    open.speculating = true;
                    events.push(InputEvent::SpeculationStarted {
                        turn: open.id,
                        at: decided_at,
                    });
                    OpenTurn {
                        assembler: open.assembler.clone(),
                        recent: VecDeque::new(),
                        held_blocks: Vec::new(),
                        ..*open
                    }
                }
                None => return,
            }
        } else {
            match self.open.take() {
                Some(open) => open,
                None => return,
            }
        };
        // A block that closed between the end of speech and the decision stays whole.
        let end = (speech_end + self.config.post_roll)
            .min(decided_at)
            .max(open.assembler.open_block_start());
        let mut blocks = open.assembler.finish(end);
        let final_block = blocks.pop();
        let mut video_frames = open.video_frames;
        for block in blocks {
            video_frames += block.frames.len();
            if !speculative {
                self.stats.blocks += 1;
            }
            events.push(InputEvent::Block {
                turn: open.id,
                block,
            });
        }
        if let Some(block) = &final_block {
            video_frames += block.frames.len();
            self.stats.blocks += 1;
        }
        if !speculative {
            self.answering = Some(open.id);
        }
        events.push(InputEvent::TurnEnded {
            turn: open.id,
            from: open.from,
            speech_end,
            decided_at,
            end,
            final_block,
            video_frames,
            speculative,
        });
    }

    /// Keeps a frame for the pre-roll of a turn that may start soon: the newest per quarter of
    /// the sampled frame period. Returns false if it is too old to matter.
    fn remember_frame(&mut self, frame: &VideoInput) -> bool {
        let bucket = (frame.at.as_secs_f64() * self.config.blocks.video_fps * 4.0) as u64;
        let horizon = self.position().saturating_sub(self.history_len);
        let newest = self.frames.values().next_back().map(|f| f.at);
        // Older than the horizon: only the newest picture so far is worth keeping (what a
        // frozen camera still shows).
        if frame.at < horizon && newest.is_some_and(|t| t >= frame.at) {
            return false;
        }
        match self.frames.get(&bucket) {
            Some(kept) if kept.at > frame.at => false,
            _ => {
                self.frames.insert(bucket, frame.clone());
                self.prune_frames();
                true
            }
        }
    }

    /// Drops frames older than the history, keeping the newest of them.
    fn prune_frames(&mut self) {
        let horizon = self.position().saturating_sub(self.history_len);
        while self.frames.len() > 1 {
            let mut two = self.frames.iter();
            let (&oldest, _) = two.next().expect("two frames");
            let (_, second) = two.next().expect("two frames");
            if second.at <= horizon {
                self.frames.remove(&oldest);
            } else {
                break;
            }
        }
    }
}

fn samples_to_duration(samples: u64, rate: u32) -> Duration {
    Duration::from_nanos((samples as u128 * 1_000_000_000 / rate as u128) as u64)
}

/// The sample index of media time `t` at `rate`, rounded to the nearest.
fn duration_to_samples(t: Duration, rate: u32) -> u64 {
    ((t.as_nanos() * rate as u128 + 500_000_000) / 1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::clock::SimulatedClock;

    fn config() -> InputConfig {
        let blocks = BlockConfig {
            sample_rate: 16_000,
            block_len: Duration::from_secs(2),
            video_fps: 2.0,
            temporal_patch_size: 2,
        };
        InputConfig::new(blocks, &SessionConfig::default())
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_stage_can_move_to_the_sessions_input_thread() {
        fn send<T: Send>() {}
        send::<InputStage>();
        send::<InputEvent>();
    }

    #[test]
    fn samples_and_media_time_round_trip() {
        for rate in [8_000, 16_000, 44_100, 48_000] {
            for i in [0u64, 1, 159, 160, 44_099, 1_000_003] {
                assert_eq!(duration_to_samples(samples_to_duration(i, rate), rate), i);
            }
        }
        assert_eq!(duration_to_samples(ms(20), 16_000), 320);
        assert_eq!(samples_to_duration(16_000 * 3, 16_000), ms(3000));
    }

    #[test]
    fn without_a_microphone_time_still_moves_and_nothing_is_a_turn() {
        let clock = Arc::new(SimulatedClock::new());
        let mut stage = InputStage::new(config(), clock.clone()).unwrap();
        let mut events = Vec::new();
        for _ in 0..100 {
            clock.advance(ms(20));
            events.extend(stage.tick().unwrap());
        }
        assert!(events.is_empty(), "{events:?}");
        let delay = stage.config().max_audio_delay;
        // the timeline follows the clock, `max_audio_delay` behind it
        assert_eq!(stage.position(), ms(2000) - delay);
        assert_eq!(
            stage.stats().vad_frames,
            ((ms(2000) - delay).as_millis() / stage.config().vad.frame.as_millis()) as u64
        );
        assert_eq!(stage.stats().speech_frames, 0);
    }

    #[test]
    fn a_fast_camera_costs_a_bounded_history() {
        let clock = Arc::new(SimulatedClock::new());
        let config = config();
        let fps = config.blocks.video_fps;
        let mut stage = InputStage::new(config, clock.clone()).unwrap();
        let picture = Arc::new(vec![0u8; 8 * 8 * 3]);
        let mut most = 0;
        for k in 0..600u64 {
            // 60 fps for 10 s, audio silent
            let at = Duration::from_nanos(k * 1_000_000_000 / 60);
            clock.set(at + ms(17));
            stage
                .push_video(VideoInput {
                    at,
                    width: 8,
                    height: 8,
                    rgb: picture.clone(),
                })
                .unwrap();
            stage.tick().unwrap();
            most = most.max(stage.frames.len());
        }
        // frames run ahead of the audio timeline by up to max_audio_delay
        let span = stage.history_len + stage.config().max_audio_delay;
        let bound = (span.as_secs_f64() * fps * 4.0).ceil() as usize + 2;
        assert!(most <= bound, "{most} frames held, bound {bound}");
        assert_eq!(stage.stats().late_video_frames, 0);
        // a frame from long ago is not kept
        stage
            .push_video(VideoInput {
                at: ms(100),
                width: 8,
                height: 8,
                rgb: picture,
            })
            .unwrap();
        assert_eq!(stage.stats().late_video_frames, 1);
    }

    #[test]
    fn an_answer_report_for_another_turn_is_ignored() {
        let clock = Arc::new(SimulatedClock::new());
        let mut stage = InputStage::new(config(), clock).unwrap();
        stage.typed_text("first".into()).unwrap();
        assert_eq!(stage.answering(), Some(1));
        assert!(stage.answer_audible(7).is_empty());
        assert!(stage.answer_finished(7).is_empty());
        assert_eq!(stage.state(), TurnState::Thinking);
        // a second message replaces the first answer
        let events = stage.typed_text("second".into()).unwrap();
        assert!(matches!(
            events[0],
            InputEvent::StopAnswer {
                turn: Some(1),
                reason: StopReason::TypedMessage,
                ..
            }
        ));
        assert!(stage.answer_finished(1).is_empty(), "stale report");
        assert_eq!(stage.answer_finished(2).len(), 1);
        assert_eq!(stage.state(), TurnState::Listening);
    }
}
