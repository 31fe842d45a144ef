//! The output pacer: releases the model's voice in 20 ms frames at real-time pace on the
//! session clock, and stops at once on barge-in. A frame counts as heard once released, so
//! the number of released frames is what the engine keeps of an interrupted answer.
//!
//! Where frames go: with [`Pacer::with_activity`] every frame and the end of each answer go to
//! one channel (its receiver hands the frames on). A session's pacer hands its frames to the
//! transport itself ([`Pacer::handing_frames_to`]): only each answer's first frame goes
//! through the channel, so that its receiver can announce the answer (state, marks) before
//! any voice of it, and the next frame waits until the receiver says the first is out
//! ([`Pacer::first_frame_out`]). The voice then never waits for a busy receiver.
//!
//! Producers that must not run too far ahead of playback (the Talker, the vocoder) wait in
//! [`Pacer::wait_until_played`]. With an [`Activity`] the pacer takes part in the session's
//! quiescence accounting: each frame or report it sends is counted (the receiver uncounts it
//! once handled), a waiting producer is uncounted while it waits and counted again when a
//! release wakes it, and [`Pacer::quiescent`] says whether anything is due on the clock.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::activity::Activity;
use super::clock::Clock;

/// Length of one output frame.
pub const FRAME: Duration = Duration::from_millis(20);

/// One 20 ms frame of the answer `answer`, the `index`-th of that answer, released at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct VoiceFrame {
    pub answer: u64,
    pub index: u64,
    pub at: Duration,
    pub pcm: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PacerOutput {
    Frame(VoiceFrame),
    /// The answer was played out to its end (not sent after a stop).
    Finished {
        answer: u64,
        frames: u64,
    },
}

/// Takes the frames after each answer's first, as they are released (called with the pacer's
/// lock held: it must not block).
pub type FrameSink = Box<dyn Fn(VoiceFrame) + Send + Sync>;

#[derive(Debug, Default)]
struct State {
    answer: u64,
    pending: VecDeque<f32>,
    /// The vocoder has delivered the whole answer.
    complete: bool,
    released: u64,
    next_due: Option<Duration>,
    /// Nothing is released while held (a speculative answer, or one paused by speech).
    held: bool,
    /// The answer's first frame went to the channel and its receiver has not said it is out
    /// (only with a frame sink): the next waits.
    first_unconfirmed: bool,
    shutdown: bool,
    /// Producers waiting in `wait_until_played` (uncounted while they wait).
    parked: i64,
    /// Moves each time parked producers are woken (and counted again).
    wake_generation: u64,
}

impl State {
    /// The answer still plays: neither stopped nor reported finished.
    fn live(&self) -> bool {
        self.answer & (1 << 63) == 0
    }

    /// The answer plays and is not held.
    fn playing(&self) -> bool {
        self.live() && !self.held
    }

    /// A frame may be released now (clock permitting).
    fn may_release(&self) -> bool {
        !self.held && !self.first_unconfirmed
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    clock: Arc<dyn Clock>,
    frame_samples: usize,
    out: Sender<PacerOutput>,
    /// Where the frames after each answer's first go (`None`: all go to `out`).
    frames: Option<FrameSink>,
    activity: Option<Arc<Activity>>,
}

impl Shared {
    /// Wakes every parked producer, counting each again; call with the state locked.
    fn wake_parked(&self, state: &mut State) {
        if state.parked > 0 {
            if let Some(a) = &self.activity {
                a.add(state.parked);
            }
            state.parked = 0;
            state.wake_generation += 1;
        }
        self.wake.notify_all();
    }

    /// Sends an output, counted until its receiver is done with it.
    fn send(&self, output: PacerOutput) {
        if let Some(a) = &self.activity {
            a.begin();
        }
        if self.out.send(output).is_err()
            && let Some(a) = &self.activity
        {
            a.end();
        }
    }
}

/// Handle of the pacer thread.
pub struct Pacer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    pub fn new(clock: Arc<dyn Clock>, sample_rate: u32, out: Sender<PacerOutput>) -> Self {
        Self::build(clock, sample_rate, out, None, None)
    }

    /// A pacer whose outputs and waiting producers are counted in `activity` (see the module
    /// doc): every [`PacerOutput`] it sends must be followed by `activity.end()` once handled.
    pub fn with_activity(
        clock: Arc<dyn Clock>,
        sample_rate: u32,
        out: Sender<PacerOutput>,
        activity: Arc<Activity>,
    ) -> Self {
        Self::build(clock, sample_rate, out, None, Some(activity))
    }

    /// A session's pacer, counted in `activity`: each answer's first frame and its end go to
    /// `out` (the receiver calls [`Pacer::first_frame_out`] once it has handed the first frame
    /// on), every other frame straight to `frames`.
    pub fn handing_frames_to(
        frames: FrameSink,
        clock: Arc<dyn Clock>,
        sample_rate: u32,
        out: Sender<PacerOutput>,
        activity: Arc<Activity>,
    ) -> Self {
        Self::build(clock, sample_rate, out, Some(frames), Some(activity))
    }

    fn build(
        clock: Arc<dyn Clock>,
        sample_rate: u32,
        out: Sender<PacerOutput>,
        frames: Option<FrameSink>,
        activity: Option<Arc<Activity>>,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            clock,
            frame_samples: (sample_rate as u128 * FRAME.as_millis() / 1000) as usize,
            out,
            frames,
            activity,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || run(&shared))
                .expect("spawn pacer thread")
        };
        Self {
            shared,
            thread: Some(thread),
        }
    }

    pub fn frame_samples(&self) -> usize {
        self.shared.frame_samples
    }

    /// Starts a new answer; whatever was pending of an earlier one is dropped.
    pub fn begin(&self, answer: u64) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        let (parked, wake_generation) = (s.parked, s.wake_generation);
        *s = State {
            answer,
            parked,
            wake_generation,
            ..State::default()
        };
        self.shared.wake_parked(&mut s);
    }

    /// Holds the current answer: no frame is released until [`Pacer::release`]; producers
    /// go on filling it (up to their lead).
    pub fn hold(&self) {
        self.shared.state.lock().expect("pacer lock").held = true;
    }

    /// Plays the held answer on: the next frame goes out at once, the schedule restarts from
    /// there.
    pub fn release(&self) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        if s.held {
            s.held = false;
            self.shared.wake.notify_all();
        }
    }

    /// The receiver of `answer`'s first frame has handed it on: the rest may follow.
    pub fn first_frame_out(&self, answer: u64) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        if s.answer == answer && s.first_unconfirmed {
            s.first_unconfirmed = false;
            self.shared.wake.notify_all();
        }
    }

    /// Whether the current answer is held.
    pub fn held(&self) -> bool {
        self.shared.state.lock().expect("pacer lock").held
    }

    /// Appends samples of the answer `answer` (ignored if that answer was stopped).
    pub fn push(&self, answer: u64, samples: &[f32]) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        if s.answer == answer && !s.complete {
            s.pending.extend(samples);
            self.shared.wake.notify_all();
        }
    }

    /// The answer's audio is complete: the last partial frame is padded with silence.
    pub fn finish(&self, answer: u64) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        if s.answer == answer && !s.complete {
            let rem = s.pending.len() % self.shared.frame_samples;
            if rem != 0 {
                let pad = self.shared.frame_samples - rem;
                s.pending.extend(std::iter::repeat_n(0.0, pad));
            }
            s.complete = true;
            self.shared.wake_parked(&mut s);
        }
    }

    /// Stops the current answer now: once this returns, no frame of it is released.
    /// Returns how many frames of it were released (what the user heard).
    pub fn stop(&self) -> u64 {
        let mut s = self.shared.state.lock().expect("pacer lock");
        let released = s.released;
        s.pending.clear();
        s.complete = true;
        s.answer = s.answer.wrapping_add(1) | (1 << 63);
        self.shared.wake_parked(&mut s);
        released
    }

    /// Frames released so far of the current answer.
    pub fn released(&self) -> u64 {
        self.shared.state.lock().expect("pacer lock").released
    }

    /// Producers waiting in [`Pacer::wait_until_played`] now.
    pub fn parked(&self) -> i64 {
        self.shared.state.lock().expect("pacer lock").parked
    }

    /// Samples of the current answer waiting to be released.
    pub fn queued_samples(&self) -> usize {
        self.shared.state.lock().expect("pacer lock").pending.len()
    }

    /// How long the samples waiting to be released will play: how long the listener can go on
    /// without more.
    pub fn queued_audio(&self) -> Duration {
        let samples = self.queued_samples() as u32;
        FRAME * samples / self.shared.frame_samples.max(1) as u32
    }

    /// Blocks until `frames` frames of `answer` have been released. Returns false at once if
    /// `answer` is not (or no longer) the one playing: it was stopped or replaced, so the
    /// caller's work for it is stale. Returns true when the frames are out, or when the
    /// answer's audio is complete (nothing more will be released: waiting is pointless).
    pub fn wait_until_played(&self, answer: u64, frames: u64) -> bool {
        let shared = &self.shared;
        let mut s = shared.state.lock().expect("pacer lock");
        loop {
            if s.shutdown || s.answer != answer {
                return false;
            }
            if s.released >= frames || s.complete {
                return true;
            }
            // Parked: uncounted until a release (or a stop) wakes it and counts it again.
            s.parked += 1;
            let generation = s.wake_generation;
            if let Some(a) = &shared.activity {
                a.end();
            }
            while s.wake_generation == generation {
                s = shared.wake.wait(s).expect("pacer lock");
            }
        }
    }

    /// Nothing is due: no frame ready to go at the clock's present time, no report pending.
    /// (A driver on simulated time moves the clock only when the session is quiescent.)
    pub fn quiescent(&self) -> bool {
        let s = self.shared.state.lock().expect("pacer lock");
        if s.shutdown {
            return true;
        }
        let n = self.shared.frame_samples;
        let now = self.shared.clock.now();
        // (a first frame awaiting its receiver is counted in the activity until handed on)
        let frame_due = s.playing()
            && s.may_release()
            && s.pending.len() >= n
            && s.next_due.is_none_or(|due| due <= now);
        let report_due = s.playing() && s.complete && s.pending.is_empty();
        !(frame_due || report_due)
    }
}

impl Pacer {
    /// Ends the pacer (the session is closing): nothing more is released, waiting producers
    /// return at once. The thread exits as soon as it wakes.
    pub fn shutdown(&self) {
        let mut s = self.shared.state.lock().expect("pacer lock");
        s.shutdown = true;
        self.shared.wake_parked(&mut s);
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shutdown();
        // Not joined: the thread may be asleep until the next frame's due time (forever on a
        // simulated clock that is no longer advanced); it exits as soon as it wakes.
        drop(self.thread.take());
    }
}

fn run(shared: &Shared) {
    let n = shared.frame_samples;
    let mut guard = shared.state.lock().expect("pacer lock");
    loop {
        if guard.shutdown {
            return;
        }
        if !guard.may_release() {
            guard = shared.wake.wait(guard).expect("pacer lock");
            continue;
        }
        if guard.pending.len() >= n {
            let answer = guard.answer;
            let now = shared.clock.now();
            // After an underrun the schedule restarts from now rather than bursting to catch up.
            let due = guard.next_due.filter(|d| *d >= now).unwrap_or(now);
            drop(guard);
            shared.clock.sleep_until(due);
            guard = shared.state.lock().expect("pacer lock");
            if guard.shutdown {
                return;
            }
            // A stop, a new answer or a hold during the sleep cancels this frame.
            if guard.answer != answer || guard.pending.len() < n || guard.held {
                continue;
            }
            let pcm: Vec<f32> = guard.pending.drain(..n).collect();
            let index = guard.released;
            guard.released += 1;
            guard.next_due = Some(due + FRAME);
            let frame = VoiceFrame {
                answer,
                index,
                at: due,
                pcm,
            };
            // Handed on under the lock, so that `stop` cannot return between release and send.
            match &shared.frames {
                Some(sink) if index > 0 => sink(frame),
                Some(_) => {
                    guard.first_unconfirmed = true;
                    shared.send(PacerOutput::Frame(frame));
                }
                None => shared.send(PacerOutput::Frame(frame)),
            }
            shared.wake_parked(&mut guard);
            continue;
        }
        if guard.complete && guard.pending.is_empty() && guard.live() {
            let (answer, frames) = (guard.answer, guard.released);
            // Mark as reported: a finished answer is never reported twice.
            guard.answer |= 1 << 63;
            shared.send(PacerOutput::Finished { answer, frames });
            continue;
        }
        guard = shared.wake.wait(guard).expect("pacer lock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::activity::Activity;
    use crate::engine::clock::SimulatedClock;
    use crossbeam_channel::unbounded;

    fn frames(rx: &crossbeam_channel::Receiver<PacerOutput>) -> Vec<PacerOutput> {
        rx.try_iter().collect()
    }

    fn wait_for(rx: &crossbeam_channel::Receiver<PacerOutput>) -> PacerOutput {
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("pacer output")
    }

    #[test]
    fn frames_are_released_every_20_ms() {
        let clock = Arc::new(SimulatedClock::new());
        let (tx, rx) = unbounded();
        let pacer = Pacer::new(clock.clone(), 24000, tx);
        assert_eq!(pacer.frame_samples(), 480);
        pacer.begin(1);
        pacer.push(1, &vec![0.5; 480 * 3 + 100]);
        pacer.finish(1);
        let first = wait_for(&rx);
        assert!(
            matches!(first, PacerOutput::Frame(VoiceFrame { index: 0, at, .. }) if at == Duration::ZERO)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(frames(&rx).is_empty(), "the next frame waits for the clock");
        for k in 1..4u64 {
            clock.advance(FRAME);
            match wait_for(&rx) {
                PacerOutput::Frame(VoiceFrame { index, at, pcm, .. }) => {
                    assert_eq!(index, k);
                    assert_eq!(at, FRAME * k as u32);
                    assert_eq!(pcm.len(), 480);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            wait_for(&rx),
            PacerOutput::Finished {
                answer: 1,
                frames: 4
            }
        );
    }

    #[test]
    fn a_producer_waits_for_playback_and_is_counted_while_it_works() {
        let clock = Arc::new(SimulatedClock::new());
        let (tx, rx) = unbounded();
        let activity = Activity::new();
        let pacer = Arc::new(Pacer::with_activity(
            clock.clone(),
            24000,
            tx,
            activity.clone(),
        ));
        pacer.begin(3);
        pacer.push(3, &vec![0.2; 480 * 4]);
        // a producer holding one piece of work waits for frame 3 to be out
        activity.begin();
        let producer = {
            let (pacer, activity) = (pacer.clone(), activity.clone());
            std::thread::spawn(move || {
                let played = pacer.wait_until_played(3, 3);
                activity.end();
                played
            })
        };
        let handled = |n: usize| {
            for _ in 0..n {
                wait_for(&rx);
                activity.end();
            }
        };
        handled(1); // frame 0 at t = 0
        // the producer is parked: nothing counted, nothing due before the clock moves
        assert!(activity.wait_zero(std::time::Duration::from_secs(5)));
        assert!(pacer.quiescent());
        for _ in 0..2 {
            clock.advance(FRAME);
            handled(1);
        }
        assert!(producer.join().unwrap(), "three frames played");
        assert!(activity.wait_zero(std::time::Duration::from_secs(5)));
        // a stopped answer releases its waiters with `false`
        activity.begin();
        let producer = {
            let (pacer, activity) = (pacer.clone(), activity.clone());
            std::thread::spawn(move || {
                let played = pacer.wait_until_played(3, 100);
                activity.end();
                played
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        pacer.stop();
        assert!(!producer.join().unwrap());
        assert!(activity.wait_zero(std::time::Duration::from_secs(5)));
        assert!(!pacer.wait_until_played(3, 1), "not the answer playing");
    }

    #[test]
    fn a_held_answer_waits_then_plays_on_from_where_it_stopped() {
        let clock = Arc::new(SimulatedClock::new());
        let (tx, rx) = unbounded();
        let pacer = Pacer::new(clock.clone(), 24000, tx);
        pacer.begin(5);
        pacer.hold();
        pacer.push(5, &vec![0.3; 480 * 3]);
        pacer.finish(5);
        for _ in 0..5 {
            clock.advance(FRAME);
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(
            frames(&rx).is_empty(),
            "nothing while held, not even the end"
        );
        assert!(pacer.quiescent());
        pacer.release();
        let now = clock.now();
        assert!(
            matches!(wait_for(&rx), PacerOutput::Frame(VoiceFrame { index: 0, at, .. }) if at == now)
        );
        // held again after one frame: the rest waits, and is not counted as heard
        pacer.hold();
        clock.advance(FRAME);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(frames(&rx).is_empty());
        assert_eq!(pacer.released(), 1);
        pacer.release();
        assert!(matches!(
            wait_for(&rx),
            PacerOutput::Frame(VoiceFrame { index: 1, .. })
        ));
        clock.advance(FRAME);
        assert!(matches!(
            wait_for(&rx),
            PacerOutput::Frame(VoiceFrame { index: 2, .. })
        ));
        assert_eq!(
            wait_for(&rx),
            PacerOutput::Finished {
                answer: 5,
                frames: 3
            }
        );
    }

    #[test]
    fn nothing_is_released_after_stop() {
        let clock = Arc::new(SimulatedClock::new());
        let (tx, rx) = unbounded();
        let pacer = Pacer::new(clock.clone(), 24000, tx);
        pacer.begin(7);
        pacer.push(7, &vec![0.1; 480 * 10]);
        wait_for(&rx);
        clock.advance(FRAME);
        wait_for(&rx);
        let heard = pacer.stop();
        assert_eq!(heard, 2);
        pacer.push(7, &vec![0.1; 480 * 10]);
        for _ in 0..10 {
            clock.advance(FRAME);
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(frames(&rx).is_empty());
    }

    #[test]
    fn with_a_sink_the_first_frame_waits_for_its_receiver_and_the_rest_go_straight_out() {
        let clock = Arc::new(SimulatedClock::new());
        let (tx, rx) = unbounded();
        let (sink_tx, sink_rx) = unbounded();
        let activity = Activity::new();
        let sink: FrameSink = Box::new(move |frame| {
            let _ = sink_tx.send(frame);
        });
        let pacer = Pacer::handing_frames_to(sink, clock.clone(), 24000, tx, activity.clone());
        pacer.begin(9);
        pacer.push(9, &vec![0.4; 480 * 3]);
        pacer.finish(9);
        let PacerOutput::Frame(first) = wait_for(&rx) else {
            panic!("the first frame goes to the channel");
        };
        assert_eq!((first.answer, first.index), (9, 0));
        // frame 1 is due, but waits until the first is out; the first is still counted
        clock.advance(FRAME);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(
            sink_rx.try_recv().is_err(),
            "frame 1 before the first was out"
        );
        assert!(
            pacer.quiescent(),
            "a frame waiting for its receiver is not due"
        );
        assert!(!activity.wait_zero(std::time::Duration::from_millis(1)));
        pacer.first_frame_out(9);
        activity.end();
        let second = sink_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("frame 1 in the sink");
        assert_eq!((second.index, second.at), (1, FRAME));
        clock.advance(FRAME);
        let third = sink_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("frame 2 in the sink");
        assert_eq!(third.index, 2);
        assert_eq!(
            wait_for(&rx),
            PacerOutput::Finished {
                answer: 9,
                frames: 3
            }
        );
        assert!(frames(&rx).is_empty(), "no other frame in the channel");
    }
}
