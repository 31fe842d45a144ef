//! One offline turn as the reference's `Qwen2_5OmniForConditionalGeneration.generate()` runs
//! it: the media of a user message through the audio and vision encoders, the conversation laid
//! out by the chat template with its placeholders, the Thinker's answer, and the spoken answer
//! (Talker, then token2wav).
//!
//! The media come prepared by the processor (`crate::media::offline` makes them from files):
//! log-mel features for audio, normalised patches for images and videos. The Talker's inputs are
//! built from the Thinker's own generation, as `generate()` builds them:
//! * prompt rows: the Thinker's prompt hidden states (after the final norm) + the prompt's input
//!   embeddings with the audio/image/video placeholder rows zeroed;
//! * the voice's bos token embedded by the Thinker, then one reply row `h_j + E(g_j)` per
//!   generated token fed back into the Thinker (the final one never is), then text end / pad;
//! * prefill positions from `get_rope_index` with the Talker's config on the text track (prompt
//!   ids, voice bos token, first generated id) and the prompt's media.

use std::ops::ControlFlow;

use anyhow::{Context, ensure};
use candle_core::{Device, Tensor};

use crate::model::chat::{Content, Conversation, EncodedPrompt, Reply};
use crate::model::omni::OmniModel;
use crate::model::speakers::Voice;
use crate::model::talker::{
    TalkerFinish, TalkerOptions, TalkerPrompt, TalkerTextRows, generate_codes,
    multimodal_placeholder_ids, prompt_rows,
};
use crate::model::thinker::rope::{RopeIndexConfig, VideoGrid, VisionGrid, get_rope_index};
use crate::model::thinker::{Generation, GenerationOptions, MultimodalEmbeds, Prompt};
use crate::model::token2wav::dit::SamplerOptions;

/// One media item of a user message, as the processor prepares it.
#[derive(Debug, Clone)]
pub enum MediaInput {
    /// `[n_mels, frames]` log-mel features of a 16 kHz clip.
    Audio { features: Tensor },
    /// `[n_patches, patch_dim]` normalised patches of a still image and their (t, h, w) grid.
    Image {
        pixel_values: Tensor,
        grid_thw: [usize; 3],
    },
    /// Patches of a video, the seconds one temporal grid spans, and with `audio_features` its
    /// sound track, interleaved with it in the prompt (`use_audio_in_video`).
    Video {
        pixel_values: Tensor,
        grid_thw: [usize; 3],
        second_per_grid: f64,
        audio_features: Option<Tensor>,
    },
}

/// Encoded media: the user message's content items (placeholder sizes) and the encoder
/// outputs that replace the placeholders.
#[derive(Debug, Clone)]
pub struct EncodedMedia {
    pub content: Vec<Content>,
    pub embeds: MultimodalEmbeds,
}

/// A tokenized conversation with its input embeddings (media merged in).
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub encoded: EncodedPrompt,
    /// `(L, hidden)` input rows of the Thinker.
    pub embeds: Tensor,
}

impl PreparedPrompt {
    /// The prompt as [`crate::model::thinker::Thinker::generate`] takes it.
    pub fn to_prompt(&self, device: &Device) -> anyhow::Result<Prompt> {
        Ok(Prompt {
            ids: self.encoded.ids.clone(),
            embeds: self.embeds.clone(),
            positions: self.encoded.positions.to_tensor(device)?,
            rope_delta: self.encoded.rope_delta,
        })
    }
}

/// The Thinker's answer with everything the Talker needs from it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub prompt: PreparedPrompt,
    pub reply: Reply,
    pub generation: Generation,
}

/// What the Talker's turn starts from.
#[derive(Debug, Clone)]
pub struct TalkerInputs {
    pub prompt: TalkerPrompt,
    pub text_rows: TalkerTextRows,
    /// `h_j + E(g_j)` of every generated token fed back into the Thinker, each `[E]`.
    pub reply_rows: Vec<Tensor>,
}

/// How the answer is spoken.
#[derive(Debug, Clone)]
pub struct SpeechOptions {
    pub voice: String,
    pub talker: TalkerOptions,
    pub sampler: SamplerOptions,
    /// Seed of token2wav's initial noise.
    pub noise_seed: u64,
}

/// The spoken answer.
#[derive(Debug, Clone)]
pub struct SpokenAnswer {
    pub codes: Vec<u32>,
    pub finish: TalkerFinish,
    /// Mono samples at `sample_rate`, `codes.len() * samples_per_code` of them.
    pub waveform: Vec<f32>,
    pub sample_rate: u32,
}

impl OmniModel {
    /// Runs the encoders over `items` (in prompt order) and lists them as message content.
    /// Audio embeddings (sound tracks of videos included) are concatenated in prompt order, as
    /// are image and video embeddings, which is how their placeholders are filled.
    pub fn encode_media(&self, items: &[MediaInput]) -> anyhow::Result<EncodedMedia> {
        let device = self.thinker.device().clone();
        let merge = self.config.thinker_config.vision_config.spatial_merge_size;
        let mut audios = Vec::new();
        let (mut image_pixels, mut image_grids) = (Vec::new(), Vec::new());
        let (mut video_pixels, mut video_grids) = (Vec::new(), Vec::new());
        for item in items {
            match item {
                MediaInput::Audio { features } => audios.push(features.to_device(&device)?),
                MediaInput::Image {
                    pixel_values,
                    grid_thw,
                } => {
                    image_pixels.push(pixel_values.to_device(&device)?);
                    image_grids.push(*grid_thw);
                }
                MediaInput::Video {
                    pixel_values,
                    grid_thw,
                    audio_features,
                    ..
                } => {
                    video_pixels.push(pixel_values.to_device(&device)?);
                    video_grids.push(*grid_thw);
                    if let Some(features) = audio_features {
                        audios.push(features.to_device(&device)?);
                    }
                }
            }
        }
        let audio_out = self
            .audio_encoder
            .forward_many(&audios)
            .context("encoding the audio")?;
        let mut audio_tokens = audio_out.iter().map(|a| a.dim(0));
        let mut next_audio = || -> anyhow::Result<usize> {
            Ok(audio_tokens
                .next()
                .context("fewer audio encodings than audio inputs")??)
        };
        let mut content = Vec::with_capacity(items.len());
        for item in items {
            content.push(match item {
                MediaInput::Audio { .. } => Content::Audio {
                    tokens: next_audio()?,
                },
                MediaInput::Image { grid_thw, .. } => Content::Image {
                    grid: VisionGrid::new(grid_thw[0], grid_thw[1], grid_thw[2]),
                },
                MediaInput::Video {
                    grid_thw,
                    second_per_grid,
                    audio_features,
                    ..
                } => Content::Video {
                    video: VideoGrid {
                        grid: VisionGrid::new(grid_thw[0], grid_thw[1], grid_thw[2]),
                        second_per_grid: *second_per_grid as f32,
                    },
                    audio_tokens: match audio_features {
                        Some(_) => Some(next_audio()?),
                        None => None,
                    },
                },
            });
        }
        let vision = |pixels: &[Tensor], grids: &[[usize; 3]], what: &str| {
            if pixels.is_empty() {
                return Ok(None);
            }
            let embeds = self
                .vision_encoder
                .forward(&Tensor::cat(pixels, 0)?, grids)
                .with_context(|| format!("encoding the {what}"))?;
            let tokens: usize = grids
                .iter()
                .map(|g| VisionGrid::new(g[0], g[1], g[2]).merged_tokens(merge))
                .sum();
            ensure!(
                embeds.dim(0)? == tokens,
                "the vision encoder gave {} rows for {tokens} {what} tokens",
                embeds.dim(0)?
            );
            anyhow::Ok(Some(embeds))
        };
        let embeds = MultimodalEmbeds {
            audio: if audio_out.is_empty() {
                None
            } else {
                Some(Tensor::cat(&audio_out, 0)?)
            },
            image: vision(&image_pixels, &image_grids, "images")?,
            video: vision(&video_pixels, &video_grids, "videos")?,
        };
        Ok(EncodedMedia { content, embeds })
    }

    /// Tokenizes `conversation` (asking for the assistant's answer) and merges `media` into
    /// its input embeddings.
    pub fn prepare_prompt(
        &self,
        conversation: &Conversation,
        media: &MultimodalEmbeds,
    ) -> anyhow::Result<PreparedPrompt> {
        let encoded = self.tokenizer.encode_conversation(conversation, true)?;
        let embeds = self
            .thinker
            .embed_prompt(&encoded.ids, media)
            .context("merging the media into the prompt")?;
        Ok(PreparedPrompt { encoded, embeds })
    }

    /// Answers `conversation` from an empty context, keeping the prompt and the generation's
    /// hidden states; `on_text` receives the answer as it is generated.
    pub fn answer(
        &mut self,
        conversation: &Conversation,
        media: &MultimodalEmbeds,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<Answer> {
        let prompt = self.prepare_prompt(conversation, media)?;
        let device = self.thinker.device().clone();
        self.thinker.clear_cache();
        let mut stream = self.tokenizer.stream();
        let mut text = String::new();
        let generation = self
            .thinker
            .generate(&prompt.to_prompt(&device)?, options, |token| {
                if !token.is_eos
                    && let Some(delta) = stream.push(token.id)?
                {
                    on_text(&delta)?;
                    text.push_str(&delta);
                }
                Ok(ControlFlow::Continue(()))
            })?;
        if let Some(delta) = stream.finish()? {
            on_text(&delta)?;
            text.push_str(&delta);
        }
        let reply = Reply {
            text,
            ids: generation.ids.clone(),
            finish: generation.finish,
            prompt_tokens: prompt.encoded.ids.len(),
        };
        Ok(Answer {
            prompt,
            reply,
            generation,
        })
    }

    /// The Talker's inputs for `answer` spoken by `voice`; `None` when the Thinker fed no
    /// generated token back (an immediate EOS): there is nothing to say.
    pub fn talker_inputs(
        &self,
        answer: &Answer,
        voice: &Voice,
    ) -> anyhow::Result<Option<TalkerInputs>> {
        let speech = self.speech()?;
        let generation = &answer.generation;
        let (Some(&first), Some(hidden), Some(embeds)) = (
            generation.ids.first(),
            &generation.token_hidden,
            &generation.token_embeds,
        ) else {
            return Ok(None);
        };
        let thinker_cfg = &self.config.thinker_config;
        let talker_cfg = &self.config.talker_config;
        let ids = &answer.prompt.encoded.ids;
        let rows = prompt_rows(
            &generation.prompt_hidden,
            &answer.prompt.embeds,
            ids,
            &multimodal_placeholder_ids(thinker_cfg),
        )?;
        let mut text_track = ids.clone();
        text_track.extend([voice.bos_token, first]);
        let (positions, rope_delta) = get_rope_index(
            &RopeIndexConfig::from(talker_cfg),
            &text_track,
            &answer.prompt.encoded.media,
        )
        .context("laying out the Talker's positions")?;
        let text_rows =
            TalkerTextRows::from_thinker_embedding(talker_cfg, voice.bos_token, |id| {
                self.thinker.embed(&[id])
            })?;
        let summed = (hidden + embeds)?;
        let reply_rows = (0..summed.dim(0)?)
            .map(|j| summed.get(j))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(TalkerInputs {
            prompt: TalkerPrompt {
                rows,
                positions: positions.to_tensor(speech.talker.device())?,
                rope_delta,
            },
            text_rows,
            reply_rows,
        }))
    }

    /// Speaks `answer`: the Talker's codes, then token2wav from seeded noise.
    pub fn speak(
        &mut self,
        answer: &Answer,
        options: &SpeechOptions,
    ) -> anyhow::Result<SpokenAnswer> {
        let voice = self.speech()?.voices.get(&options.voice)?.clone();
        let sample_rate = self.speech()?.token2wav.sample_rate();
        let Some(inputs) = self.talker_inputs(answer, &voice)? else {
            return Ok(SpokenAnswer {
                codes: Vec::new(),
                finish: TalkerFinish::NoText,
                waveform: Vec::new(),
                sample_rate,
            });
        };
        let speech = self
            .speech
            .as_mut()
            .context("this checkpoint has no Talker")?;
        let (codes, finish) = generate_codes(
            &mut speech.talker,
            inputs.prompt,
            inputs.text_rows,
            &inputs.reply_rows,
            options.talker.clone(),
        )
        .context("generating the speech codes")?;
        speech.talker.clear_cache();
        let waveform = if codes.is_empty() {
            Vec::new()
        } else {
            let token2wav = &self.speech()?.token2wav;
            let frames = codes.len() * token2wav.frames_per_code();
            let noise = token2wav
                .noise_source(options.noise_seed)
                .take_tensor(frames, &Device::Cpu)?;
            self.render_speech(&codes, &voice, &options.sampler, &noise)?
        };
        Ok(SpokenAnswer {
            codes,
            finish,
            waveform,
            sample_rate,
        })
    }

    /// token2wav of `codes` in `voice` from the initial ODE state `noise`
    /// `[1, repeats * codes, mel_dim]`: the waveform, `codes.len() * samples_per_code` samples.
    pub fn render_speech(
        &self,
        codes: &[u32],
        voice: &Voice,
        sampler: &SamplerOptions,
        noise: &Tensor,
    ) -> anyhow::Result<Vec<f32>> {
        let token2wav = &self.speech()?.token2wav;
        let speaker = token2wav.speaker(voice)?;
        let schedule = token2wav.schedule(sampler)?;
        token2wav
            .synthesize(&speaker, codes, noise, &schedule)
            .context("token2wav")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loading::ModelFiles;
    use crate::model::sampling::SamplingOptions;
    use candle_core::DType;

    fn tiny() -> OmniModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        OmniModel::load(
            &ModelFiles::from_dir(&dir).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn features(model: &OmniModel, frames: usize, phase: f32) -> Tensor {
        let mels = model.config.thinker_config.audio_config.num_mel_bins;
        let v: Vec<f32> = (0..mels * frames)
            .map(|i| ((i as f32 * 0.13 + phase).sin()) * 0.5)
            .collect();
        Tensor::from_vec(v, (mels, frames), &Device::Cpu).unwrap()
    }

    fn patches(model: &OmniModel, grid: [usize; 3]) -> Tensor {
        let v = &model.config.thinker_config.vision_config;
        let dim = 3 * v.temporal_patch_size * v.patch_size * v.patch_size;
        let n = grid.iter().product::<usize>();
        let values: Vec<f32> = (0..n * dim)
            .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
            .collect();
        Tensor::from_vec(values, (n, dim), &Device::Cpu).unwrap()
    }

    #[test]
    fn media_become_content_items_and_fill_every_placeholder() -> anyhow::Result<()> {
        let model = tiny();
        let merge = model.config.thinker_config.vision_config.spatial_merge_size;
        let grid = [1, 2 * merge, 2 * merge];
        let video_grid = [2, 2 * merge, 2 * merge];
        let items = vec![
            MediaInput::Video {
                pixel_values: patches(&model, video_grid),
                grid_thw: video_grid,
                second_per_grid: 1.0,
                audio_features: Some(features(&model, 90, 0.3)),
            },
            MediaInput::Image {
                pixel_values: patches(&model, grid),
                grid_thw: grid,
            },
            MediaInput::Audio {
                features: features(&model, 40, 0.0),
            },
        ];
        let encoded = model.encode_media(&items)?;
        let audio_tokens = |frames| crate::model::thinker::audio_encoder::output_len(frames);
        assert_eq!(
            encoded.content[0],
            Content::Video {
                video: VideoGrid {
                    grid: VisionGrid::new(2, 2 * merge, 2 * merge),
                    second_per_grid: 1.0,
                },
                audio_tokens: Some(audio_tokens(90)),
            }
        );
        assert_eq!(
            encoded.content[2],
            Content::Audio {
                tokens: audio_tokens(40)
            }
        );
        let e = &encoded.embeds;
        assert_eq!(
            e.audio.as_ref().unwrap().dim(0)?,
            audio_tokens(90) + audio_tokens(40)
        );
        assert_eq!(e.image.as_ref().unwrap().dim(0)?, 4);
        assert_eq!(e.video.as_ref().unwrap().dim(0)?, 8);
        let mut content = encoded.content.clone();
        content.push(Content::Text("What is this?".into()));
        let conversation = Conversation {
            messages: vec![crate::model::chat::Message::new(
                crate::model::chat::Role::User,
                content,
            )],
        };
        let prompt = model.prepare_prompt(&conversation, &encoded.embeds)?;
        assert_eq!(prompt.embeds.dim(0)?, prompt.encoded.ids.len());
        // One placeholder missing its features is an error, not a panic.
        let mut short = encoded.embeds.clone();
        short.image = None;
        assert!(model.prepare_prompt(&conversation, &short).is_err());
        Ok(())
    }

    #[test]
    fn a_spoken_answer_has_samples_for_every_code() -> anyhow::Result<()> {
        let mut model = tiny();
        let conversation = Conversation::new(
            crate::model::chat::SPEECH_SYSTEM_PROMPT,
            vec![Content::Text("Hello".into())],
        );
        let mut options = model.generation_options(4, SamplingOptions::greedy());
        options.eos_token_ids.clear();
        let answer = model.answer(
            &conversation,
            &MultimodalEmbeds::default(),
            &options,
            |_| Ok(()),
        )?;
        assert_eq!(answer.reply.ids.len(), 4);
        let voice = model.speech()?.voices.default_voice()?.clone();
        let inputs = model.talker_inputs(&answer, &voice)?.expect("reply rows");
        assert_eq!(
            inputs.reply_rows.len(),
            3,
            "every token but the last is fed back"
        );
        assert_eq!(
            inputs.prompt.positions.dims(),
            &[3, answer.prompt.encoded.ids.len() + 2]
        );
        let max_codes = 6;
        let spoken = model.speak(
            &answer,
            &SpeechOptions {
                voice: voice.name.clone(),
                talker: TalkerOptions {
                    sampling: SamplingOptions::greedy(),
                    max_codes,
                    dit_codec_rows: None,
                },
                sampler: SamplerOptions::default(),
                noise_seed: 1,
            },
        )?;
        assert!(spoken.codes.len() <= max_codes);
        let per_code = model.speech()?.token2wav.samples_per_code();
        assert_eq!(spoken.waveform.len(), spoken.codes.len() * per_code);
        assert!(
            model
                .speak(
                    &answer,
                    &SpeechOptions {
                        voice: "Nobody".into(),
                        talker: TalkerOptions::reference(0, 1),
                        sampler: SamplerOptions::default(),
                        noise_seed: 0,
                    },
                )
                .unwrap_err()
                .to_string()
                .contains("Chelsie")
        );
        Ok(())
    }
}
