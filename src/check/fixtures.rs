//! A golden fixture folder of the reference (layout of `tests/fixtures/reference/a`):
//! `cases.safetensors` (every tensor), `cases.json` (spec and settings) and `model/` (the tiny
//! model the fixtures were made with). A missing key is an error naming it and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use candle_core::{DType, Device, Tensor};

use crate::model::loading::{ModelFamily, ModelFiles};

pub struct Fixtures {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Fixtures {
    /// Reads `dir/cases.safetensors` and `dir/cases.json`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let cases = dir.join("cases.safetensors");
        let tensors = candle_core::safetensors::load(&cases, &Device::Cpu)
            .with_context(|| format!("cannot read fixtures {}", cases.display()))?;
        let json_path = dir.join("cases.json");
        let text = std::fs::read_to_string(&json_path)
            .with_context(|| format!("cannot read {}", json_path.display()))?;
        let json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", json_path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tensors,
            json,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fixture model's folder.
    pub fn model_dir(&self) -> PathBuf {
        self.dir.join("model")
    }

    /// The family of the fixture model, from its config.json's `model_type`.
    pub fn family(&self) -> anyhow::Result<ModelFamily> {
        ModelFiles::from_dir(&self.model_dir())
            .and_then(|files| files.family())
            .context("fixture model folder")
    }

    /// A fixture tensor as stored (on the CPU).
    pub fn get(&self, key: &str) -> anyhow::Result<Tensor> {
        self.tensors.get(key).cloned().ok_or_else(|| {
            anyhow!(
                "fixture key {key} missing from {}",
                self.dir.join("cases.safetensors").display()
            )
        })
    }

    pub fn f32(&self, key: &str) -> anyhow::Result<Tensor> {
        Ok(self.get(key)?.to_dtype(DType::F32)?)
    }

    pub fn i64_vec(&self, key: &str) -> anyhow::Result<Vec<i64>> {
        let t = self.get(key)?;
        t.flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()
            .with_context(|| format!("fixture {key}"))
    }

    pub fn u32_vec(&self, key: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self.i64_vec(key)?.into_iter().map(|i| i as u32).collect())
    }

    pub fn usize_vec(&self, key: &str) -> anyhow::Result<Vec<usize>> {
        Ok(self.i64_vec(key)?.into_iter().map(|i| i as usize).collect())
    }

    /// The first value of a fixture as f32.
    pub fn f32_scalar(&self, key: &str) -> anyhow::Result<f32> {
        let values = self.f32(key)?.flatten_all()?.to_vec1::<f32>()?;
        values
            .first()
            .copied()
            .ok_or_else(|| anyhow!("fixture {key} is empty"))
    }

    /// `cases.json` at a `/`-separated path (e.g. `spec/inputs/ode_steps`).
    pub fn json(&self, path: &str) -> anyhow::Result<&serde_json::Value> {
        let mut v = &self.json;
        for part in path.split('/') {
            v = v
                .get(part)
                .ok_or_else(|| anyhow!("{} missing in cases.json", path.replace('/', ".")))?;
        }
        Ok(v)
    }

    pub fn json_u64(&self, path: &str) -> anyhow::Result<u64> {
        self.json(path)?
            .as_u64()
            .ok_or_else(|| anyhow!("{} in cases.json is not a count", path.replace('/', ".")))
    }

    pub fn json_f64(&self, path: &str) -> anyhow::Result<f64> {
        self.json(path)?
            .as_f64()
            .ok_or_else(|| anyhow!("{} in cases.json is not a number", path.replace('/', ".")))
    }

    pub fn json_str(&self, path: &str) -> anyhow::Result<&str> {
        self.json(path)?
            .as_str()
            .ok_or_else(|| anyhow!("{} in cases.json is not a string", path.replace('/', ".")))
    }
}
