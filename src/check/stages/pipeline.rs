//! The joined pipeline from the fixtures' raw inputs (waveform, image, video frames) through
//! our mel, audio encoder, image/video preparation, vision encoder, chat template, rope index,
//! embedding merge and Thinker (`pipeline_thinker_logits`, `pipeline_thinker_av_logits`), the
//! Talker's inputs built from the Thinker's own generation and its greedy codes
//! (`pipeline_talker`), and the codes rendered with the fixture's noise (`pipeline_waveform`).
//! Nothing here reads an intermediate fixture as an input.

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::rope;
use super::token2wav::fixture_sampler;
use super::vision::hwc_image;
use crate::check::{Checker, Quantity};
use crate::media::image::{RgbImage, RgbView};
use crate::media::offline::MediaPreparer;
use crate::media::video::DEFAULT_FPS;
use crate::model::chat::{Content, Conversation, Message, Role};
use crate::model::omni::OmniModel;
use crate::model::pipeline::{Answer, MediaInput, SpeechOptions};
use crate::model::sampling::SamplingOptions;
use crate::model::speakers::Voice;
use crate::model::talker::TalkerOptions;
use crate::model::thinker::{LogitsFor, MultimodalEmbeds};

fn load_model(check: &Checker) -> anyhow::Result<OmniModel> {
    OmniModel::load(
        &check.model_files()?,
        check.options.dtype,
        &check.options.device,
    )
    .context("fixture model loads")
}

fn input_waveform(check: &Checker) -> anyhow::Result<Vec<f32>> {
    Ok(check.fixtures.f32("inputs.waveform")?.to_vec1::<f32>()?)
}

/// The user's words of a fixture prompt: the ids between the last media end marker and the
/// end of the user turn, detokenized.
fn user_text(model: &OmniModel, prompt_ids: &[u32]) -> anyhow::Result<String> {
    let s = model.tokenizer.special();
    let media_end = prompt_ids
        .iter()
        .rposition(|&id| id == s.audio_eos.id || id == s.vision_eos.id)
        .context("no media block in the fixture prompt")?;
    let end = media_end
        + prompt_ids[media_end..]
            .iter()
            .position(|&id| id == s.im_end.id)
            .context("the fixture's user turn does not end")?;
    model.tokenizer.decode(&prompt_ids[media_end + 1..end])
}

/// The user turn with `items` in order, then the fixture prompt's text; the chat template
/// adds the default system prompt, as the fixtures' prompts have it.
fn conversation(
    model: &OmniModel,
    items: &[MediaInput],
    fixture_ids: &[u32],
) -> anyhow::Result<(Conversation, MultimodalEmbeds)> {
    let encoded = model.encode_media(items).context("encoders")?;
    let mut content = encoded.content;
    content.push(Content::Text(user_text(model, fixture_ids)?));
    let conversation = Conversation {
        messages: vec![Message::new(Role::User, content)],
    };
    Ok((conversation, encoded.embeds))
}

/// The audio + image prompt of the `thinker` case, from the raw waveform and image.
fn thinker_prompt(
    check: &Checker,
    model: &OmniModel,
) -> anyhow::Result<(Conversation, MultimodalEmbeds)> {
    let preparer = MediaPreparer::new(&model.processor, DEFAULT_FPS)?;
    let image = hwc_image(&check.fixtures.get("inputs.image")?)?;
    let items = vec![
        preparer.audio(&input_waveform(check)?).context("mel")?,
        preparer.image(image.view()).context("image preparation")?,
    ];
    conversation(model, &items, &check.fixtures.u32_vec("thinker.input_ids")?)
}

/// The Thinker's greedy answer to the `thinker` prompt, as many tokens as `generate()` made.
fn thinker_answer(check: &Checker, model: &mut OmniModel) -> anyhow::Result<Answer> {
    let (conversation, media) = thinker_prompt(check, model)?;
    let max_tokens = check.fixtures.json_u64("spec/inputs/thinker_new_tokens")? as usize;
    let mut options = model.generation_options(max_tokens, SamplingOptions::greedy());
    options.keep_step_logits = true;
    model
        .answer(&conversation, &media, &options, |_| Ok(()))
        .context("thinker answer")
}

fn voice(check: &Checker, model: &OmniModel) -> anyhow::Result<Voice> {
    let name = check.fixtures.json_str("settings/speaker")?;
    Ok(model.speech()?.voices.get(name)?.clone())
}

/// `generate()`'s talker settings for the fixtures: greedy, no repetition penalty, at most
/// `talker_new_tokens` codes.
fn fixture_speech(check: &Checker, model: &OmniModel) -> anyhow::Result<SpeechOptions> {
    let dit = &model.config.token2wav_config.dit_config;
    Ok(SpeechOptions {
        voice: voice(check, model)?.name,
        talker: TalkerOptions {
            sampling: SamplingOptions::greedy(),
            max_codes: check.fixtures.json_u64("spec/inputs/talker_new_tokens")? as usize,
            dit_codec_rows: Some(dit.num_embeds + 1),
        },
        sampler: fixture_sampler(check)?,
        noise_seed: 0,
    })
}

/// The reference's codes up to (not including) the first end id.
fn reference_codes(check: &Checker, model: &OmniModel, key: &str) -> anyhow::Result<Vec<u32>> {
    let t = &model.config.talker_config;
    Ok(check
        .fixtures
        .u32_vec(key)?
        .into_iter()
        .take_while(|c| *c != t.tts_codec_pad_token_id && *c != t.tts_codec_end_token_id)
        .collect())
}

fn logits_of(out: &crate::model::thinker::ThinkerOutput) -> anyhow::Result<&Tensor> {
    out.logits
        .as_ref()
        .context("the forward pass gave no logits")
}

pub fn thinker_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let mut model = load_model(check)?;
    let (conversation, media) = thinker_prompt(check, &model)?;
    let prompt = model.prepare_prompt(&conversation, &media)?;
    check.equal(
        "thinker.input_ids",
        &prompt.encoded.ids,
        &fx.u32_vec("thinker.input_ids")?,
    );
    rope::positions(
        check,
        "thinker",
        &prompt.encoded.positions,
        prompt.encoded.rope_delta,
    )?;
    check.close(
        "thinker.inputs_embeds (pipeline)",
        &prompt.embeds,
        &fx.f32("thinker.inputs_embeds")?.squeeze(0)?,
        Quantity::Thinker,
    );
    model.thinker.clear_cache();
    let out = model.thinker.forward(
        &prompt.embeds,
        &prompt.encoded.positions.to_tensor(&check.options.device)?,
        LogitsFor::All,
    )?;
    check.close(
        "thinker.logits (pipeline)",
        logits_of(&out)?,
        &fx.f32("thinker.logits")?,
        Quantity::Thinker,
    );

    let answer = thinker_answer(check, &mut model)?;
    let want = fx.u32_vec("thinker.generated_ids")?;
    let want_logits = fx.f32("thinker.generation_step_logits")?;
    let same = check.greedy_ids(
        "thinker.generated_ids (pipeline)",
        &answer.generation.ids,
        &want,
        Some(&want_logits),
        Quantity::Thinker,
    );
    if same {
        check.close(
            "thinker.generation_step_logits (pipeline)",
            &Tensor::stack(&answer.generation.step_logits, 0)?,
            &want_logits,
            Quantity::Thinker,
        );
    }
    Ok(())
}

pub fn thinker_av_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let mut model = load_model(check)?;
    let call = |k: &str| fx.json_f64(&format!("settings/video_processor_call/{k}"));
    let preparer = MediaPreparer::new(&model.processor, call("fps")?)?
        .with_video_pixel_bounds(call("min_pixels")? as usize, call("max_pixels")? as usize);
    let video = fx.get("inputs.video")?;
    let frames: Vec<RgbImage> = (0..video.dim(0)?)
        .map(|t| hwc_image(&video.get(t)?))
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<RgbView<'_>> = frames.iter().map(RgbImage::view).collect();
    let item = preparer
        .video_frames(&views, Some(&input_waveform(check)?))
        .context("video preparation")?;
    let fixture_ids = fx.u32_vec("rope.video_audio.input_ids")?;
    let (conversation, media) = conversation(&model, &[item], &fixture_ids)?;
    let prompt = model.prepare_prompt(&conversation, &media)?;
    check.equal(
        "rope.video_audio.input_ids (pipeline)",
        &prompt.encoded.ids,
        &fixture_ids,
    );
    rope::positions(
        check,
        "rope.video_audio",
        &prompt.encoded.positions,
        prompt.encoded.rope_delta,
    )?;
    model.thinker.clear_cache();
    let out = model.thinker.forward(
        &prompt.embeds,
        &prompt.encoded.positions.to_tensor(&check.options.device)?,
        LogitsFor::All,
    )?;
    check.close(
        "thinker_av.logits (pipeline)",
        logits_of(&out)?,
        &fx.f32("thinker_av.logits")?,
        Quantity::Thinker,
    );
    Ok(())
}

pub fn talker(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let mut model = load_model(check)?;
    let answer = thinker_answer(check, &mut model)?;
    let voice = voice(check, &model)?;
    let inputs = model
        .talker_inputs(&answer, &voice)?
        .context("the Thinker fed no tokens back")?;

    let ids = &answer.prompt.encoded.ids;
    let l = ids.len();
    let mut text_track: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    text_track.push(voice.bos_token as i64);
    text_track.extend(answer.generation.ids.first().map(|&i| i as i64));
    check.equal(
        "talker.input_text_ids",
        text_track,
        fx.i64_vec("talker.input_text_ids")?,
    );

    let want = fx.f32("talker.inputs_embeds")?.squeeze(0)?;
    check.equal("talker.inputs_embeds rows", want.dim(0)?, l + 2);
    let first_reply = inputs.reply_rows.first().context("no reply rows")?;
    let got = Tensor::cat(
        &[
            inputs.prompt.rows.clone(),
            inputs.text_rows.speaker_bos.unsqueeze(0)?,
            first_reply.unsqueeze(0)?,
        ],
        0,
    )?;
    check.close(
        "talker.inputs_embeds (pipeline)",
        &got,
        &want,
        Quantity::Talker,
    );

    let mut later: Vec<Tensor> = inputs.reply_rows[1..].to_vec();
    later.push(inputs.text_rows.text_end.clone());
    later.push(inputs.text_rows.text_pad.clone());
    check.close(
        "talker.thinker_reply_part (pipeline)",
        &Tensor::stack(&later, 0)?,
        &fx.f32("talker.thinker_reply_part")?.squeeze(0)?,
        Quantity::Talker,
    );

    let positions = inputs
        .prompt
        .positions
        .to_device(&Device::Cpu)?
        .to_vec2::<i64>()?;
    check.equal(
        "talker.prefill_position_ids",
        positions.concat(),
        fx.i64_vec("talker.prefill_position_ids")?,
    );
    check.equal(
        "talker.prefill_rope_deltas",
        inputs.prompt.rope_delta,
        fx.i64_vec("talker.prefill_rope_deltas")?[0],
    );

    let spoken = model.speak(&answer, &fixture_speech(check, &model)?)?;
    let want_codes = reference_codes(check, &model, "talker.generated_codes")?;
    check.greedy_ids(
        "talker.generated_codes (pipeline)",
        &spoken.codes,
        &want_codes,
        Some(&fx.f32("talker.step_logits")?),
        Quantity::Talker,
    );
    Ok(())
}

pub fn waveform(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let mut model = load_model(check)?;
    let answer = thinker_answer(check, &mut model)?;
    let spoken = model.speak(&answer, &fixture_speech(check, &model)?)?;
    let handed = fx.u32_vec("token2wav.code")?;
    check.greedy_ids(
        "token2wav.code (pipeline)",
        &spoken.codes,
        &handed,
        Some(&fx.f32("talker.step_logits")?),
        Quantity::Talker,
    );
    let per_code = model.speech()?.token2wav.samples_per_code();
    check.equal(
        "waveform samples",
        spoken.waveform.len(),
        spoken.codes.len() * per_code,
    );

    let voice = voice(check, &model)?;
    check.close_within(
        "token2wav.conditioning (voice)",
        &voice.cond,
        &fx.f32("token2wav.conditioning")?,
        0.0,
    );
    // The codes generate() handed to token2wav (equal to ours, or ours parted at a near tie),
    // rendered by this model's token2wav with the reference's noise.
    let waveform = model.render_speech(
        &handed,
        &voice,
        &fixture_sampler(check)?,
        &check.input("token2wav.noise")?,
    )?;
    let waveform = Tensor::new(waveform.as_slice(), &Device::Cpu)?;
    for key in ["token2wav.waveform", "generate.waveform"] {
        check.close(
            &format!("{key} (pipeline)"),
            &waveform,
            &fx.f32(key)?,
            Quantity::Waveform,
        );
    }
    Ok(())
}
