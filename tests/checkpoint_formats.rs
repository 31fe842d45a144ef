//! The formats a published checkpoint ships, on the fixture model: the voices in `spk_dict.pt`
//! (a torch pickle) read through the pickle reader, and weights split into shards with a
//! `model.safetensors.index.json`, loaded through the real loader.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use omnicall::model::chat::{Content, Conversation, DEFAULT_SYSTEM_PROMPT};
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::model::speakers::{SPEAKERS_SAFETENSORS, SPK_DICT, Voices};
use omnicall::model::thinker::LogitsFor;
use omnicall::model::token2wav::Token2Wav;
use omnicall::model::token2wav::dit::SamplerOptions;

/// Fixture README tolerance of waveforms.
const WAVEFORM_ATOL: f32 = 1e-4;

/// Where two float tensors of the same shape differ most: Err names the first non-finite
/// element, a shape mismatch, or the worst element when it is beyond `atol`.
fn compare(what: &str, got: &Tensor, want: &Tensor, atol: f32) -> Result<f32, String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "{what}: shape {:?}, expected {:?}",
            got.dims(),
            want.dims()
        ));
    }
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("a float tensor")
    };
    let (got, want) = (flat(got), flat(want));
    let mut worst = (0usize, 0f32);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            return Err(format!("{what}: element {i} is not finite ({a} vs {b})"));
        }
        let d = (a - b).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    if worst.1 > atol {
        let i = worst.0;
        return Err(format!(
            "{what}: element {i} is {} instead of {} (diff {:e} > {atol:e})",
            got[i], want[i], worst.1
        ));
    }
    Ok(worst.1)
}

/// Every voice of `got` equals the one of the same name in `want`, bit for bit.
fn compare_voices(got: &Voices, want: &Voices) -> Result<(), String> {
    if got.names() != want.names() {
        return Err(format!(
            "voices {:?}, expected {:?}",
            got.names(),
            want.names()
        ));
    }
    for voice in got.iter() {
        let other = want.get(&voice.name).map_err(|e| e.to_string())?;
        if voice.bos_token != other.bos_token {
            return Err(format!(
                "voice {}: bos_token {}, expected {}",
                voice.name, voice.bos_token, other.bos_token
            ));
        }
        compare(
            &format!("voice {}: cond", voice.name),
            &voice.cond,
            &other.cond,
            0.0,
        )?;
        compare(
            &format!("voice {}: ref_mel", voice.name),
            &voice.ref_mel,
            &other.ref_mel,
            0.0,
        )?;
    }
    Ok(())
}

fn pickle_voices() -> Voices {
    Voices::from_spk_dict(&common::model_dir().join(SPK_DICT), &Device::Cpu)
        .expect("the fixture's spk_dict.pt reads")
}

fn safetensors_voices() -> Voices {
    Voices::from_safetensors(
        &common::model_dir().join(SPEAKERS_SAFETENSORS),
        &Device::Cpu,
    )
    .expect("the fixture's speakers.safetensors reads")
}

#[test]
fn voices_from_the_pickle_equal_the_safetensors_ones() {
    let (pickle, reference) = (pickle_voices(), safetensors_voices());
    assert!(!pickle.is_empty());
    compare_voices(&pickle, &reference).unwrap();
}

#[test]
fn a_wrong_voice_tensor_fails_the_voice_check_naming_it() {
    let reference = safetensors_voices();
    let mut voices: Vec<_> = pickle_voices().iter().cloned().collect();
    let victim = &mut voices[0];
    let name = victim.name.clone();
    // One element of the x-vector off by 1e-3.
    let bump = Tensor::zeros(victim.cond.dims(), DType::F32, &Device::Cpu)
        .unwrap()
        .slice_assign(
            &[0..1, 3..4],
            &Tensor::new(&[[1e-3f32]], &Device::Cpu).unwrap(),
        )
        .unwrap();
    victim.cond = (&victim.cond + bump).unwrap();
    let err = compare_voices(&Voices::from_voices(voices).unwrap(), &reference).unwrap_err();
    assert!(
        err.starts_with(&format!("voice {name}: cond: element 3 is")),
        "{err}"
    );
}

/// token2wav with the pickle's voice renders the reference's waveform of that voice.
#[test]
fn token2wav_with_the_pickle_voice_matches_the_reference() {
    let cases = common::Cases::load();
    let json = common::Cases::json();
    let settings = &json["settings"];
    let cfg = common::model_config();
    let t2w = Token2Wav::new(
        &cfg.token2wav_config,
        common::model_weights().pp("token2wav"),
    )
    .unwrap();
    let options = SamplerOptions {
        steps: json["spec"]["inputs"]["ode_steps"]
            .as_u64()
            .expect("spec.inputs.ode_steps") as usize,
        guidance_scale: settings["guidance_scale"]
            .as_f64()
            .expect("settings.guidance_scale"),
        sway: settings["sway_coefficient"]
            .as_f64()
            .expect("settings.sway_coefficient"),
    };
    let voices = pickle_voices();
    // generate() captured the conditioning of the fixture's speaker.
    let voice = voices
        .get(settings["speaker"].as_str().expect("settings.speaker"))
        .unwrap();
    compare(
        "token2wav.conditioning",
        &voice.cond,
        &cases.f32("token2wav.conditioning"),
        0.0,
    )
    .unwrap();
    compare(
        "token2wav.reference_mel",
        &voice.ref_mel,
        &cases.f32("token2wav.reference_mel"),
        0.0,
    )
    .unwrap();
    let codes: Vec<u32> = cases
        .i64_vec("token2wav_fixed.code")
        .iter()
        .map(|&c| c as u32)
        .collect();
    let wav = t2w
        .synthesize(
            &t2w.speaker(voice).unwrap(),
            &codes,
            &cases.f32("token2wav_fixed.noise"),
            &t2w.schedule(&options).unwrap(),
        )
        .unwrap();
    let diff = compare(
        "token2wav_fixed.waveform",
        &Tensor::new(wav.as_slice(), &Device::Cpu).unwrap(),
        &cases.f32("token2wav_fixed.waveform"),
        WAVEFORM_ATOL,
    )
    .unwrap();
    eprintln!("token2wav_fixed.waveform with the pickle's voice: max abs diff {diff:e}");
}

/// A copy of the fixture model folder whose weights are split into shards (by top-level
/// module, so the Thinker and the speech parts live in different files) plus the index.
struct ShardedModel {
    dir: PathBuf,
    shards: Vec<String>,
}

impl ShardedModel {
    fn new(name: &str) -> Self {
        let source = common::model_dir();
        let dir =
            std::env::temp_dir().join(format!("omnicall-sharded-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            if !file.ends_with(".safetensors") || file == SPEAKERS_SAFETENSORS {
                std::fs::copy(&path, dir.join(&file)).unwrap();
            }
        }
        let tensors =
            candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut groups: std::collections::BTreeMap<String, HashMap<String, Tensor>> =
            Default::default();
        for (name, tensor) in tensors {
            let module = name.split('.').next().unwrap().to_string();
            groups.entry(module).or_default().insert(name, tensor);
        }
        assert!(groups.len() >= 2, "the fixture has one module only");
        let n = groups.len();
        let mut weight_map = serde_json::Map::new();
        let mut shards = Vec::new();
        for (i, group) in groups.values().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            candle_core::safetensors::save(group, dir.join(&file)).unwrap();
            for name in group.keys() {
                weight_map.insert(name.clone(), file.clone().into());
            }
            shards.push(file);
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
        Self { dir, shards }
    }
}

impl Drop for ShardedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Logits of every position of a text prompt.
fn prompt_logits(model: &OmniModel) -> Tensor {
    let conversation = Conversation::new(
        DEFAULT_SYSTEM_PROMPT,
        vec![Content::Text("Hello, who are you?".into())],
    );
    let prompt = model
        .tokenizer
        .encode_conversation(&conversation, true)
        .unwrap();
    let mut thinker = model.thinker.clone();
    thinker.clear_cache();
    let embeds = thinker.embed(&prompt.ids).unwrap();
    let positions = prompt.positions.to_tensor(&Device::Cpu).unwrap();
    thinker
        .forward(&embeds, &positions, LogitsFor::All)
        .unwrap()
        .logits
        .unwrap()
}

fn load(dir: &Path) -> anyhow::Result<OmniModel> {
    OmniModel::load(&ModelFiles::from_dir(dir)?, DType::F32, &Device::Cpu)
}

#[test]
fn a_sharded_checkpoint_loads_to_the_same_model() {
    let sharded = ShardedModel::new("load");
    let files = ModelFiles::from_dir(&sharded.dir).unwrap();
    let listed: Vec<String> = files
        .weights
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, sharded.shards, "the loader's shard list");
    let from_shards = load(&sharded.dir).unwrap();
    let single = load(&common::model_dir()).unwrap();
    assert!(
        from_shards.speech.is_some(),
        "the speech parts from their shard"
    );
    let diff = compare(
        "prompt logits",
        &prompt_logits(&from_shards),
        &prompt_logits(&single),
        0.0,
    )
    .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_missing_shard_is_named() {
    let sharded = ShardedModel::new("missing");
    let gone = sharded.shards.last().unwrap().clone();
    std::fs::remove_file(sharded.dir.join(&gone)).unwrap();
    let err = format!("{:#}", load(&sharded.dir).err().expect("a missing shard"));
    assert!(err.contains(&gone), "{err}");
    assert!(err.contains("missing"), "{err}");
}
