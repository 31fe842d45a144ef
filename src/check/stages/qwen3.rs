//! The stages of the Qwen3-Omni family (fixtures of `scripts/gen_reference_qwen3_omni.py`):
//! positions, the log-mel, the AuT audio encoder, the vision encoder with DeepStack, the
//! Thinker (text and multimodal), the Talker, the code predictor, the whole greedy speech path
//! and Code2Wav (offline, chunked and streamed). Every size comes from the fixture's config.

use candle_core::{D, DType, IndexOp, Tensor};

use crate::check::{Checker, Quantity};
use crate::media::mel::LogMel;
use crate::model::config::FeatureExtractorConfig;
use crate::model::qwen3_omni::audio_encoder::AudioEncoder;
use crate::model::qwen3_omni::code_predictor::CodePredictor;
use crate::model::qwen3_omni::code2wav::{Code2Wav, Code2WavStream};
use crate::model::qwen3_omni::config::Config;
use crate::model::qwen3_omni::rope_index::{MediaLayout, RopeIndexTokens, rope_index};
use crate::model::qwen3_omni::speech::{SpeechStream, talker_prompt, thinker_answer};
use crate::model::qwen3_omni::talker::Talker;
use crate::model::qwen3_omni::thinker::{Thinker, ThinkerMedia, VisionInput};
use crate::model::qwen3_omni::thinker_text::{ThinkerText, text_positions};
use crate::model::sampling::{Sampler, SamplingOptions};

/// The Talker's repetition penalty in the reference's `generate` (its generation default,
/// with which the fixture's codebook-0 ids were drawn).
const TALKER_REPETITION_PENALTY: f32 = 1.05;

/// Streamed Code2Wav's RMS error relative to the offline decode's RMS, on the frames decoded
/// with less than their whole history, as measured on the committed fixtures (the tiny random
/// decoder's reach is far longer than the fixture's 3-frame left context); the bound is 3x.
const MEASURED_STREAM_RMS_ERROR: f32 = 0.73;

/// The multimodal prompts of the fixtures' `rope_index.*` cases.
const ROPE_CASES: &[&str] = &["audio", "image", "video", "audio_in_video", "mixed"];

/// Runs `check.stage`, one of [`crate::check::QWEN3_STAGES`].
pub(in crate::check) fn run(check: &mut Checker) -> anyhow::Result<()> {
    match check.stage {
        "qwen3_rope_index_text" => rope_index_text(check),
        "qwen3_rope_index_multimodal" => rope_index_multimodal(check),
        "qwen3_mel" => mel(check),
        "qwen3_audio_encoder" => audio_encoder(check),
        "qwen3_audio_encoder_streaming" => audio_encoder_streaming(check),
        "qwen3_vision_encoder" => vision_encoder(check),
        "qwen3_thinker_logits" => thinker_logits(check),
        "qwen3_thinker_greedy" => thinker_greedy(check),
        "qwen3_thinker_cache_truncation" => thinker_cache_truncation(check),
        "qwen3_thinker_mm_logits" => thinker_mm_logits(check),
        "qwen3_talker_logits" => talker_logits(check),
        "qwen3_code_predictor" => code_predictor(check),
        "qwen3_talker_greedy" => talker_greedy(check),
        "qwen3_code2wav" => code2wav(check),
        "qwen3_code2wav_chunked" => code2wav_chunked(check),
        "qwen3_code2wav_streaming" => code2wav_streaming(check),
        other => anyhow::bail!("stage {other} has no Qwen3-Omni implementation"),
    }
}

impl Checker<'_> {
    fn qwen3_config(&self) -> anyhow::Result<Config> {
        self.model_files()?.load_qwen3_omni_config()
    }

    /// A float fixture in the run's dtype on its device (what the model takes as input).
    fn model_input(&self, key: &str) -> anyhow::Result<Tensor> {
        Ok(self.input(key)?.to_dtype(self.options.dtype)?)
    }

    /// Integer ids of a fixture as a (1, t) u32 tensor on the run's device.
    fn ids_tensor(&self, key: &str) -> anyhow::Result<Tensor> {
        Ok(self.input_ids(key)?.to_dtype(DType::U32)?)
    }
}

fn thinker_text(check: &Checker, c: &Config) -> anyhow::Result<ThinkerText> {
    Ok(ThinkerText::new(
        &c.thinker_config.text_config,
        c.thinker_config.tie_word_embeddings,
        check.weights()?.pp("thinker"),
    )?)
}

fn thinker(check: &Checker, c: &Config) -> anyhow::Result<Thinker> {
    Ok(Thinker::new(
        &c.thinker_config,
        check.weights()?.pp("thinker"),
    )?)
}

/// Code2Wav in f32 in every run, as the pipeline loads it.
fn code2wav_model(check: &Checker, c: &Config) -> anyhow::Result<Code2Wav> {
    Ok(Code2Wav::new(
        &c.code2wav_config,
        check.token2wav_weights()?.pp("code2wav"),
    )?)
}

fn greedy_pick(logits: &Tensor) -> candle_core::Result<u32> {
    let ids = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    ids.first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty logits".into()))
}

fn rope_index_text(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let want = fx.get("thinker_text.position_ids")?; // (3, 1, t)
    let t = want.dim(2)?;
    let got = text_positions(0, t, &check.options.device)?;
    check.equal(
        "thinker_text.position_ids",
        got.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?,
        want.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?,
    );
    // Text advances every row by one per token: the reference's rope delta is zero.
    check.equal(
        "thinker_text.rope_deltas",
        vec![0],
        fx.i64_vec("thinker_text.rope_deltas")?,
    );
    Ok(())
}

fn media_layout(check: &Checker, case: &str) -> anyhow::Result<MediaLayout> {
    let fx = check.fixtures;
    let grids = |key: &str| -> anyhow::Result<Vec<[usize; 3]>> {
        Ok(fx
            .usize_vec(&format!("{case}.{key}"))?
            .chunks(3)
            .map(|g| [g[0], g[1], g[2]])
            .collect())
    };
    Ok(MediaLayout {
        image_grid_thw: grids("image_grid_thw")?,
        video_grid_thw: grids("video_grid_thw")?,
        video_second_per_grid: fx
            .f32(&format!("{case}.video_second_per_grid"))?
            .flatten_all()?
            .to_vec1()?,
        audio_feature_lengths: fx.usize_vec(&format!("{case}.audio_feature_lengths"))?,
        use_audio_in_video: fx.i64_vec(&format!("{case}.use_audio_in_video"))? == [1],
    })
}

/// `get_rope_index` on prompts with audio, an image, a video (fractional times), audio inside
/// a video, and all of them mixed: every position and the decode offset exactly equal.
fn rope_index_multimodal(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let tokens = RopeIndexTokens::thinker(&c.thinker_config);
    for name in ROPE_CASES {
        let case = format!("rope_index.{name}");
        let ids = fx.u32_vec(&format!("{case}.input_ids"))?;
        let index = rope_index(&ids, &tokens, &media_layout(check, &case)?)?;
        let want = fx.f32(&format!("{case}.position_ids"))?.squeeze(1)?;
        check.equal(
            &format!("{case}.position_ids"),
            index
                .to_tensor(&candle_core::Device::Cpu)?
                .to_vec2::<f32>()?,
            want.to_vec2::<f32>()?,
        );
        let want_delta = fx.f32_scalar(&format!("{case}.rope_deltas"))?;
        check.equal(&format!("{case}.rope_deltas"), index.delta, want_delta);
    }
    Ok(())
}

/// The project's Whisper log-mel against the reference processor's features, on every frame
/// whose FFT window lies inside the clip. The last frames differ: the Qwen3-Omni processor pads
/// to the longest clip of its batch (the STFT reflects the clip's own end), the project's
/// log-mel pads with zeros as Qwen2.5-Omni's does.
fn mel(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let fe = FeatureExtractorConfig {
        feature_size: c.thinker_config.audio_config.num_mel_bins,
        ..Default::default()
    };
    let wave: Vec<f32> = fx.f32("audio.waveform")?.flatten_all()?.to_vec1()?;
    let got = LogMel::new(&fe)?
        .features(&wave)?
        .to_tensor(&candle_core::Device::Cpu)?;
    let want = fx.f32("audio.input_features")?;
    check.equal("log-mel shape", got.dims(), want.dims());
    let inside = (wave.len().saturating_sub(fe.n_fft / 2) / fe.hop_length + 1).min(got.dim(1)?);
    check.holds(
        "log-mel frames inside the clip",
        inside + 2 >= want.dim(1)?,
        || format!("{inside} of {} frames", want.dim(1).unwrap_or(0)),
    );
    check.close(
        "audio.input_features (inside the clip)",
        &got.narrow(1, 0, inside)?,
        &want.narrow(1, 0, inside)?,
        Quantity::Mel,
    );
    Ok(())
}

fn audio_tower(check: &Checker, c: &Config) -> anyhow::Result<AudioEncoder> {
    Ok(AudioEncoder::new(
        &c.thinker_config.audio_config,
        check.weights()?.pp("thinker.audio_tower"),
    )?)
}

/// The AuT encoder on the reference's log-mel (chunked convolutions, per-chunk positions,
/// windowed attention).
fn audio_encoder(check: &mut Checker) -> anyhow::Result<()> {
    let c = check.qwen3_config()?;
    let encoder = audio_tower(check, &c)?;
    let got = encoder.forward(&check.model_input("audio.input_features")?)?;
    let want = check.fixtures.f32("audio.features")?;
    check.close("audio.features", &got, &want, Quantity::Encoder);
    Ok(())
}

/// Window by window (pieces of n_window_infer frames, the last holding a full chunk) the
/// encoder gives the whole clip's tokens.
fn audio_encoder_streaming(check: &mut Checker) -> anyhow::Result<()> {
    let c = check.qwen3_config()?;
    let encoder = audio_tower(check, &c)?;
    let features = check.model_input("audio.input_features")?;
    let frames = features.dim(1)?;
    let window = encoder.window_frames();
    let chunk = 2 * c.thinker_config.audio_config.n_window;
    check.holds(
        "the clip spans several windows",
        frames > window + chunk,
        || format!("{frames} frames, a window of {window} and a chunk of {chunk}"),
    );
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < frames {
        let len = if frames - start >= window + chunk || frames - start <= window {
            window.min(frames - start)
        } else {
            frames - start
        };
        pieces.push(encoder.forward(&features.narrow(1, start, len)?)?);
        start += len;
    }
    let streamed = Tensor::cat(&pieces, 0)?;
    let whole = check.fixtures.f32("audio.features")?;
    check.close(
        &format!("audio.features, {} windows", pieces.len()),
        &streamed,
        &whole,
        Quantity::Encoder,
    );
    Ok(())
}

fn vision_input(check: &Checker, kind: &str) -> anyhow::Result<VisionInput> {
    Ok(VisionInput {
        pixels: check.input(&format!("vision.{kind}.pixel_values"))?,
        grids: check
            .fixtures
            .usize_vec(&format!("rope_index.mixed.{kind}_grid_thw"))?
            .chunks(3)
            .map(|g| [g[0], g[1], g[2]])
            .collect(),
    })
}

/// The vision encoder on an image and on a video: merged tokens and DeepStack features.
fn vision_encoder(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let thinker = thinker(check, &c)?;
    for kind in ["image", "video"] {
        let input = vision_input(check, kind)?;
        let out = thinker
            .vision_encoder()
            .forward(&input.pixels, &input.grids)?;
        let key = format!("vision.{kind}.embeds");
        check.close(&key, &out.embeds, &fx.f32(&key)?, Quantity::Encoder);
        let want = fx.f32(&format!("vision.{kind}.deepstack"))?;
        check.equal(
            &format!("vision.{kind}.deepstack layers"),
            out.deepstack.len(),
            want.dim(0)?,
        );
        for (l, got) in out.deepstack.iter().enumerate() {
            check.close(
                &format!("vision.{kind}.deepstack[{l}]"),
                got,
                &want.i(l)?,
                Quantity::Encoder,
            );
        }
    }
    Ok(())
}

/// The Thinker on the text prompt: embeddings, every layer but the last (the reference's final
/// entry is after the norm) and the logits at every position.
fn thinker_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let mut model = thinker_text(check, &c)?;
    let ids = check.ids_tensor("thinker_text.input_ids")?;
    let t = ids.dim(1)?;
    let embeds = model.embed(&ids)?;
    check.close(
        "thinker_text.inputs_embeds",
        &embeds,
        &fx.f32("thinker_text.inputs_embeds")?,
        Quantity::Thinker,
    );
    let positions = text_positions(0, t, &check.options.device)?;
    let mut layers = Vec::new();
    let hidden = model.forward_hidden(&embeds, &positions, Some(&mut layers))?;
    let n = c.thinker_config.text_config.num_hidden_layers;
    check.equal("thinker_text layers", layers.len(), n);
    for (i, got) in layers.iter().enumerate().take(n.saturating_sub(1)) {
        let key = format!("thinker_text.layer{i}_output");
        check.close_routed(&key, got, &fx.f32(&key)?, Quantity::Thinker);
    }
    let logits = model.logits(&hidden)?;
    check.close_routed(
        "thinker_text.logits",
        &logits,
        &fx.f32("thinker_text.logits")?,
        Quantity::Thinker,
    );
    Ok(())
}

/// The Thinker's greedy answer to the text prompt, its step logits while the ids agree.
fn thinker_greedy(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let dev = check.options.device.clone();
    let mut model = thinker_text(check, &c)?;
    let ids = check.ids_tensor("thinker_text.input_ids")?;
    let want_ids = fx.u32_vec("thinker_text.generated_ids")?;
    let want_logits = fx.f32("thinker_text.generation_step_logits")?.squeeze(0)?; // (steps, vocab)
    let t = ids.dim(1)?;
    let logits = model.forward(&ids, &text_positions(0, t, &dev)?)?;
    let mut step_logits = logits.i((.., t - 1, ..))?;
    let mut got_ids = Vec::new();
    for (step, &want) in want_ids.iter().enumerate() {
        check.close(
            &format!("thinker_text.generation_step_logits[{step}]"),
            &step_logits,
            &want_logits.i(step)?.unsqueeze(0)?,
            Quantity::Thinker,
        );
        let next = greedy_pick(&step_logits)?;
        got_ids.push(next);
        if next != want || step + 1 == want_ids.len() {
            break;
        }
        let pos = model.cache_len() as i64;
        let input = Tensor::new(&[[next]], &dev)?;
        step_logits = model
            .forward(&input, &text_positions(pos, 1, &dev)?)?
            .i((.., 0, ..))?;
    }
    check.greedy_ids(
        "thinker_text.generated_ids",
        &got_ids,
        &want_ids,
        Some(&want_logits),
        Quantity::Thinker,
    );
    Ok(())
}

/// Rolled back to half the prompt and fed the rest again, the Thinker gives the same logits.
fn thinker_cache_truncation(check: &mut Checker) -> anyhow::Result<()> {
    let c = check.qwen3_config()?;
    let dev = check.options.device.clone();
    let mut model = thinker_text(check, &c)?;
    let ids = check.ids_tensor("thinker_text.input_ids")?;
    let t = ids.dim(1)?;
    let full = model.forward(&ids, &text_positions(0, t, &dev)?)?;
    let half = t / 2;
    model.truncate_cache(half);
    let again = model.forward(
        &ids.narrow(1, half, t - half)?,
        &text_positions(half as i64, t - half, &dev)?,
    )?;
    check.close(
        "logits replayed after truncation",
        &again,
        &full.narrow(1, half, t - half)?,
        Quantity::Thinker,
    );
    Ok(())
}

/// The Thinker on a prompt with audio, an image and a video: merged embeddings and the logits
/// at every position (audio tower, vision encoder, DeepStack, multimodal positions).
fn thinker_mm_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let mut thinker = thinker(check, &c)?;
    let ids = fx.u32_vec("rope_index.mixed.input_ids")?;
    let layout = media_layout(check, "rope_index.mixed")?;
    let media = ThinkerMedia {
        audio: vec![check.model_input("thinker_mm.input_features")?.squeeze(0)?],
        images: Some(vision_input(check, "image")?),
        videos: Some(vision_input(check, "video")?),
        video_second_per_grid: layout.video_second_per_grid.clone(),
        use_audio_in_video: layout.use_audio_in_video,
    };
    check.equal("media layout", media.layout()?, layout);
    let prompt = thinker.prepare(&ids, &media)?;
    check.close(
        "thinker_mm.inputs_embeds",
        &prompt.embeds,
        &fx.f32("thinker_mm.inputs_embeds")?,
        Quantity::Thinker,
    );
    let logits = thinker.prompt_logits(&prompt)?;
    check.close_routed(
        "thinker_mm.logits",
        &logits,
        &fx.f32("thinker_mm.logits")?,
        Quantity::Thinker,
    );
    Ok(())
}

/// The Talker's projections of the Thinker's embeddings and hidden states, its last hidden
/// state and codec logits on the reference's inputs.
fn talker_logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let mut talker = Talker::new(&c.talker_config, check.weights()?.pp("talker"))?;
    let thinker = thinker_text(check, &c)?;
    let thinker_embeds = thinker.embed(&check.ids_tensor("thinker_text.input_ids")?)?;
    check.close(
        "talker.text_projection",
        &talker.project_text(&thinker_embeds)?,
        &fx.f32("talker.text_projection")?,
        Quantity::Talker,
    );
    check.close(
        "talker.hidden_projection",
        &talker.project_hidden(&check.model_input("talker.thinker_hidden")?)?,
        &fx.f32("talker.hidden_projection")?,
        Quantity::Talker,
    );
    let embeds = check.model_input("talker.inputs_embeds")?;
    let t = embeds.dim(1)?;
    let hidden = talker.forward_hidden(&embeds, &text_positions(0, t, &check.options.device)?)?;
    check.close_routed(
        "talker.last_hidden",
        &hidden,
        &fx.f32("talker.last_hidden")?,
        Quantity::Talker,
    );
    check.close_routed(
        "talker.logits",
        &talker.codec_logits(&hidden)?,
        &fx.f32("talker.logits")?,
        Quantity::Talker,
    );
    Ok(())
}

/// One frame of the code predictor from the reference's Talker hidden state and codebook-0
/// code: each residual step's logits, the greedy codes and the Talker's next input.
fn code_predictor(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let vb = check.weights()?;
    let mut predictor = CodePredictor::new(
        &c.talker_config.code_predictor_config,
        vb.pp("talker.code_predictor"),
    )?;
    let talker_embedding = candle_nn::embedding(
        c.talker_config.text_config.vocab_size,
        c.talker_config.text_config.hidden_size,
        vb.pp("talker.model.codec_embedding"),
    )?;
    let code0 = check.ids_tensor("code_predictor.code0")?;
    let code0_embedding = candle_core::Module::forward(&talker_embedding, &code0)?;
    check.close(
        "code_predictor.code0_embedding",
        &code0_embedding,
        &fx.f32("code_predictor.code0_embedding")?,
        Quantity::Talker,
    );
    let frame = predictor.generate(
        &check.model_input("code_predictor.past_hidden")?,
        &code0_embedding,
        greedy_pick,
    )?;
    let want_logits = fx.f32("code_predictor.step_logits")?; // (1, steps, vocab)
    for (step, got) in frame.logits.iter().enumerate() {
        check.close(
            &format!("code_predictor.step_logits[{step}]"),
            got,
            &want_logits.i((.., step, ..))?,
            Quantity::Talker,
        );
    }
    let want_codes = fx.u32_vec("code_predictor.residual_codes")?;
    let step_logits = want_logits.squeeze(0)?;
    check.greedy_ids(
        "code_predictor.residual_codes",
        &frame.codes,
        &want_codes,
        Some(&step_logits),
        Quantity::Talker,
    );
    check.close(
        "code_predictor.next_talker_input",
        &frame.summed_embedding,
        &fx.f32("code_predictor.next_talker_input")?,
        Quantity::Talker,
    );
    Ok(())
}

/// The whole speech path of the reference's `generate`, greedy: the Thinker's answer, the
/// Talker's prompt from it, then codebook-0 ids (within the logits tolerance at every step)
/// and every frame's residual codes.
fn talker_greedy(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let dev = check.options.device.clone();
    let mut thinker = thinker(check, &c)?;
    let mut talker = Talker::new(&c.talker_config, check.weights()?.pp("talker"))?;
    let prompt = fx.u32_vec("thinker_text.input_ids")?;
    let prepared = thinker.prepare(&prompt, &ThinkerMedia::default())?;
    let answer = thinker_answer(
        &mut thinker.text,
        &prepared,
        c.talker_config.accept_hidden_layer,
        fx.json_u64("args/speech_thinker_tokens")? as usize,
        c.im_end_token_id,
        &mut Sampler::new(SamplingOptions::greedy()),
    )?;
    let answer_ids = answer.sequence[prompt.len()..].to_vec();
    let want_answer = fx.u32_vec("speech.thinker_ids")?;
    if !check.greedy_ids(
        "speech.thinker_ids",
        &answer_ids,
        &want_answer,
        None,
        Quantity::Thinker,
    ) {
        // Another answer makes another Talker prompt: nothing after it compares.
        return Ok(());
    }

    let speaker = fx.json_str("args/speaker")?;
    let talker_prompt = talker_prompt(&c, &thinker.text, &talker, &answer, speaker)?;
    check.equal(
        "speech.talker_input_ids",
        talker_prompt.ids.clone(),
        fx.u32_vec("speech.talker_input_ids")?,
    );
    check.close(
        "speech.talker_inputs_embeds",
        &talker_prompt.embeds,
        &fx.f32("speech.talker_inputs_embeds")?,
        Quantity::Talker,
    );
    check.close(
        "speech.trailing_text_hidden",
        &talker_prompt.trailing_text,
        &fx.f32("speech.trailing_text_hidden")?,
        Quantity::Talker,
    );

    let options = SamplingOptions {
        repetition_penalty: TALKER_REPETITION_PENALTY,
        ..SamplingOptions::greedy()
    };
    let positions = text_positions(0, talker_prompt.ids.len(), &dev)?;
    let mut stream = SpeechStream::start(
        &c,
        &mut talker,
        &talker_prompt,
        &positions,
        0.0,
        fx.json_u64("args/speech_talker_tokens")? as usize,
        options,
    )?;
    let mut frames = Vec::new();
    while let Some(frame) = stream.next_frame()? {
        frames.push(frame.codes);
    }
    let want_logits = fx.f32("speech.talker_step_logits")?.squeeze(0)?; // (steps, vocab)
    let want_code0 = fx.u32_vec("speech.codebook0_ids")?;
    let got_code0 = stream.codebook0_ids().to_vec();
    let agreeing = got_code0
        .iter()
        .zip(&want_code0)
        .take_while(|(a, b)| a == b)
        .count();
    // Step logits compare while the ids agree (and at the step where they part).
    for (step, got) in stream.step_logits().iter().enumerate().take(agreeing + 1) {
        if step < want_logits.dim(0)? {
            check.close(
                &format!("speech.talker_step_logits[{step}]"),
                &got.flatten_all()?,
                &want_logits.i(step)?,
                Quantity::Talker,
            );
        }
    }
    if !check.greedy_ids(
        "speech.codebook0_ids",
        &got_code0,
        &want_code0,
        Some(&want_logits),
        Quantity::Talker,
    ) {
        return Ok(());
    }
    let want_codes = fx.get("speech.codes")?.to_dtype(DType::U32)?; // (1, groups, frames)
    let (_, _, n_frames) = want_codes.dims3()?;
    check.equal("speech.codes frames", frames.len(), n_frames);
    for (f, codes) in frames.iter().enumerate().take(n_frames) {
        let want: Vec<u32> = want_codes.i((0, .., f))?.to_vec1()?;
        check.equal(&format!("speech.codes frame {f}"), codes.clone(), want);
    }
    Ok(())
}

/// Code2Wav on the reference's codes, stage by stage and as one call.
fn code2wav(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let mut model = code2wav_model(check, &c)?;
    let codes = check.ids_tensor("code2wav.codes")?;
    let embeds = model.embed(&codes)?;
    check.close(
        "code2wav.embedded",
        &embeds,
        &fx.f32("code2wav.embedded")?,
        Quantity::Waveform,
    );
    let hidden = model.pre_transform(&embeds)?;
    check.close(
        "code2wav.pre_transformer",
        &hidden,
        &fx.f32("code2wav.pre_transformer")?,
        Quantity::Waveform,
    );
    let up = model.upsample(&hidden)?;
    check.close(
        "code2wav.upsampled",
        &up,
        &fx.f32("code2wav.upsampled")?,
        Quantity::Waveform,
    );
    let want_wav = fx.f32("code2wav.waveform")?;
    check.close(
        "code2wav.waveform (from upsampled)",
        &model.decode_upsampled(&up)?,
        &want_wav,
        Quantity::Waveform,
    );
    check.close(
        "code2wav.waveform",
        &model.forward(&codes)?,
        &want_wav,
        Quantity::Waveform,
    );
    Ok(())
}

/// The reference's `chunked_decode` with the fixture's chunk size and left context.
fn code2wav_chunked(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let chunk = fx.json_u64("args/c2w_chunk_size")? as usize;
    let context = fx.json_u64("args/c2w_left_context")? as usize;
    let wav = code2wav_model(check, &c)?.chunked_decode(
        &check.ids_tensor("code2wav.codes")?,
        chunk,
        context,
    )?;
    check.close(
        "code2wav.chunked_waveform",
        &wav,
        &fx.f32("code2wav.chunked_waveform")?,
        Quantity::Waveform,
    );
    Ok(())
}

/// Code2Wav frame by frame against the reference's offline decode: as long, exact while the
/// window holds the whole history (everywhere with a left context of all frames), and within
/// 3x the measured RMS error after, with the fixture's left context.
fn code2wav_streaming(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let c = check.qwen3_config()?;
    let codes = fx.get("code2wav.codes")?.to_dtype(DType::U32)?; // (1, quantizers, frames)
    let (_, _, frames) = codes.dims3()?;
    let fixture_context = fx.json_u64("args/c2w_left_context")? as usize;
    let offline: Vec<f32> = fx.f32("code2wav.waveform")?.flatten_all()?.to_vec1()?;
    for left_context in [fixture_context, frames] {
        let mut decoder = code2wav_model(check, &c)?;
        let mut stream = Code2WavStream::new(left_context);
        let mut streamed = Vec::new();
        let mut exact_until = 0;
        for f in 0..frames {
            let frame: Vec<u32> = codes.i((0, .., f))?.to_vec1()?;
            streamed.extend(stream.push_frame(&mut decoder, &frame)?);
            if f <= left_context {
                exact_until = streamed.len();
            }
        }
        let what = format!("streamed, left context {left_context} frames");
        check.equal(&format!("{what}: samples"), streamed.len(), offline.len());
        let exact_until = exact_until.min(offline.len()).min(streamed.len());
        check.close(
            &format!("{what}: the first {exact_until} samples (whole history)"),
            &Tensor::new(&streamed[..exact_until], &candle_core::Device::Cpu)?,
            &Tensor::new(&offline[..exact_until], &candle_core::Device::Cpu)?,
            Quantity::Waveform,
        );
        let tail = exact_until..offline.len().min(streamed.len());
        if tail.is_empty() {
            continue;
        }
        let rms = |v: &mut dyn Iterator<Item = f32>| {
            let (sum, n) = v.fold((0f64, 0usize), |(s, n), x| (s + (x as f64).powi(2), n + 1));
            (sum / n.max(1) as f64).sqrt() as f32
        };
        let error = rms(&mut tail.clone().map(|i| streamed[i] - offline[i]))
            / rms(&mut tail.clone().map(|i| offline[i]));
        let bound = 3.0 * MEASURED_STREAM_RMS_ERROR;
        check.holds(
            &format!("{what}: RMS error {error:.4} of the offline RMS after the first samples"),
            error <= bound,
            || format!("{error} > {bound}"),
        );
    }
    Ok(())
}
