//! Parity with the reference implementation (Hugging Face transformers), stage by stage, on a
//! golden fixture folder: what `tests/reference_parity.rs` asserts and what `omnicall check`
//! prints, one implementation for both. Each stage records rows (a float comparison through
//! [`compare::check_close`], or an exact one); an error (a missing fixture key, a model that
//! fails to build) is a failed row, never a skip. The fixture model's config.json tells the
//! family: Qwen2.5-Omni runs [`STAGES`], Qwen3-Omni [`QWEN3_STAGES`] (`tests/qwen3_parity.rs`).
//!
//! The device and dtype are those of [`CheckOptions`]: the Thinker, its encoders and the Talker
//! run in that dtype, token2wav in f32 (as [`crate::model::omni::OmniModel`] runs it), the
//! media front ends (mel, pixels) on the CPU in f32. Tolerances are per dtype
//! ([`Tolerances::for_dtype`]): f32 those of the fixture README, bf16 measured (README).

pub mod compare;
pub mod fixtures;
mod stages;

use std::fmt::{Debug, Write};

use candle_core::{DType, Device, Tensor};

use crate::model::linear::{WeightFormat, with_weight_format};
use crate::model::loading::ModelFamily;

pub use fixtures::Fixtures;

/// Where and in which dtype the model runs for the check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub device: Device,
    /// Dtype of the Thinker (with its encoders) and the Talker.
    pub dtype: DType,
    /// How their Linear weights are stored (token2wav stays dense f32).
    pub weights: WeightFormat,
}

impl CheckOptions {
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightFormat::Dense,
        }
    }
}

/// What a float comparison is of; its tolerance depends on the run's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// Log-mel features (media front end, always f32 on the CPU).
    Mel,
    /// Normalised pixel values (media front end).
    Pixels,
    /// Audio and vision tower outputs.
    Encoder,
    /// Thinker embeddings, hidden states, logits.
    Thinker,
    /// Talker inputs, hidden states, logits.
    Talker,
    /// One DiT evaluation (f32 in every run).
    DitProbe,
    /// The mel after the whole ODE sampler (f32 in every run).
    DitMel,
    /// Waveforms (BigVGAN, f32 in every run).
    Waveform,
}

/// Absolute tolerances of one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Tolerances {
    pub encoder: f32,
    pub thinker: f32,
    pub talker: f32,
}

/// Tolerances of the fixture README for what runs in f32 whatever the run's dtype.
const MEL_ATOL: f32 = 1e-4;
const PIXEL_ATOL: f32 = 1e-5;
const DIT_PROBE_ATOL: f32 = 1e-4;
const DIT_MEL_ATOL: f32 = 5e-4;
const WAVEFORM_ATOL: f32 = 1e-4;

impl Tolerances {
    /// f32: the fixture README's 1e-4. bf16: measured on the CPU against the f32 reference
    /// (`omnicall check --dtype bf16`, README "bf16 tolerances"), rounded up to about twice
    /// the largest error seen.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 | DType::F64 => Self {
                encoder: 1e-4,
                thinker: 1e-4,
                talker: 1e-4,
            },
            _ => Self {
                encoder: BF16_ENCODER_ATOL,
                thinker: BF16_THINKER_ATOL,
                talker: BF16_TALKER_ATOL,
            },
        }
    }

    /// [`Tolerances::for_dtype`], or the measured q8 tolerances for int8 weights.
    pub fn for_run(dtype: DType, weights: WeightFormat) -> Self {
        match weights {
            WeightFormat::Dense => Self::for_dtype(dtype),
            WeightFormat::Q8 => Self {
                encoder: Q8_ENCODER_ATOL,
                thinker: Q8_THINKER_ATOL,
                talker: Q8_TALKER_ATOL,
            },
        }
    }

    pub fn of(&self, quantity: Quantity) -> f32 {
        match quantity {
            Quantity::Mel => MEL_ATOL,
            Quantity::Pixels => PIXEL_ATOL,
            Quantity::Encoder => self.encoder,
            Quantity::Thinker => self.thinker,
            Quantity::Talker => self.talker,
            Quantity::DitProbe => DIT_PROBE_ATOL,
            Quantity::DitMel => DIT_MEL_ATOL,
            Quantity::Waveform => WAVEFORM_ATOL,
        }
    }
}

/// bf16 tolerances (and f16, which has more mantissa): see [`Tolerances::for_dtype`].
/// Largest errors measured on the committed fixtures (CPU, `--kernels auto` and `generic`):
/// encoders 0.070 (image.blocks_output), Thinker 0.095 (last hidden state), Talker 0.093
/// (its inputs from the Thinker's hidden states); the tolerances are about twice those.
const BF16_ENCODER_ATOL: f32 = 0.15;
const BF16_THINKER_ATOL: f32 = 0.2;
const BF16_TALKER_ATOL: f32 = 0.2;

/// q8 tolerances (Q8_0 weights, int8 activations in candle's kernels, f32 activations
/// elsewhere). Largest errors measured on the committed fixtures (CPU, `omnicall check
/// --weights q8`): encoders 0.084 (audio_encoder.pooled), Thinker 0.157 (logits), Talker 0.101
/// (first step logits), greedy ids and codes equal; the tolerances are about twice those.
const Q8_ENCODER_ATOL: f32 = 0.15;
const Q8_THINKER_ATOL: f32 = 0.3;
const Q8_TALKER_ATOL: f32 = 0.2;

/// One comparison of a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub stage: &'static str,
    pub what: String,
    /// Largest |ours - reference| of a float comparison that could be made.
    pub max_abs_diff: Option<f32>,
    /// Its tolerance (0 for exact comparisons of ids and positions).
    pub tolerance: Option<f32>,
    pub pass: bool,
    /// Why it failed (empty when it passed).
    pub message: String,
}

/// Every row of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| !r.pass)
    }

    /// A markdown table: stage, what, max abs diff, tolerance, pass (and why not).
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| stage | what | max abs diff | tolerance | pass |\n| --- | --- | ---: | ---: | --- |\n",
        );
        for r in &self.rows {
            let num = |v: Option<f32>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3e}"));
            let pass = if r.pass {
                "pass".to_string()
            } else {
                format!("FAIL: {}", r.message.replace('|', "/").replace('\n', " "))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {pass} |",
                r.stage,
                r.what,
                num(r.max_abs_diff),
                num(r.tolerance)
            );
        }
        out
    }
}

/// The stages, in the order of the model: the names of the parity tests.
pub const STAGES: &[&str] = &[
    "mel",
    "audio_encoder",
    "image_preprocess",
    "video_preprocess",
    "image_vision_encoder",
    "video_vision_encoder",
    "rope_index_text",
    "rope_index_audio",
    "rope_index_image",
    "rope_index_video",
    "rope_index_video_audio",
    "rope_index_talker",
    "chat_template_ids",
    "thinker_logits",
    "thinker_greedy",
    "thinker_av_logits",
    "talker_inputs",
    "talker_logits",
    "talker_greedy",
    "dit_probe",
    "dit_mel",
    "bigvgan_waveform",
    "token2wav_waveform",
    "pipeline_thinker_logits",
    "pipeline_thinker_av_logits",
    "pipeline_talker",
    "pipeline_waveform",
];

/// The stages of the Qwen3-Omni family, in the order of the model.
pub const QWEN3_STAGES: &[&str] = &[
    "qwen3_rope_index_text",
    "qwen3_rope_index_multimodal",
    "qwen3_mel",
    "qwen3_audio_encoder",
    "qwen3_audio_encoder_streaming",
    "qwen3_vision_encoder",
    "qwen3_thinker_logits",
    "qwen3_thinker_greedy",
    "qwen3_thinker_cache_truncation",
    "qwen3_thinker_mm_logits",
    "qwen3_talker_logits",
    "qwen3_code_predictor",
    "qwen3_talker_greedy",
    "qwen3_code2wav",
    "qwen3_code2wav_chunked",
    "qwen3_code2wav_streaming",
];

/// The stages of a model family's fixtures.
pub fn stages_of(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Qwen25Omni => STAGES,
        ModelFamily::Qwen3Omni => QWEN3_STAGES,
    }
}

/// Runs the named stages (all those of the fixtures' family when `names` is empty) on
/// `fixtures`.
pub fn run(fixtures: &Fixtures, options: &CheckOptions, names: &[&str]) -> Report {
    let names: Vec<&str> = if names.is_empty() {
        match fixtures.family() {
            Ok(family) => stages_of(family).to_vec(),
            Err(e) => {
                return Report {
                    rows: vec![family_error(&e)],
                };
            }
        }
    } else {
        names.to_vec()
    };
    let mut report = Report::default();
    for name in names {
        report.rows.extend(run_stage(fixtures, options, name));
    }
    report
}

/// The fixture model's family could not be told: one failed row saying why.
fn family_error(e: &anyhow::Error) -> Row {
    Row {
        stage: "?",
        what: "model family".to_string(),
        max_abs_diff: None,
        tolerance: None,
        pass: false,
        message: format!("{e:#}"),
    }
}

/// The rows of one stage of the fixtures' family (from their model's config.json); an unknown
/// name or an error inside the stage is a failed row.
pub fn run_stage(fixtures: &Fixtures, options: &CheckOptions, name: &str) -> Vec<Row> {
    let family = match fixtures.family() {
        Ok(family) => family,
        Err(e) => return vec![family_error(&e)],
    };
    let known = stages_of(family);
    let Some(&stage) = known.iter().find(|&&s| s == name) else {
        return vec![Row {
            stage: "?",
            what: name.to_string(),
            max_abs_diff: None,
            tolerance: None,
            pass: false,
            message: format!(
                "unknown stage {name:?} for {family:?} fixtures; their stages are {}",
                known.join(", ")
            ),
        }];
    };
    let mut check = Checker {
        fixtures,
        options,
        tolerances: Tolerances::for_run(options.dtype, options.weights),
        stage,
        rows: Vec::new(),
    };
    // Every model the stage builds, on this thread, gets the run's weight format.
    let result = with_weight_format(options.weights, || match family {
        ModelFamily::Qwen25Omni => stages::run(&mut check),
        ModelFamily::Qwen3Omni => stages::run_qwen3(&mut check),
    });
    if let Err(e) = result {
        check.rows.push(Row {
            stage,
            what: "(stage)".to_string(),
            max_abs_diff: None,
            tolerance: None,
            pass: false,
            message: format!("{e:#}"),
        });
    }
    check.rows
}

/// What a stage records its comparisons into.
pub(crate) struct Checker<'a> {
    pub fixtures: &'a Fixtures,
    pub options: &'a CheckOptions,
    pub tolerances: Tolerances,
    pub stage: &'static str,
    pub rows: Vec<Row>,
}

impl Checker<'_> {
    /// Compares floats within the tolerance of `quantity` for this run's dtype.
    pub fn close(&mut self, what: &str, got: &Tensor, want: &Tensor, quantity: Quantity) {
        let atol = self.tolerances.of(quantity);
        self.close_within(what, got, want, atol);
    }

    /// [`Checker::close`] for the output of a mixture of experts `[1, positions, ..]`. In f32
    /// as strict as `close`; in a lower precision a tenth of the positions (at least one) may be
    /// beyond the tolerance: where a router's top-k nearly ties, the rounding of its input picks
    /// another expert for that position (docs/qwen3-omni.md, "bf16 and Qwen3-Omni's experts"),
    /// while an error of the computation shows at most positions.
    pub fn close_routed(&mut self, what: &str, got: &Tensor, want: &Tensor, quantity: Quantity) {
        if self.options.dtype == DType::F32 {
            return self.close(what, got, want, quantity);
        }
        let atol = self.tolerances.of(quantity);
        let (max_abs_diff, pass, message, what) = match compare::positions_beyond(
            got, want, atol, 1,
        ) {
            Ok((positions, diff)) => {
                let len = got.dims()[1];
                let allowed = (len / 10).max(1);
                let what = if positions.is_empty() {
                    what.to_string()
                } else {
                    format!(
                        "{what} (positions {positions:?} of {len} beyond, at most {allowed} may be)"
                    )
                };
                let pass = positions.len() <= allowed;
                let message = if pass {
                    String::new()
                } else {
                    format!(
                        "{what}: {} of {len} positions beyond {atol:e} (at most {allowed} may be: \
                         a router's near tie); worst {:e} at {:?} (got {}, reference {})",
                        positions.len(),
                        diff.max_abs_diff,
                        diff.worst_index,
                        diff.got,
                        diff.want
                    )
                };
                (Some(diff.max_abs_diff), pass, message, what)
            }
            Err(e) => (None, false, format!("{what}: {e}"), what.to_string()),
        };
        self.rows.push(Row {
            stage: self.stage,
            what,
            max_abs_diff,
            tolerance: Some(atol),
            pass,
            message,
        });
    }

    pub fn close_within(&mut self, what: &str, got: &Tensor, want: &Tensor, atol: f32) {
        let (max_abs_diff, pass, message) = match compare::check_close(got, want, atol) {
            Ok(d) => (Some(d.max_abs_diff), true, String::new()),
            Err(e) => {
                let diff = match &e {
                    compare::CloseError::TooFar { diff, .. } => Some(diff.max_abs_diff),
                    _ => None,
                };
                (diff, false, format!("{what}: {e}"))
            }
        };
        self.rows.push(Row {
            stage: self.stage,
            what: what.to_string(),
            max_abs_diff,
            tolerance: Some(atol),
            pass,
            message,
        });
    }

    /// An exact comparison (ids, positions, grids, counts).
    pub fn equal<T: PartialEq + Debug>(&mut self, what: &str, got: T, want: T) {
        let pass = got == want;
        let message = if pass {
            String::new()
        } else {
            let (g, w) = (format!("{got:?}"), format!("{want:?}"));
            format!("{what}: {} vs reference {}", shorten(&g), shorten(&w))
        };
        self.rows.push(Row {
            stage: self.stage,
            what: what.to_string(),
            max_abs_diff: None,
            tolerance: Some(0.0),
            pass,
            message,
        });
    }

    /// Greedy ids against the reference's. They must be equal, except that they may part at a
    /// near tie: at the first step where they differ, the reference's logit of its own id may
    /// exceed its logit of ours by at most twice the logits' tolerance (what two sets of logits
    /// each within the tolerance of the reference's can flip). After that step nothing can be
    /// compared; returns whether the ids were equal throughout.
    pub fn greedy_ids(
        &mut self,
        what: &str,
        got: &[u32],
        want: &[u32],
        want_step_logits: Option<&Tensor>,
        quantity: Quantity,
    ) -> bool {
        let Some(step) = got.iter().zip(want).position(|(a, b)| a != b) else {
            self.equal(what, got, want);
            return got.len() == want.len();
        };
        let margin = want_step_logits.and_then(|logits| {
            let row = logits.get(step).ok()?.to_dtype(DType::F32).ok()?;
            let row = row.flatten_all().ok()?.to_vec1::<f32>().ok()?;
            Some(row.get(want[step] as usize)? - row.get(got[step] as usize)?)
        });
        self.parted_at(
            what,
            got,
            want,
            step,
            margin.map(|m| (m, "the reference's")),
            quantity,
        );
        false
    }

    /// [`Checker::greedy_ids`] where the fixture has no step logits: the tie is judged on the
    /// logits our own step chose from (`chosen_from[step]`, after penalties). Our logit of our
    /// id may exceed our logit of the reference's by at most twice the tolerance: the same
    /// bound seen from the other side.
    pub fn greedy_ids_by_own_logits(
        &mut self,
        what: &str,
        got: &[u32],
        want: &[u32],
        chosen_from: &[Tensor],
        quantity: Quantity,
    ) -> anyhow::Result<bool> {
        let Some(step) = got.iter().zip(want).position(|(a, b)| a != b) else {
            self.equal(what, got, want);
            return Ok(got.len() == want.len());
        };
        let margin = match chosen_from.get(step) {
            Some(logits) => {
                let row = logits
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let logit = |id: u32| row.get(id as usize).copied().unwrap_or(f32::NAN);
                Some((logit(got[step]) - logit(want[step]), "our"))
            }
            None => None,
        };
        self.parted_at(what, got, want, step, margin, quantity);
        Ok(false)
    }

    /// The row of greedy ids that part at `step`, with the margin there (and whose logits it
    /// is taken from) when known.
    fn parted_at(
        &mut self,
        what: &str,
        got: &[u32],
        want: &[u32],
        step: usize,
        margin: Option<(f32, &str)>,
        quantity: Quantity,
    ) {
        let bound = 2.0 * self.tolerances.of(quantity);
        let (pass, message) = match margin {
            Some((m, _)) if m.is_finite() && m <= bound => (true, String::new()),
            Some((m, whose)) => (
                false,
                format!(
                    "{what}: id {} instead of {} at step {step}, where {whose} logits \
                     differ by {m:e} (> {bound:e})",
                    got[step], want[step]
                ),
            ),
            None => (
                false,
                format!(
                    "{what}: id {} instead of {} at step {step}: {} vs reference {}",
                    got[step],
                    want[step],
                    shorten(&format!("{got:?}")),
                    shorten(&format!("{want:?}"))
                ),
            ),
        };
        self.rows.push(Row {
            stage: self.stage,
            what: format!("{what} (equal for {step} steps, then a near tie)"),
            max_abs_diff: margin.map(|(m, _)| m),
            tolerance: Some(bound),
            pass,
            message,
        });
    }

    /// A condition that must hold, with the reason when it does not.
    pub fn holds(&mut self, what: &str, pass: bool, why_not: impl FnOnce() -> String) {
        let message = if pass {
            String::new()
        } else {
            format!("{what}: {}", why_not())
        };
        self.rows.push(Row {
            stage: self.stage,
            what: what.to_string(),
            max_abs_diff: None,
            tolerance: None,
            pass,
            message,
        });
    }
}

/// Long id lists cut to their ends in messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 240;
    if s.len() <= MAX {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX / 2).collect();
    let tail: String = s
        .chars()
        .rev()
        .take(MAX / 2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head} ... {tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/a")
    }

    #[test]
    fn an_unknown_stage_is_a_failed_row() {
        let fixtures = Fixtures::open(&fixture_dir()).unwrap();
        let rows = run_stage(&fixtures, &CheckOptions::cpu_f32(), "no_such_stage");
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].pass);
        assert!(
            rows[0].message.contains("unknown stage"),
            "{}",
            rows[0].message
        );
    }

    #[test]
    fn the_family_of_the_fixture_model_picks_the_stages() {
        let qwen25 = Fixtures::open(&fixture_dir()).unwrap();
        assert_eq!(qwen25.family().unwrap(), ModelFamily::Qwen25Omni);
        let qwen3_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-omni");
        let qwen3 = Fixtures::open(&qwen3_dir).unwrap();
        assert_eq!(qwen3.family().unwrap(), ModelFamily::Qwen3Omni);
        // A stage of the other family is unknown here, a failed row naming this family's.
        let rows = run_stage(&qwen3, &CheckOptions::cpu_f32(), "thinker_logits");
        assert!(!rows[0].pass);
        assert!(
            rows[0].message.contains("Qwen3Omni") && rows[0].message.contains("qwen3_code2wav"),
            "{}",
            rows[0].message
        );
    }

    #[test]
    fn the_table_names_each_failure() {
        let report = Report {
            rows: vec![
                Row {
                    stage: "mel",
                    what: "features".into(),
                    max_abs_diff: Some(1e-6),
                    tolerance: Some(1e-4),
                    pass: true,
                    message: String::new(),
                },
                Row {
                    stage: "thinker_logits",
                    what: "logits".into(),
                    max_abs_diff: None,
                    tolerance: Some(1e-4),
                    pass: false,
                    message: "got value NaN at index [0, 3]".into(),
                },
            ],
        };
        assert!(!report.passed());
        let table = report.table();
        assert!(
            table.contains("| mel | features | 1.000e-6 | 1.000e-4 | pass |"),
            "{table}"
        );
        assert!(
            table.contains("FAIL: got value NaN at index [0, 3]"),
            "{table}"
        );
        assert!(!Report::default().passed(), "an empty run proves nothing");
    }
}
