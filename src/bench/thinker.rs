//! Thinker LM speed at full size: the decoder stack and LM head built from a published config
//! with random weights (no files), timed on a prompt prefill, on one live 2-second block
//! appended to a warm cache, and on token-by-token decoding.

use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::bench::{Achieved, Measurement, per_run};
use crate::model::config::Config;
use crate::model::linear::{ProductWork, product_work};
use crate::model::random_weights::RandomWeights;
use crate::model::thinker::decoder::sequential_positions;
use crate::model::thinker::{LogitsFor, Thinker};

/// What the thinker bench runs.
#[derive(Debug, Clone)]
pub struct ThinkerBenchOptions {
    /// Prompt length for the prefill figure (a system prompt plus a few turns).
    pub prompt_tokens: usize,
    /// Tokens of one live 2-second block: 50 audio tokens plus two temporal grids of video
    /// (64 merged tokens each for a 224x224 camera frame).
    pub block_tokens: usize,
    /// Decode steps timed after the prompt.
    pub decode_tokens: usize,
    /// Timed repetitions of the prefill figures after one untimed run (the median is
    /// reported).
    pub iterations: usize,
}

impl Default for ThinkerBenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 500,
            block_tokens: 50 + 2 * 64,
            decode_tokens: 16,
            iterations: 1,
        }
    }
}

/// The thinker stage of `omnicall bench model` with the default options.
pub fn bench_thinker(
    config: &Config,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Vec<Measurement>> {
    bench_thinker_with(config, dtype, device, &ThinkerBenchOptions::default())
}

/// Prefill tokens/s of a prompt, ms and tokens/s of one 2-s block appended to a warm cache, and
/// decode tokens/s, for the Thinker of `config` with random weights.
pub fn bench_thinker_with(
    config: &Config,
    dtype: DType,
    device: &Device,
    options: &ThinkerBenchOptions,
) -> anyhow::Result<Vec<Measurement>> {
    let text = &config.thinker_config.text_config;
    let shape = format!(
        "{} layers x {}, {:?} on {}",
        text.num_hidden_layers,
        text.hidden_size,
        dtype,
        device_name(device)
    );
    let built = Instant::now();
    let vb = RandomWeights::var_builder(dtype, device);
    let mut thinker = Thinker::new(&config.thinker_config, vb.pp("thinker"))
        .context("building the Thinker with random weights")?;
    tracing::info!(
        "built the Thinker ({shape}) in {:.1} s",
        built.elapsed().as_secs_f64()
    );

    let vocab = thinker.vocab_size() as u32;
    // Ids spread over the vocabulary; their values do not change the cost.
    let ids = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(7919).wrapping_add(seed) % vocab)
            .collect()
    };
    let prompt = thinker.embed(&ids(options.prompt_tokens, 1))?;
    let prompt_positions = sequential_positions(0, options.prompt_tokens, device)?;
    let block = thinker.embed(&ids(options.block_tokens, 2))?;
    let block_positions =
        sequential_positions(options.prompt_tokens as i64, options.block_tokens, device)?;

    let mut rows = Vec::new();
    let (prefill, prefill_work) = time_runs(1, options.iterations, || {
        thinker.clear_cache();
        let out = thinker.forward(&prompt, &prompt_positions, LogitsFor::Last)?;
        sync(&out.hidden)
    })?;
    rows.push(
        Measurement::new(
            "thinker prefill",
            format!("{shape}, {}-token prompt", options.prompt_tokens),
            options.prompt_tokens as f64 / prefill.as_secs_f64(),
            "tokens/s",
        )
        .achieving(Achieved::new(prefill_work, prefill)),
    );

    let (block_time, block_work) = time_runs(1, options.iterations, || {
        thinker.truncate_cache(options.prompt_tokens);
        let out = thinker.forward(&block, &block_positions, LogitsFor::Last)?;
        sync(&out.hidden)
    })?;
    let block_setup = format!(
        "{shape}, {}-token 2 s block after {} tokens",
        options.block_tokens, options.prompt_tokens
    );
    rows.push(Measurement::new(
        "thinker block prefill",
        block_setup.clone(),
        block_time.as_secs_f64() * 1e3,
        "ms/block",
    ));
    rows.push(
        Measurement::new(
            "thinker block prefill",
            block_setup,
            options.block_tokens as f64 / block_time.as_secs_f64(),
            "tokens/s",
        )
        .achieving(Achieved::new(block_work, block_time)),
    );

    // Decode after the prompt: one token per step, logits of that row only.
    thinker.truncate_cache(options.prompt_tokens);
    let mut id = ids(1, 3)[0];
    let step = thinker.decode_step(id, 0)?; // warm-up
    sync(&step.logits)?;
    let (started, work_before) = (Instant::now(), product_work());
    for _ in 0..options.decode_tokens {
        let step = thinker.decode_step(id, 0)?;
        id = step.logits.argmax(0)?.to_scalar::<u32>()? % vocab;
    }
    let decode = started.elapsed();
    let decode_work = product_work().since(work_before);
    rows.push(
        Measurement::new(
            "thinker decode",
            format!(
                "{shape}, {} steps after {} tokens",
                options.decode_tokens, options.prompt_tokens
            ),
            options.decode_tokens as f64 / decode.as_secs_f64(),
            "tokens/s",
        )
        .achieving(Achieved::new(decode_work, decode)),
    );
    Ok(rows)
}

fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

/// Waits for the device to finish the work behind `t` (a no-op on the CPU).
fn sync(t: &Tensor) -> anyhow::Result<()> {
    t.device().synchronize()?;
    Ok(())
}

/// Runs `run` `warmup` times, then `iters` times, and returns the median duration and the
/// Linear work of one run; errors stop the measurement.
fn time_runs(
    warmup: usize,
    iters: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Duration, ProductWork)> {
    let before = product_work();
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed());
    }
    times.sort();
    let work = per_run(product_work().since(before), warmup + times.len());
    Ok((times[times.len() / 2], work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_config_runs_every_figure() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let config =
            Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let options = ThinkerBenchOptions {
            prompt_tokens: 20,
            block_tokens: 8,
            decode_tokens: 3,
            iterations: 1,
        };
        let rows = bench_thinker_with(&config, DType::F32, &Device::Cpu, &options).unwrap();
        let stages: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(
            stages,
            [
                "thinker prefill",
                "thinker block prefill",
                "thinker block prefill",
                "thinker decode"
            ]
        );
        assert!(rows.iter().all(|r| r.value.is_finite() && r.value > 0.0));
        // Prefill and decode say what their products achieved.
        let rates: Vec<_> = rows.iter().filter_map(|r| r.achieved).collect();
        assert_eq!(rates.len(), 3);
        assert!(rates.iter().all(|a| a.gflops > 0.0 && a.weight_gbps > 0.0));
    }
}
