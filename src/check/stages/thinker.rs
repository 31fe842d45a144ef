//! The Thinker LM: embedding merge, TMRoPE positions, every decoder layer, the final hidden
//! state and the logits of the audio+image prompt (`thinker_logits`), the greedy tokens with
//! their step logits (`thinker_greedy`) and the video+audio prompt (`thinker_av_logits`).

use candle_core::{IndexOp, Tensor};

use super::rope;
use crate::check::{Checker, Quantity};
use crate::model::thinker::rope::{RopeIndexConfig, get_rope_index};
use crate::model::thinker::{GenerationOptions, LogitsFor, MultimodalEmbeds, Prompt, Thinker};

fn load_thinker(check: &Checker) -> anyhow::Result<Thinker> {
    let cfg = check.config()?;
    Ok(Thinker::new(
        &cfg.thinker_config,
        check.weights()?.pp("thinker"),
    )?)
}

/// Encoder embeddings of a prompt's media, from the fixtures' encoder outputs.
fn encoder_embeddings(check: &Checker, prompt: &str) -> anyhow::Result<MultimodalEmbeds> {
    Ok(match prompt {
        "thinker" => MultimodalEmbeds {
            audio: Some(check.input("audio_encoder.output")?),
            image: Some(check.input("image.embeds")?),
            video: None,
        },
        "video_audio" => MultimodalEmbeds {
            audio: Some(check.input("audio_encoder.output")?),
            image: None,
            video: Some(check.input("video.embeds")?),
        },
        other => anyhow::bail!("no encoder embeddings for {other}"),
    })
}

pub fn logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let mut thinker = load_thinker(check)?;
    let ids = fx.u32_vec("thinker.input_ids")?;

    let embeds = thinker.embed_prompt(&ids, &encoder_embeddings(check, "thinker")?)?;
    check.close(
        "thinker.inputs_embeds",
        &embeds,
        &fx.f32("thinker.inputs_embeds")?.squeeze(0)?,
        Quantity::Thinker,
    );

    let rope_cfg = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, delta) = get_rope_index(&rope_cfg, &ids, &rope::media(check, "thinker")?)?;
    rope::positions(check, "thinker", &positions, delta)?;

    let (out, layers) = thinker.forward_with_layer_outputs(
        &embeds,
        &positions.to_tensor(&check.options.device)?,
        LogitsFor::All,
    )?;
    let want_layers = fx.f32("thinker.layer_outputs")?;
    let n = want_layers.dim(0)?;
    check.equal("thinker decoder layers", layers.len(), n + 1);
    for (i, layer) in layers.iter().take(n).enumerate() {
        check.close(
            &format!("thinker.layer_outputs[{i}]"),
            layer,
            &want_layers.i(i)?,
            Quantity::Thinker,
        );
    }
    check.close(
        "thinker.last_hidden_state",
        &out.hidden,
        &fx.f32("thinker.last_hidden_state")?,
        Quantity::Thinker,
    );
    let logits = out
        .logits
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no logits"))?;
    check.close(
        "thinker.logits",
        logits,
        &fx.f32("thinker.logits")?,
        Quantity::Thinker,
    );
    Ok(())
}

pub fn greedy(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let mut thinker = load_thinker(check)?;
    let ids = fx.u32_vec("thinker.input_ids")?;
    let embeds = thinker.embed_prompt(&ids, &encoder_embeddings(check, "thinker")?)?;
    let rope_cfg = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, rope_delta) = get_rope_index(&rope_cfg, &ids, &rope::media(check, "thinker")?)?;
    let want = fx.u32_vec("thinker.generated_ids")?;
    let prompt = Prompt {
        ids: ids.clone(),
        embeds,
        positions: positions.to_tensor(&check.options.device)?,
        rope_delta,
    };
    let mut options = GenerationOptions::greedy(want.len(), cfg.thinker_config.eos_token_ids());
    options.keep_step_logits = true;
    let mut streamed = Vec::new();
    let generation = thinker.generate(&prompt, &options, |token| {
        streamed.push(token.id);
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    let want_logits = fx.f32("thinker.generation_step_logits")?;
    let same = check.greedy_ids(
        "thinker.generated_ids",
        &generation.ids,
        &want,
        Some(&want_logits),
        Quantity::Thinker,
    );
    check.equal("ids seen by the callback", &streamed, &generation.ids);
    if same {
        let step_logits = Tensor::stack(&generation.step_logits, 0)?;
        check.close(
            "thinker.generation_step_logits",
            &step_logits,
            &want_logits,
            Quantity::Thinker,
        );
    }
    // Every generated token but the last was fed back: its hidden state and embedding are kept.
    let fed = generation.ids.len().saturating_sub(1);
    let hidden = thinker.hidden_size();
    let dims = |t: &Option<Tensor>| t.as_ref().map(|t| t.dims().to_vec());
    check.equal(
        "fed-back hidden states",
        dims(&generation.token_hidden),
        Some(vec![fed, hidden]),
    );
    check.equal(
        "fed-back embeddings",
        dims(&generation.token_embeds),
        Some(vec![fed, hidden]),
    );
    check.equal("thinker cache length", thinker.cache_len(), ids.len() + fed);
    Ok(())
}

pub fn av_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let mut thinker = load_thinker(check)?;
    let ids = fx.u32_vec("rope.video_audio.input_ids")?;
    let embeds = thinker.embed_prompt(&ids, &encoder_embeddings(check, "video_audio")?)?;
    let rope_cfg = RopeIndexConfig::from(&cfg.thinker_config);
    let (positions, delta) = get_rope_index(&rope_cfg, &ids, &rope::media(check, "video_audio")?)?;
    rope::positions(check, "rope.video_audio", &positions, delta)?;
    let out = thinker.forward(
        &embeds,
        &positions.to_tensor(&check.options.device)?,
        LogitsFor::All,
    )?;
    let logits = out
        .logits
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no logits"))?;
    check.close(
        "thinker_av.logits",
        logits,
        &fx.f32("thinker_av.logits")?,
        Quantity::Thinker,
    );
    Ok(())
}
