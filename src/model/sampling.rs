//! Choosing the next token from logits, in the order Hugging Face `generate` applies its
//! processors: repetition penalty (over every id so far), suppressed ids, temperature, top-k,
//! top-p, then a seeded multinomial draw. Temperature 0 means greedy.

use candle_core::{Result, Tensor};
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
    /// choosing an id of `suppress`.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32], suppress: &[u32]) -> Result<u32> {
        let logits = logits.flatten_all()?;
        let logits = if self.options.repetition_penalty != 1.0 && !history.is_empty() {
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.options.repetition_penalty,
                history,
            )?
        } else {
            logits.to_dtype(candle_core::DType::F32)?
        };
        let logits = if suppress.is_empty() {
            logits
        } else {
            let mut values = logits.to_vec1::<f32>()?;
            for &id in suppress {
                if let Some(v) = values.get_mut(id as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            Tensor::from_vec(values, logits.dims1()?, logits.device())?
        };
        self.processor.sample(&logits)
    }
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
}
