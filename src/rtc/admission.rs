//! Admission by capacity: the server measures what its calls cost in CPU as they run, and
//! refuses the offer that would push the calls in progress past real time.
//!
//! The cost is measured, not configured: a [`LoadMeter`] samples the process's CPU time every
//! second ([`ProcessUsage`]), and the busy cores over a [`LoadMeter::WINDOW`] in which the same
//! calls ran throughout, divided by their number, is the cost of one call (averaged over such
//! windows). The rule ([`decide`]) admits a call when the calls running plus the new one, each
//! at that cost, stay within the budget, `cores × max_load`. (The busy cores of the last window
//! are not the projection's base: they lag, still counting a call that just ended.) Until a
//! first cost is known, calls are admitted one at a time, each once the one before has been
//! measured. `max_calls` stays an upper bound either way.
//!
//! Whatever else runs on the machine is not in the process's CPU time: on a shared machine,
//! give the server fewer cores (`--capacity-cores`) than the machine has.
//!
//! With a shared model scheduler ([`crate::engine::scheduler`]) every call's Thinker and Talker
//! passes run on its one thread, which can be saturated while the process still has idle
//! cores. So the meter also samples that thread's busy time, learns a call's share of it from
//! the same steady windows, and the rule refuses the call that would take the thread past
//! `max_load` of its time. (Batching makes a call's share shrink as calls are added, so the
//! linear projection errs on the side of refusing.)

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// CPU time and resident memory of a process (Linux `/proc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    /// User and system CPU time of all its threads, those that ended included.
    pub cpu: Duration,
    pub resident_bytes: u64,
}

/// `/proc/<pid>/stat` counts CPU time in `USER_HZ` ticks, 100 a second on every Linux ABI.
const USER_HZ: u64 = 100;
const PAGE_BYTES: u64 = 4096;

impl ProcessUsage {
    /// This process's usage; `None` where `/proc` cannot tell.
    pub fn of_self() -> Option<Self> {
        Self::read("self")
    }

    /// The usage of process `pid`.
    pub fn of(pid: u32) -> Option<Self> {
        Self::read(&pid.to_string())
    }

    fn read(pid: &str) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        Self::parse(&stat, &statm)
    }

    /// From the texts of `/proc/<pid>/stat` and `/proc/<pid>/statm`.
    fn parse(stat: &str, statm: &str) -> Option<Self> {
        // the command name (field 2) may hold spaces: count fields after its closing ')'
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        // fields 14 and 15 (utime, stime) of the whole line are 12 and 13 after the name
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(Self {
            cpu: Duration::from_millis(ticks * 1000 / USER_HZ),
            resident_bytes: pages * PAGE_BYTES,
        })
    }
}

/// What the server may spend: `cores × max_load` busy cores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub cores: f64,
    /// The share of `cores` the calls may use (below 1: the margin for bursts, the transport,
    /// the scheduler's own jitter).
    pub max_load: f64,
}

impl Capacity {
    /// Every core this process may run on, 85 % of them for calls.
    pub fn of_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            cores: cores as f64,
            max_load: 0.85,
        }
    }

    pub fn budget(&self) -> f64 {
        self.cores * self.max_load
    }
}

/// The measured load when an offer comes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadEstimate {
    /// Cores the process kept busy over the last window.
    pub busy_cores: f64,
    /// Busy cores per call, from the last window in which calls ran (`None`: not yet known).
    pub call_cost: Option<f64>,
    /// Calls running now.
    pub calls: usize,
    /// Of them, the calls admitted too recently to show in `busy_cores`.
    pub unmeasured_calls: usize,
    /// Fraction of the last window the model scheduler's thread ran passes (`None`: no
    /// shared scheduler, or not measured yet).
    pub scheduler_busy: Option<f64>,
    /// A call's share of the scheduler thread's time, learned like `call_cost`.
    pub scheduler_call_cost: Option<f64>,
}

/// Why an offer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// All `max_calls` slots are taken.
    Slots,
    /// One more call would not fit in the measured capacity.
    Capacity,
    /// A call admitted a moment ago is still being measured (no cost known yet).
    Measuring,
}

impl RefusalReason {
    /// The `reason` label on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Slots => "busy",
            RefusalReason::Capacity => "capacity",
            RefusalReason::Measuring => "measuring",
        }
    }
}

/// A refused offer: why, in words, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
    pub retry_after: Duration,
}

/// How long a refused caller is told to wait: about how soon the load can have changed (a
/// call's turn is seconds long).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Whether one more call fits in `capacity` (`None`: any number does), with `max_calls` as
/// the upper bound.
pub fn decide(
    load: &LoadEstimate,
    capacity: Option<&Capacity>,
    max_calls: usize,
) -> Result<(), Refusal> {
    if load.calls >= max_calls {
        return Err(Refusal {
            reason: RefusalReason::Slots,
            message: format!(
                "all {max_calls} call slots are busy; try again when a call has ended"
            ),
            retry_after: RETRY_AFTER,
        });
    }
    let Some(capacity) = capacity else {
        return Ok(());
    };
    let Some(cost) = load.call_cost else {
        if load.unmeasured_calls > 0 {
            return Err(Refusal {
                reason: RefusalReason::Measuring,
                message: "the server is measuring what its first call costs; try again in a \
                          moment"
                    .into(),
                retry_after: LoadMeter::WINDOW,
            });
        }
        return Ok(());
    };
    let projected = cost * (load.calls + 1) as f64;
    if projected > capacity.budget() {
        return Err(Refusal {
            reason: RefusalReason::Capacity,
            message: format!(
                "the server is at capacity: {} calls at {cost:.2} cores each, and one more, \
                 need {projected:.2} of its {:.2} cores, which would put the calls in progress \
                 behind real time; try again later",
                load.calls,
                capacity.budget()
            ),
            retry_after: RETRY_AFTER,
        });
    }
    if let Some(share) = load.scheduler_call_cost {
        let projected = share * (load.calls + 1) as f64;
        if projected > capacity.max_load {
            return Err(Refusal {
                reason: RefusalReason::Capacity,
                message: format!(
                    "the model scheduler is at capacity: {} calls at {:.0} % of its thread \
                     each, and one more, need {:.0} % of it (at most {:.0} %), which would put \
                     the calls in progress behind real time; try again later",
                    load.calls,
                    share * 100.0,
                    projected * 100.0,
                    capacity.max_load * 100.0
                ),
                retry_after: RETRY_AFTER,
            });
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: Duration,
    /// The model scheduler thread's busy time so far, where there is one.
    scheduler_busy: Option<Duration>,
    calls: usize,
}

/// The process's CPU load over a sliding window, and the cost of one call learned from it.
#[derive(Debug, Default)]
pub struct LoadMeter {
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    samples: VecDeque<Sample>,
    call_cost: Option<f64>,
    scheduler_call_cost: Option<f64>,
    /// When calls were admitted, for those not yet in a full window.
    admitted: VecDeque<Instant>,
}

impl LoadMeter {
    /// The span the load is measured over.
    pub const WINDOW: Duration = Duration::from_secs(3);
    /// How often [`LoadMeter::sample`] should run.
    pub const PERIOD: Duration = Duration::from_secs(1);

    /// Takes one sample: the process's CPU time now, with `calls` running, and the model
    /// scheduler thread's busy time so far (`None`: no shared scheduler).
    pub fn sample(&self, calls: usize, scheduler_busy: Option<Duration>) {
        if let Some(usage) = ProcessUsage::of_self() {
            self.record(Instant::now(), usage.cpu, scheduler_busy, calls);
        }
    }

    /// Records the CPU time `cpu` and the scheduler's busy time at `at` with `calls` running,
    /// and learns the cost of a call from the window when every call in it ran through all
    /// of it.
    pub fn record(
        &self,
        at: Instant,
        cpu: Duration,
        scheduler_busy: Option<Duration>,
        calls: usize,
    ) {
        let mut s = self.state.lock().expect("load meter lock");
        s.samples.push_back(Sample {
            at,
            cpu,
            scheduler_busy,
            calls,
        });
        while s.samples.len() > 2 && at - s.samples[1].at >= Self::WINDOW {
            s.samples.pop_front();
        }
        while s.admitted.front().is_some_and(|&t| at - t > Self::WINDOW) {
            s.admitted.pop_front();
        }
        let window = window_load(&s.samples);
        if let (Some(busy), Some(n)) = (window.busy_cores, window.steady_calls)
            && n > 0
            && s.admitted.is_empty()
        {
            let cost = busy / n as f64;
            // one window is noisy (a prefill, a vocoder burst): average them
            s.call_cost = Some(s.call_cost.map_or(cost, |c| 0.5 * c + 0.5 * cost));
            if let Some(busy) = window.scheduler_busy {
                let share = busy / n as f64;
                s.scheduler_call_cost = Some(
                    s.scheduler_call_cost
                        .map_or(share, |c| 0.5 * c + 0.5 * share),
                );
            }
        }
    }

    /// A call was admitted now.
    pub fn admitted(&self, at: Instant) {
        self.state
            .lock()
            .expect("load meter lock")
            .admitted
            .push_back(at);
    }

    /// The load as an offer at `now` with `calls` running sees it.
    pub fn estimate(&self, now: Instant, calls: usize) -> LoadEstimate {
        let s = self.state.lock().expect("load meter lock");
        let window = window_load(&s.samples);
        LoadEstimate {
            busy_cores: window.busy_cores.unwrap_or(0.0),
            call_cost: s.call_cost,
            scheduler_busy: window.scheduler_busy,
            scheduler_call_cost: s.scheduler_call_cost,
            calls,
            unmeasured_calls: s
                .admitted
                .iter()
                .filter(|&&t| now - t <= Self::WINDOW)
                .count()
                .min(calls),
        }
    }
}

/// The load between the first and the last sample of a window.
#[derive(Debug, Default)]
struct WindowLoad {
    busy_cores: Option<f64>,
    /// Fraction of the window the scheduler's thread was busy.
    scheduler_busy: Option<f64>,
    /// The number of calls, when it stayed the same through the window.
    steady_calls: Option<usize>,
}

fn window_load(samples: &VecDeque<Sample>) -> WindowLoad {
    let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
        return WindowLoad::default();
    };
    let wall = (last.at - first.at).as_secs_f64();
    if wall < LoadMeter::PERIOD.as_secs_f64() / 2.0 {
        return WindowLoad::default();
    }
    let busy = last.cpu.saturating_sub(first.cpu).as_secs_f64() / wall;
    let scheduler_busy = match (first.scheduler_busy, last.scheduler_busy) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a).as_secs_f64() / wall).min(1.0)),
        _ => None,
    };
    let steady = samples
        .iter()
        .all(|s| s.calls == first.calls)
        .then_some(first.calls);
    WindowLoad {
        busy_cores: Some(busy),
        scheduler_busy,
        steady_calls: steady,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_cores() -> Capacity {
        Capacity {
            cores: 2.0,
            max_load: 0.85,
        }
    }

    #[test]
    fn a_call_that_would_not_fit_is_refused() {
        // measured: 0.4 cores a call; budget 1.7: a fourth call fits (1.6), a fifth not (2.0)
        let load = LoadEstimate {
            busy_cores: 1.2,
            call_cost: Some(0.4),
            calls: 3,
            unmeasured_calls: 0,
            ..LoadEstimate::default()
        };
        assert_eq!(decide(&load, Some(&two_cores()), 16), Ok(()));
        // the lagging busy cores of a call that just ended do not count
        let after_a_hang_up = LoadEstimate {
            busy_cores: 1.69,
            ..load
        };
        assert_eq!(decide(&after_a_hang_up, Some(&two_cores()), 16), Ok(()));
        let fuller = LoadEstimate { calls: 4, ..load };
        let refusal = decide(&fuller, Some(&two_cores()), 16).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Capacity);
        assert!(
            refusal
                .message
                .contains("4 calls at 0.40 cores each, and one more, need 2.00 of its 1.70 cores"),
            "{}",
            refusal.message
        );
        assert_eq!(refusal.retry_after, RETRY_AFTER);
    }

    #[test]
    fn max_calls_stays_the_upper_bound() {
        let idle = LoadEstimate {
            busy_cores: 0.1,
            call_cost: Some(0.01),
            calls: 4,
            unmeasured_calls: 0,
            ..LoadEstimate::default()
        };
        let refusal = decide(&idle, Some(&two_cores()), 4).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Slots);
        assert!(refusal.message.contains("all 4 call slots"));
    }

    #[test]
    fn without_a_known_cost_calls_come_in_one_at_a_time() {
        let cold = LoadEstimate::default();
        assert_eq!(decide(&cold, Some(&two_cores()), 4), Ok(()));
        let one_unmeasured = LoadEstimate {
            calls: 1,
            unmeasured_calls: 1,
            ..cold
        };
        let refusal = decide(&one_unmeasured, Some(&two_cores()), 4).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Measuring);
        assert_eq!(refusal.retry_after, LoadMeter::WINDOW);
    }

    #[test]
    fn the_meter_learns_a_calls_cost_from_a_steady_window() {
        let meter = LoadMeter::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        meter.admitted(t0);
        meter.admitted(t0);
        // two calls use 0.6 cores between them: 0.6 s of CPU every second
        for k in 0..=6u64 {
            meter.record(t0 + s(k), Duration::from_millis(600 * k), None, 2);
        }
        let load = meter.estimate(t0 + s(6), 2);
        assert!((load.busy_cores - 0.6).abs() < 1e-9, "{load:?}");
        assert!((load.call_cost.unwrap() - 0.3).abs() < 1e-9, "{load:?}");
        assert_eq!(load.unmeasured_calls, 0);
        // a third call admitted now is not in the load yet
        meter.admitted(t0 + s(6));
        assert_eq!(meter.estimate(t0 + s(6), 3).unmeasured_calls, 1);
    }

    #[test]
    fn a_call_that_would_saturate_the_model_scheduler_is_refused() {
        // plenty of cores, but each call takes 20 % of the scheduler's one thread: a fourth
        // call fits (80 % of it), a fifth (100 %) would put every call behind
        let load = LoadEstimate {
            busy_cores: 0.9,
            call_cost: Some(0.3),
            calls: 3,
            scheduler_busy: Some(0.6),
            scheduler_call_cost: Some(0.2),
            ..LoadEstimate::default()
        };
        let roomy = Capacity {
            cores: 16.0,
            max_load: 0.85,
        };
        assert_eq!(decide(&load, Some(&roomy), 16), Ok(()));
        let refusal = decide(&LoadEstimate { calls: 4, ..load }, Some(&roomy), 16).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Capacity);
        assert!(
            refusal.message.contains(
                "model scheduler is at capacity: 4 calls at 20 % of its thread each, and one \
                 more, need 100 % of it (at most 85 %)"
            ),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn the_meter_learns_a_calls_share_of_the_scheduler() {
        let meter = LoadMeter::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // three calls: the scheduler's thread runs passes 450 ms of every second
        for k in 0..=6u64 {
            let cpu = Duration::from_millis(900 * k);
            meter.record(t0 + s(k), cpu, Some(Duration::from_millis(450 * k)), 3);
        }
        let load = meter.estimate(t0 + s(6), 3);
        assert!(
            (load.scheduler_busy.unwrap() - 0.45).abs() < 1e-9,
            "{load:?}"
        );
        assert!(
            (load.scheduler_call_cost.unwrap() - 0.15).abs() < 1e-9,
            "{load:?}"
        );
        // without a scheduler nothing is learned about one
        let plain = LoadMeter::default();
        for k in 0..=6u64 {
            plain.record(t0 + s(k), Duration::from_millis(900 * k), None, 3);
        }
        let load = plain.estimate(t0 + s(6), 3);
        assert_eq!(
            (load.scheduler_busy, load.scheduler_call_cost),
            (None, None)
        );
    }

    #[test]
    fn a_window_while_calls_come_and_go_teaches_nothing() {
        let meter = LoadMeter::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for k in 0..=3u64 {
            meter.record(t0 + s(k), Duration::from_millis(500 * k), None, k as usize);
        }
        assert_eq!(meter.estimate(t0 + s(3), 3).call_cost, None);
    }

    #[test]
    fn proc_stat_is_read_after_the_command_name() {
        let stat = "4242 (omni call) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 9 0 \
                    100 1000000 2000 18446744073709551615";
        let usage = ProcessUsage::parse(stat, "50000 2000 300 1 0 900 0").unwrap();
        assert_eq!(usage.cpu, Duration::from_secs(3));
        assert_eq!(usage.resident_bytes, 2000 * 4096);
        assert!(ProcessUsage::parse("garbage", "1 2").is_none());
        assert!(ProcessUsage::of_self().is_some_and(|u| u.resident_bytes > 0));
    }
}
