//! The Thinker LM against the reference: embedding merge, TMRoPE positions, every decoder layer,
//! the final hidden state and the logits of the audio+image prompt (`thinker_logits`), eight
//! greedy tokens with their step logits (`thinker_greedy`) and the video+audio prompt
//! (`thinker_av_logits`).

use candle_core::{DType, Device, IndexOp, Tensor};
use omnicall::model::loading::ModelFiles;
use omnicall::model::thinker::rope::{RopeIndexConfig, get_rope_index};
use omnicall::model::thinker::{GenerationOptions, LogitsFor, MultimodalEmbeds, Prompt, Thinker};

use crate::common::{self, Cases};
use crate::rope::{assert_positions, config, ids, media};

/// Tolerance of the fixture README for thinker hidden states and logits.
const ATOL: f32 = 1e-4;

fn load_thinker() -> Thinker {
    let files = ModelFiles::from_dir(&common::model_dir()).expect("fixture model folder");
    let cfg = files.load_config().expect("fixture config");
    let checkpoint = files.checkpoint().expect("fixture weights");
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu, "thinker", &["thinker."]);
    Thinker::new(&cfg.thinker_config, vb.pp("thinker")).expect("thinker builds")
}

/// Encoder embeddings of a prompt's media. They come from the fixtures' encoder outputs here;
/// swap in the audio/vision encoders to test the whole Thinker front end.
fn encoder_embeddings(cases: &Cases, prompt: &str) -> MultimodalEmbeds {
    match prompt {
        "thinker" => MultimodalEmbeds {
            audio: Some(cases.f32("audio_encoder.output")),
            image: Some(cases.f32("image.embeds")),
            video: None,
        },
        "video_audio" => MultimodalEmbeds {
            audio: Some(cases.f32("audio_encoder.output")),
            image: None,
            video: Some(cases.f32("video.embeds")),
        },
        other => panic!("no encoder embeddings for {other}"),
    }
}

#[test]
fn thinker_logits() {
    let cases = Cases::load();
    let cfg = config();
    let mut thinker = load_thinker();
    let ids = ids(&cases, "thinker.input_ids");

    let embeds = thinker
        .embed_prompt(&ids, &encoder_embeddings(&cases, "thinker"))
        .unwrap();
    common::assert_close(
        "thinker.inputs_embeds",
        &embeds,
        &cases.f32("thinker.inputs_embeds").squeeze(0).unwrap(),
        ATOL,
    );

    let rope = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, delta) = get_rope_index(&rope, &ids, &media(&cases, "thinker")).unwrap();
    assert_positions("thinker", &cases, &positions, delta);

    let (out, layers) = thinker
        .forward_with_layer_outputs(
            &embeds,
            &positions.to_tensor(&Device::Cpu).unwrap(),
            LogitsFor::All,
        )
        .unwrap();
    let want_layers = cases.f32("thinker.layer_outputs");
    let n = want_layers.dim(0).unwrap();
    assert_eq!(layers.len(), n + 1, "decoder layers");
    for (i, layer) in layers.iter().take(n).enumerate() {
        common::assert_close(
            &format!("thinker.layer_outputs[{i}]"),
            layer,
            &want_layers.i(i).unwrap(),
            ATOL,
        );
    }
    common::assert_close(
        "thinker.last_hidden_state",
        &out.hidden,
        &cases.f32("thinker.last_hidden_state"),
        ATOL,
    );
    common::assert_close(
        "thinker.logits",
        out.logits.as_ref().unwrap(),
        &cases.f32("thinker.logits"),
        ATOL,
    );
}

#[test]
fn thinker_greedy() {
    let cases = Cases::load();
    let cfg = config();
    let mut thinker = load_thinker();
    let ids = ids(&cases, "thinker.input_ids");
    let embeds = thinker
        .embed_prompt(&ids, &encoder_embeddings(&cases, "thinker"))
        .unwrap();
    let rope = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, rope_delta) = get_rope_index(&rope, &ids, &media(&cases, "thinker")).unwrap();
    let want: Vec<u32> = cases
        .i64_vec("thinker.generated_ids")
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let prompt = Prompt {
        ids: ids.clone(),
        embeds,
        positions: positions.to_tensor(&Device::Cpu).unwrap(),
        rope_delta,
    };
    let mut options = GenerationOptions::greedy(want.len(), cfg.thinker_config.eos_token_ids());
    options.keep_step_logits = true;
    let mut streamed = Vec::new();
    let generation = thinker
        .generate(&prompt, &options, |token| {
            streamed.push(token.id);
            Ok(std::ops::ControlFlow::Continue(()))
        })
        .unwrap();
    assert_eq!(generation.ids, want, "greedy ids");
    assert_eq!(streamed, want, "ids seen by the callback");
    let step_logits = Tensor::stack(&generation.step_logits, 0).unwrap();
    common::assert_close(
        "thinker.generation_step_logits",
        &step_logits,
        &cases.f32("thinker.generation_step_logits"),
        ATOL,
    );
    // Every generated token but the last was fed back: its hidden state and embedding are kept.
    let fed = want.len() - 1;
    assert_eq!(
        generation.token_hidden.unwrap().dims(),
        &[fed, thinker.hidden_size()]
    );
    assert_eq!(
        generation.token_embeds.unwrap().dims(),
        &[fed, thinker.hidden_size()]
    );
    assert_eq!(thinker.cache_len(), ids.len() + fed);
}

#[test]
fn thinker_av_logits() {
    let cases = Cases::load();
    let cfg = config();
    let mut thinker = load_thinker();
    let ids = ids(&cases, "rope.video_audio.input_ids");
    let embeds = thinker
        .embed_prompt(&ids, &encoder_embeddings(&cases, "video_audio"))
        .unwrap();
    let rope = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, delta) = get_rope_index(&rope, &ids, &media(&cases, "video_audio")).unwrap();
    assert_positions("rope.video_audio", &cases, &positions, delta);
    let out = thinker
        .forward(
            &embeds,
            &positions.to_tensor(&Device::Cpu).unwrap(),
            LogitsFor::All,
        )
        .unwrap();
    common::assert_close(
        "thinker_av.logits",
        out.logits.as_ref().unwrap(),
        &cases.f32("thinker_av.logits"),
        ATOL,
    );
}
