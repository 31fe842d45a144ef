//! Model folders and hub ids: config, weights, tokenizer, voices; dtype and device.
//!
//! [`ModelFiles::locate`] takes what `--model` names: a folder, or a Hugging Face hub id
//! (`Qwen/Qwen2.5-Omni-3B`) looked up in the local Hugging Face cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and downloaded into it where the network
//! allows. [`Checkpoint`] memory-maps the safetensors shards and hands out a `VarBuilder` whose
//! errors name the tensor, the shape the model expects and the shape found, or the files searched.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use crate::model::config::{Config, ProcessorConfig, TokenIds};

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// A `tokenizer.json` (the `tokenizers` library's own format).
    Json(PathBuf),
    /// The slow-tokenizer files of published Qwen checkpoints: `vocab.json` + `merges.txt`, with
    /// the special tokens from `tokenizer_config.json` (`added_tokens_decoder`) and/or
    /// `added_tokens.json`.
    VocabMerges {
        vocab: PathBuf,
        merges: PathBuf,
        added_tokens: Option<PathBuf>,
    },
}

/// Speaker conditioning files (the speech side reads them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpeakerFiles {
    /// `spk_dict.pt`: the torch pickle the reference loads.
    pub pickle: Option<PathBuf>,
    /// `speakers.safetensors`: the same data, flat.
    pub safetensors: Option<PathBuf>,
}

/// The files of one model folder.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Safetensors shards, in index order.
    pub weights: Vec<PathBuf>,
    pub tokenizer: TokenizerFiles,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    /// `preprocessor_config.json` (published) or `processor_config.json` (newer writers).
    pub processor_config: Option<PathBuf>,
    pub speakers: SpeakerFiles,
}

const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Files a model needs (tokenizer and weights are resolved separately).
const HUB_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spk_dict.pt",
    "speakers.safetensors",
    WEIGHTS_INDEX,
];

#[derive(Deserialize)]
struct WeightsIndex {
    weight_map: HashMap<String, String>,
}

impl ModelFiles {
    /// Resolves `--model`: an existing folder, else a hub id from the local Hugging Face cache
    /// (downloading what is missing unless `HF_HUB_OFFLINE=1`).
    pub fn locate(model: &str) -> anyhow::Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if !is_hub_id(model) {
            bail!(
                "model {model:?} is neither a folder nor a Hugging Face hub id (like \
                 Qwen/Qwen2.5-Omni-3B)"
            );
        }
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
        Self::from_hub(model, &hub_cache_dir()?, !offline)
            .with_context(|| format!("there is no model folder {model:?}"))
    }

    /// The files of a model folder; config, weights and a tokenizer are required.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        ensure!(
            dir.is_dir(),
            "model folder {} does not exist",
            dir.display()
        );
        let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let config =
            file("config.json").with_context(|| format!("{} has no config.json", dir.display()))?;
        let weights = weight_files(dir)?;
        let tokenizer = if let Some(json) = file("tokenizer.json") {
            TokenizerFiles::Json(json)
        } else if let (Some(vocab), Some(merges)) = (file("vocab.json"), file("merges.txt")) {
            TokenizerFiles::VocabMerges {
                vocab,
                merges,
                added_tokens: file("added_tokens.json"),
            }
        } else {
            bail!(
                "{} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt + \
                 tokenizer_config.json",
                dir.display()
            );
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            tokenizer_config: file("tokenizer_config.json"),
            generation_config: file("generation_config.json"),
            processor_config: file("preprocessor_config.json")
                .or_else(|| file("processor_config.json")),
            speakers: SpeakerFiles {
                pickle: file("spk_dict.pt"),
                safetensors: file("speakers.safetensors"),
            },
        })
    }

    /// A hub id from the cache at `cache_dir` (the `hub` folder, holding `models--owner--name`),
    /// downloading missing files when `download` is set.
    pub fn from_hub(id: &str, cache_dir: &Path, download: bool) -> anyhow::Result<Self> {
        let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
        let cached = cache.model(id.to_string());
        if let Some(config) = cached.get("config.json") {
            let snapshot = config
                .parent()
                .context("cached config.json has no folder")?
                .to_path_buf();
            match Self::from_dir(&snapshot) {
                Ok(files) => return Ok(files),
                Err(e) if !download => {
                    bail!(
                        "{id} is only partly in the Hugging Face cache at {} ({e:#}); fetch it \
                         with `huggingface-cli download {id}`",
                        cache_dir.display()
                    )
                }
                Err(_) => {}
            }
        }
        let fetch = || -> anyhow::Result<Self> {
            ensure!(download, "offline (HF_HUB_OFFLINE is set)");
            download_model(id, cache_dir)
        };
        fetch().map_err(|e| {
            anyhow::anyhow!(
                "{id} is not in the Hugging Face cache at {} and could not be downloaded ({e:#}). \
                 Fetch it once with `huggingface-cli download {id}` (it honours HF_HOME and \
                 HF_HUB_CACHE), or pass --model with a model folder",
                cache_dir.display()
            )
        })
    }

    /// The model configuration, parsed and checked; errors name the file.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let text = self.read_config()?;
        parse_config(&text, &self.config.display().to_string())
    }

    /// Which model family the folder holds, from `config.json`'s `model_type`.
    pub fn family(&self) -> anyhow::Result<ModelFamily> {
        ModelFamily::of_config(&self.read_config()?)
            .with_context(|| format!("{}", self.config.display()))
    }

    /// The Qwen3-Omni configuration, parsed and checked; errors name the file.
    pub fn load_qwen3_omni_config(
        &self,
    ) -> anyhow::Result<crate::model::qwen3_omni::config::Config> {
        crate::model::qwen3_omni::config::Config::from_json(&self.read_config()?)
            .with_context(|| format!("{} is not a valid Qwen3-Omni config", self.config.display()))
    }

    fn read_config(&self) -> anyhow::Result<String> {
        std::fs::read_to_string(&self.config)
            .with_context(|| format!("cannot read {}", self.config.display()))
    }

    /// The processor settings, or the published defaults when the folder has none.
    pub fn load_processor_config(&self) -> anyhow::Result<ProcessorConfig> {
        match &self.processor_config {
            None => Ok(ProcessorConfig::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                ProcessorConfig::from_json(&text)
                    .with_context(|| format!("{} is not a valid processor config", path.display()))
            }
        }
    }

    /// `generation_config.json`, or an empty one (greedy) when the folder has none.
    pub fn load_generation_config(&self) -> anyhow::Result<GenerationConfig> {
        match &self.generation_config {
            None => Ok(GenerationConfig::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a valid generation config", path.display()))
            }
        }
    }

    /// Memory-maps the weights.
    pub fn checkpoint(&self) -> anyhow::Result<Checkpoint> {
        Checkpoint::open(&self.weights)
    }
}

/// The safetensors files of a folder: the index's shards, else every `model*.safetensors`.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let parsed: WeightsIndex = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a safetensors index", index.display()))?;
        let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let missing: Vec<&String> = shards
            .iter()
            .zip(&files)
            .filter(|(_, f)| !f.is_file())
            .map(|(s, _)| s)
            .collect();
        ensure!(
            missing.is_empty(),
            "{} lists shards that are missing: {missing:?}",
            index.display()
        );
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{} has no weights: expected {WEIGHTS_INDEX} or model*.safetensors",
        dir.display()
    );
    Ok(files)
}

/// `owner/name` with the characters the hub allows.
fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(home).join("hub"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("cannot find the Hugging Face cache: set HF_HOME or HOME")?;
    Ok(PathBuf::from(home).join(".cache/huggingface/hub"))
}

fn download_model(id: &str, cache_dir: &Path) -> anyhow::Result<ModelFiles> {
    let mut builder =
        hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.to_path_buf()))
            .with_progress(std::io::stderr().is_terminal());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().context("cannot start the hub client")?;
    let repo = api.model(id.to_string());
    let info = repo
        .info()
        .with_context(|| format!("cannot list {id} on the hub"))?;
    let available: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut wanted: Vec<String> = HUB_FILES
        .iter()
        .filter(|f| available.iter().any(|a| a == *f))
        .map(|f| f.to_string())
        .collect();
    let mut snapshot = None;
    for name in &wanted {
        tracing::info!("fetching {id}/{name}");
        let path = repo
            .get(name)
            .with_context(|| format!("cannot download {id}/{name}"))?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    let snapshot = snapshot.with_context(|| format!("{id} has no config.json on the hub"))?;
    wanted.clear();
    let index = snapshot.join(WEIGHTS_INDEX);
    if index.is_file() {
        let parsed: WeightsIndex = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not a safetensors index", index.display()))?;
        wanted.extend(parsed.weight_map.into_values());
        wanted.sort();
        wanted.dedup();
    } else {
        wanted.extend(
            available
                .iter()
                .filter(|a| a.starts_with("model") && a.ends_with(".safetensors"))
                .cloned(),
        );
    }
    for name in &wanted {
        tracing::info!("fetching {id}/{name}");
        repo.get(name)
            .with_context(|| format!("cannot download {id}/{name}"))?;
    }
    ModelFiles::from_dir(&snapshot)
}

/// `generation_config.json`: the sampling defaults a checkpoint ships (Qwen2.5-Omni's is
/// essentially empty, i.e. greedy).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

/// The published configurations this repository carries (models/3b, models/7b), built in so
/// that benchmarks run from anywhere.
pub fn published_config(size: &str) -> Option<anyhow::Result<Config>> {
    let text = match size.to_ascii_lowercase().as_str() {
        "3b" => include_str!("../../models/3b/config.json"),
        "7b" => include_str!("../../models/7b/config.json"),
        _ => return None,
    };
    Some(parse_config(text, size))
}

/// A config named `3b` / `7b`, or read from a config.json (or a model folder holding one).
pub fn config_from_spec(spec: &str) -> anyhow::Result<Config> {
    if let Some(config) = published_config(spec) {
        return config;
    }
    let path = Path::new(spec);
    let path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("config {spec:?} is neither 3b, 7b nor a readable config.json"))?;
    parse_config(&text, &path.display().to_string())
}

/// The model families omnicall knows, told apart by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// `qwen2_5_omni` (also a config without `model_type`, as older writers left it out).
    Qwen25Omni,
    /// `qwen3_omni_moe`.
    Qwen3Omni,
}

impl ModelFamily {
    pub fn of_config(text: &str) -> anyhow::Result<Self> {
        #[derive(Deserialize)]
        struct ModelType {
            #[serde(default)]
            model_type: Option<String>,
        }
        let probe: ModelType = serde_json::from_str(text).context("config.json is not JSON")?;
        match probe.model_type.as_deref() {
            None | Some("qwen2_5_omni") => Ok(Self::Qwen25Omni),
            Some(crate::model::qwen3_omni::config::MODEL_TYPE) => Ok(Self::Qwen3Omni),
            Some(other) => bail!(
                "model_type {other:?} is not a model omnicall runs (qwen2_5_omni, qwen3_omni_moe)"
            ),
        }
    }
}

fn parse_config(text: &str, origin: &str) -> anyhow::Result<Config> {
    if ModelFamily::of_config(text).ok() == Some(ModelFamily::Qwen3Omni) {
        bail!(
            "{origin} describes a Qwen3-Omni model (model_type qwen3_omni_moe): its model layer \
             exists (model::qwen3_omni), but this path runs Qwen2.5-Omni only so far"
        );
    }
    let config = Config::from_json(text)
        .with_context(|| format!("{origin} is not a valid Qwen2.5-Omni config"))?;
    config
        .validate()
        .with_context(|| format!("{origin} does not describe a consistent model"))?;
    Ok(config)
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => bail!("unknown dtype {other:?}: use f32, bf16 or f16"),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let s = s.to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("unknown device {s:?}: use cpu, cuda or cuda:N"))?,
        None => bail!("unknown device {s:?}: use cpu, cuda or cuda:N"),
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> anyhow::Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> anyhow::Result<Device> {
    bail!(
        "device cuda:{ordinal} asked for, but this omnicall was built without CUDA: rebuild with \
         `cargo build --release --features cuda`"
    )
}

/// Memory-mapped safetensors shards, with a name -> shard map.
pub struct Checkpoint {
    inner: Arc<Shards>,
}

struct Shards {
    files: Vec<PathBuf>,
    maps: Vec<MmapedSafetensors>,
    /// Tensor name -> shard index.
    routing: HashMap<String, usize>,
}

impl Checkpoint {
    /// Maps `files` and reads their headers; a tensor in several files is taken from the last.
    pub fn open(files: &[PathBuf]) -> anyhow::Result<Self> {
        ensure!(!files.is_empty(), "no weight files given");
        let mut maps = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            // Safety: the file is mapped read-only; it must not be modified while the model runs,
            // which is the contract of every mmap-based checkpoint loader.
            let map = unsafe { MmapedSafetensors::new(path) }
                .with_context(|| format!("{} is not a safetensors file", path.display()))?;
            for (name, _) in map.tensors() {
                routing.insert(name, i);
            }
            maps.push(map);
        }
        Ok(Self {
            inner: Arc::new(Shards {
                files: files.to_vec(),
                maps,
                routing,
            }),
        })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.routing.contains_key(name)
    }

    /// Bytes stored for the tensors whose names start with one of `prefixes`.
    pub fn bytes_under(&self, prefixes: &[&str]) -> u64 {
        self.inner
            .routing
            .iter()
            .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
            .filter_map(|(name, &i)| self.inner.maps[i].get(name).ok())
            .map(|view| view.data().len() as u64)
            .sum()
    }

    /// A `VarBuilder` over the checkpoint, converting to `dtype` on `device`. Progress over the
    /// tensors under `tracked` (e.g. `["thinker.model.", "thinker.lm_head."]`) is shown on a
    /// terminal for large loads and logged when done.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
        label: &str,
        tracked: &[&str],
    ) -> VarBuilder<'static> {
        let total = self.bytes_under(tracked);
        let progress = LoadProgress::new(label, total, tracked);
        let backend = CheckpointBackend {
            shards: self.inner.clone(),
            progress: Arc::new(progress),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }
}

/// Counts the bytes materialised for the tracked tensors; a bar on a terminal for large loads,
/// a log line when all are in.
struct LoadProgress {
    label: String,
    tracked: Vec<String>,
    total: u64,
    loaded: AtomicU64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// Loads below this size finish too fast for a bar to help.
const PROGRESS_BAR_MIN_BYTES: u64 = 64 << 20;

impl LoadProgress {
    fn new(label: &str, total: u64, tracked: &[&str]) -> Self {
        let bar = (total >= PROGRESS_BAR_MIN_BYTES && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("loading {label}"));
            bar
        });
        Self {
            label: label.to_string(),
            tracked: tracked.iter().map(|s| s.to_string()).collect(),
            total,
            loaded: AtomicU64::new(0),
            started: Instant::now(),
            bar,
        }
    }

    fn add(&self, name: &str, bytes: u64) {
        if !self.tracked.iter().any(|p| name.starts_with(p.as_str())) {
            return;
        }
        let before = self.loaded.fetch_add(bytes, Ordering::Relaxed);
        let now = before + bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(now.min(self.total));
        }
        if before < self.total && now >= self.total {
            if let Some(bar) = &self.bar {
                bar.finish_and_clear();
            }
            tracing::info!(
                "loaded {} ({:.2} GB) in {:.1} s",
                self.label,
                self.total as f64 / 1e9,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

impl Drop for LoadProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && !bar.is_finished()
        {
            bar.abandon();
        }
    }
}

struct CheckpointBackend {
    shards: Arc<Shards>,
    progress: Arc<LoadProgress>,
}

impl CheckpointBackend {
    /// The shard holding `name`, the stored shape and the stored size in bytes.
    fn view(&self, name: &str) -> candle_core::Result<(usize, Vec<usize>, u64)> {
        let Some(&shard) = self.shards.routing.get(name) else {
            let files: Vec<String> = self
                .shards
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            candle_core::bail!(
                "tensor {name} is missing from the checkpoint (searched {})",
                files.join(", ")
            );
        };
        let view = self.shards.maps[shard].get(name)?;
        Ok((shard, view.shape().to_vec(), view.data().len() as u64))
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (shard, _, bytes) = self.view(name)?;
        let tensor = self.shards.maps[shard]
            .load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot load tensor {name} from {}: {e}",
                    self.shards.files[shard].display()
                ))
            })?;
        self.progress.add(name, bytes);
        Ok(tensor)
    }
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let (shard, stored, _) = self.view(name)?;
        // Check the header before reading any data.
        if stored != shape.dims() {
            candle_core::bail!(
                "tensor {name} in {} has shape {:?} but the model (from config.json) expects {:?}",
                self.shards.files[shard].display(),
                stored,
                shape.dims()
            );
        }
        self.load(name, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shards.routing.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
    }

    #[test]
    fn hub_ids_and_folders_are_told_apart() {
        assert!(is_hub_id("Qwen/Qwen2.5-Omni-3B"));
        assert!(!is_hub_id("models/tiny/x"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("./x"));
        assert!(!is_hub_id("tiny"));
        let err = ModelFiles::locate("no/such folder")
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither a folder nor"), "{err}");
    }

    #[test]
    fn tiny_folder_resolves_every_file() {
        let files = ModelFiles::from_dir(&tiny_dir()).unwrap();
        assert_eq!(files.weights, vec![tiny_dir().join("model.safetensors")]);
        assert_eq!(
            files.tokenizer,
            TokenizerFiles::Json(tiny_dir().join("tokenizer.json"))
        );
        assert!(files.generation_config.is_some());
        assert!(files.speakers.pickle.is_some() && files.speakers.safetensors.is_some());
        assert_eq!(
            files.processor_config,
            Some(tiny_dir().join("processor_config.json"))
        );
        files.load_config().unwrap();
        files.load_processor_config().unwrap();
        let generation = files.load_generation_config().unwrap();
        assert!(generation.eos_token_id.is_some());
    }

    /// A hub cache laid out as huggingface_hub writes it, holding the tiny model.
    fn fake_cache(id: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "omnicall-hub-{}-{}",
            std::process::id(),
            id.replace('/', "-")
        ));
        let _ = std::fs::remove_dir_all(&root);
        let repo = root.join(format!("models--{}", id.replace('/', "--")));
        let snapshot = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        for entry in std::fs::read_dir(tiny_dir()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
        }
        root
    }

    #[test]
    fn hub_id_found_in_the_cache_and_clear_error_when_absent() {
        let cache = fake_cache("Qwen/Tiny-Omni");
        let files = ModelFiles::from_hub("Qwen/Tiny-Omni", &cache, false).unwrap();
        assert!(files.dir.ends_with("snapshots/0123abcd"));
        files.load_config().unwrap();
        let err = ModelFiles::from_hub("Qwen/Qwen2.5-Omni-3B", &cache, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("huggingface-cli download Qwen/Qwen2.5-Omni-3B"),
            "{err}"
        );
        std::fs::remove_dir_all(cache).unwrap();
    }

    #[test]
    fn published_configs_by_name_or_path() {
        let c3 = config_from_spec("3b").unwrap();
        assert_eq!(c3.thinker_config.text_config.num_hidden_layers, 36);
        assert!(config_from_spec("7B").is_ok());
        assert!(config_from_spec(tiny_dir().to_str().unwrap()).is_ok());
        let err = format!("{:#}", config_from_spec("13b").unwrap_err());
        assert!(err.contains("neither 3b, 7b"), "{err}");
    }

    #[test]
    fn dtype_and_device_names() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(
            parse_dtype("int8")
                .unwrap_err()
                .to_string()
                .contains("f32, bf16")
        );
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(
            parse_device("cuda:1")
                .unwrap_err()
                .to_string()
                .contains("without CUDA")
        );
    }
}
