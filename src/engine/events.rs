//! The session's way out: its events to the transport (through the bounded event queue), the
//! text of a speculative answer held back until its turn is confirmed, and the timing marks
//! of the answers under way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::clock::Clock;
use super::queues::QueueCounters;
use super::session::{SessionEvent, TurnTimings};

/// Where every session thread sends its events.
pub(crate) struct EventSink {
    events: Sender<SessionEvent>,
    queues: Arc<QueueCounters>,
    /// The text of a speculative answer, held until its turn is confirmed (or dropped).
    held_text: Mutex<Option<(u64, Vec<SessionEvent>)>>,
}

impl EventSink {
    pub fn new(events: Sender<SessionEvent>, queues: Arc<QueueCounters>) -> Self {
        Self {
            events,
            queues,
            held_text: Mutex::new(None),
        }
    }

    pub fn emit(&self, event: SessionEvent) {
        if let SessionEvent::AssistantText { turn, .. } = &event {
            let mut held = self.held_text.lock().expect("held text lock");
            if let Some((_, events)) = held.as_mut().filter(|(t, _)| t == turn) {
                events.push(event);
                return;
            }
        }
        self.queues.deliver(&self.events, event);
    }

    pub fn error(&self, error: impl std::fmt::Display) {
        tracing::warn!("session error: {error}");
        self.emit(SessionEvent::Error(error.to_string()));
    }

    /// Holds the answer text of `turn` from now on.
    pub fn hold_text(&self, turn: u64) {
        *self.held_text.lock().expect("held text lock") = Some((turn, Vec::new()));
    }

    /// Sends the held text of `turn` (`release`) or forgets it, and stops holding.
    pub fn end_hold(&self, turn: u64, release: bool) {
        let mut held = self.held_text.lock().expect("held text lock");
        if held.as_ref().is_some_and(|(t, _)| *t == turn) {
            let (_, events) = held.take().expect("held text");
            if release {
                for event in events {
                    self.queues.deliver(&self.events, event);
                }
            }
        }
    }
}

/// The timing marks of the answers under way, by turn, on the session clock.
pub(crate) struct AnswerMarks {
    clock: Arc<dyn Clock>,
    timings: Mutex<HashMap<u64, TurnTimings>>,
}

impl AnswerMarks {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            timings: Mutex::new(HashMap::new()),
        }
    }

    /// The answer to `timings.turn` starts with these marks.
    pub fn start(&self, timings: TurnTimings) {
        let mut all = self.timings.lock().expect("timings lock");
        all.insert(timings.turn, timings);
    }

    /// Sets a mark of the answer to `turn` (`set` is given the clock's time).
    pub fn mark(&self, turn: u64, set: impl FnOnce(&mut TurnTimings, Duration)) {
        let now = self.clock.now();
        let mut timings = self.timings.lock().expect("timings lock");
        if let Some(t) = timings.get_mut(&turn) {
            set(t, now);
        }
    }

    /// The marks so far of the answer to `turn`.
    pub fn get(&self, turn: u64) -> Option<TurnTimings> {
        self.timings
            .lock()
            .expect("timings lock")
            .get(&turn)
            .cloned()
    }

    /// Forgets the answer to `turn` (a dropped speculation).
    pub fn forget(&self, turn: u64) {
        self.timings.lock().expect("timings lock").remove(&turn);
    }

    /// The answer to `turn` ended: its marks go out as a `Timings` event.
    pub fn emit(&self, turn: u64, sink: &EventSink) {
        let t = self.timings.lock().expect("timings lock").remove(&turn);
        if let Some(t) = t {
            sink.emit(SessionEvent::Timings(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::clock::SimulatedClock;

    fn sink() -> (EventSink, crossbeam_channel::Receiver<SessionEvent>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (EventSink::new(tx, QueueCounters::new()), rx)
    }

    fn text(turn: u64, delta: &str) -> SessionEvent {
        SessionEvent::AssistantText {
            turn,
            delta: delta.into(),
        }
    }

    #[test]
    fn held_text_goes_out_on_release_and_nowhere_when_forgotten() {
        let (sink, rx) = sink();
        sink.hold_text(3);
        sink.emit(text(3, "a"));
        sink.emit(text(2, "other turn"));
        assert_eq!(rx.try_iter().count(), 1, "only the other turn's text");
        sink.end_hold(3, true);
        assert!(matches!(&rx.try_iter().collect::<Vec<_>>()[..],
            [SessionEvent::AssistantText { turn: 3, delta }] if delta == "a"));
        sink.hold_text(4);
        sink.emit(text(4, "b"));
        sink.end_hold(4, false);
        sink.emit(text(4, "c"));
        assert!(matches!(&rx.try_iter().collect::<Vec<_>>()[..],
            [SessionEvent::AssistantText { delta, .. }] if delta == "c"));
    }

    #[test]
    fn marks_are_taken_on_the_clock_and_sent_once() {
        let clock = Arc::new(SimulatedClock::new());
        let marks = AnswerMarks::new(clock.clone());
        let (sink, rx) = sink();
        marks.mark(1, |t, now| t.prefill_done = Some(now));
        assert!(marks.get(1).is_none(), "no answer to 1 yet");
        marks.start(TurnTimings {
            turn: 1,
            ..Default::default()
        });
        clock.set(Duration::from_millis(250));
        marks.mark(1, |t, now| t.prefill_done = Some(now));
        assert_eq!(
            marks.get(1).unwrap().prefill_done,
            Some(Duration::from_millis(250))
        );
        marks.emit(1, &sink);
        marks.emit(1, &sink);
        assert_eq!(rx.try_iter().count(), 1);
    }
}
