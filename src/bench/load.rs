//! `omnicall bench load`: many headless callers ([`call`](crate::bench::call)) against one
//! running server, at several numbers of calls at once, and a soak of calls starting and
//! ending. What the server spent and refused comes from its `/metrics` page, so the server
//! may run anywhere.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench::call::{CallBenchOptions, run_call_bench, summarize};
use crate::rtc::RtcConfig;
use crate::rtc::admission::ProcessUsage;
use crate::rtc::client::OfferRefused;

/// Load on a running server: N callers at once, per N; or a soak.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Spoken prompt (WAV, any rate); repeat the flag for several, used in turn.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<PathBuf>,
    /// Numbers of calls at once, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub calls: Vec<usize>,
    /// Spoken turns of every call.
    #[arg(long, default_value_t = 2)]
    pub turns: usize,
    /// Seconds between the starts of two calls of a run (callers rarely come at the same
    /// instant; 0: all at once).
    #[arg(long, default_value_t = 0.5)]
    pub stagger: f64,
    /// Bearer token of the server (also for its /metrics).
    #[arg(long)]
    pub token: Option<String>,
    /// Silence before each prompt, in seconds.
    #[arg(long, default_value_t = 1.5)]
    pub gap: f64,
    /// Longest wait for an answer, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub answer_timeout: f64,
    /// Local UDP address for ICE (repeatable; default: loopback).
    #[arg(long = "udp")]
    pub udp_addrs: Vec<String>,
    /// Instead of the runs: keep --soak-calls calls going (each one turn, then the next
    /// caller) for this many minutes, sampling the server's memory between calls every 30 s.
    #[arg(long)]
    pub soak_minutes: Option<f64>,
    /// Calls at once during the soak.
    #[arg(long, default_value_t = 2)]
    pub soak_calls: usize,
    /// Read the server's CPU time and memory from /proc of this process (a server on this
    /// machine whose /metrics does not show them).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the tables here too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

/// What one run at N calls measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRow {
    pub calls: usize,
    pub turns_expected: usize,
    pub turns_answered: usize,
    /// Voice to voice over the answered turns, in ms.
    pub v2v_p50: Option<f64>,
    pub v2v_p90: Option<f64>,
    pub refused: usize,
    /// Calls that were admitted but failed (connection, timeouts), with the first error.
    pub failed: usize,
    pub first_error: Option<String>,
    /// Media the server dropped, shed or re-timed during the run (its `/metrics` counters).
    pub media_dropped: Option<f64>,
    pub media_shed: Option<f64>,
    pub media_retimed: Option<f64>,
    /// Server cores busy on average over the run.
    pub server_cores: Option<f64>,
    /// Fraction of the run the shared model scheduler's thread ran passes (`None`: no shared
    /// scheduler), and its requests finished after their deadline.
    pub scheduler_busy: Option<f64>,
    pub deadline_misses: Option<f64>,
    /// Server resident memory after the run, in MiB.
    pub rss_after_mib: Option<f64>,
}

/// Samples of one metric family on a Prometheus text page, summed over their labels.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once(' ').map(|(_, v)| v)
        } else {
            rest.strip_prefix(' ')
        };
        if let Some(v) = value.and_then(|v| v.trim().parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The server's `/metrics` page.
async fn scrape(url: &str, token: Option<&str>) -> anyhow::Result<String> {
    let url = format!("{}/metrics", url.trim_end_matches('/'));
    let token = token.map(String::from);
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url).timeout(Duration::from_secs(10));
        if let Some(t) = &token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        request
            .call()
            .with_context(|| format!("reading {url}"))?
            .into_string()
            .context("reading the metrics page")
    })
    .await?
}

/// The server's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct ServerCounters {
    at: Option<Instant>,
    cpu_seconds: Option<f64>,
    rss_bytes: Option<f64>,
    dropped: Option<f64>,
    shed: Option<f64>,
    retimed: Option<f64>,
    calls_active: Option<f64>,
    scheduler_busy_seconds: Option<f64>,
    scheduler_passes: Option<f64>,
    deadline_misses: Option<f64>,
}

impl ServerCounters {
    fn read(page: &str, server_pid: Option<u32>) -> Self {
        let usage = server_pid.and_then(ProcessUsage::of);
        Self {
            at: Some(Instant::now()),
            cpu_seconds: usage
                .map(|u| u.cpu.as_secs_f64())
                .or_else(|| metric_sum(page, "omnicall_process_cpu_seconds")),
            rss_bytes: usage
                .map(|u| u.resident_bytes as f64)
                .or_else(|| metric_sum(page, "omnicall_process_resident_bytes")),
            dropped: metric_sum(page, "omnicall_media_dropped_total"),
            shed: metric_sum(page, "omnicall_media_shed_total"),
            retimed: metric_sum(page, "omnicall_media_retimed_total"),
            calls_active: metric_sum(page, "omnicall_calls_active"),
            scheduler_busy_seconds: metric_sum(page, "omnicall_scheduler_busy_seconds_total"),
            scheduler_passes: metric_sum(page, "omnicall_scheduler_passes_total"),
            deadline_misses: metric_sum(page, "omnicall_scheduler_deadline_misses_total"),
        }
    }
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

/// How one caller's call went.
enum CallOutcome {
    Answered(Vec<f64>),
    Refused,
    Failed(String),
}

fn call_options(args: &LoadArgs, turns: usize) -> anyhow::Result<CallBenchOptions> {
    let mut rtc = RtcConfig {
        udp_addrs: vec!["127.0.0.1:0".into()],
        ..Default::default()
    };
    if !args.udp_addrs.is_empty() {
        rtc.udp_addrs = args.udp_addrs.clone();
    }
    for (what, s) in [
        ("--gap", args.gap),
        ("--answer-timeout", args.answer_timeout),
    ] {
        anyhow::ensure!(
            s.is_finite() && s >= 0.0,
            "{what} must be a number of seconds >= 0, got {s}"
        );
    }
    Ok(CallBenchOptions {
        token: args.token.clone(),
        turns,
        warmup: 0,
        gap: Duration::from_secs_f64(args.gap),
        answer_timeout: Duration::from_secs_f64(args.answer_timeout),
        rtc,
        ..CallBenchOptions::new(args.url.clone(), args.prompts.clone())
    })
}

async fn one_call(options: CallBenchOptions, delay: Duration) -> CallOutcome {
    tokio::time::sleep(delay).await;
    match run_call_bench(options).await {
        Ok(report) => CallOutcome::Answered(
            report
                .rows
                .iter()
                .filter_map(|r| r.voice_to_voice())
                .collect(),
        ),
        Err(e)
            if e.chain()
                .any(|c| c.downcast_ref::<OfferRefused>().is_some()) =>
        {
            CallOutcome::Refused
        }
        Err(e) => CallOutcome::Failed(format!("{e:#}")),
    }
}

/// Waits until the server shows no call (hung-up calls end in the background).
/// The server's counters once it has no call and its memory has settled: a call leaves the
/// call list before its session's threads have ended and handed their memory back (a few
/// seconds at most), so RSS is read once two readings a second apart agree within 1 %.
async fn wait_idle(args: &LoadArgs) -> anyhow::Result<ServerCounters> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settling: Option<f64> = None;
    loop {
        let counters = ServerCounters::read(
            &scrape(&args.url, args.token.as_deref()).await?,
            args.server_pid,
        );
        if Instant::now() > deadline {
            return Ok(counters);
        }
        if counters.calls_active.is_none_or(|n| n == 0.0) {
            let Some(rss) = counters.rss_bytes else {
                return Ok(counters);
            };
            if settling.is_some_and(|before| (rss - before).abs() <= 0.01 * before) {
                return Ok(counters);
            }
            settling = Some(rss);
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else {
            settling = None;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One run: `calls` callers, started `stagger` apart.
async fn run_level(args: &LoadArgs, calls: usize) -> anyhow::Result<LoadRow> {
    anyhow::ensure!(calls > 0, "--calls must list numbers of at least 1");
    let options = call_options(args, args.turns)?;
    let stagger = Duration::from_secs_f64(args.stagger);
    let before = wait_idle(args).await?;
    let tasks: Vec<_> = (0..calls)
        .map(|i| tokio::spawn(one_call(options.clone(), stagger * i as u32)))
        .collect();
    let mut row = LoadRow {
        calls,
        turns_expected: 0,
        turns_answered: 0,
        v2v_p50: None,
        v2v_p90: None,
        refused: 0,
        failed: 0,
        first_error: None,
        media_dropped: None,
        media_shed: None,
        media_retimed: None,
        server_cores: None,
        scheduler_busy: None,
        deadline_misses: None,
        rss_after_mib: None,
    };
    let mut v2v = Vec::new();
    for task in tasks {
        match task.await.context("a caller task failed")? {
            CallOutcome::Answered(turns) => {
                row.turns_expected += args.turns;
                row.turns_answered += turns.len();
                v2v.extend(turns);
            }
            CallOutcome::Refused => row.refused += 1,
            CallOutcome::Failed(e) => {
                row.turns_expected += args.turns;
                row.failed += 1;
                row.first_error.get_or_insert(e);
            }
        }
    }
    let busy = ServerCounters::read(
        &scrape(&args.url, args.token.as_deref()).await?,
        args.server_pid,
    );
    let after = wait_idle(args).await?;
    if let Some(s) = summarize("voice_to_voice", v2v) {
        row.v2v_p50 = Some(s.median);
        row.v2v_p90 = Some(s.p90);
    }
    row.media_dropped = delta(before.dropped, after.dropped);
    row.media_shed = delta(before.shed, after.shed);
    row.media_retimed = delta(before.retimed, after.retimed);
    if let (Some(t0), Some(t1)) = (before.at, busy.at) {
        let wall = (t1 - t0).as_secs_f64().max(1e-3);
        row.server_cores = delta(before.cpu_seconds, busy.cpu_seconds).map(|cpu| cpu / wall);
        row.scheduler_busy = delta(before.scheduler_busy_seconds, busy.scheduler_busy_seconds)
            .map(|busy| busy / wall);
    }
    row.deadline_misses = delta(before.deadline_misses, after.deadline_misses);
    // a server whose calls run their passes themselves has no scheduler to show (its
    // figures stay at 0)
    if delta(before.scheduler_passes, after.scheduler_passes).is_none_or(|p| p <= 0.0) {
        (row.scheduler_busy, row.deadline_misses) = (None, None);
    }
    row.rss_after_mib = after.rss_bytes.map(mib);
    Ok(row)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

/// The runs as a markdown table.
pub fn load_table(rows: &[LoadRow]) -> String {
    let mut out = String::from(
        "| calls | turns answered | voice-to-voice p50 (s) | p90 (s) | refused | failed | media dropped | shed | re-timed | server cores | scheduler busy | deadline misses | RSS after (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.calls,
            r.turns_answered,
            r.turns_expected,
            cell(r.v2v_p50.map(|v| v / 1000.0), 2),
            cell(r.v2v_p90.map(|v| v / 1000.0), 2),
            r.refused,
            r.failed,
            cell(r.media_dropped, 0),
            cell(r.media_shed, 0),
            cell(r.media_retimed, 0),
            cell(r.server_cores, 2),
            r.scheduler_busy
                .map_or_else(|| "n/a".into(), |b| format!("{:.0} %", b * 100.0)),
            cell(r.deadline_misses, 0),
            cell(r.rss_after_mib, 0),
        );
    }
    out
}

/// A memory sample of the soak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RssSample {
    pub minutes: f64,
    pub calls_done: usize,
    pub rss_mib: f64,
}

/// The spread of the samples after the first `warmup` share of them: (max - min) / min.
pub fn rss_spread(samples: &[RssSample], warmup: f64) -> Option<f64> {
    let skip = ((samples.len() as f64) * warmup).floor() as usize;
    let rest = samples.get(skip..)?;
    let min = rest.iter().map(|s| s.rss_mib).min_by(f64::total_cmp)?;
    let max = rest.iter().map(|s| s.rss_mib).max_by(f64::total_cmp)?;
    Some((max - min) / min)
}

async fn soak(args: &LoadArgs, minutes: f64) -> anyhow::Result<String> {
    anyhow::ensure!(
        minutes.is_finite() && minutes > 0.0,
        "--soak-minutes must be positive, got {minutes}"
    );
    anyhow::ensure!(args.soak_calls > 0, "--soak-calls must be at least 1");
    let options = call_options(args, 1)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let every = Duration::from_secs(30).min(Duration::from_secs_f64(minutes * 60.0 / 4.0));
    let mut samples = Vec::new();
    let (mut done, mut refused, mut failed) = (0usize, 0usize, 0usize);
    let mut running = tokio::task::JoinSet::new();
    let mut next_sample = start + every;
    // Memory is sampled between calls: when a sample is due no call starts, the running ones
    // end, the server goes idle, then its RSS is read. In-call samples would measure where each
    // call was, not what the server keeps.
    loop {
        let now = Instant::now();
        let sampling = now >= next_sample || now >= end;
        if sampling && running.is_empty() {
            let idle = wait_idle(args).await?;
            if let Some(rss) = idle.rss_bytes {
                samples.push(RssSample {
                    minutes: start.elapsed().as_secs_f64() / 60.0,
                    calls_done: done,
                    rss_mib: mib(rss),
                });
            }
            if Instant::now() >= end {
                break;
            }
            next_sample = Instant::now() + every;
            continue;
        }
        if !sampling {
            while running.len() < args.soak_calls {
                running.spawn(one_call(options.clone(), Duration::ZERO));
            }
        }
        let wait = if sampling {
            Duration::from_secs(3600)
        } else {
            next_sample.saturating_duration_since(now)
        };
        if let Ok(Some(outcome)) = tokio::time::timeout(wait, running.join_next()).await {
            match outcome.context("a caller task failed")? {
                CallOutcome::Answered(_) => done += 1,
                CallOutcome::Refused => refused += 1,
                CallOutcome::Failed(e) => {
                    failed += 1;
                    tracing::warn!("soak call failed: {e}");
                }
            }
        }
    }
    let idle = wait_idle(args).await?;
    let mut out = format!(
        "soak: {minutes} min, {} calls at once: {done} calls done, {refused} refused, {failed} failed\n\n\
         | minute | calls done | RSS between calls (MiB) |\n| ---: | ---: | ---: |\n",
        args.soak_calls
    );
    for s in &samples {
        let _ = writeln!(
            out,
            "| {:.1} | {} | {:.0} |",
            s.minutes, s.calls_done, s.rss_mib
        );
    }
    let _ = writeln!(
        out,
        "\nRSS after the calls ended: {} MiB; spread after the first 20 % of samples: {}",
        cell(idle.rss_bytes.map(mib), 0),
        rss_spread(&samples, 0.2).map_or("n/a".into(), |s| format!("{:.1} %", s * 100.0))
    );
    Ok(out)
}

async fn run(args: &LoadArgs) -> anyhow::Result<String> {
    if let Some(minutes) = args.soak_minutes {
        return soak(args, minutes).await;
    }
    anyhow::ensure!(!args.calls.is_empty(), "--calls lists no number of calls");
    anyhow::ensure!(
        args.stagger.is_finite() && args.stagger >= 0.0,
        "--stagger must be a number of seconds >= 0, got {}",
        args.stagger
    );
    // the memory of a server that has served one call: the reference for "after all calls"
    let first = run_level(args, 1).await?;
    let mut rows = Vec::new();
    for &calls in &args.calls {
        let row = run_level(args, calls).await?;
        if let Some(e) = &row.first_error {
            tracing::warn!("{calls} calls: {} failed, first: {e}", row.failed);
        }
        println!(
            "{}",
            load_table(std::slice::from_ref(&row))
                .lines()
                .last()
                .unwrap_or("")
        );
        rows.push(row);
    }
    let mut out = load_table(&rows);
    let last = rows.last().and_then(|r| r.rss_after_mib);
    let _ = writeln!(
        out,
        "\nRSS after one call: {} MiB; after all runs: {} MiB{}",
        cell(first.rss_after_mib, 0),
        cell(last, 0),
        match (first.rss_after_mib, last) {
            (Some(a), Some(b)) => format!(" ({:+.1} %)", (b - a) / a * 100.0),
            _ => String::new(),
        }
    );
    Ok(out)
}

/// `omnicall bench load`: runs, prints the table (and writes it when asked).
pub fn main(args: LoadArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(run(&args))?;
    print!("\n{out}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let page = "# HELP x\n# TYPE omnicall_media_dropped_total counter\n\
                    omnicall_media_dropped_total{kind=\"video\"} 3\n\
                    omnicall_media_dropped_total{kind=\"audio\"} 0\n\
                    omnicall_media_dropped_totally 9\n\
                    omnicall_process_resident_bytes 1048576\n";
        assert_eq!(metric_sum(page, "omnicall_media_dropped_total"), Some(3.0));
        assert_eq!(
            metric_sum(page, "omnicall_process_resident_bytes").map(mib),
            Some(1.0)
        );
        assert_eq!(metric_sum(page, "omnicall_absent"), None);
    }

    #[test]
    fn rss_spread_leaves_out_the_warm_up() {
        let s = |minutes: f64, rss_mib: f64| RssSample {
            minutes,
            calls_done: 0,
            rss_mib,
        };
        let samples = [
            s(0.0, 100.0),
            s(1.0, 200.0),
            s(2.0, 210.0),
            s(3.0, 205.0),
            s(4.0, 200.0),
        ];
        let spread = rss_spread(&samples, 0.2).unwrap();
        assert!((spread - 0.05).abs() < 1e-9, "{spread}");
        assert_eq!(rss_spread(&[], 0.2), None);
    }

    #[test]
    fn the_table_names_what_it_could_not_measure() {
        let row = LoadRow {
            calls: 4,
            turns_expected: 8,
            turns_answered: 7,
            v2v_p50: Some(1900.0),
            v2v_p90: Some(2300.0),
            refused: 1,
            failed: 0,
            first_error: None,
            media_dropped: None,
            media_shed: Some(0.0),
            media_retimed: Some(2.0),
            server_cores: Some(1.5),
            scheduler_busy: Some(0.42),
            deadline_misses: None,
            rss_after_mib: Some(300.0),
        };
        let table = load_table(&[row]);
        assert!(
            table.contains(
                "| 4 | 7/8 | 1.90 | 2.30 | 1 | 0 | n/a | 0 | 2 | 1.50 | 42 % | n/a | 300 |"
            ),
            "{table}"
        );
    }
}
