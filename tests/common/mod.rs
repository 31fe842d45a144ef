//! Shared helpers of the integration tests: the reference fixtures and tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
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

/// Every tensor of `cases.safetensors`; a missing file is a failure, never a skip.
pub struct Cases {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl Cases {
    pub fn load() -> Self {
        let path = reference_dir().join("cases.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("cannot read fixtures {}: {e}", path.display()));
        Self { tensors, path }
    }

    /// A fixture tensor; panics naming the key and the file when it is missing.
    pub fn get(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture key {key} missing from {}", self.path.display()))
            .clone()
    }

    pub fn f32(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::F32).unwrap()
    }

    pub fn i64_vec(&self, key: &str) -> Vec<i64> {
        self.get(key)
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
    }

    /// The spec / notes of `cases.json`.
    pub fn json() -> serde_json::Value {
        let path = reference_dir().join("cases.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
}

/// Max absolute difference of two tensors of the same shape (shapes are asserted).
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `got` is within `atol` of `want` everywhere, naming what was compared.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    assert_eq!(
        got.dims(),
        want.dims(),
        "{what}: shape {:?} vs reference {:?}",
        got.dims(),
        want.dims()
    );
    let diff = max_abs_diff(got, want);
    assert!(diff <= atol, "{what}: max abs diff {diff:e} > {atol:e}");
    eprintln!("{what}: max abs diff {diff:e} (atol {atol:e})");
}
