//! The server's `/metrics` page: Prometheus text exposition of the calls, the audio packets and
//! the per-stage timings of every turn.
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `omnicall_calls_active` | gauge | calls running now |
//! | `omnicall_calls_started_total` | counter | offers answered (`201`) |
//! | `omnicall_calls_rejected_total{reason}` | counter | offers refused: `busy` (`503`), `unauthorized` (`401`), `bad_offer` (`400`), `unsupported_offer` (`422`), `unsupported_media_type` (`415`), `server_error` (`5xx`), `other`; by capacity: `capacity` (one more call would not fit), `measuring` (the first call's cost is not known yet) |
//! | `omnicall_turns_total` | counter | turns whose timing marks the sessions reported |
//! | `omnicall_barge_ins_total` | counter | answers cut short (the user spoke over the model, or sent `interrupt`) |
//! | `omnicall_audio_packets_received_total` | counter | RTP packets of the callers' microphones |
//! | `omnicall_audio_packets_sent_total{kind}` | counter | Opus RTP packets sent: `voice` or `silence` (between answers) |
//! | `omnicall_turn_stage_seconds{stage}` | histogram | time from the end of the user's speech to each stage of the answer |
//! | `omnicall_media_dropped_total{kind}` | counter | caller media the transport dropped: `audio_packet` (late, duplicate or undecodable), `video_frame` (incomplete, undecodable, or the decoder behind) |
//! | `omnicall_session_queue_depth{queue}` | gauge | messages waiting, summed over the calls: `input` (the transports' audio, frames and controls for their sessions), `events` (the sessions' events for their transports), `thinker`, `talker`, `vocoder` (between a session's model threads: backpressure); bounds in [`queues`](crate::engine::queues) |
//! | `omnicall_media_shed_total{kind}` | counter | caller input shed because its session was behind: `video_frame` first, `audio_piece` and `control` only when a session's input queue is full |
//! | `omnicall_media_retimed_total{kind}` | counter | `audio_piece`s and `video_frame`s stamped too far ahead of their session's clock, placed at the clock (nothing dropped) |
//! | `omnicall_session_events_dropped_total` | counter | session events lost because their transport did not read them |
//! | `omnicall_load_cores` | gauge | cores the server kept busy over the last seconds ([`admission`](crate::rtc::admission)) |
//! | `omnicall_capacity_cores` | gauge | cores the calls may use (`--capacity-cores × --max-load`; 0: no admission by capacity) |
//! | `omnicall_headroom_cores` | gauge | capacity minus load |
//! | `omnicall_call_cost_cores` | gauge | busy cores per call, as measured (0 until known) |
//! | `omnicall_process_cpu_seconds` | gauge | CPU time of the server process so far |
//! | `omnicall_process_resident_bytes` | gauge | resident memory of the server process |
//! | `omnicall_scheduler_busy_ratio` | gauge | fraction of the last seconds the shared model scheduler's thread ran passes ([`scheduler`](crate::engine::scheduler); 0 without one) |
//! | `omnicall_scheduler_busy_seconds_total` | counter | time that thread ran passes (its rate is the busy ratio over any span) |
//! | `omnicall_scheduler_call_cost_ratio` | gauge | a call's share of that thread's time, as measured (0 until known) |
//! | `omnicall_scheduler_queued_requests` | gauge | model work waiting in the scheduler |
//! | `omnicall_scheduler_sessions` | gauge | sessions the scheduler holds contexts for |
//! | `omnicall_scheduler_passes_total` | counter | forward passes the scheduler ran |
//! | `omnicall_scheduler_sequences_total` | counter | sequences over those passes (divided by the passes: the mean batch) |
//! | `omnicall_scheduler_largest_batch` | gauge | most sequences in one pass so far |
//! | `omnicall_scheduler_deadline_misses_total` | counter | requests finished after their deadline |
//! | `omnicall_scheduler_worst_lateness_seconds` | gauge | the latest any request finished past its deadline |
//!
//! The stages are those of [`TurnTimings`], measured on the session clock from `speech_end`:
//! `end_of_turn`, `prefill_done`, `first_text_token`, `first_codec_token`,
//! `first_waveform_chunk`, `first_audio_frame` (the first 20 ms of voice handed to the
//! transport, which sends it as an Opus packet at once). Turns without a `speech_end` (typed
//! messages) count in `omnicall_turns_total` only.
//!
//! Every server has its own registry (no global state), so servers side by side in one
//! process, as in the tests, keep separate counts.

use std::time::Duration;

use prometheus::{
    Counter, Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rtc::admission::{Capacity, LoadEstimate, ProcessUsage, RefusalReason};

use crate::engine::queues::QueueStats;
use crate::engine::scheduler::Headroom;
use crate::engine::session::{SessionEvent, TurnTimings};

/// The `Content-Type` of the page.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The stages of a turn on `/metrics`, in the order they happen.
pub const TURN_STAGES: [&str; 6] = [
    "end_of_turn",
    "prefill_done",
    "first_text_token",
    "first_codec_token",
    "first_waveform_chunk",
    "first_audio_frame",
];

/// The `kind`s of `omnicall_media_dropped_total`.
pub const MEDIA_DROPPED_KINDS: [&str; 2] = ["audio_packet", "video_frame"];
/// The `queue`s of `omnicall_session_queue_depth`.
pub const SESSION_QUEUES: [&str; 5] = ["input", "events", "thinker", "talker", "vocoder"];
/// The `kind`s of `omnicall_media_shed_total` and of `omnicall_media_retimed_total`.
pub const MEDIA_SHED_KINDS: [&str; 3] = ["video_frame", "audio_piece", "control"];
pub const MEDIA_RETIMED_KINDS: [&str; 2] = ["audio_piece", "video_frame"];

/// Histogram buckets of the stage timings, in seconds: from a VAD frame to a slow CPU prefill.
const STAGE_BUCKETS: [f64; 15] = [
    0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
];

/// The marks of `t` in [`TURN_STAGES`] order.
fn stage_marks(t: &TurnTimings) -> [Option<Duration>; 6] {
    [
        t.end_of_turn,
        t.prefill_done,
        t.first_text_token,
        t.first_codec_token,
        t.first_waveform_chunk,
        t.first_audio_frame,
    ]
}

/// Counters of the Opus packets a call sends, shared with its audio sender.
#[derive(Debug, Clone)]
pub struct PacketsOut {
    pub voice: IntCounter,
    pub silence: IntCounter,
}

/// The metrics of one server.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    registry: Registry,
    calls_active: IntGauge,
    calls_started: IntCounter,
    calls_rejected: IntCounterVec,
    turns: IntCounter,
    barge_ins: IntCounter,
    audio_packets_received: IntCounter,
    audio_packets_sent: IntCounterVec,
    stage_seconds: HistogramVec,
    media_dropped: IntCounterVec,
    queues: QueueMetrics,
    load: LoadGauges,
    scheduler: SchedulerMetrics,
}

/// The sessions' queues: depths summed over the calls, and what they shed and re-timed.
#[derive(Debug, Clone)]
struct QueueMetrics {
    depth: IntGaugeVec,
    shed: IntCounterVec,
    retimed: IntCounterVec,
    events_dropped: IntCounter,
}

impl QueueMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let depth = IntGaugeVec::new(
            Opts::new(
                "omnicall_session_queue_depth",
                "Messages waiting between the transports and their sessions, summed over the calls.",
            ),
            &["queue"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "omnicall_media_shed_total",
                "Caller input shed because its session was behind (camera frames first).",
            ),
            &["kind"],
        )?;
        let retimed = IntCounterVec::new(
            Opts::new(
                "omnicall_media_retimed_total",
                "Caller media stamped too far ahead of the session clock, placed at the clock.",
            ),
            &["kind"],
        )?;
        let events_dropped = IntCounter::new(
            "omnicall_session_events_dropped_total",
            "Session events lost because their transport did not read them.",
        )?;
        registry.register(Box::new(depth.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(retimed.clone()))?;
        registry.register(Box::new(events_dropped.clone()))?;
        for queue in SESSION_QUEUES {
            depth.with_label_values(&[queue]);
        }
        for kind in MEDIA_SHED_KINDS {
            shed.with_label_values(&[kind]);
        }
        for kind in MEDIA_RETIMED_KINDS {
            retimed.with_label_values(&[kind]);
        }
        Ok(Self {
            depth,
            shed,
            retimed,
            events_dropped,
        })
    }
}

/// What one call's session queues last added to the server's metrics: each update adds the
/// change since, so the gauges sum over the calls and the counters count every call's.
#[derive(Debug, Default)]
pub struct SessionQueueReport {
    last: QueueStats,
}

impl SessionQueueReport {
    /// Takes the session's queues as they are now.
    pub fn update(&mut self, metrics: &ServerMetrics, now: QueueStats) {
        let q = &metrics.queues;
        let last = std::mem::replace(&mut self.last, now);
        let depth = |queue: &str, now: usize, before: usize| {
            q.depth
                .with_label_values(&[queue])
                .add(now as i64 - before as i64);
        };
        depth("input", now.input_depth, last.input_depth);
        depth("events", now.event_depth, last.event_depth);
        depth("thinker", now.thinker_depth, last.thinker_depth);
        depth("talker", now.talker_depth, last.talker_depth);
        depth("vocoder", now.vocoder_depth, last.vocoder_depth);
        let count = |c: &IntCounterVec, kind: &str, now: u64, before: u64| {
            if now > before {
                c.with_label_values(&[kind]).inc_by(now - before);
            }
        };
        count(
            &q.shed,
            "video_frame",
            now.shed_video_frames,
            last.shed_video_frames,
        );
        count(
            &q.shed,
            "audio_piece",
            now.shed_audio_pieces,
            last.shed_audio_pieces,
        );
        count(&q.shed, "control", now.shed_controls, last.shed_controls);
        count(
            &q.retimed,
            "audio_piece",
            now.retimed_audio,
            last.retimed_audio,
        );
        count(
            &q.retimed,
            "video_frame",
            now.retimed_video_frames,
            last.retimed_video_frames,
        );
        if now.dropped_events > last.dropped_events {
            q.events_dropped
                .inc_by(now.dropped_events - last.dropped_events);
        }
    }

    /// The call ended: its queues count for nothing any more (its counts stay).
    pub fn finish(mut self, metrics: &ServerMetrics, last: QueueStats) {
        self.update(
            metrics,
            QueueStats {
                input_depth: 0,
                event_depth: 0,
                thinker_depth: 0,
                talker_depth: 0,
                vocoder_depth: 0,
                ..last
            },
        );
    }
}

/// The gauges of the server's load and of its process.
#[derive(Debug, Clone)]
struct LoadGauges {
    load_cores: Gauge,
    capacity_cores: Gauge,
    headroom_cores: Gauge,
    call_cost_cores: Gauge,
    process_cpu_seconds: Gauge,
    process_resident_bytes: Gauge,
}

impl LoadGauges {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<Gauge> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            load_cores: gauge(
                "omnicall_load_cores",
                "Cores the server kept busy over the last seconds.",
            )?,
            capacity_cores: gauge(
                "omnicall_capacity_cores",
                "Cores the calls may use (0: no admission by capacity).",
            )?,
            headroom_cores: gauge("omnicall_headroom_cores", "Capacity minus load, in cores.")?,
            call_cost_cores: gauge(
                "omnicall_call_cost_cores",
                "Busy cores per call, as measured (0 until known).",
            )?,
            process_cpu_seconds: gauge(
                "omnicall_process_cpu_seconds",
                "CPU time of the server process so far.",
            )?,
            process_resident_bytes: gauge(
                "omnicall_process_resident_bytes",
                "Resident memory of the server process.",
            )?,
        })
    }
}

/// The shared model scheduler's load and work.
#[derive(Debug, Clone)]
struct SchedulerMetrics {
    busy_ratio: Gauge,
    busy_seconds: Counter,
    call_cost_ratio: Gauge,
    queued_requests: IntGauge,
    sessions: IntGauge,
    passes: IntCounter,
    sequences: IntCounter,
    largest_batch: IntGauge,
    deadline_misses: IntCounter,
    worst_lateness_seconds: Gauge,
}

impl SchedulerMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        fn registered<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: M,
        ) -> prometheus::Result<M> {
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        }
        Ok(Self {
            busy_ratio: registered(
                registry,
                Gauge::new(
                    "omnicall_scheduler_busy_ratio",
                    "Fraction of the last seconds the model scheduler's thread ran passes.",
                )?,
            )?,
            busy_seconds: registered(
                registry,
                Counter::new(
                    "omnicall_scheduler_busy_seconds_total",
                    "Time the model scheduler's thread ran passes.",
                )?,
            )?,
            call_cost_ratio: registered(
                registry,
                Gauge::new(
                    "omnicall_scheduler_call_cost_ratio",
                    "A call's share of the model scheduler thread's time (0 until known).",
                )?,
            )?,
            queued_requests: registered(
                registry,
                IntGauge::new(
                    "omnicall_scheduler_queued_requests",
                    "Model work waiting in the scheduler.",
                )?,
            )?,
            sessions: registered(
                registry,
                IntGauge::new(
                    "omnicall_scheduler_sessions",
                    "Sessions the model scheduler holds contexts for.",
                )?,
            )?,
            passes: registered(
                registry,
                IntCounter::new(
                    "omnicall_scheduler_passes_total",
                    "Forward passes the model scheduler ran.",
                )?,
            )?,
            sequences: registered(
                registry,
                IntCounter::new(
                    "omnicall_scheduler_sequences_total",
                    "Sequences over the model scheduler's passes.",
                )?,
            )?,
            largest_batch: registered(
                registry,
                IntGauge::new(
                    "omnicall_scheduler_largest_batch",
                    "Most sequences in one pass so far.",
                )?,
            )?,
            deadline_misses: registered(
                registry,
                IntCounter::new(
                    "omnicall_scheduler_deadline_misses_total",
                    "Model requests finished after their deadline.",
                )?,
            )?,
            worst_lateness_seconds: registered(
                registry,
                Gauge::new(
                    "omnicall_scheduler_worst_lateness_seconds",
                    "The latest a model request finished past its deadline.",
                )?,
            )?,
        })
    }
}

/// Moves `counter` up to `total` (the scheduler counts; the page only mirrors it).
fn mirror(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

impl ServerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let calls_active = IntGauge::new("omnicall_calls_active", "Calls running now.")?;
        let calls_started = IntCounter::new(
            "omnicall_calls_started_total",
            "Offers answered with a call.",
        )?;
        let calls_rejected = IntCounterVec::new(
            Opts::new(
                "omnicall_calls_rejected_total",
                "Offers refused, by reason.",
            ),
            &["reason"],
        )?;
        let turns = IntCounter::new(
            "omnicall_turns_total",
            "Turns whose timing marks the sessions reported.",
        )?;
        let barge_ins = IntCounter::new(
            "omnicall_barge_ins_total",
            "Answers cut short by the user (speech over the model, or an interrupt message).",
        )?;
        let audio_packets_received = IntCounter::new(
            "omnicall_audio_packets_received_total",
            "RTP packets of the callers' microphones.",
        )?;
        let audio_packets_sent = IntCounterVec::new(
            Opts::new(
                "omnicall_audio_packets_sent_total",
                "Opus RTP packets sent to the callers: the model's voice, or silence between answers.",
            ),
            &["kind"],
        )?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "omnicall_turn_stage_seconds",
                "Time from the end of the user's speech to each stage of the answer (session clock).",
            )
            .buckets(STAGE_BUCKETS.to_vec()),
            &["stage"],
        )?;
        registry.register(Box::new(calls_active.clone()))?;
        registry.register(Box::new(calls_started.clone()))?;
        registry.register(Box::new(calls_rejected.clone()))?;
        registry.register(Box::new(turns.clone()))?;
        registry.register(Box::new(barge_ins.clone()))?;
        registry.register(Box::new(audio_packets_received.clone()))?;
        registry.register(Box::new(audio_packets_sent.clone()))?;
        registry.register(Box::new(stage_seconds.clone()))?;
        // every series exists from the start, so that a scrape before the first call shows zeros
        for kind in ["voice", "silence"] {
            audio_packets_sent.with_label_values(&[kind]);
        }
        for stage in TURN_STAGES {
            stage_seconds.with_label_values(&[stage]);
        }
        let media_dropped = IntCounterVec::new(
            Opts::new(
                "omnicall_media_dropped_total",
                "Caller media the transport dropped: audio packets (late, duplicate, undecodable), \
                 video frames (incomplete, undecodable, decoder behind).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(media_dropped.clone()))?;
        for kind in MEDIA_DROPPED_KINDS {
            media_dropped.with_label_values(&[kind]);
        }
        let load = LoadGauges::new(&registry)?;
        let queues = QueueMetrics::new(&registry)?;
        let scheduler = SchedulerMetrics::new(&registry)?;
        Ok(Self {
            queues,
            scheduler,
            media_dropped,
            load,
            registry,
            calls_active,
            calls_started,
            calls_rejected,
            turns,
            barge_ins,
            audio_packets_received,
            audio_packets_sent,
            stage_seconds,
        })
    }

    /// An offer was answered with a call (`201`), or refused with this HTTP status.
    pub fn offer_answered(&self, status: u16) {
        if status == 201 {
            self.calls_started.inc();
        } else {
            self.calls_rejected
                .with_label_values(&[reject_reason(status)])
                .inc();
        }
    }

    /// An offer was refused by admission control.
    pub fn offer_refused(&self, reason: RefusalReason) {
        self.calls_rejected
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// The load as admission measured it, against `capacity` (`None`: not admitting by
    /// capacity).
    pub fn set_load(&self, load: &LoadEstimate, capacity: Option<&Capacity>) {
        let g = &self.load;
        g.load_cores.set(load.busy_cores);
        g.call_cost_cores.set(load.call_cost.unwrap_or(0.0));
        let budget = capacity.map_or(0.0, Capacity::budget);
        g.capacity_cores.set(budget);
        g.headroom_cores.set(budget - load.busy_cores);
    }

    /// The shared model scheduler's figures, with its load as admission measured it.
    pub fn set_scheduler(&self, headroom: &Headroom, load: &LoadEstimate) {
        let m = &self.scheduler;
        m.busy_ratio.set(load.scheduler_busy.unwrap_or(0.0));
        let busy = headroom.busy.as_secs_f64();
        m.busy_seconds
            .inc_by((busy - m.busy_seconds.get()).max(0.0));
        m.call_cost_ratio
            .set(load.scheduler_call_cost.unwrap_or(0.0));
        m.queued_requests.set(headroom.queued as i64);
        m.sessions.set(headroom.sessions as i64);
        mirror(&m.passes, headroom.passes);
        mirror(&m.sequences, headroom.sequences);
        m.largest_batch.set(headroom.largest_batch as i64);
        mirror(&m.deadline_misses, headroom.deadline_misses);
        m.worst_lateness_seconds
            .set(headroom.worst_lateness.as_secs_f64());
    }

    /// The process's CPU time and memory.
    pub fn set_process(&self, usage: &ProcessUsage) {
        self.load.process_cpu_seconds.set(usage.cpu.as_secs_f64());
        self.load
            .process_resident_bytes
            .set(usage.resident_bytes as f64);
    }

    /// `count` pieces of caller media of `kind` (one of [`MEDIA_DROPPED_KINDS`]) were dropped.
    pub fn media_dropped(&self, kind: &str, count: u64) {
        if count > 0 {
            self.media_dropped.with_label_values(&[kind]).inc_by(count);
        }
    }

    /// One RTP packet of a caller's microphone arrived.
    pub fn audio_packet_received(&self) {
        self.audio_packets_received.inc();
    }

    /// The counters a call's audio sender bumps.
    pub fn packets_out(&self) -> PacketsOut {
        PacketsOut {
            voice: self.audio_packets_sent.with_label_values(&["voice"]),
            silence: self.audio_packets_sent.with_label_values(&["silence"]),
        }
    }

    /// Takes what a session event says about turns and barge-ins.
    pub fn observe(&self, event: &SessionEvent) {
        match event {
            SessionEvent::Timings(t) => self.observe_timings(t),
            SessionEvent::Interrupted { .. } => self.barge_ins.inc(),
            _ => {}
        }
    }

    fn observe_timings(&self, t: &TurnTimings) {
        self.turns.inc();
        let Some(speech_end) = t.speech_end else {
            return;
        };
        for (stage, mark) in TURN_STAGES.iter().zip(stage_marks(t)) {
            if let Some(mark) = mark {
                // a mark before the end of speech would be a clock mix-up: it counts as 0
                let seconds = mark.saturating_sub(speech_end).as_secs_f64();
                self.stage_seconds
                    .with_label_values(&[stage])
                    .observe(seconds);
            }
        }
    }

    /// The page, with `calls_active` calls running now.
    pub fn render(&self, calls_active: usize) -> anyhow::Result<String> {
        self.calls_active.set(calls_active as i64);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}

/// The `reason` label of a refused offer's HTTP status.
pub fn reject_reason(status: u16) -> &'static str {
    match status {
        503 => "busy",
        401 => "unauthorized",
        400 => "bad_offer",
        422 => "unsupported_offer",
        415 => "unsupported_media_type",
        500..=599 => "server_error",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name` (with its labels) on the page.
    fn sample(page: &str, name: &str) -> Option<f64> {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn session_queues_sum_over_calls_and_count_what_they_shed() {
        let m = ServerMetrics::new().unwrap();
        let (mut a, mut b) = (SessionQueueReport::default(), SessionQueueReport::default());
        let stats = |input_depth, shed_video_frames, retimed_audio| QueueStats {
            input_depth,
            shed_video_frames,
            retimed_audio,
            ..Default::default()
        };
        a.update(&m, stats(20, 3, 0));
        b.update(&m, stats(5, 0, 7));
        a.update(&m, stats(10, 4, 0));
        let page = m.render(2).unwrap();
        let depth = r#"omnicall_session_queue_depth{queue="input"}"#;
        let shed = r#"omnicall_media_shed_total{kind="video_frame"}"#;
        let retimed = r#"omnicall_media_retimed_total{kind="audio_piece"}"#;
        assert_eq!(sample(&page, depth), Some(15.0));
        assert_eq!(sample(&page, shed), Some(4.0));
        assert_eq!(sample(&page, retimed), Some(7.0));
        assert_eq!(
            sample(&page, r#"omnicall_media_shed_total{kind="audio_piece"}"#),
            Some(0.0)
        );
        a.finish(&m, stats(12, 4, 0));
        let page = m.render(1).unwrap();
        assert_eq!(
            sample(&page, depth),
            Some(5.0),
            "the ended call's queue is gone"
        );
        assert_eq!(sample(&page, shed), Some(4.0), "its counts stay");
    }

    #[test]
    fn the_model_channels_depths_are_summed_too() {
        let m = ServerMetrics::new().unwrap();
        let mut call = SessionQueueReport::default();
        let stats = QueueStats {
            thinker_depth: 3,
            talker_depth: 40,
            vocoder_depth: 2,
            ..Default::default()
        };
        call.update(&m, stats);
        let page = m.render(1).unwrap();
        let depth = |queue: &str| {
            sample(
                &page,
                &format!("omnicall_session_queue_depth{{queue=\"{queue}\"}}"),
            )
        };
        assert_eq!(depth("thinker"), Some(3.0));
        assert_eq!(depth("talker"), Some(40.0));
        assert_eq!(depth("vocoder"), Some(2.0));
        call.finish(&m, stats);
        let page = m.render(0).unwrap();
        assert_eq!(
            sample(&page, r#"omnicall_session_queue_depth{queue="talker"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn the_scheduler_figures_are_mirrored() {
        let m = ServerMetrics::new().unwrap();
        let mut headroom = Headroom {
            passes: 40,
            sequences: 100,
            largest_batch: 4,
            deadline_misses: 2,
            worst_lateness: Duration::from_millis(250),
            busy: Duration::from_millis(1500),
            queued: 3,
            sessions: 5,
            ..Headroom::default()
        };
        let load = LoadEstimate {
            scheduler_busy: Some(0.5),
            scheduler_call_cost: Some(0.1),
            ..LoadEstimate::default()
        };
        m.set_scheduler(&headroom, &load);
        headroom.passes = 50;
        m.set_scheduler(&headroom, &load);
        let page = m.render(5).unwrap();
        assert_eq!(sample(&page, "omnicall_scheduler_passes_total"), Some(50.0));
        assert_eq!(
            sample(&page, "omnicall_scheduler_sequences_total"),
            Some(100.0)
        );
        assert_eq!(sample(&page, "omnicall_scheduler_busy_ratio"), Some(0.5));
        assert_eq!(
            sample(&page, "omnicall_scheduler_busy_seconds_total"),
            Some(1.5)
        );
        assert_eq!(
            sample(&page, "omnicall_scheduler_call_cost_ratio"),
            Some(0.1)
        );
        assert_eq!(
            sample(&page, "omnicall_scheduler_queued_requests"),
            Some(3.0)
        );
        assert_eq!(
            sample(&page, "omnicall_scheduler_deadline_misses_total"),
            Some(2.0)
        );
        assert_eq!(
            sample(&page, "omnicall_scheduler_worst_lateness_seconds"),
            Some(0.25)
        );
    }

    #[test]
    fn events_become_counts_and_stage_histograms() {
        let m = ServerMetrics::new().unwrap();
        let ms = Duration::from_millis;
        m.observe(&SessionEvent::Timings(TurnTimings {
            turn: 1,
            speech_end: Some(ms(2_000)),
            end_of_turn: Some(ms(2_500)),
            prefill_done: Some(ms(2_700)),
            first_text_token: Some(ms(2_750)),
            first_audio_frame: Some(ms(3_100)),
            ..Default::default()
        }));
        // a typed turn: counted, no stages
        m.observe(&SessionEvent::Timings(TurnTimings {
            turn: 2,
            prefill_done: Some(ms(9_000)),
            ..Default::default()
        }));
        m.observe(&SessionEvent::Interrupted {
            turn: 2,
            heard: ms(100),
            kept_text: String::new(),
        });
        m.observe(&SessionEvent::AnswerDone { turn: 2 });
        m.offer_answered(201);
        m.offer_answered(503);
        m.offer_answered(503);
        m.offer_answered(401);
        m.audio_packet_received();
        let out = m.packets_out();
        out.voice.inc_by(3);
        out.silence.inc();

        let page = m.render(1).unwrap();
        assert_eq!(sample(&page, "omnicall_calls_active"), Some(1.0));
        assert_eq!(sample(&page, "omnicall_calls_started_total"), Some(1.0));
        assert_eq!(
            sample(&page, r#"omnicall_calls_rejected_total{reason="busy"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &page,
                r#"omnicall_calls_rejected_total{reason="unauthorized"}"#
            ),
            Some(1.0)
        );
        assert_eq!(sample(&page, "omnicall_turns_total"), Some(2.0));
        assert_eq!(sample(&page, "omnicall_barge_ins_total"), Some(1.0));
        assert_eq!(
            sample(&page, "omnicall_audio_packets_received_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(&page, r#"omnicall_audio_packets_sent_total{kind="voice"}"#),
            Some(3.0)
        );
        let stage = |s: &str, suffix: &str| {
            sample(
                &page,
                &format!("omnicall_turn_stage_seconds_{suffix}{{stage=\"{s}\"}}"),
            )
        };
        assert_eq!(stage("end_of_turn", "count"), Some(1.0));
        assert_eq!(stage("end_of_turn", "sum"), Some(0.5));
        assert_eq!(stage("first_audio_frame", "sum"), Some(1.1));
        // present without observations: this turn had no codec mark
        assert_eq!(stage("first_codec_token", "count"), Some(0.0));
        assert_eq!(
            sample(
                &page,
                r#"omnicall_turn_stage_seconds_bucket{stage="first_audio_frame",le="1.5"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                r#"omnicall_turn_stage_seconds_bucket{stage="first_audio_frame",le="1"}"#
            ),
            Some(0.0)
        );
        assert!(page.contains("# TYPE omnicall_turn_stage_seconds histogram"));
    }

    #[test]
    fn refusals_are_named_by_status() {
        assert_eq!(reject_reason(503), "busy");
        assert_eq!(reject_reason(422), "unsupported_offer");
        assert_eq!(reject_reason(502), "server_error");
        assert_eq!(reject_reason(404), "other");
    }
}
