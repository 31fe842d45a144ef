//! Batched decode throughput: one pass of the weights for N sessions' decode steps, each over
//! its own KV cache ([`Thinker::decode_batch`], [`Talker::forward_batch`]), for the Thinker and
//! the Talker of a config with random weights. The figure is tokens per second summed over the
//! sessions: what one model serves when the scheduler batches every call's steps.

use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::bench::{Achieved, Measurement};
use crate::model::config::Config;
use crate::model::linear::product_work;
use crate::model::random_weights::RandomWeights;
use crate::model::talker::{Talker, TalkerRows};
use crate::model::thinker::decoder::sequential_positions;
use crate::model::thinker::{LogitsFor, Thinker, ThinkerDecode};

/// What the batched bench runs.
#[derive(Debug, Clone)]
pub struct BatchedBenchOptions {
    /// Session counts measured.
    pub sessions: Vec<usize>,
    /// Positions every session's context holds before the timed steps.
    pub context_tokens: usize,
    /// Timed batched steps per session count (after one untimed step), at least.
    pub steps: usize,
    /// Steps go on until this much time has passed too (small models need many steps for a
    /// steady figure; full-size ones stop at `steps`).
    pub min_time: Duration,
}

impl Default for BatchedBenchOptions {
    fn default() -> Self {
        Self {
            sessions: vec![1, 2, 4, 8],
            context_tokens: 32,
            steps: 4,
            min_time: Duration::from_secs(1),
        }
    }
}

/// The batched stage of `omnicall bench model` with the default options.
pub fn bench_batched(
    config: &Config,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Vec<Measurement>> {
    bench_batched_with(config, dtype, device, &BatchedBenchOptions::default())
}

/// Thinker and Talker decode tokens/s summed over N sessions decoding together, per N.
pub fn bench_batched_with(
    config: &Config,
    dtype: DType,
    device: &Device,
    options: &BatchedBenchOptions,
) -> anyhow::Result<Vec<Measurement>> {
    if options.sessions.contains(&0) || options.steps == 0 || options.context_tokens == 0 {
        anyhow::bail!("batched bench: session counts, steps and context must be > 0");
    }
    let vb = RandomWeights::var_builder(dtype, device);
    let mut rows = Vec::new();

    let thinker = Thinker::new(&config.thinker_config, vb.pp("thinker"))
        .context("building the Thinker with random weights")?;
    let text = &config.thinker_config.text_config;
    let shape = format!(
        "{} layers x {}, {dtype:?}",
        text.num_hidden_layers, text.hidden_size
    );
    let vocab = thinker.vocab_size() as u32;
    let ids: Vec<u32> = (0..options.context_tokens as u32)
        .map(|i| i.wrapping_mul(7919).wrapping_add(1) % vocab)
        .collect();
    let mut prefilled = thinker.clone();
    prefilled.forward(
        &thinker.embed(&ids)?,
        &sequential_positions(0, ids.len(), device)?,
        LogitsFor::None,
    )?;
    for &n in &options.sessions {
        // Every session starts from the same context; each writes its own copy of the cache.
        let mut contexts: Vec<Thinker> = (0..n).map(|_| prefilled.clone()).collect();
        let mut next: Vec<u32> = (0..n as u32).map(|s| (s * 104_729 + 3) % vocab).collect();
        let step = |contexts: &mut [Thinker], next: &mut [u32]| -> anyhow::Result<()> {
            let mut steps: Vec<ThinkerDecode<'_>> = contexts
                .iter_mut()
                .zip(next.iter())
                .map(|(context, &id)| ThinkerDecode {
                    context,
                    id,
                    rope_delta: 0,
                })
                .collect();
            let out = thinker.decode_batch(&mut steps)?;
            for (id, o) in next.iter_mut().zip(out) {
                *id = o.logits.argmax(0)?.to_scalar::<u32>()? % vocab;
            }
            Ok(())
        };
        step(&mut contexts, &mut next)?; // warm-up (and the caches' first, copying write)
        let (started, before) = (Instant::now(), product_work());
        let mut steps = 0;
        while steps < options.steps || started.elapsed() < options.min_time {
            step(&mut contexts, &mut next)?;
            steps += 1;
        }
        let elapsed = started.elapsed();
        let work = product_work().since(before);
        rows.push(
            Measurement::new(
                "thinker batched decode",
                format!(
                    "{shape}, {n} session{}, {steps} steps after {} tokens",
                    if n == 1 { "" } else { "s" },
                    options.context_tokens
                ),
                (n * steps) as f64 / elapsed.as_secs_f64(),
                "tokens/s (sum)",
            )
            .achieving(Achieved::new(work, elapsed)),
        );
    }
    drop(prefilled);
    drop(thinker);

    let cfg = &config.talker_config;
    let talker =
        Talker::new(cfg, vb.pp("talker")).context("building the Talker with random weights")?;
    let shape = format!(
        "talker {} layers x {}, {dtype:?}",
        cfg.num_hidden_layers, cfg.hidden_size
    );
    let e = cfg.embedding_size;
    let rows_of = |n: usize, phase: f64| -> anyhow::Result<Tensor> {
        let v: Vec<f32> = (0..n * e)
            .map(|i| ((i as f64 * 0.37 + phase).sin() * 0.5) as f32)
            .collect();
        Ok(Tensor::from_vec(v, (1, n, e), device)?)
    };
    let mut prefilled = talker.clone();
    prefilled.forward(
        &rows_of(options.context_tokens, 0.0)?,
        &sequential_positions(0, options.context_tokens, device)?,
    )?;
    let row = rows_of(1, 4.0)?;
    for &n in &options.sessions {
        let mut contexts: Vec<Talker> = (0..n).map(|_| prefilled.clone()).collect();
        let step = |contexts: &mut [Talker]| -> anyhow::Result<()> {
            let mut batch = contexts
                .iter_mut()
                .map(|context| {
                    let position = context.cache_len() as i64;
                    Ok(TalkerRows {
                        context,
                        input: row.clone(),
                        positions: sequential_positions(position, 1, device)?,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let out = talker.forward_batch(&mut batch)?;
            for (_, logits) in &out {
                logits.device().synchronize()?;
            }
            Ok(())
        };
        step(&mut contexts)?;
        let (started, before) = (Instant::now(), product_work());
        let mut steps = 0;
        while steps < options.steps || started.elapsed() < options.min_time {
            step(&mut contexts)?;
            steps += 1;
        }
        let elapsed = started.elapsed();
        let work = product_work().since(before);
        rows.push(
            Measurement::new(
                "talker batched decode",
                format!(
                    "{shape}, {n} session{}, {steps} steps after {} rows",
                    if n == 1 { "" } else { "s" },
                    options.context_tokens
                ),
                (n * steps) as f64 / elapsed.as_secs_f64(),
                "codec tokens/s (sum)",
            )
            .achieving(Achieved::new(work, elapsed)),
        );
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_config_reports_every_session_count() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let config =
            Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let options = BatchedBenchOptions {
            sessions: vec![1, 3],
            context_tokens: 5,
            steps: 2,
            min_time: Duration::ZERO,
        };
        let rows = bench_batched_with(&config, DType::F32, &Device::Cpu, &options).unwrap();
        let stages: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(
            stages,
            [
                "thinker batched decode",
                "thinker batched decode",
                "talker batched decode",
                "talker batched decode"
            ]
        );
        assert!(
            rows[1].setup.contains("3 sessions, 2 steps"),
            "{}",
            rows[1].setup
        );
        assert!(rows.iter().all(|r| r.value.is_finite() && r.value > 0.0));
        assert!(rows.iter().all(|r| r.achieved.is_some()));
        let err = bench_batched_with(
            &config,
            DType::F32,
            &Device::Cpu,
            &BatchedBenchOptions {
                sessions: vec![0],
                ..options
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("must be > 0"), "{err}");
    }
}
