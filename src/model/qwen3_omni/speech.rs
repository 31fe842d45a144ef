//! Speech generation as the reference's `Qwen3OmniMoeForConditionalGeneration.generate` runs it:
//! the Thinker answers while its token embeddings and the hidden states of layer
//! `accept_hidden_layer` are kept, the Talker's prompt is built from them (the user turn through
//! the two projections, the assistant prefix with the codec specials and the voice), and then the
//! Talker emits one codebook-0 id per step while the code predictor completes each frame.
//!
//! The loop is a stepper ([`SpeechStream`]) so that a caller can hand each 80 ms frame to Code2Wav
//! as soon as its codes exist.

use candle_core::{IndexOp, Result, Tensor};

use crate::model::qwen3_omni::config::Config;
use crate::model::qwen3_omni::rope_index::decode_positions;
use crate::model::qwen3_omni::talker::Talker;
use crate::model::qwen3_omni::thinker::ThinkerPrompt;
use crate::model::qwen3_omni::thinker_text::ThinkerText;
use crate::model::sampling::{Sampler, SamplingOptions};

/// The reference suppresses this many top codec ids (the special codec tokens) except EOS.
const SUPPRESSED_TOP_IDS: usize = 1024;

/// What the Thinker produced that the Talker reads.
#[derive(Debug, Clone)]
pub struct ThinkerAnswer {
    /// Prompt and answer ids.
    pub sequence: Vec<u32>,
    pub prompt_len: usize,
    /// (1, sequence.len() - 1, hidden): the input embeddings of every position the Thinker ran
    /// (all but the last id, which it only chose).
    pub embeds: Tensor,
    /// (1, sequence.len() - 1, hidden): the hidden states `accept_hidden_layer` of those positions
    /// (0: the embeddings; the last index: after the final norm).
    pub hidden: Tensor,
}

/// Hidden state number `index` in the reference's `hidden_states` tuple.
fn accepted_hidden(
    embeds: &Tensor,
    layer_outputs: &[Tensor],
    normed: &Tensor,
    index: usize,
) -> Result<Tensor> {
    match index {
        0 => Ok(embeds.clone()),
        i if i < layer_outputs.len() => Ok(layer_outputs[i - 1].clone()),
        i if i == layer_outputs.len() => Ok(normed.clone()),
        i => candle_core::bail!(
            "talker_config.accept_hidden_layer {i} is past the Thinker's {} layers",
            layer_outputs.len()
        ),
    }
}

/// Greedy or sampled Thinker answer to `prompt`; decode positions continue at
/// `cache_len + rope_delta`. Stops after `eos` or `max_new_tokens`. Starts from an empty cache.
pub fn thinker_answer(
    thinker: &mut ThinkerText,
    prompt: &ThinkerPrompt,
    accept_hidden_layer: usize,
    max_new_tokens: usize,
    eos: u32,
    sampler: &mut Sampler,
) -> Result<ThinkerAnswer> {
    let prompt_ids = &prompt.ids;
    if prompt.embeds.dim(1)? != prompt_ids.len() {
        candle_core::bail!(
            "thinker prompt: {} embeddings for {} ids",
            prompt.embeds.dim(1)?,
            prompt_ids.len()
        );
    }
    thinker.clear_cache();
    let dev = prompt.embeds.device().clone();
    let mut sequence = prompt_ids.to_vec();
    let mut embeds_parts = Vec::new();
    let mut hidden_parts = Vec::new();
    let mut input = prompt.embeds.clone();
    let mut input_positions = prompt.positions.clone();
    let mut deepstack = prompt.deepstack.as_ref();
    while sequence.len() - prompt_ids.len() < max_new_tokens {
        let mut layers = Vec::new();
        let normed = thinker.forward_hidden_deepstack(
            &input,
            &input_positions,
            Some(&mut layers),
            deepstack.take(),
        )?;
        hidden_parts.push(accepted_hidden(
            &input,
            &layers,
            &normed,
            accept_hidden_layer,
        )?);
        embeds_parts.push(input);
        let t = normed.dim(1)?;
        let logits = thinker.logits(&normed.i((.., t - 1.., ..))?)?;
        let history = &sequence[prompt_ids.len()..];
        let next = sampler.sample(&logits, history, &[])?;
        sequence.push(next);
        if next == eos {
            break;
        }
        input = thinker.embed(&Tensor::new(&[[next]], &dev)?)?;
        input_positions = decode_positions(thinker.cache_len(), prompt.rope_delta, 1, &dev)?;
    }
    thinker.clear_cache();
    Ok(ThinkerAnswer {
        sequence,
        prompt_len: prompt_ids.len(),
        embeds: Tensor::cat(&embeds_parts, 1)?,
        hidden: Tensor::cat(&hidden_parts, 1)?,
    })
}

/// The Talker's prompt and what it reads step by step.
#[derive(Debug, Clone)]
pub struct TalkerPrompt {
    /// (1, t, talker hidden).
    pub embeds: Tensor,
    /// The ids its rotary positions come from: the user turn's ids, then `tts_pad` per slot of
    /// the assistant prefix.
    pub ids: Vec<u32>,
    /// (1, n, talker hidden): one text entry per Talker step (the answer after its first token,
    /// then `tts_eos`); `tts_pad` once it runs out.
    pub trailing_text: Tensor,
    /// (1, 1, talker hidden).
    pub tts_pad: Tensor,
}

/// Builds the Talker's prompt from the Thinker's answer, as the reference's
/// `_get_talker_user_parts` and `_get_talker_assistant_parts` do (one sequence, no padding).
pub fn talker_prompt(
    config: &Config,
    thinker: &ThinkerText,
    talker: &Talker,
    answer: &ThinkerAnswer,
    speaker: &str,
) -> Result<TalkerPrompt> {
    let tc = &config.talker_config;
    let speaker_id = tc
        .speaker_id
        .as_ref()
        .and_then(|voices| voices.get(&speaker.to_lowercase()).copied())
        .ok_or_else(|| {
            let known: Vec<&String> = tc.speaker_id.iter().flat_map(|v| v.keys()).collect();
            candle_core::Error::Msg(format!(
                "voice {speaker:?} is not in talker_config.speaker_id (known: {known:?})"
            ))
        })?;
    let prompt = &answer.sequence[..answer.prompt_len];
    let ran = answer.embeds.dim(1)?;
    if answer.hidden.dim(1)? != ran || ran + 1 != answer.sequence.len() {
        candle_core::bail!(
            "thinker answer: {} embeddings and {} hidden states for {} ids (want one fewer than the ids)",
            ran,
            answer.hidden.dim(1)?,
            answer.sequence.len()
        );
    }
    let dev = answer.embeds.device();

    // The user turn: every prompt position whose latest <|im_start|> is followed by `user`.
    let multimodal = [
        config.thinker_config.audio_token_id,
        config.thinker_config.image_token_id,
        config.thinker_config.video_token_id,
    ];
    let mut role_start = 0;
    let mut user_rows = Vec::new();
    for (i, &id) in prompt.iter().enumerate() {
        if id == config.im_start_token_id {
            role_start = i;
        }
        let role = prompt[(role_start + 1).min(prompt.len() - 1)];
        if role == config.user_token_id {
            let source = if multimodal.contains(&id) {
                talker.project_hidden(&answer.hidden.i((.., i..i + 1, ..))?)?
            } else {
                talker.project_text(&answer.embeds.i((.., i..i + 1, ..))?)?
            };
            user_rows.push((id, source));
        }
    }

    let assistant_start = (0..prompt.len().saturating_sub(1))
        .rev()
        .find(|&i| {
            prompt[i] == config.im_start_token_id && prompt[i + 1] == config.assistant_token_id
        })
        .ok_or_else(|| {
            candle_core::Error::Msg("the prompt has no <|im_start|>assistant turn".into())
        })?;
    if ran < assistant_start + 4 {
        candle_core::bail!(
            "the Talker needs the assistant header and at least one answer token with its \
             hidden state (got {} positions after <|im_start|>)",
            ran - assistant_start
        );
    }
    let specials = Tensor::new(
        &[[
            config.tts_bos_token_id,
            config.tts_eos_token_id,
            config.tts_pad_token_id,
        ]],
        dev,
    )?;
    let specials = talker.project_text(&thinker.embed(&specials)?)?;
    let (tts_bos, tts_eos, tts_pad) = (
        specials.i((.., 0..1, ..))?,
        specials.i((.., 1..2, ..))?,
        specials.i((.., 2..3, ..))?,
    );
    let assistant = talker.project_text(&answer.embeds.i((.., assistant_start.., ..))?)?;
    let text_part = Tensor::cat(
        &[
            assistant.i((.., 0..3, ..))?,
            tts_pad.repeat((1, 4, 1))?,
            tts_bos,
            assistant.i((.., 3..4, ..))?,
        ],
        1,
    )?;
    let codec_ids = Tensor::new(
        &[[
            tc.codec_nothink_id,
            tc.codec_think_bos_id,
            tc.codec_think_eos_id,
            speaker_id,
            tc.codec_pad_id,
            tc.codec_bos_id,
        ]],
        dev,
    )?;
    let codec = talker.embed_codes(&codec_ids)?;
    let codec_part = Tensor::cat(&[Tensor::zeros_like(&codec.i((.., 0..3, ..))?)?, codec], 1)?;
    let assistant_embeds = (text_part + codec_part)?;
    // The reference also moves `tts_eos` to just after the Thinker's EOS in a batch; one sequence
    // ends at its EOS (or the token limit), where the marker already is.
    let trailing_text = Tensor::cat(&[assistant.i((.., 4.., ..))?, tts_eos], 1)?;

    let mut parts: Vec<Tensor> = user_rows.iter().map(|(_, row)| row.clone()).collect();
    parts.push(assistant_embeds.clone());
    let mut ids: Vec<u32> = user_rows.iter().map(|&(id, _)| id).collect();
    ids.extend(std::iter::repeat_n(
        config.tts_pad_token_id,
        assistant_embeds.dim(1)?,
    ));
    Ok(TalkerPrompt {
        embeds: Tensor::cat(&parts, 1)?,
        ids,
        trailing_text,
        tts_pad,
    })
}

/// One 80 ms frame: codebook 0 from the Talker, the rest from the code predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechFrame {
    pub codes: Vec<u32>,
}

/// The Talker's generation loop, one frame per [`SpeechStream::next_frame`].
pub struct SpeechStream<'a> {
    talker: &'a mut Talker,
    trailing_text: Tensor,
    tts_pad: Tensor,
    eos: u32,
    suppress: Vec<u32>,
    max_new_tokens: usize,
    rope_delta: f32,
    sampler: Sampler,
    predictor_sampler: Sampler,
    /// Codebook-0 ids so far (the repetition penalty's history).
    ids: Vec<u32>,
    /// The raw codec_head logits (vocab) that chose each id.
    logits: Vec<Tensor>,
    /// The Talker's last hidden state after its final norm, (1, 1, hidden).
    last_hidden: Tensor,
}

impl<'a> SpeechStream<'a> {
    /// Runs the Talker's prompt (its positions `positions` (3, t), later steps at
    /// `cache_len + rope_delta`) and chooses the first codebook-0 id. The code predictor draws
    /// greedily when `options` is greedy, else with the reference's top-k 50 / top-p 0.8.
    pub fn start(
        config: &Config,
        talker: &'a mut Talker,
        prompt: &TalkerPrompt,
        positions: &Tensor,
        rope_delta: f32,
        max_new_tokens: usize,
        options: SamplingOptions,
    ) -> Result<Self> {
        let vocab = config.talker_config.text_config.vocab_size;
        let eos = config.talker_config.codec_eos_token_id;
        let suppress = (vocab.saturating_sub(SUPPRESSED_TOP_IDS) as u32..vocab as u32)
            .filter(|&id| id != eos)
            .collect();
        let predictor_options = if options.is_greedy() {
            SamplingOptions::greedy()
        } else {
            SamplingOptions {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.8,
                repetition_penalty: 1.0,
                seed: options.seed.wrapping_add(1),
            }
        };
        talker.clear_cache();
        let mut stream = Self {
            talker,
            trailing_text: prompt.trailing_text.clone(),
            tts_pad: prompt.tts_pad.clone(),
            eos,
            suppress,
            max_new_tokens,
            rope_delta,
            sampler: Sampler::new(options),
            predictor_sampler: Sampler::new(predictor_options),
            ids: Vec::new(),
            logits: Vec::new(),
            last_hidden: prompt.tts_pad.clone(),
        };
        if max_new_tokens > 0 {
            stream.advance(&prompt.embeds, positions)?;
        }
        Ok(stream)
    }

    /// Runs `embeds` and chooses the next codebook-0 id.
    fn advance(&mut self, embeds: &Tensor, positions: &Tensor) -> Result<()> {
        let hidden = self.talker.forward_hidden(embeds, positions)?;
        let t = hidden.dim(1)?;
        self.last_hidden = hidden.i((.., t - 1.., ..))?;
        let logits = self.talker.codec_logits(&self.last_hidden)?.flatten_all()?;
        let id = self.sampler.sample(&logits, &self.ids, &self.suppress)?;
        self.ids.push(id);
        self.logits.push(logits);
        Ok(())
    }

    /// The next frame's 16 codes, then the Talker's next codebook-0 id; `None` once the Talker
    /// chose EOS or reached `max_new_tokens` (as in the reference, the id chosen at the limit
    /// gets no frame).
    pub fn next_frame(&mut self) -> Result<Option<SpeechFrame>> {
        let Some(&code0) = self.ids.last() else {
            return Ok(None);
        };
        if code0 == self.eos || self.ids.len() >= self.max_new_tokens {
            return Ok(None);
        }
        let dev = self.last_hidden.device().clone();
        let code0_embedding = self.talker.embed_codes(&Tensor::new(&[[code0]], &dev)?)?;
        let last_hidden = self.last_hidden.clone();
        let sampler = &mut self.predictor_sampler;
        let residual = self.talker.code_predictor_mut().generate(
            &last_hidden,
            &code0_embedding,
            |logits| sampler.sample(logits, &[], &[]),
        )?;
        let step = self.ids.len() - 1;
        let text = if step < self.trailing_text.dim(1)? {
            self.trailing_text.i((.., step..step + 1, ..))?
        } else {
            self.tts_pad.clone()
        };
        let input = (residual.summed_embedding + text)?;
        let positions = decode_positions(self.talker.cache_len(), self.rope_delta, 1, &dev)?;
        self.advance(&input, &positions)?;
        let mut codes = vec![code0];
        codes.extend(residual.codes);
        Ok(Some(SpeechFrame { codes }))
    }

    /// Codebook-0 ids chosen so far (with the final EOS, if any).
    pub fn codebook0_ids(&self) -> &[u32] {
        &self.ids
    }

    /// The codec_head logits (vocab) that chose each codebook-0 id.
    pub fn step_logits(&self) -> &[Tensor] {
        &self.logits
    }
}
