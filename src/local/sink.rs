//! Where the model's voice goes: a loudspeaker ([`super::device::SpeakerSink`]) or a WAV file
//! ([`WavSink`]), behind one trait. The runner dates every 20 ms frame the session releases
//! ([`VoicePlacer`]) and hands it over with its media time; a file writes it at that position,
//! a speaker plays it as it comes.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::echo::SpeakerActivity;
use super::far_end::{FarEndReader, FarEndWriter, far_end_tap};
use super::source::samples_to_duration;
use crate::media::resample::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, StreamResampler};

/// One frame of the model's voice as released by the session.
#[derive(Debug, Clone, Copy)]
pub struct VoiceFrame<'a> {
    /// The user turn it answers.
    pub turn: u64,
    /// Its index within the answer.
    pub index: u64,
    /// When the session released it (session clock).
    pub at: Duration,
    pub sample_rate: u32,
    pub pcm: &'a [f32],
}

/// Counters of a sink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkStats {
    /// Voice received from the session.
    pub voice: Duration,
    /// Voice dropped unplayed by interruptions (queued in the speaker's buffer when the user
    /// barged in).
    pub flushed: Duration,
    /// Times the speaker ran dry in the middle of an answer.
    pub underruns: u64,
    /// Voice dropped because the speaker's queue was full.
    pub overflow: Duration,
}

/// A destination of the model's voice.
pub trait AudioSink {
    fn describe(&self) -> String;
    /// Session time from which the sink's output counts (the start of the input).
    fn start(&mut self, origin: Duration) -> anyhow::Result<()>;
    fn play(&mut self, frame: VoiceFrame<'_>) -> anyhow::Result<()>;
    /// The answer to `turn` was cut: drop whatever of it is still queued.
    fn interrupt(&mut self, turn: u64) -> anyhow::Result<()>;
    /// The answer to `turn` is complete: play out what is queued of it.
    fn answer_done(&mut self, turn: u64) -> anyhow::Result<()>;
    /// Voice queued and not yet played.
    fn pending(&self) -> Duration;
    /// Ends the output at session time `end`.
    fn finish(&mut self, end: Duration) -> anyhow::Result<()>;
    fn stats(&self) -> SinkStats;
    /// The reading end of what this sink plays, for the echo canceller or a simulated echo
    /// (once; `None` for a sink that plays nothing).
    fn take_far_end(&mut self) -> Option<FarEndReader> {
        None
    }
}

/// Dates the frames of the session's voice on the session clock. The session releases the
/// frames of an answer back to back in real time and sends them without a timestamp; a frame
/// that arrives less than `JITTER` after where the previous one ended continues it (the delay
/// of the event channel and of this thread is not a gap), a later one starts a new run where
/// it is received (the engine ran dry and restarted its schedule). A run restarted by a
/// shorter stall is placed up to `JITTER` early; the error does not add up over a call.
#[derive(Debug, Default)]
pub struct VoicePlacer {
    /// Turn, index and end of the last frame placed.
    last: Option<(u64, u64, Duration)>,
}

impl VoicePlacer {
    /// The longest delivery delay taken for jitter.
    pub const JITTER: Duration = Duration::from_millis(100);

    pub fn new() -> Self {
        Self::default()
    }

    /// Media time of a frame of `length` of answer `turn`, index `index`, received at `now`.
    pub fn place(&mut self, turn: u64, index: u64, length: Duration, now: Duration) -> Duration {
        let at = match self.last {
            Some((last_turn, last_index, end))
                if last_turn == turn && index == last_index + 1 && now < end + Self::JITTER =>
            {
                end
            }
            // the frame came after a gap, or starts an answer: received now, released a
            // little earlier (never before the previous frame ended)
            Some((_, _, end)) => now.max(end),
            None => now,
        };
        self.last = Some((turn, index, at + length));
        at
    }

    /// Forgets the current run (after an interruption).
    pub fn reset(&mut self) {
        if let Some((turn, _, end)) = self.last {
            // an index that never continues: the next frame starts a run
            self.last = Some((turn, u64::MAX - 1, end));
        }
    }
}

/// The model's voice written to a mono 16-bit WAV file: every frame at its media time relative
/// to the sink's origin, silence in between and up to the end of the session, so that the file
/// lines up sample for sample in time with the input (sample `n` is at `origin + n / rate`).
/// Voice at another rate than the file's is resampled.
pub struct WavSink {
    path: PathBuf,
    writer: Option<hound::WavWriter<BufWriter<File>>>,
    rate: u32,
    origin: Duration,
    /// Samples written.
    written: u64,
    run: Option<Run>,
    activity: Arc<SpeakerActivity>,
    /// Every voice sample written, at its time (the silence between is the timeline's default).
    far_end: FarEndWriter,
    far_end_reader: Option<FarEndReader>,
    stats: SinkStats,
}

/// A run of back-to-back frames of one answer.
struct Run {
    turn: u64,
    /// Rate of the frames, and the resampler to the file's rate (`None`: same rate).
    source_rate: u32,
    resampler: Option<StreamResampler>,
    /// File position of the run's first sample.
    start: u64,
    /// Samples of the run emitted so far, at the file's rate.
    emitted: u64,
    /// Media time where the run's next frame would start.
    next_at: Duration,
}

impl WavSink {
    pub fn create(path: &Path, rate: u32, activity: Arc<SpeakerActivity>) -> anyhow::Result<Self> {
        if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
            bail!("output file rate {rate} Hz is outside {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz");
        }
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec)
            .with_context(|| format!("cannot create the output WAV file {}", path.display()))?;
        // a frame is placed up to the placer's jitter before it arrives
        let (far_end, far_end_reader) = far_end_tap(rate, VoicePlacer::JITTER);
        Ok(Self {
            path: path.to_path_buf(),
            writer: Some(writer),
            rate,
            origin: Duration::ZERO,
            written: 0,
            run: None,
            activity,
            far_end,
            far_end_reader: Some(far_end_reader),
            stats: SinkStats::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sample_rate(&self) -> u32 {
        self.rate
    }

    fn position(&self, at: Duration) -> u64 {
        let t = at.saturating_sub(self.origin);
        (t.as_nanos() * self.rate as u128 / 1_000_000_000) as u64
    }

    /// Writes `samples` at file position `at` (silence up to it; what overlaps audio already
    /// written is dropped).
    fn write_at(&mut self, at: u64, samples: &[f32]) -> anyhow::Result<()> {
        let writer = self
            .writer
            .as_mut()
            .context("the output file is already finished")?;
        while self.written < at {
            writer.write_sample(0i16)?;
            self.written += 1;
        }
        let skip = (self.written - at).min(samples.len() as u64) as usize;
        let played_at = self.origin + samples_to_duration(self.written, self.rate);
        self.far_end.write(played_at, &samples[skip..]);
        for &x in &samples[skip..] {
            writer.write_sample((x.clamp(-1.0, 1.0) * 32767.0).round() as i16)?;
        }
        self.written += (samples.len() - skip) as u64;
        Ok(())
    }

    /// Writes what the current run's resampler still holds and closes the run.
    fn end_run(&mut self) -> anyhow::Result<()> {
        if let Some(mut run) = self.run.take()
            && let Some(resampler) = run.resampler.as_mut()
        {
            let tail = resampler.flush()?;
            self.write_at(run.start + run.emitted, &tail)?;
            run.emitted += tail.len() as u64;
        }
        Ok(())
    }

    /// Pads with silence up to `end` and closes the file (a frame released just before `end`
    /// was heard whole and stays whole).
    fn close(&mut self, end: Duration) -> anyhow::Result<()> {
        self.end_run()?;
        let end = self.position(end);
        self.write_at(end, &[])?;
        if let Some(writer) = self.writer.take() {
            writer
                .finalize()
                .with_context(|| format!("cannot finish the WAV file {}", self.path.display()))?;
        }
        Ok(())
    }
}

impl AudioSink for WavSink {
    fn describe(&self) -> String {
        format!("file {} ({} Hz)", self.path.display(), self.rate)
    }

    fn start(&mut self, origin: Duration) -> anyhow::Result<()> {
        self.origin = origin;
        Ok(())
    }

    fn play(&mut self, frame: VoiceFrame<'_>) -> anyhow::Result<()> {
        if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&frame.sample_rate) {
            bail!(
                "voice frame {} of turn {} has sample rate {} Hz",
                frame.index,
                frame.turn,
                frame.sample_rate
            );
        }
        let length = samples_to_duration(frame.pcm.len() as u64, frame.sample_rate);
        self.stats.voice += length;
        self.activity.record(frame.at, frame.at + length);
        let continues = self.run.as_ref().is_some_and(|run| {
            run.turn == frame.turn
                && run.source_rate == frame.sample_rate
                && run.next_at == frame.at
        });
        if !continues {
            self.end_run()?;
            let resampler = if frame.sample_rate == self.rate {
                None
            } else {
                Some(StreamResampler::new(frame.sample_rate, self.rate)?)
            };
            self.run = Some(Run {
                turn: frame.turn,
                source_rate: frame.sample_rate,
                resampler,
                start: self.position(frame.at),
                emitted: 0,
                next_at: frame.at,
            });
        }
        let run = self.run.as_mut().expect("a run was just opened");
        run.next_at = frame.at + length;
        let resampled;
        let samples = match run.resampler.as_mut() {
            Some(resampler) => {
                resampled = resampler.push(frame.pcm)?;
                &resampled[..]
            }
            None => frame.pcm,
        };
        let at = run.start + run.emitted;
        run.emitted += samples.len() as u64;
        self.write_at(at, samples)
    }

    fn interrupt(&mut self, _turn: u64) -> anyhow::Result<()> {
        // every frame received was heard: only the resampler's tail is left to write
        self.end_run()
    }

    fn answer_done(&mut self, _turn: u64) -> anyhow::Result<()> {
        self.end_run()
    }

    fn pending(&self) -> Duration {
        Duration::ZERO
    }

    fn finish(&mut self, end: Duration) -> anyhow::Result<()> {
        self.close(end)
    }

    fn stats(&self) -> SinkStats {
        self.stats
    }

    fn take_far_end(&mut self) -> Option<FarEndReader> {
        self.far_end_reader.take()
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        // an unfinished file (an error path) still gets a valid header
        if let Some(writer) = self.writer.take() {
            let _ = writer.finalize();
        }
    }
}

/// No audio output (a text-only or transcript-only run): the voice is counted and dropped.
#[derive(Debug, Default)]
pub struct DiscardSink {
    stats: SinkStats,
}

impl AudioSink for DiscardSink {
    fn describe(&self) -> String {
        "no audio output".into()
    }

    fn start(&mut self, _origin: Duration) -> anyhow::Result<()> {
        Ok(())
    }

    fn play(&mut self, frame: VoiceFrame<'_>) -> anyhow::Result<()> {
        self.stats.voice += samples_to_duration(frame.pcm.len() as u64, frame.sample_rate);
        Ok(())
    }

    fn interrupt(&mut self, _turn: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn answer_done(&mut self, _turn: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn pending(&self) -> Duration {
        Duration::ZERO
    }

    fn finish(&mut self, _end: Duration) -> anyhow::Result<()> {
        Ok(())
    }

    fn stats(&self) -> SinkStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn frames_back_to_back_stay_contiguous_despite_delivery_jitter() {
        let mut p = VoicePlacer::new();
        let f = ms(20);
        assert_eq!(p.place(1, 0, f, ms(1000)), ms(1000));
        assert_eq!(p.place(1, 1, f, ms(1027)), ms(1020), "7 ms late is jitter");
        assert_eq!(p.place(1, 2, f, ms(1041)), ms(1040));
        assert_eq!(
            p.place(1, 3, f, ms(1130)),
            ms(1060),
            "so is a busy receiver"
        );
        assert_eq!(p.place(1, 4, f, ms(1131)), ms(1080));
        // the engine ran dry for 200 ms
        assert_eq!(p.place(1, 5, f, ms(1300)), ms(1300));
        // a new answer starts where it is received
        assert_eq!(p.place(2, 0, f, ms(3000)), ms(3000));
        p.reset();
        assert_eq!(p.place(2, 1, f, ms(3021)), ms(3021));
    }
}
