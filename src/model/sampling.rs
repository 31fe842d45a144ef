//! Choosing the next token from logits, in the order Hugging Face `generate` applies its
//! processors: repetition penalty (over every id so far), suppressed ids, temperature, top-k,
//! top-p, then a seeded multinomial draw. Temperature 0 means greedy.

use candle_core::{DType, Device, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// 0 (or below 1e-7) is greedy.
    pub temperature: f64,
    /// Keep only the k most likely ids (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of ids whose probability reaches p (1.0: no limit).
    pub top_p: f64,
    /// Divide positive logits (multiply negative ones) of every id seen so far (1.0: off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingOptions {
    /// Greedy decoding (what the tests and the reference fixtures use).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// The published Talker defaults for codec tokens.
    pub fn talker_default(seed: u64) -> Self {
        Self {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.8,
            repetition_penalty: 1.05,
            seed,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-7
    }

    fn sampling(&self) -> Sampling {
        if self.is_greedy() {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        let p = self.top_p;
        match (self.top_k, p < 1.0) {
            (0, false) => Sampling::All { temperature },
            (0, true) => Sampling::TopP { p, temperature },
            (k, false) => Sampling::TopK { k, temperature },
            (k, true) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// A seeded sampler: the same options, seed and logits give the same ids.
pub struct Sampler {
    options: SamplingOptions,
    processor: LogitsProcessor,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Self {
        let processor = LogitsProcessor::from_sampling(options.seed, options.sampling());
        Self { options, processor }
    }

    pub fn options(&self) -> &SamplingOptions {
        &self.options
    }

    /// Picks the next id from 1-D `logits`, penalising the ids of `history` and never
    /// choosing an id of `suppress`. The penalty and the suppression run on the logits' device
    /// (only the ids go up); greedy decoding brings back just the chosen id, sampling the
    /// probabilities (candle's sampler draws on the host).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32], suppress: &[u32]) -> Result<u32> {
        let logits = processed_logits(logits, &self.options, history, suppress)?;
        self.processor.sample(&logits)
    }
}

/// The f32 logits [`Sampler::sample`] chooses from: `logits` flattened, the ids of `history`
/// penalised, those of `suppress` at minus infinity.
pub fn processed_logits(
    logits: &Tensor,
    options: &SamplingOptions,
    history: &[u32],
    suppress: &[u32],
) -> Result<Tensor> {
    let mut logits = logits.flatten_all()?.to_dtype(DType::F32)?;
    if options.repetition_penalty != 1.0 && !history.is_empty() {
        logits = repeat_penalty(&logits, options.repetition_penalty, history)?;
    }
    if !suppress.is_empty() {
        logits = suppress_ids(&logits, suppress)?;
    }
    Ok(logits)
}

/// The distinct ids of `ids` below `vocab`, as an index tensor on `device`.
fn index_of(ids: &[u32], vocab: usize, device: &Device) -> Result<Option<Tensor>> {
    let mut ids: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| (i as usize) < vocab)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(None);
    }
    let n = ids.len();
    Tensor::from_vec(ids, n, device).map(Some)
}

/// Hugging Face's repetition penalty: a positive logit of a seen id divided by `penalty`, a
/// negative one multiplied (the same f32 operations as candle-transformers' host version).
fn repeat_penalty(logits: &Tensor, penalty: f32, history: &[u32]) -> Result<Tensor> {
    let Some(index) = index_of(history, logits.dim(0)?, logits.device())? else {
        return Ok(logits.clone());
    };
    let seen = logits.index_select(&index, 0)?;
    let penalty = Tensor::new(&[penalty], logits.device())?;
    let penalised = seen.ge(0f32)?.where_cond(
        &seen.broadcast_div(&penalty)?,
        &seen.broadcast_mul(&penalty)?,
    )?;
    logits.scatter(&index, &penalised, 0)
}

/// `logits` with the ids of `suppress` set to minus infinity.
fn suppress_ids(logits: &Tensor, suppress: &[u32]) -> Result<Tensor> {
    let Some(index) = index_of(suppress, logits.dim(0)?, logits.device())? else {
        return Ok(logits.clone());
    };
    let minus_inf = Tensor::full(f32::NEG_INFINITY, index.dim(0)?, logits.device())?;
    logits.scatter(&index, &minus_inf, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax_after_penalty_and_suppression() -> Result<()> {
        let mut s = Sampler::new(SamplingOptions::greedy());
        assert_eq!(s.sample(&logits(&[0.1, 2.0, 1.9]), &[], &[])?, 1);
        assert_eq!(s.sample(&logits(&[0.1, 2.0, 1.9]), &[], &[1])?, 2);
        let mut p = Sampler::new(SamplingOptions {
            repetition_penalty: 1.1,
            ..SamplingOptions::greedy()
        });
        // 2.0 / 1.1 = 1.82 < 1.9: the seen id loses.
        assert_eq!(p.sample(&logits(&[0.1, 2.0, 1.9]), &[1], &[])?, 2);
        // Negative logits are multiplied: -0.5 * 1.1 < -0.52.
        assert_eq!(p.sample(&logits(&[-0.5, -0.52, -3.0]), &[0], &[])?, 1);
        Ok(())
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() -> Result<()> {
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 7,
        };
        let l = logits(&[1.0, 1.1, 0.9, -5.0, 1.05]);
        let draw = |opts: &SamplingOptions| -> Result<Vec<u32>> {
            let mut s = Sampler::new(opts.clone());
            (0..50).map(|_| s.sample(&l, &[], &[])).collect()
        };
        let a = draw(&opts)?;
        assert_eq!(a, draw(&opts)?);
        assert!(a.iter().all(|&id| id == 1 || id == 4), "{a:?}");
        assert!(a.contains(&1) && a.contains(&4));
        Ok(())
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() -> Result<()> {
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            repetition_penalty: 1.0,
            seed: 3,
        };
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: p = 0.5 keeps only the first.
        let l = logits(&[3.0, 2.0, 1.0, 0.0]);
        let mut s = Sampler::new(opts);
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[], &[])?, 0);
        }
        Ok(())
    }

    /// The penalty on the device gives exactly candle-transformers' host result, ids out of
    /// the vocabulary and repeated ids included; suppression leaves the other ids untouched.
    #[test]
    fn device_penalty_and_suppression_match_the_host_versions() -> Result<()> {
        let l = Tensor::randn(0f32, 3.0, 300, &Device::Cpu)?;
        let history = [5u32, 17, 5, 299, 1000, 0, 42, 42];
        let want = candle_transformers::utils::apply_repeat_penalty(&l, 1.05, &history)?;
        let got = repeat_penalty(&l, 1.05, &history)?;
        assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?);

        let suppressed = suppress_ids(&l, &[3, 3, 7, 5000])?.to_vec1::<f32>()?;
        let before = l.to_vec1::<f32>()?;
        for (i, (a, b)) in suppressed.iter().zip(&before).enumerate() {
            if i == 3 || i == 7 {
                assert_eq!(*a, f32::NEG_INFINITY);
            } else {
                assert_eq!(a, b);
            }
        }
        Ok(())
    }
}
