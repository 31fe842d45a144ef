//! `omnicall bench turn`: the turn-taking models on the spoken turn set
//! (`tests/fixtures/turn/set`, `scripts/make_turn_set.py`): Smart Turn's time per call on 8 s
//! of audio, Silero's CPU per second of audio, Smart Turn's probability at each candidate
//! silence after the VAD's end of speech (in every mid-sentence pause and after every complete
//! question), and what end-of-turn policies make of them: false cut-offs on the pauses and the
//! endpointing delay on the questions. The thresholds of [`crate::engine::turn`] come from
//! this table (`docs/engine.md`, *Turn-taking*).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::runtime::thread_cpu;
use crate::media::smart_turn::{SMART_TURN_SAMPLES, SmartTurn};
use crate::media::vad::{VadBackend, VadConfig, VadDecision, VoiceDetector};

const RATE: usize = 16_000;

#[derive(Debug, clap::Args)]
pub struct TurnBenchArgs {
    /// The spoken turn set: WAV files (16 kHz mono) and their `segments.json`.
    #[arg(long, default_value = "tests/fixtures/turn/set")]
    pub set: PathBuf,
    /// Silences after the VAD's end of speech (ms) at which Smart Turn is scored.
    #[arg(long, value_delimiter = ',', default_value = "60,100,150,200,300,500")]
    pub silences: Vec<u64>,
    /// Timed Smart Turn calls on 8 s of audio (after 2 untimed).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// The VAD in front of Smart Turn.
    #[arg(long, default_value = "silero", value_parser = ["silero", "webrtc"])]
    pub vad: String,
}

/// One clip of the set.
#[derive(Debug, Clone)]
pub struct Clip {
    pub file: String,
    pub kind: String,
    /// `[start, end]` seconds of each spoken part.
    pub speech: Vec<(f64, f64)>,
}

/// The clips of `segments.json` in `dir`.
pub fn load_turn_set(dir: &Path) -> anyhow::Result<Vec<Clip>> {
    let path = dir.join("segments.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    entries
        .iter()
        .map(|c| {
            let field = |name: &str| {
                c.get(name)
                    .with_context(|| format!("{}: an entry has no {name:?}", path.display()))
            };
            let speech = field("speech")?
                .as_array()
                .context("speech is not a list")?
                .iter()
                .map(|s| Some((s.get(0)?.as_f64()?, s.get(1)?.as_f64()?)))
                .collect::<Option<Vec<_>>>()
                .with_context(|| {
                    format!("{}: a speech segment is not [start, end]", path.display())
                })?;
            Ok(Clip {
                file: field("file")?
                    .as_str()
                    .context("file is not text")?
                    .to_string(),
                kind: field("kind")?
                    .as_str()
                    .context("kind is not text")?
                    .to_string(),
                speech,
            })
        })
        .collect()
}

/// A clip's samples (16 kHz mono 16-bit WAV), -1..1.
pub fn load_wav(path: &Path) -> anyhow::Result<Vec<f32>> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = reader.spec();
    if spec.sample_rate as usize != RATE || spec.channels != 1 || spec.bits_per_sample != 16 {
        bail!(
            "{}: {} Hz, {} channels, {} bits; the turn set is 16 kHz mono 16-bit",
            path.display(),
            spec.sample_rate,
            spec.channels,
            spec.bits_per_sample
        );
    }
    reader
        .samples::<i16>()
        .map(|s| Ok(s? as f32 / 32768.0))
        .collect::<Result<_, hound::Error>>()
        .with_context(|| format!("reading {}", path.display()))
}

/// Media time (s) from which the detector says silence, for speech that really ends at `end`
/// (and starts again at `next`, if it does): the end of the last speech frame before `next`,
/// looking at most 600 ms past `end`.
pub fn speech_end_decision(decisions: &[VadDecision], end: f64, next: Option<f64>) -> Option<f64> {
    let horizon = Duration::from_secs_f64(next.unwrap_or(f64::MAX).min(end + 0.6));
    let horizon = decisions
        .iter()
        .position(|d| d.end() > horizon)
        .unwrap_or(decisions.len());
    let last = decisions[..horizon].iter().rposition(|d| d.speech)?;
    Some(decisions[last].end().as_secs_f64())
}

/// A point where the end-of-turn model is asked: a VAD end of speech in a pause or at the end.
#[derive(Debug, Clone)]
pub struct TurnPoint {
    pub file: String,
    /// A true end of the utterance (else a mid-sentence pause).
    pub end: bool,
    /// The VAD's end of speech after the true end of the part (ms).
    pub vad_delay_ms: f64,
    /// Silence the VAD sees before the next part starts (pauses; `None` after the end).
    pub silence_ms: Option<f64>,
    /// Smart Turn's probability after each candidate silence (`None`: the pause is shorter).
    pub probability: Vec<Option<f32>>,
}

/// An end-of-turn policy on one Smart Turn prediction per pause: the model is asked after
/// `ask` of silence; a probability ≥ `high` ends the turn after `high_silence`, one ≥ `middle`
/// after `middle_silence`; any turn ends after `max_silence`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub ask: u64,
    pub high: f32,
    pub high_silence: u64,
    pub middle: f32,
    pub middle_silence: u64,
    pub max_silence: u64,
}

/// A policy's outcome on the set.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub false_cutoffs: usize,
    pub pauses: usize,
    /// Per complete question: end of speech (true) → turn ended, ms.
    pub delays: Vec<f64>,
}

impl Policy {
    /// Silence (ms after the VAD's end of speech) at which the turn ends, given `p` at `ask`;
    /// the prediction itself takes `compute_ms`.
    pub fn ends_after(&self, p: Option<f32>, compute_ms: f64) -> f64 {
        let asked = self.ask as f64 + compute_ms;
        let silence = match p {
            Some(p) if p >= self.high => self.high_silence,
            Some(p) if p >= self.middle => self.middle_silence,
            _ => self.max_silence,
        } as f64;
        if silence < self.max_silence as f64 {
            silence.max(asked)
        } else {
            silence
        }
    }

    /// The policy on `points`, the probabilities read at the candidate `silences` (`ask` must
    /// be one of them).
    pub fn outcome(&self, points: &[TurnPoint], silences: &[u64], compute_ms: f64) -> Outcome {
        let column = silences.iter().position(|&s| s == self.ask);
        let mut out = Outcome {
            false_cutoffs: 0,
            pauses: 0,
            delays: Vec::new(),
        };
        for point in points {
            let p = column.and_then(|c| point.probability[c]);
            let ends = self.ends_after(p, compute_ms);
            match point.silence_ms {
                Some(silence) => {
                    out.pauses += 1;
                    if ends < silence {
                        out.false_cutoffs += 1;
                    }
                }
                None => out.delays.push(point.vad_delay_ms + ends),
            }
        }
        out
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn main(args: TurnBenchArgs) -> anyhow::Result<()> {
    let backend = match args.vad.as_str() {
        "webrtc" => VadBackend::WebRtc,
        _ => VadBackend::Silero,
    };
    if args.silences.is_empty() {
        bail!("--silences needs at least one silence");
    }
    let clips = load_turn_set(&args.set)?;
    let mut model = SmartTurn::new()?;

    // Smart Turn's cost per call: 8 s of the set's speech
    let mut eight_seconds = Vec::with_capacity(SMART_TURN_SAMPLES);
    for clip in &clips {
        if eight_seconds.len() >= SMART_TURN_SAMPLES {
            break;
        }
        eight_seconds.extend(load_wav(&args.set.join(&clip.file))?);
    }
    eight_seconds.truncate(SMART_TURN_SAMPLES);
    let cpu_before = thread_cpu();
    let call = super::median_time(2, args.iters.max(1), || {
        model.complete_probability(&eight_seconds)
    });
    let cpu = thread_cpu().zip(cpu_before).map(|(after, before)| {
        (after - before).as_secs_f64() * 1000.0 / (args.iters.max(1) + 2) as f64
    });
    let threads = candle_core::utils::get_num_threads();
    println!(
        "Smart Turn: {:.1} ms per call (median of {}, 8 s of audio, {threads} candle thread(s)); \
         CPU of this thread {} ms per call",
        call.as_secs_f64() * 1000.0,
        args.iters.max(1),
        cpu.map_or("unknown".into(), |ms| format!("{ms:.1}"))
    );

    let mut points = Vec::new();
    let (mut audio_seconds, mut vad_time) = (0.0, Duration::ZERO);
    let (mut turn_time, mut turn_calls) = (Duration::ZERO, 0usize);
    let mut asked_per_pause = 0usize;
    for clip in clips
        .iter()
        .filter(|c| c.kind == "complete" || c.kind == "pause")
    {
        let audio = load_wav(&args.set.join(&clip.file))?;
        let mut vad =
            VoiceDetector::new(VadConfig::for_backend(backend), RATE as u32, Duration::ZERO)?;
        let started = Instant::now();
        let decisions: Vec<VadDecision> = audio.chunks(320).flat_map(|p| vad.push(p)).collect();
        vad_time += started.elapsed();
        audio_seconds += audio.len() as f64 / RATE as f64;
        for (k, &(_, end)) in clip.speech.iter().enumerate() {
            let next = clip.speech.get(k + 1).map(|s| s.0);
            let Some(vad_end) = speech_end_decision(&decisions, end, next) else {
                println!("{}: the VAD found no speech before {end} s", clip.file);
                continue;
            };
            let silence_ms = next.map(|n| (n - vad_end) * 1000.0);
            let mut probability = Vec::new();
            for &s in &args.silences {
                if silence_ms.is_some_and(|pause| s as f64 >= pause) {
                    probability.push(None);
                    continue;
                }
                let n = (((vad_end + s as f64 / 1000.0) * RATE as f64) as usize).min(audio.len());
                let started = Instant::now();
                probability.push(Some(model.complete_probability(&audio[..n])?));
                turn_time += started.elapsed();
                turn_calls += 1;
            }
            asked_per_pause += 1;
            points.push(TurnPoint {
                file: clip.file.clone(),
                end: next.is_none(),
                vad_delay_ms: (vad_end - end) * 1000.0,
                silence_ms,
                probability,
            });
        }
    }
    if points.is_empty() {
        bail!("{}: no complete or pause clips", args.set.display());
    }
    let per_call_ms = turn_time.as_secs_f64() * 1000.0 / turn_calls.max(1) as f64;
    let vad_ms_per_s = vad_time.as_secs_f64() * 1000.0 / audio_seconds;
    // the engine asks once per pause of the VAD
    let turn_ms_per_s = per_call_ms * asked_per_pause as f64 / audio_seconds;
    println!(
        "{backend:?} VAD: {vad_ms_per_s:.2} ms CPU per s of audio; Smart Turn asked once per pause: \
         {asked_per_pause} pauses in {audio_seconds:.1} s, {per_call_ms:.1} ms per call (turn-set audio): \
         {turn_ms_per_s:.2} ms CPU per s; together {:.2} ms CPU per s of call ({:.2} % of a core)",
        vad_ms_per_s + turn_ms_per_s,
        (vad_ms_per_s + turn_ms_per_s) / 10.0
    );

    println!();
    let header: Vec<String> = args.silences.iter().map(|s| format!("p@{s}ms")).collect();
    println!(
        "| clip | point | VAD end (ms after true end) | silence seen (ms) | {} |",
        header.join(" | ")
    );
    println!(
        "| --- | --- | ---: | ---: |{}",
        " ---: |".repeat(args.silences.len())
    );
    for p in &points {
        let probs: Vec<String> = p
            .probability
            .iter()
            .map(|x| x.map_or("—".into(), |x| format!("{x:.2}")))
            .collect();
        println!(
            "| {} | {} | {:.0} | {} | {} |",
            p.file,
            if p.end { "end" } else { "pause" },
            p.vad_delay_ms,
            p.silence_ms.map_or("—".into(), |s| format!("{s:.0}")),
            probs.join(" | ")
        );
    }

    println!();
    println!("| ask after (ms) | threshold | pauses kept open (p < t) | ends at or above t |");
    println!("| ---: | ---: | ---: | ---: |");
    for (c, &s) in args.silences.iter().enumerate() {
        for t in [0.3f32, 0.5, 0.7, 0.8, 0.9, 0.95] {
            let pauses: Vec<_> = points.iter().filter(|p| !p.end).collect();
            let open = pauses
                .iter()
                .filter(|p| p.probability[c].is_none_or(|x| x < t))
                .count();
            let ends: Vec<_> = points.iter().filter(|p| p.end).collect();
            let done = ends
                .iter()
                .filter(|p| p.probability[c].is_some_and(|x| x >= t))
                .count();
            println!(
                "| {s} | {t} | {open}/{} | {done}/{} |",
                pauses.len(),
                ends.len()
            );
        }
    }

    // policies: one prediction per pause, two tiers, the fallback
    let compute_ms = cpu.unwrap_or(call.as_secs_f64() * 1000.0);
    let mut results = Vec::new();
    for &ask in &args.silences {
        for high in [0.5f32, 0.7, 0.8, 0.9, 0.95, 0.98] {
            for high_silence in [100u64, 150, 200, 300, 400, 600] {
                for middle in [0.1f32, 0.2, 0.3, 0.5, 0.7, 1.1] {
                    for middle_silence in [400u64, 600, 800, 1000, 1200] {
                        if middle > high || high_silence < ask || middle_silence < high_silence {
                            continue;
                        }
                        let policy = Policy {
                            ask,
                            high,
                            high_silence,
                            middle,
                            middle_silence,
                            max_silence: 1500,
                        };
                        let outcome = policy.outcome(&points, &args.silences, compute_ms);
                        results.push((policy, outcome));
                    }
                }
            }
        }
    }
    let allowed = |o: &Outcome| o.false_cutoffs * 10 <= o.pauses;
    let mut good: Vec<_> = results.iter().filter(|(_, o)| allowed(o)).collect();
    good.sort_by(|a, b| {
        median(&a.1.delays)
            .total_cmp(&median(&b.1.delays))
            .then(percentile(&a.1.delays, 0.9).total_cmp(&percentile(&b.1.delays, 0.9)))
    });
    println!();
    println!(
        "policies with false cut-offs <= 10 %, lowest endpointing delay first (Smart Turn {compute_ms:.0} ms a call, fallback 1500 ms):"
    );
    println!(
        "| ask | high ≥ | then after | middle ≥ | then after | false cut-offs | delay p50 | delay p90 |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let row = |(p, o): &(Policy, Outcome)| {
        println!(
            "| {} ms | {} | {} ms | {} | {} ms | {}/{} | {:.0} ms | {:.0} ms |",
            p.ask,
            p.high,
            p.high_silence,
            if p.middle > 1.0 {
                "—".into()
            } else {
                p.middle.to_string()
            },
            p.middle_silence,
            o.false_cutoffs,
            o.pauses,
            median(&o.delays),
            percentile(&o.delays, 0.9)
        )
    };
    for r in good.iter().take(12) {
        row(r);
    }
    let before = Policy {
        ask: 60,
        high: 0.5,
        high_silence: 200,
        middle: 1.1,
        middle_silence: 1500,
        max_silence: 1500,
    };
    if args.silences.contains(&60) {
        println!("the rule before this table (ask at 60 ms, p >= 0.5 after 200 ms, else 1.5 s):");
        row(&(before, before.outcome(&points, &args.silences, compute_ms)));
    }
    let defaults = crate::engine::turn::SmartTurnConfig::default();
    let ms = |d: Duration| d.as_millis() as u64;
    let chosen = Policy {
        ask: ms(defaults.pause),
        high: defaults.threshold,
        high_silence: ms(defaults.complete_silence),
        middle: defaults.likely_threshold,
        middle_silence: ms(defaults.likely_silence),
        max_silence: ms(defaults.max_silence),
    };
    if args.silences.contains(&chosen.ask) {
        println!("the sessions' defaults (`SmartTurnConfig::default()`):");
        row(&(chosen, chosen.outcome(&points, &args.silences, compute_ms)));
    }
    Ok(())
}
