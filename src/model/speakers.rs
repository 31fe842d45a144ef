//! Voices: the speaker conditioning of the published checkpoints.
//!
//! Each voice has three entries (`spk_dict.pt`, loaded by the reference's `from_pretrained`):
//! * `bos_token`: a Thinker-vocabulary id whose Thinker embedding sits between the prompt and
//!   the reply on the Talker's text track;
//! * `cond` `[1, enc_emb_dim]`: the speaker vector broadcast into the DiT input;
//! * `ref_mel` `[1, T_ref, mel_dim]`: a reference log-mel, encoded by the DiT's ECAPA-TDNN.
//!
//! Two file layouts hold the same data: `spk_dict.pt` (a torch zip archive whose pickle is a
//! dict name -> dict) and `speakers.safetensors` (flat keys `NAME.bos_token` int64 `[1]`,
//! `NAME.cond`, `NAME.ref_mel`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Tensor};

/// The voice the reference uses when none is named.
pub const DEFAULT_VOICE: &str = "Chelsie";
/// File names inside a model folder, in the order [`Voices::load`] tries them.
pub const SPEAKERS_SAFETENSORS: &str = "speakers.safetensors";
pub const SPK_DICT: &str = "spk_dict.pt";

/// One voice.
#[derive(Debug, Clone)]
pub struct Voice {
    pub name: String,
    /// Thinker-vocabulary id of the speaker's text-track token.
    pub bos_token: u32,
    /// `[1, enc_emb_dim]` f32.
    pub cond: Tensor,
    /// `[1, T_ref, mel_dim]` f32.
    pub ref_mel: Tensor,
}

impl Voice {
    fn new(
        name: &str,
        bos_token: i64,
        cond: Tensor,
        ref_mel: Tensor,
        device: &Device,
    ) -> Result<Self> {
        let bos_token = u32::try_from(bos_token)
            .with_context(|| format!("voice {name}: bos_token {bos_token} is not a token id"))?;
        let cond = match cond.rank() {
            1 => cond.unsqueeze(0)?,
            _ => cond,
        };
        if cond.rank() != 2 || cond.dim(0)? != 1 {
            bail!(
                "voice {name}: cond must be [1, enc_emb_dim], got {:?}",
                cond.dims()
            );
        }
        if ref_mel.rank() != 3 || ref_mel.dim(0)? != 1 || ref_mel.dim(1)? == 0 {
            bail!(
                "voice {name}: ref_mel must be [1, T_ref > 0, mel_dim], got {:?}",
                ref_mel.dims()
            );
        }
        Ok(Self {
            name: name.to_string(),
            bos_token,
            cond: cond.to_dtype(DType::F32)?.to_device(device)?,
            ref_mel: ref_mel.to_dtype(DType::F32)?.to_device(device)?,
        })
    }
}

/// The voices of a model folder, by name.
#[derive(Debug, Clone, Default)]
pub struct Voices {
    voices: BTreeMap<String, Voice>,
}

impl Voices {
    /// Reads `speakers.safetensors` if the folder has one, else `spk_dict.pt`.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self> {
        let flat = model_dir.join(SPEAKERS_SAFETENSORS);
        if flat.exists() {
            return Self::from_safetensors(&flat, device);
        }
        let pickle = model_dir.join(SPK_DICT);
        if pickle.exists() {
            return Self::from_spk_dict(&pickle, device);
        }
        bail!(
            "no voices in {}: neither {SPEAKERS_SAFETENSORS} nor {SPK_DICT} is there",
            model_dir.display()
        )
    }

    /// `speakers.safetensors`: `NAME.bos_token`, `NAME.cond`, `NAME.ref_mel` per voice.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read voices from {}", path.display()))?;
        let names: std::collections::BTreeSet<String> = tensors
            .keys()
            .filter_map(|k| k.rsplit_once('.').map(|(name, _)| name.to_string()))
            .collect();
        let mut voices = BTreeMap::new();
        for name in names {
            let mut take = |entry: &str| -> Result<Tensor> {
                tensors
                    .remove(&format!("{name}.{entry}"))
                    .with_context(|| format!("{}: voice {name} has no {entry}", path.display()))
            };
            let bos = take("bos_token")?;
            let bos = bos
                .flatten_all()?
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .first()
                .copied()
                .with_context(|| format!("{}: {name}.bos_token is empty", path.display()))?;
            let voice = Voice::new(&name, bos, take("cond")?, take("ref_mel")?, device)
                .with_context(|| path.display().to_string())?;
            voices.insert(name, voice);
        }
        if voices.is_empty() {
            bail!("{}: no voices in the file", path.display());
        }
        Ok(Self { voices })
    }

    /// `spk_dict.pt`: the torch pickle `{name: {"bos_token": int, "cond": tensor, "ref_mel":
    /// tensor}}` inside a zip archive.
    pub fn from_spk_dict(path: &Path, device: &Device) -> Result<Self> {
        let root = read_pickle(path)?;
        let Object::Dict(entries) = root else {
            bail!("{}: the pickle is not a dict of voices", path.display());
        };
        let mut voices = BTreeMap::new();
        for (key, value) in entries {
            let Object::Unicode(name) = key else {
                bail!("{}: a voice name is not a string: {key:?}", path.display());
            };
            let Object::Dict(fields) = value else {
                bail!("{}: voice {name} is not a dict", path.display());
            };
            let bos = fields
                .into_iter()
                .find(|(k, _)| *k == Object::Unicode("bos_token".into()))
                .map(|(_, v)| v)
                .with_context(|| format!("{}: voice {name} has no bos_token", path.display()))?
                .int_or_long()
                .map_err(|o| {
                    anyhow::anyhow!("{}: {name}.bos_token is not an int: {o:?}", path.display())
                })?;
            let tensors = PthTensors::new(path, Some(&name))
                .with_context(|| format!("{}: reading voice {name}", path.display()))?;
            let get = |entry: &str| -> Result<Tensor> {
                tensors
                    .get(entry)?
                    .with_context(|| format!("{}: voice {name} has no {entry}", path.display()))
            };
            let voice = Voice::new(&name, bos, get("cond")?, get("ref_mel")?, device)
                .with_context(|| path.display().to_string())?;
            voices.insert(name, voice);
        }
        if voices.is_empty() {
            bail!("{}: no voices in the file", path.display());
        }
        Ok(Self { voices })
    }

    /// Voices made in memory (benchmarks with random weights); each is checked as a loaded
    /// one is.
    pub fn from_voices(voices: impl IntoIterator<Item = Voice>) -> Result<Self> {
        let mut map = BTreeMap::new();
        for v in voices {
            let device = v.cond.device().clone();
            let bos = i64::from(v.bos_token);
            let voice = Voice::new(&v.name, bos, v.cond, v.ref_mel, &device)?;
            map.insert(voice.name.clone(), voice);
        }
        if map.is_empty() {
            bail!("no voices given");
        }
        Ok(Self { voices: map })
    }

    /// The voice called `name`; an unknown name is an error listing the voices there are.
    pub fn get(&self, name: &str) -> Result<&Voice> {
        self.voices.get(name).with_context(|| {
            format!(
                "unknown voice {name:?}; available voices: {}",
                self.names().join(", ")
            )
        })
    }

    /// [`DEFAULT_VOICE`] if present, else the first voice by name.
    pub fn default_voice(&self) -> Result<&Voice> {
        self.voices
            .get(DEFAULT_VOICE)
            .or_else(|| self.voices.values().next())
            .context("there are no voices")
    }

    pub fn names(&self) -> Vec<&str> {
        self.voices.keys().map(String::as_str).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Voice> {
        self.voices.values()
    }

    pub fn len(&self) -> usize {
        self.voices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.voices.is_empty()
    }
}

/// The root object of the `data.pkl` inside a torch zip archive.
fn read_pickle(path: &Path) -> Result<Object> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a torch zip archive", path.display()))?;
    let name = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
    let mut bytes = Vec::new();
    archive
        .by_name(&name)
        .with_context(|| format!("{}: cannot open {name}", path.display()))?
        .read_to_end(&mut bytes)?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(bytes))
        .with_context(|| format!("{}: cannot parse {name}", path.display()))?;
    Ok(stack.finalize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
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

    #[test]
    fn pickle_and_safetensors_give_the_same_voices() -> Result<()> {
        let dev = Device::Cpu;
        let a = Voices::from_spk_dict(&tiny_dir().join(SPK_DICT), &dev)?;
        let b = Voices::from_safetensors(&tiny_dir().join(SPEAKERS_SAFETENSORS), &dev)?;
        assert_eq!(a.names(), b.names());
        assert!(a.len() >= 2, "{:?}", a.names());
        for va in a.iter() {
            let vb = b.get(&va.name)?;
            assert_eq!(va.bos_token, vb.bos_token);
            assert_eq!(va.cond.dims(), vb.cond.dims());
            assert_eq!(va.ref_mel.dims(), vb.ref_mel.dims());
            assert_eq!(max_diff(&va.cond, &vb.cond), 0.0);
            assert_eq!(max_diff(&va.ref_mel, &vb.ref_mel), 0.0);
            assert_eq!(va.cond.dim(0)?, 1);
            assert_eq!(va.ref_mel.dim(0)?, 1);
        }
        // The folder loader prefers the safetensors file.
        let c = Voices::load(&tiny_dir(), &dev)?;
        assert_eq!(c.names(), a.names());
        assert_eq!(c.default_voice()?.name, DEFAULT_VOICE);
        Ok(())
    }

    #[test]
    fn unknown_voice_lists_the_voices() -> Result<()> {
        let voices = Voices::load(&tiny_dir(), &Device::Cpu)?;
        let err = voices.get("Nobody").unwrap_err().to_string();
        assert!(err.contains("Nobody"), "{err}");
        for name in voices.names() {
            assert!(err.contains(name), "{err}");
        }
        Ok(())
    }

    #[test]
    fn missing_or_broken_files_are_clear_errors() {
        let dev = Device::Cpu;
        let err = Voices::load(Path::new("/nonexistent/model"), &dev).unwrap_err();
        assert!(err.to_string().contains(SPK_DICT), "{err}");
        // A safetensors file is not a zip archive.
        let err = Voices::from_spk_dict(&tiny_dir().join(SPEAKERS_SAFETENSORS), &dev).unwrap_err();
        assert!(format!("{err:#}").contains("zip"), "{err:#}");
    }
}
