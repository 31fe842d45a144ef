//! Broken model folders give clear errors: each test copies models/tiny into a temporary folder,
//! breaks one thing and checks that the error names what is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;

/// A copy of the tiny model in a fresh temporary folder, removed when dropped.
struct BrokenModel {
    dir: PathBuf,
}

impl BrokenModel {
    fn new(name: &str) -> Self {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let dir =
            std::env::temp_dir().join(format!("omnicall-loading-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&tiny).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        Self { dir }
    }

    fn weights(&self) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(self.dir.join("model.safetensors"), &Device::Cpu).unwrap()
    }

    fn write_weights(&self, tensors: &HashMap<String, Tensor>) {
        candle_core::safetensors::save(tensors, self.dir.join("model.safetensors")).unwrap();
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
    }

    /// The error of loading the text chat model (config, tokenizer, Thinker weights).
    fn load_error(&self) -> String {
        let result = ModelFiles::from_dir(&self.dir)
            .and_then(|files| OmniModel::load(&files, DType::F32, &Device::Cpu));
        match result {
            Ok(_) => panic!("{} loaded although it is broken", self.dir.display()),
            Err(e) => {
                let err = format!("{e:#}");
                eprintln!("{}: {err}", self.dir.display());
                err
            }
        }
    }
}

impl Drop for BrokenModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_intact_copy_loads() {
    let model = BrokenModel::new("intact");
    let files = ModelFiles::from_dir(&model.dir).unwrap();
    OmniModel::load(&files, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let model = BrokenModel::new("shape");
    let mut weights = model.weights();
    let name = "thinker.model.layers.0.mlp.gate_proj.weight";
    let (rows, cols) = weights[name].dims2().unwrap();
    weights.insert(
        name.to_string(),
        Tensor::zeros((rows, cols + 1), DType::F32, &Device::Cpu).unwrap(),
    );
    model.write_weights(&weights);
    let err = model.load_error();
    assert!(err.contains(name), "{err}");
    assert!(err.contains(&format!("[{rows}, {}]", cols + 1)), "{err}");
    assert!(err.contains(&format!("[{rows}, {cols}]")), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_tensor_names_it_and_the_files_searched() {
    let model = BrokenModel::new("missing");
    let mut weights = model.weights();
    let name = "thinker.model.norm.weight";
    assert!(weights.remove(name).is_some());
    model.write_weights(&weights);
    let err = model.load_error();
    assert!(err.contains(name), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(
        err.contains(&model.dir.join("model.safetensors").display().to_string()),
        "{err}"
    );
}

#[test]
fn malformed_config_json_names_the_file_and_the_place() {
    let model = BrokenModel::new("json");
    let path = model.dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = model.load_error();
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn config_that_does_not_fit_names_the_field() {
    let model = BrokenModel::new("mrope");
    model.edit_config(|c| {
        let text = &mut c["thinker_config"]["text_config"];
        let rope = if text.get("rope_parameters").is_some() {
            &mut text["rope_parameters"]
        } else {
            &mut text["rope_scaling"]
        };
        let section = rope["mrope_section"].as_array_mut().unwrap();
        let first = section[0].as_u64().unwrap();
        section[0] = serde_json::json!(first + 1);
    });
    let err = model.load_error();
    assert!(err.contains("mrope_section"), "{err}");
    assert!(err.contains("head_dim"), "{err}");
}

#[test]
fn hidden_size_the_weights_do_not_have_is_a_shape_error() {
    let model = BrokenModel::new("hidden");
    model.edit_config(|c| {
        let text = &mut c["thinker_config"]["text_config"];
        let hidden = text["hidden_size"].as_u64().unwrap();
        // Keep the config self-consistent (encoders project to the same width) but unlike the
        // weights.
        text["hidden_size"] = serde_json::json!(hidden * 2);
        text["head_dim"] =
            serde_json::json!(hidden / text["num_attention_heads"].as_u64().unwrap());
        c["thinker_config"]["audio_config"]["output_dim"] = serde_json::json!(hidden * 2);
        c["thinker_config"]["vision_config"]["out_hidden_size"] = serde_json::json!(hidden * 2);
        c["talker_config"]["embedding_size"] = serde_json::json!(hidden * 2);
    });
    let err = model.load_error();
    assert!(err.contains("thinker.model.embed_tokens.weight"), "{err}");
    assert!(err.contains("expects"), "{err}");
}

#[test]
fn missing_files_are_listed() {
    let model = BrokenModel::new("files");
    std::fs::remove_file(model.dir.join("tokenizer.json")).unwrap();
    let err = format!("{:#}", ModelFiles::from_dir(&model.dir).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");
    assert!(err.contains("vocab.json"), "{err}");

    std::fs::remove_file(model.dir.join("model.safetensors")).unwrap();
    let err = format!("{:#}", ModelFiles::from_dir(&model.dir).unwrap_err());
    assert!(err.contains("no weights"), "{err}");

    std::fs::write(
        model.dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = format!("{:#}", ModelFiles::from_dir(&model.dir).unwrap_err());
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");

    let err = format!(
        "{:#}",
        ModelFiles::from_dir(&model.dir.join("nope")).unwrap_err()
    );
    assert!(err.contains("does not exist"), "{err}");
}
