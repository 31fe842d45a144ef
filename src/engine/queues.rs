//! The two channels between a transport and its session, their bounds and what is shed when
//! the session falls behind.
//!
//! # Input policy
//!
//! The transport's inputs (audio pieces, camera frames, controls) wait in one bounded queue of
//! [`INPUT_QUEUE`] messages, in the order they were sent, until the session's control thread
//! takes them. Audio is what the user said and is never given up for being late; camera
//! frames only refresh a picture. So, by depth of the queue:
//!
//! 1. below [`SHED_VIDEO_DEPTH`] messages (about 1 s of 20-ms audio pieces: a debug build
//!    on busy cores stalls that long) everything is queued;
//! 2. from there on the session is behind: **camera frames are shed** (not queued), audio and
//!    controls still are;
//! 3. only a queue full of [`INPUT_QUEUE`] messages (about 80 s of audio the session has not
//!    taken: it is stuck) sheds audio and controls as well.
//!
//! Whatever is shed is counted ([`QueueStats`]) and the session says so to its user: an
//! `Error` event naming what was shed, at most once per [`SHED_REPORT_INTERVAL`] of session
//! time (the control thread sends it at its next tick).
//!
//! Events to the transport wait in a queue of [`EVENT_QUEUE`] events (over ten minutes of
//! 20-ms voice frames): a transport that stops reading its events altogether loses the
//! newest ones, counted, rather than stalling its session.
//!
//! # The channels between the session's threads
//!
//! Every one is bounded too. The control thread never waits on one (it takes the user's input,
//! and it is what the others' waits end on): what it sends, it offers ([`THINKER_QUEUE`]: a
//! Thinker that far behind cannot serve the call in real time, and the session ends with an
//! error saying so; end-of-turn questions past [`PREDICTION_QUEUE`] go unanswered and the
//! silence rule decides; ticks past [`TICK_QUEUE`] are coalesced). Everyone else may wait on a
//! full channel (backpressure), as no wait cycle can close without the control thread. The
//! depths of the model's channels are in [`QueueStats`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

/// Most inputs waiting for a session (about 80 s of 20-ms audio pieces).
pub const INPUT_QUEUE: usize = 4096;
/// Inputs waiting beyond which the session is behind and camera frames are shed.
pub const SHED_VIDEO_DEPTH: usize = 50;
/// Most events waiting for a transport.
pub const EVENT_QUEUE: usize = 32_768;
/// Shedding is reported at most this often (session time).
pub const SHED_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Most messages waiting for the Thinker (a block is one message: over half an hour of speech).
pub const THINKER_QUEUE: usize = 1024;
/// Most reports waiting for the control thread.
pub const REPORT_QUEUE: usize = 64;
/// Most messages waiting for the Talker (rows of the answers and mirrored prefills).
pub const TALKER_QUEUE: usize = 4096;
/// Most messages waiting for the vocoder.
pub const VOCODER_QUEUE: usize = 1024;
/// Most pacer messages waiting for the control thread: two per answer (its first frame, its
/// end), and a next answer starts only from the control thread.
pub const PACER_QUEUE: usize = 16;
/// Most ticks waiting (more are coalesced: a tick only says time went on).
pub const TICK_QUEUE: usize = 4;
/// Most end-of-turn questions and answers waiting (the model takes the newest question).
pub const PREDICTION_QUEUE: usize = 8;

/// Reads the depth of one channel between a session's threads.
pub(crate) type DepthReader = Arc<dyn Fn() -> usize + Send + Sync>;

/// A reader of `rx`'s depth.
pub(crate) fn depth_of<T: Send + 'static>(rx: &Receiver<T>) -> DepthReader {
    let rx = rx.clone();
    Arc::new(move || rx.len())
}

/// The depths of the model's channels in one session (`None`: a model without a Talker).
#[derive(Clone, Default)]
pub(crate) struct ModelQueues {
    pub thinker: Option<DepthReader>,
    pub talker: Option<DepthReader>,
    pub vocoder: Option<DepthReader>,
}

impl std::fmt::Debug for ModelQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let depth = |d: &Option<DepthReader>| d.as_ref().map(|d| d());
        f.debug_struct("ModelQueues")
            .field("thinker", &depth(&self.thinker))
            .field("talker", &depth(&self.talker))
            .field("vocoder", &depth(&self.vocoder))
            .finish()
    }
}

/// What was shed and re-timed so far in one session, shared by its handle (which sheds) and
/// its control thread (which re-times, reports, and reads `closing`).
#[derive(Debug, Default)]
pub struct QueueCounters {
    shed_video_frames: AtomicU64,
    shed_audio_pieces: AtomicU64,
    shed_audio_ns: AtomicU64,
    shed_controls: AtomicU64,
    retimed_audio: AtomicU64,
    retimed_video_frames: AtomicU64,
    dropped_events: AtomicU64,
    /// Set by [`QueueCounters::close`]: the session ends even if its queue is full.
    closing: AtomicBool,
}

/// The depth of a session's queues now and the counts of what was shed and re-timed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Inputs waiting for the session, events waiting for the transport.
    pub input_depth: usize,
    pub event_depth: usize,
    /// Messages waiting for the Thinker, the Talker and the vocoder.
    pub thinker_depth: usize,
    pub talker_depth: usize,
    pub vocoder_depth: usize,
    pub shed_video_frames: u64,
    pub shed_audio_pieces: u64,
    pub shed_audio: Duration,
    pub shed_controls: u64,
    /// Audio pieces and camera frames placed at the session clock (their stamps ran ahead).
    pub retimed_audio: u64,
    pub retimed_video_frames: u64,
    /// Events lost because the transport did not read them.
    pub dropped_events: u64,
}

/// What a kind of input costs when it cannot be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputKind {
    Video,
    Audio(Duration),
    Control,
}

/// Why an input was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotQueued {
    Shed,
    SessionEnded,
}

impl QueueCounters {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queues `message` on `input` by the input policy (see the module doc).
    pub(crate) fn offer<T>(
        &self,
        input: &Sender<T>,
        kind: InputKind,
        message: T,
    ) -> Result<(), NotQueued> {
        if kind == InputKind::Video && input.len() >= SHED_VIDEO_DEPTH {
            self.shed(kind);
            return Err(NotQueued::Shed);
        }
        match input.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.shed(kind);
                Err(NotQueued::Shed)
            }
            Err(TrySendError::Disconnected(_)) => Err(NotQueued::SessionEnded),
        }
    }

    fn shed(&self, kind: InputKind) {
        match kind {
            InputKind::Video => &self.shed_video_frames,
            InputKind::Audio(length) => {
                self.shed_audio_ns
                    .fetch_add(length.as_nanos() as u64, Ordering::Relaxed);
                &self.shed_audio_pieces
            }
            InputKind::Control => &self.shed_controls,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `event` to the transport unless its queue is full (then it is counted).
    pub(crate) fn deliver<T>(&self, events: &Sender<T>, event: T) {
        if let Err(TrySendError::Full(_)) = events.try_send(event) {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The input stage's counts of re-timed media.
    pub(crate) fn set_retimed(&self, audio: u64, video_frames: u64) {
        self.retimed_audio.store(audio, Ordering::Relaxed);
        self.retimed_video_frames
            .store(video_frames, Ordering::Relaxed);
    }

    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The counts now, with the queues' depths.
    pub(crate) fn stats<I, E>(
        &self,
        input: &Sender<I>,
        events: &Receiver<E>,
        model: &ModelQueues,
    ) -> QueueStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let depth = |d: &Option<DepthReader>| d.as_ref().map_or(0, |d| d());
        QueueStats {
            input_depth: input.len(),
            event_depth: events.len(),
            thinker_depth: depth(&model.thinker),
            talker_depth: depth(&model.talker),
            vocoder_depth: depth(&model.vocoder),
            shed_video_frames: get(&self.shed_video_frames),
            shed_audio_pieces: get(&self.shed_audio_pieces),
            shed_audio: Duration::from_nanos(get(&self.shed_audio_ns)),
            shed_controls: get(&self.shed_controls),
            retimed_audio: get(&self.retimed_audio),
            retimed_video_frames: get(&self.retimed_video_frames),
            dropped_events: get(&self.dropped_events),
        }
    }
}

/// Both ends of a channel.
pub(crate) type Channel<T> = (Sender<T>, Receiver<T>);

/// The bounded channels of a new session: inputs (transport to session), events (session to
/// transport).
pub(crate) fn session_channels<I, E>() -> (Channel<I>, Channel<E>) {
    (bounded(INPUT_QUEUE), bounded(EVENT_QUEUE))
}

/// The control thread's side of shedding: an `Error` event when more was shed since the last
/// one, at most once per [`SHED_REPORT_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct ShedReporter {
    reported: (u64, u64, u64),
    last_report: Option<Duration>,
}

impl ShedReporter {
    /// The message to send at session time `now`, if any.
    pub fn report(&mut self, counters: &QueueCounters, now: Duration) -> Option<String> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let shed = (
            get(&counters.shed_video_frames),
            get(&counters.shed_audio_pieces),
            get(&counters.shed_controls),
        );
        if shed == self.reported
            || self
                .last_report
                .is_some_and(|t| now.saturating_sub(t) < SHED_REPORT_INTERVAL)
        {
            return None;
        }
        let (video, audio, controls) = (
            shed.0 - self.reported.0,
            shed.1 - self.reported.1,
            shed.2 - self.reported.2,
        );
        self.reported = shed;
        self.last_report = Some(now);
        let mut what = Vec::new();
        if video > 0 {
            what.push(format!("{video} camera frame{}", plural(video)));
        }
        if audio > 0 {
            what.push(format!("{audio} audio piece{}", plural(audio)));
        }
        if controls > 0 {
            what.push(format!("{controls} control message{}", plural(controls)));
        }
        Some(format!(
            "the session is behind its input: shed {} (camera frames go first, then audio)",
            what.join(", ")
        ))
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn camera_frames_are_shed_before_any_audio() {
        let counters = QueueCounters::new();
        let ((tx, rx), _) = session_channels::<u32, ()>();
        for i in 0..SHED_VIDEO_DEPTH as u32 {
            assert_eq!(counters.offer(&tx, InputKind::Audio(ms(20)), i), Ok(()));
        }
        // behind: the frame is shed, audio and controls still go in
        assert_eq!(
            counters.offer(&tx, InputKind::Video, 99),
            Err(NotQueued::Shed)
        );
        assert_eq!(counters.offer(&tx, InputKind::Audio(ms(20)), 100), Ok(()));
        assert_eq!(counters.offer(&tx, InputKind::Control, 101), Ok(()));
        // until the queue is full: then audio is shed too
        while tx.len() < INPUT_QUEUE {
            counters.offer(&tx, InputKind::Audio(ms(20)), 0).unwrap();
        }
        assert_eq!(
            counters.offer(&tx, InputKind::Audio(ms(20)), 0),
            Err(NotQueued::Shed)
        );
        let stats = counters.stats(
            &tx,
            &crossbeam_channel::never::<()>(),
            &ModelQueues::default(),
        );
        assert_eq!(stats.input_depth, INPUT_QUEUE);
        assert_eq!(stats.shed_video_frames, 1);
        assert_eq!((stats.shed_audio_pieces, stats.shed_audio), (1, ms(20)));
        // caught up: frames go in again
        for _ in 0..INPUT_QUEUE {
            rx.recv().unwrap();
        }
        assert_eq!(counters.offer(&tx, InputKind::Video, 7), Ok(()));
        drop(rx);
        assert_eq!(
            counters.offer(&tx, InputKind::Video, 7),
            Err(NotQueued::SessionEnded)
        );
    }

    #[test]
    fn shedding_is_reported_once_per_interval_naming_what_was_shed() {
        let counters = QueueCounters::new();
        let mut reporter = ShedReporter::default();
        assert_eq!(reporter.report(&counters, ms(0)), None);
        counters.shed(InputKind::Video);
        counters.shed(InputKind::Video);
        let first = reporter.report(&counters, ms(100)).unwrap();
        assert!(first.contains("shed 2 camera frames"), "{first}");
        assert!(!first.contains("audio piece"), "{first}");
        counters.shed(InputKind::Audio(ms(20)));
        assert_eq!(reporter.report(&counters, ms(600)), None, "within 1 s");
        let second = reporter.report(&counters, ms(1100)).unwrap();
        assert_eq!(
            second,
            "the session is behind its input: shed 1 audio piece (camera frames go first, \
             then audio)",
            "only what is new"
        );
        assert_eq!(reporter.report(&counters, ms(5000)), None);
    }

    #[test]
    fn a_full_event_queue_counts_what_it_drops() {
        let counters = QueueCounters::new();
        let (tx, rx) = bounded::<u32>(2);
        for i in 0..3 {
            counters.deliver(&tx, i);
        }
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0, 1]);
        let (input, _) = bounded::<()>(1);
        assert_eq!(
            counters
                .stats(&input, &rx, &ModelQueues::default())
                .dropped_events,
            1
        );
    }
}
