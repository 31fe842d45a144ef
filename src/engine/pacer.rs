//! The output pacer: releases the model's voice in 20 ms frames at real-time pace on the
//! session clock, and stops at once on barge-in. A frame counts as heard once released, so
//! the number of released frames is what the engine keeps of an interrupted answer.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::clock::Clock;

/// Length of one output frame.
pub const FRAME: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, PartialEq)]
pub enum PacerOutput {
    /// One 20 ms frame of the answer `answer`, the `index`-th of that answer, released at `at`.
    Frame {
        answer: u64,
        index: u64,
        at: Duration,
        pcm: Vec<f32>,
    },
    /// The answer was played out to its end (not sent after a stop).
    Finished { answer: u64, frames: u64 },
}

#[derive(Debug, Default)]
struct State {
    answer: u64,
    pending: VecDeque<f32>,
    /// The vocoder has delivered the whole answer.
    complete: bool,
    released: u64,
    next_due: Option<Duration>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    clock: Arc<dyn Clock>,
    frame_samples: usize,
    out: Sender<PacerOutput>,
}

/// Handle of the pacer thread.
pub struct Pacer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    pub fn new(clock: Arc<dyn Clock>, sample_rate: u32, out: Sender<PacerOutput>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            clock,
            frame_samples: (sample_rate as u128 * FRAME.as_millis() / 1000) as usize,
            out,
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
        *s = State {
            answer,
            ..State::default()
        };
        self.shared.wake.notify_all();
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
            self.shared.wake.notify_all();
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
        self.shared.wake.notify_all();
        released
    }

    /// Frames released so far of the current answer.
    pub fn released(&self) -> u64 {
        self.shared.state.lock().expect("pacer lock").released
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        {
            let mut s = self.shared.state.lock().expect("pacer lock");
            s.shutdown = true;
            self.shared.wake.notify_all();
        }
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
            // A stop or a new answer during the sleep cancels this frame.
            if guard.answer != answer || guard.pending.len() < n {
                continue;
            }
            let pcm: Vec<f32> = guard.pending.drain(..n).collect();
            let index = guard.released;
            guard.released += 1;
            guard.next_due = Some(due + FRAME);
            // Sent under the lock, so that `stop` cannot return between release and send.
            let _ = shared.out.send(PacerOutput::Frame {
                answer,
                index,
                at: due,
                pcm,
            });
            continue;
        }
        if guard.complete && guard.pending.is_empty() && guard.answer & (1 << 63) == 0 {
            let (answer, frames) = (guard.answer, guard.released);
            // Mark as reported: a finished answer is never reported twice.
            guard.answer |= 1 << 63;
            let _ = shared.out.send(PacerOutput::Finished { answer, frames });
            continue;
        }
        guard = shared.wake.wait(guard).expect("pacer lock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(matches!(first, PacerOutput::Frame { index: 0, at, .. } if at == Duration::ZERO));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(frames(&rx).is_empty(), "the next frame waits for the clock");
        for k in 1..4u64 {
            clock.advance(FRAME);
            match wait_for(&rx) {
                PacerOutput::Frame { index, at, pcm, .. } => {
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
}
