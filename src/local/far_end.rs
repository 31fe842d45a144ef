//! What the loudspeaker plays, by session time: the far end of the echo canceller and the
//! source of a simulated echo. The sink writes every sample it hands to the device (voice and
//! silence, at the device's rate) or to its file (the voice), dated with the session time it
//! plays at; the audio feeder reads it back in order, 10 ms at a time, beside the microphone.
//!
//! The writing end may be an audio callback: it never blocks and does not allocate in the
//! steady state (buffers go round through two bounded channels, as in [`super::device`]); what
//! does not fit is dropped and counted. The reading end keeps a few seconds on a timeline of
//! sample indices at the sink's rate; a moment nothing was written for reads as silence.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::source::{duration_to_samples, samples_to_duration};

/// A piece of what played, from session time `at`.
struct Played {
    at: Duration,
    samples: Vec<f32>,
}

const CHUNKS: usize = 256;
const CHUNK_CAPACITY: usize = 8192;
/// How much of the past the reader keeps behind its position.
const KEEP: Duration = Duration::from_secs(2);

/// The sink's end.
pub struct FarEndWriter {
    chunks: Sender<Played>,
    pool: Receiver<Vec<f32>>,
    dropped: Arc<AtomicU64>,
}

/// The feeder's end.
pub struct FarEndReader {
    rate: u32,
    settle: Duration,
    chunks: Receiver<Played>,
    pool: Sender<Vec<f32>>,
    dropped: Arc<AtomicU64>,
    /// Samples from index `start` on.
    timeline: VecDeque<f32>,
    start: u64,
    /// The timeline starts where it is first read.
    started: bool,
}

/// A far-end tap for a sink playing at `rate`. `settle` is how long after a moment the sink
/// may still write what plays at it (a file sink dates voice frames up to
/// [`super::sink::VoicePlacer::JITTER`] in the past; a device callback writes ahead of time).
pub fn far_end_tap(rate: u32, settle: Duration) -> (FarEndWriter, FarEndReader) {
    let (chunks, chunk_rx) = bounded(CHUNKS);
    let (pool, pool_rx) = bounded(CHUNKS);
    for _ in 0..CHUNKS {
        let _ = pool.try_send(Vec::with_capacity(CHUNK_CAPACITY));
    }
    let dropped = Arc::new(AtomicU64::new(0));
    (
        FarEndWriter {
            chunks,
            pool: pool_rx,
            dropped: dropped.clone(),
        },
        FarEndReader {
            rate: rate.max(1),
            settle,
            chunks: chunk_rx,
            pool,
            dropped,
            timeline: VecDeque::new(),
            start: 0,
            started: false,
        },
    )
}

impl FarEndWriter {
    /// Records that `samples` play from session time `at`.
    pub fn write(&self, at: Duration, samples: &[f32]) {
        if samples.is_empty() {
            return;
        }
        let Ok(mut buffer) = self.pool.try_recv() else {
            // the reader stalled (or there is none): this is lost
            self.dropped
                .fetch_add(samples.len() as u64, Ordering::Relaxed);
            return;
        };
        buffer.clear();
        buffer.extend_from_slice(samples);
        if self
            .chunks
            .try_send(Played {
                at,
                samples: buffer,
            })
            .is_err()
        {
            self.dropped
                .fetch_add(samples.len() as u64, Ordering::Relaxed);
        }
    }
}

impl FarEndReader {
    pub fn rate(&self) -> u32 {
        self.rate
    }

    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// Samples written but lost because the reader fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The sample index of session time `t` on the timeline.
    pub fn index_of(&self, t: Duration) -> u64 {
        duration_to_samples(t, self.rate)
    }

    /// The session time of sample index `index`.
    pub fn time_of(&self, index: u64) -> Duration {
        samples_to_duration(index, self.rate)
    }

    /// Moves what the sink wrote onto the timeline.
    fn take_written(&mut self) {
        while let Ok(played) = self.chunks.try_recv() {
            let first = self.index_of(played.at);
            let skip = self.start.saturating_sub(first) as usize;
            if skip < played.samples.len() {
                let offset = (first + skip as u64 - self.start) as usize;
                let end = offset + played.samples.len() - skip;
                if self.timeline.len() < end {
                    self.timeline.resize(end, 0.0);
                }
                for (slot, &x) in self
                    .timeline
                    .range_mut(offset..end)
                    .zip(&played.samples[skip..])
                {
                    *slot = x;
                }
            }
            let _ = self.pool.try_send(played.samples);
        }
    }

    /// Fills `out` with what played from sample index `from` on (silence where nothing was
    /// written), and forgets what is older than [`KEEP`] before it.
    pub fn read(&mut self, from: u64, out: &mut [f32]) {
        if !self.started {
            self.started = true;
            self.start = from.saturating_sub(self.index_of(KEEP));
        }
        self.take_written();
        for (k, slot) in out.iter_mut().enumerate() {
            let index = from + k as u64;
            *slot = index
                .checked_sub(self.start)
                .and_then(|i| self.timeline.get(i as usize))
                .copied()
                .unwrap_or(0.0);
        }
        let keep_from = from.saturating_sub(self.index_of(KEEP));
        if keep_from > self.start {
            let drop = ((keep_from - self.start) as usize).min(self.timeline.len());
            self.timeline.drain(..drop);
            self.start = keep_from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn what_played_is_read_back_at_its_time_with_silence_around_it() {
        let (writer, mut reader) = far_end_tap(1000, Duration::ZERO);
        writer.write(ms(1000), &[1.0, 2.0, 3.0]);
        // a later piece that overlaps: the newer samples win
        writer.write(ms(1002), &[4.0, 5.0]);
        let mut out = [9.0; 6];
        reader.read(999, &mut out);
        assert_eq!(out, [0.0, 1.0, 2.0, 4.0, 5.0, 0.0]);
        // written late, but still kept: read again
        writer.write(ms(1010), &[7.0]);
        let mut out = [9.0; 2];
        reader.read(1009, &mut out);
        assert_eq!(out, [0.0, 7.0]);
    }

    #[test]
    fn the_past_beyond_what_is_kept_is_forgotten() {
        let (writer, mut reader) = far_end_tap(100, Duration::ZERO);
        writer.write(ms(0), &[1.0; 100]);
        let mut out = [0.0; 1];
        reader.read(0, &mut out);
        assert_eq!(out, [1.0]);
        reader.read(1000, &mut out);
        // 2 s kept at 100 Hz: index 0 is 10 s behind
        reader.read(0, &mut out);
        assert_eq!(out, [0.0]);
        assert_eq!(reader.index_of(ms(1500)), 150);
        assert_eq!(reader.time_of(150), ms(1500));
    }
}
