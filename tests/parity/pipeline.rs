//! The joined pipeline against the reference, from the fixtures' raw inputs (waveform, image,
//! video frames) through our mel, audio encoder, image/video preparation, vision encoder, chat
//! template, rope index, embedding merge and Thinker (`pipeline_thinker_logits`,
//! `pipeline_thinker_av_logits`), the Talker's inputs built from the Thinker's own generation
//! and its greedy codes (`pipeline_talker`), and the codes rendered with the fixture's noise
//! (`pipeline_waveform`). Nothing here reads an intermediate fixture as an input.

use candle_core::{DType, Device, Tensor};
use omnicall::media::image::{RgbImage, RgbView};
use omnicall::media::offline::MediaPreparer;
use omnicall::media::video::DEFAULT_FPS;
use omnicall::model::chat::{Content, Conversation, Message, Role};
use omnicall::model::loading::ModelFiles;
use omnicall::model::omni::OmniModel;
use omnicall::model::pipeline::{Answer, MediaInput, SpeechOptions};
use omnicall::model::sampling::SamplingOptions;
use omnicall::model::speakers::Voice;
use omnicall::model::talker::TalkerOptions;
use omnicall::model::thinker::LogitsFor;
use omnicall::model::token2wav::dit::SamplerOptions;

use crate::common::{self, Cases};
use crate::rope::{assert_positions, ids};

/// Tolerances of the fixture README: Thinker and Talker floats, and the waveform.
const ATOL: f32 = 1e-4;
const WAVEFORM_ATOL: f32 = 1e-4;

fn load_model() -> OmniModel {
    let files = ModelFiles::from_dir(&common::model_dir()).expect("fixture model folder");
    OmniModel::load(&files, DType::F32, &Device::Cpu).expect("fixture model loads")
}

fn settings() -> serde_json::Value {
    Cases::json()["settings"].clone()
}

fn spec_input(key: &str) -> u64 {
    Cases::json()["spec"]["inputs"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("spec.inputs.{key} missing in cases.json"))
}

/// A (H, W, 3) uint8 fixture as a packed RGB image.
fn hwc_image(t: &Tensor) -> RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3, "fixture image is not RGB");
    RgbImage::new(w, h, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

fn waveform(cases: &Cases) -> Vec<f32> {
    cases.f32("inputs.waveform").to_vec1::<f32>().unwrap()
}

/// The user's words of a fixture prompt: the ids between the last media end marker and the
/// end of the user turn, detokenized.
fn user_text(model: &OmniModel, prompt_ids: &[u32]) -> String {
    let s = model.tokenizer.special();
    let media_end = prompt_ids
        .iter()
        .rposition(|&id| id == s.audio_eos.id || id == s.vision_eos.id)
        .expect("a media block in the fixture prompt");
    let end = media_end
        + prompt_ids[media_end..]
            .iter()
            .position(|&id| id == s.im_end.id)
            .expect("the user turn ends");
    model
        .tokenizer
        .decode(&prompt_ids[media_end + 1..end])
        .unwrap()
}

/// The user turn with `items` in order, then the fixture prompt's text; the chat template
/// adds the default system prompt, as the fixtures' prompts have it.
fn conversation(
    model: &OmniModel,
    items: &[MediaInput],
    fixture_ids: &[u32],
) -> (Conversation, omnicall::model::thinker::MultimodalEmbeds) {
    let encoded = model.encode_media(items).expect("encoders");
    let mut content = encoded.content;
    content.push(Content::Text(user_text(model, fixture_ids)));
    let conversation = Conversation {
        messages: vec![Message::new(Role::User, content)],
    };
    (conversation, encoded.embeds)
}

/// The audio + image prompt of the `thinker` case, from the raw waveform and image.
fn thinker_prompt(
    model: &OmniModel,
    cases: &Cases,
) -> (Conversation, omnicall::model::thinker::MultimodalEmbeds) {
    let preparer = MediaPreparer::new(&model.processor, DEFAULT_FPS).unwrap();
    let image = hwc_image(&cases.get("inputs.image"));
    let items = vec![
        preparer.audio(&waveform(cases)).expect("mel"),
        preparer.image(image.view()).expect("image preparation"),
    ];
    conversation(model, &items, &ids(cases, "thinker.input_ids"))
}

/// The Thinker's greedy answer to the `thinker` prompt, as many tokens as `generate()` made.
fn thinker_answer(model: &mut OmniModel, cases: &Cases) -> Answer {
    let (conversation, media) = thinker_prompt(model, cases);
    let max_tokens = spec_input("thinker_new_tokens") as usize;
    let mut options = model.generation_options(max_tokens, SamplingOptions::greedy());
    options.keep_step_logits = true;
    model
        .answer(&conversation, &media, &options, |_| Ok(()))
        .expect("thinker answer")
}

fn voice(model: &OmniModel) -> Voice {
    let name = settings()["speaker"]
        .as_str()
        .expect("settings.speaker in cases.json")
        .to_string();
    model.speech().unwrap().voices.get(&name).unwrap().clone()
}

/// `generate()`'s talker settings for the fixtures: greedy, no repetition penalty, at most
/// `talker_new_tokens` codes.
fn fixture_speech(model: &OmniModel) -> SpeechOptions {
    let dit = &model.config.token2wav_config.dit_config;
    SpeechOptions {
        voice: voice(model).name,
        talker: TalkerOptions {
            sampling: SamplingOptions::greedy(),
            max_codes: spec_input("talker_new_tokens") as usize,
            dit_codec_rows: Some(dit.num_embeds + 1),
        },
        sampler: fixture_sampler(),
        noise_seed: 0,
    }
}

fn fixture_sampler() -> SamplerOptions {
    let s = settings();
    SamplerOptions {
        steps: spec_input("ode_steps") as usize,
        guidance_scale: s["guidance_scale"]
            .as_f64()
            .expect("settings.guidance_scale"),
        sway: s["sway_coefficient"]
            .as_f64()
            .expect("settings.sway_coefficient"),
    }
}

/// The reference's codes up to (not including) the first end id.
fn reference_codes(cases: &Cases, model: &OmniModel, key: &str) -> Vec<u32> {
    let t = &model.config.talker_config;
    cases
        .i64_vec(key)
        .into_iter()
        .map(|c| c as u32)
        .take_while(|c| *c != t.tts_codec_pad_token_id && *c != t.tts_codec_end_token_id)
        .collect()
}

#[test]
fn pipeline_thinker_logits() {
    let cases = Cases::load();
    let mut model = load_model();
    let (conversation, media) = thinker_prompt(&model, &cases);
    let prompt = model.prepare_prompt(&conversation, &media).unwrap();
    assert_eq!(
        prompt.encoded.ids,
        ids(&cases, "thinker.input_ids"),
        "thinker.input_ids"
    );
    assert_positions(
        "thinker",
        &cases,
        &prompt.encoded.positions,
        prompt.encoded.rope_delta,
    );
    common::assert_close(
        "thinker.inputs_embeds (pipeline)",
        &prompt.embeds,
        &cases.f32("thinker.inputs_embeds").squeeze(0).unwrap(),
        ATOL,
    );
    model.thinker.clear_cache();
    let out = model
        .thinker
        .forward(
            &prompt.embeds,
            &prompt.encoded.positions.to_tensor(&Device::Cpu).unwrap(),
            LogitsFor::All,
        )
        .unwrap();
    common::assert_close(
        "thinker.logits (pipeline)",
        out.logits.as_ref().unwrap(),
        &cases.f32("thinker.logits"),
        ATOL,
    );

    let answer = thinker_answer(&mut model, &cases);
    assert_eq!(
        answer.generation.ids,
        ids(&cases, "thinker.generated_ids"),
        "thinker.generated_ids"
    );
    common::assert_close(
        "thinker.generation_step_logits (pipeline)",
        &Tensor::stack(&answer.generation.step_logits, 0).unwrap(),
        &cases.f32("thinker.generation_step_logits"),
        ATOL,
    );
}

#[test]
fn pipeline_thinker_av_logits() {
    let cases = Cases::load();
    let mut model = load_model();
    let call = &settings()["video_processor_call"];
    let get = |k: &str| {
        call[k]
            .as_f64()
            .unwrap_or_else(|| panic!("settings.video_processor_call.{k} missing"))
    };
    let preparer = MediaPreparer::new(&model.processor, get("fps"))
        .unwrap()
        .with_video_pixel_bounds(get("min_pixels") as usize, get("max_pixels") as usize);
    let video = cases.get("inputs.video");
    let frames: Vec<RgbImage> = (0..video.dim(0).unwrap())
        .map(|t| hwc_image(&video.get(t).unwrap()))
        .collect();
    let views: Vec<RgbView<'_>> = frames.iter().map(RgbImage::view).collect();
    let item = preparer
        .video_frames(&views, Some(&waveform(&cases)))
        .expect("video preparation");
    let fixture_ids = ids(&cases, "rope.video_audio.input_ids");
    let (conversation, media) = conversation(&model, &[item], &fixture_ids);
    let prompt = model.prepare_prompt(&conversation, &media).unwrap();
    assert_eq!(
        prompt.encoded.ids, fixture_ids,
        "rope.video_audio.input_ids"
    );
    assert_positions(
        "rope.video_audio",
        &cases,
        &prompt.encoded.positions,
        prompt.encoded.rope_delta,
    );
    model.thinker.clear_cache();
    let out = model
        .thinker
        .forward(
            &prompt.embeds,
            &prompt.encoded.positions.to_tensor(&Device::Cpu).unwrap(),
            LogitsFor::All,
        )
        .unwrap();
    common::assert_close(
        "thinker_av.logits (pipeline)",
        out.logits.as_ref().unwrap(),
        &cases.f32("thinker_av.logits"),
        ATOL,
    );
}

#[test]
fn pipeline_talker() {
    let cases = Cases::load();
    let mut model = load_model();
    let answer = thinker_answer(&mut model, &cases);
    let voice = voice(&model);
    let inputs = model
        .talker_inputs(&answer, &voice)
        .unwrap()
        .expect("the Thinker fed tokens back");

    let ids = &answer.prompt.encoded.ids;
    let l = ids.len();
    let mut text_track: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    text_track.extend([voice.bos_token as i64, answer.generation.ids[0] as i64]);
    assert_eq!(
        text_track,
        cases.i64_vec("talker.input_text_ids"),
        "talker.input_text_ids"
    );

    let want = cases.f32("talker.inputs_embeds").squeeze(0).unwrap();
    assert_eq!(want.dim(0).unwrap(), l + 2, "talker.inputs_embeds rows");
    let got = Tensor::cat(
        &[
            inputs.prompt.rows.clone(),
            inputs.text_rows.speaker_bos.unsqueeze(0).unwrap(),
            inputs.reply_rows[0].unsqueeze(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    common::assert_close("talker.inputs_embeds (pipeline)", &got, &want, ATOL);

    let mut later: Vec<Tensor> = inputs.reply_rows[1..].to_vec();
    later.push(inputs.text_rows.text_end.clone());
    later.push(inputs.text_rows.text_pad.clone());
    common::assert_close(
        "talker.thinker_reply_part (pipeline)",
        &Tensor::stack(&later, 0).unwrap(),
        &cases.f32("talker.thinker_reply_part").squeeze(0).unwrap(),
        ATOL,
    );

    let positions = inputs.prompt.positions.to_vec2::<i64>().unwrap();
    let want_positions = cases.i64_vec("talker.prefill_position_ids");
    assert_eq!(
        positions.concat(),
        want_positions,
        "talker.prefill_position_ids"
    );
    assert_eq!(
        inputs.prompt.rope_delta,
        cases.i64_vec("talker.prefill_rope_deltas")[0],
        "talker.prefill_rope_deltas"
    );

    let spoken = model.speak(&answer, &fixture_speech(&model)).unwrap();
    let want_codes = reference_codes(&cases, &model, "talker.generated_codes");
    assert_eq!(spoken.codes, want_codes, "talker.generated_codes");
    eprintln!(
        "talker.generated_codes: {} codes equal ({:?})",
        spoken.codes.len(),
        spoken.finish
    );
}

#[test]
fn pipeline_waveform() {
    let cases = Cases::load();
    let mut model = load_model();
    let answer = thinker_answer(&mut model, &cases);
    let spoken = model.speak(&answer, &fixture_speech(&model)).unwrap();
    let handed: Vec<u32> = cases
        .i64_vec("token2wav.code")
        .into_iter()
        .map(|c| c as u32)
        .collect();
    assert_eq!(spoken.codes, handed, "token2wav.code");
    let per_code = model.speech().unwrap().token2wav.samples_per_code();
    assert_eq!(spoken.waveform.len(), spoken.codes.len() * per_code);

    let voice = voice(&model);
    common::assert_close(
        "token2wav.conditioning (voice)",
        &voice.cond,
        &cases.f32("token2wav.conditioning"),
        0.0,
    );
    let waveform = model
        .render_speech(
            &spoken.codes,
            &voice,
            &fixture_sampler(),
            &cases.f32("token2wav.noise"),
        )
        .unwrap();
    let waveform = Tensor::new(waveform.as_slice(), &Device::Cpu).unwrap();
    common::assert_close(
        "token2wav.waveform (pipeline)",
        &waveform,
        &cases.f32("token2wav.waveform"),
        WAVEFORM_ATOL,
    );
    common::assert_close(
        "generate.waveform (pipeline)",
        &waveform,
        &cases.f32("generate.waveform"),
        WAVEFORM_ATOL,
    );
}
