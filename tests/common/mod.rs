//! Shared helpers of the integration tests: the reference fixtures and tolerance checks.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The fixture folder: `$OMNICALL_REFERENCE_DIR`, else the project's own copy of variant a.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("OMNICALL_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/a"),
    }
}

/// The tiny model folder of the fixture set.
pub fn model_dir() -> PathBuf {
    reference_dir().join("model")
}

/// The fixture model's `config.json`.
pub fn model_config() -> omnicall::model::config::Config {
    let path = model_dir().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    omnicall::model::config::Config::from_json(&text).expect("config.json parses")
}

/// The fixture model's weights, in f32 on the CPU.
pub fn model_weights() -> candle_nn::VarBuilder<'static> {
    let path = model_dir().join("model.safetensors");
    // SAFETY: the fixture file is not modified while the tests map it.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu) }
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The project's own tiny model (`models/tiny`), its config and f32 weights on the CPU.
pub fn tiny_model() -> (
    omnicall::model::config::Config,
    candle_nn::VarBuilder<'static>,
) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let cfg =
        omnicall::model::config::Config::from_json(&text).expect("models/tiny/config.json parses");
    let weights = dir.join("model.safetensors");
    // SAFETY: the model file is not modified while the tests map it.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu)
    }
    .unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    (cfg, vb)
}

/// The fixture folder's tensors and spec (`omnicall::check::Fixtures`); a missing file or key
/// is a failure naming it, never a skip.
pub struct Cases {
    fixtures: omnicall::check::Fixtures,
}

impl Cases {
    pub fn load() -> Self {
        let fixtures =
            omnicall::check::Fixtures::open(&reference_dir()).unwrap_or_else(|e| panic!("{e:#}"));
        Self { fixtures }
    }

    /// A fixture tensor; panics naming the key and the file when it is missing.
    pub fn get(&self, key: &str) -> Tensor {
        self.fixtures.get(key).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f32(&self, key: &str) -> Tensor {
        self.fixtures.f32(key).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn i64_vec(&self, key: &str) -> Vec<i64> {
        self.fixtures
            .i64_vec(key)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The spec / notes of `cases.json`.
    pub fn json() -> serde_json::Value {
        let path = reference_dir().join("cases.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
}

/// Asserts `got` is within `atol` of `want` everywhere and finite on both sides (the library's
/// check: a NaN anywhere fails, the worst element is named), saying what was compared.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    match omnicall::check::compare::check_close(got, want, atol) {
        Ok(diff) => eprintln!(
            "{what}: max abs diff {:e} (atol {atol:e})",
            diff.max_abs_diff
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Runs one stage of `omnicall::check` on the fixture folder `dir` (CPU) and fails naming every
/// comparison that failed.
pub fn check_stage(
    dir: &std::path::Path,
    stage: &str,
    dtype: DType,
    weights: omnicall::model::linear::WeightFormat,
) {
    let fixtures = omnicall::check::Fixtures::open(dir).unwrap_or_else(|e| panic!("{e:#}"));
    let options = omnicall::check::CheckOptions {
        device: Device::Cpu,
        dtype,
        weights,
    };
    let rows = omnicall::check::run_stage(&fixtures, &options, stage);
    assert!(!rows.is_empty(), "{stage}: no comparisons");
    let mut failures = Vec::new();
    for row in &rows {
        let diff = row.max_abs_diff.map_or("-".into(), |d| format!("{d:e}"));
        let tol = row.tolerance.map_or("-".into(), |d| format!("{d:e}"));
        eprintln!(
            "{stage} {dtype:?} {weights:?}: {}: max abs diff {diff} (atol {tol}) {}",
            row.what,
            if row.pass { "ok" } else { "FAILED" }
        );
        if !row.pass {
            failures.push(row.message.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "{stage} in {dtype:?}:\n{}",
        failures.join("\n")
    );
}

/// A 16 kHz recording of `tests/media`, as f32 samples.
pub fn load_16k(name: &str) -> Vec<f32> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/media")
        .join(name);
    let mut reader = hound::WavReader::open(&path).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000, "{}", path.display());
    reader
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect()
}

/// The ids of `turn`'s answer in a session's context.
pub fn answer_ids(entries: &[omnicall::engine::context::Entry], turn: u64) -> Vec<u32> {
    entries
        .iter()
        .filter(|e| e.turn == turn && e.kind == omnicall::engine::context::EntryKind::Answer)
        .map(|e| e.id)
        .collect()
}
