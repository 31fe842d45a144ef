//! A session on a [`SimulatedClock`], driven deterministically for tests and benchmarks:
//! inputs are counted, and time moves only once the session has done everything it can (the
//! [`SessionProbe`] says when).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::clock::{Clock, SimulatedClock};
use super::probe::SessionProbe;
use super::queues::QueueStats;
use super::runtime::{TICK, spawn_probed};
use super::session::{
    AudioInput, Control, SessionConfig, SessionEvent, SessionHandle, SessionInput, VideoInput,
};
use crate::model::omni::OmniModel;

/// A session on a [`SimulatedClock`], driven deterministically: inputs are counted, and time
/// moves only once the session has done everything it can (see the module doc).
pub struct SimulatedSession {
    pub clock: Arc<SimulatedClock>,
    pub handle: SessionHandle,
    pub probe: SessionProbe,
    sent: u64,
    /// How long to wait (wall time) for the session to settle before giving up.
    pub settle_timeout: Duration,
}

impl SimulatedSession {
    pub fn spawn(model: &OmniModel, config: SessionConfig) -> Result<Self> {
        let clock = Arc::new(SimulatedClock::new());
        let (handle, probe) = spawn_probed(model, config, clock.clone())?;
        let mut session = Self {
            clock,
            handle,
            probe,
            sent: 0,
            settle_timeout: Duration::from_secs(120),
        };
        session.settle()?;
        Ok(session)
    }

    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    pub fn send(&mut self, input: SessionInput) -> Result<()> {
        self.handle
            .input
            .send(input)
            .map_err(|_| anyhow::anyhow!("the session has ended"))?;
        self.sent += 1;
        Ok(())
    }

    /// Queues a piece of audio by the input policy, as a transport does.
    pub fn push_audio(&mut self, audio: AudioInput) -> Result<()> {
        self.offer(|handle| handle.push_audio(audio))
    }

    /// Queues a camera frame by the input policy (shed while the session is behind).
    pub fn push_video(&mut self, frame: VideoInput) -> Result<()> {
        self.offer(|handle| handle.push_video(frame))
    }

    pub fn control(&mut self, control: Control) -> Result<()> {
        self.offer(|handle| handle.control(control))
    }

    /// Offers an input through the handle; only one that was queued (not shed) is counted.
    fn offer(&mut self, push: impl FnOnce(&SessionHandle) -> bool) -> Result<()> {
        let shed = |q: QueueStats| q.shed_video_frames + q.shed_audio_pieces + q.shed_controls;
        let before = shed(self.handle.queues());
        anyhow::ensure!(push(&self.handle), "the session has ended");
        if shed(self.handle.queues()) == before {
            self.sent += 1;
        }
        Ok(())
    }

    /// Waits until the session has done everything it can at the present time.
    pub fn settle(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.probe.wait_quiescent(self.sent, self.settle_timeout),
            "the session did not settle within {:?} at {:?} (activity {})",
            self.settle_timeout,
            self.clock.now(),
            self.probe.pending()
        );
        Ok(())
    }

    /// Moves the clock to `to` in steps of at most one tick, settling after each.
    pub fn advance_to(&mut self, to: Duration) -> Result<()> {
        self.settle()?;
        while self.clock.now() < to {
            let next = (self.clock.now() + TICK).min(to);
            self.clock.set(next);
            self.settle()?;
        }
        Ok(())
    }

    pub fn advance(&mut self, by: Duration) -> Result<()> {
        self.advance_to(self.clock.now() + by)
    }

    /// Events so far.
    pub fn events(&self) -> Vec<SessionEvent> {
        self.handle.events.try_iter().collect()
    }

    /// Ends the session and waits for its threads.
    pub fn close(mut self) -> Result<()> {
        self.send(SessionInput::Close)?;
        let SimulatedSession { handle, probe, .. } = self;
        drop(handle);
        anyhow::ensure!(
            probe.join(Duration::from_secs(60)),
            "the session's threads did not end"
        );
        Ok(())
    }
}
