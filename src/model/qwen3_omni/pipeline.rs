//! One offline Qwen3-Omni turn as the reference's `Qwen3OmniMoeForConditionalGeneration.generate`
//! runs it: the user message's media (prepared by `crate::media::offline`, the same processor
//! steps as for Qwen2.5-Omni with this family's patch size and normalisation) merged into the
//! Thinker's prompt, the Thinker's answer, then the Talker frame by frame with each frame's
//! waveform rendered as soon as its codes exist ([`Code2WavStream`]).
//!
//! First audio: the Talker's prefill and first codebook-0 id, one code predictor pass
//! (`num_code_groups - 1` steps) and one Code2Wav window give the first 80 ms frame; every later
//! frame costs one Talker step, one predictor pass and one Code2Wav window.

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::model::chat::load_tokenizer;
use crate::model::config::{FeatureExtractorConfig, ImageProcessorConfig, ProcessorConfig};
use crate::model::loading::{GenerationConfig, ModelFiles};
use crate::model::pipeline::MediaInput;
use crate::model::qwen3_omni::code2wav::{Code2Wav, Code2WavStream};
use crate::model::qwen3_omni::config::Config;
use crate::model::qwen3_omni::rope_index::{
    MediaLayout, RopeIndexTokens, audio_output_length, rope_index,
};
use crate::model::qwen3_omni::speech::{
    SpeechFrame, SpeechStream, ThinkerAnswer, talker_prompt, thinker_answer,
};
use crate::model::qwen3_omni::talker::Talker;
use crate::model::qwen3_omni::thinker::{Thinker, ThinkerMedia, ThinkerPrompt, VisionInput};
use crate::model::sampling::{Sampler, SamplingOptions};

/// The left context the reference's `generate` decodes speech with (`chunked_decode(codes, 300, 25)`).
pub const CODE2WAV_LEFT_CONTEXT: usize = 25;

/// Code2Wav's output rate.
pub const SAMPLE_RATE: u32 = 24_000;

/// The published image normalisation of this family (its vision encoder is SigLIP2-style).
const IMAGE_MEAN_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// A loaded Qwen3-Omni model.
pub struct Qwen3Omni {
    pub config: Config,
    pub thinker: Thinker,
    /// With its Code2Wav, when the checkpoint speaks (`enable_audio_output`).
    pub speech: Option<(Talker, Code2Wav)>,
    pub tokenizer: Tokenizer,
    pub processor: ProcessorConfig,
    pub generation: GenerationConfig,
}

/// The ids of the placeholder tokens, from the tokenizer (the config names only some).
struct Placeholders {
    audio_start: u32,
    audio_end: u32,
    vision_start: u32,
    vision_end: u32,
}

/// The Thinker's answer and its text.
pub struct Qwen3Answer {
    pub answer: ThinkerAnswer,
    pub text: String,
}

/// The spoken answer.
pub struct Qwen3Speech {
    pub frames: Vec<SpeechFrame>,
    pub waveform: Vec<f32>,
    /// The Talker chose its end of speech (not the frame limit).
    pub finished: bool,
}

impl Qwen3Omni {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let config = files.load_qwen3_omni_config()?;
        config.validate().with_context(|| {
            format!(
                "{} is not a consistent Qwen3-Omni config",
                files.dir.display()
            )
        })?;
        let checkpoint = files.checkpoint()?;
        let vb = checkpoint.var_builder(dtype, device, "thinker", &["thinker."]);
        let thinker = Thinker::new(&config.thinker_config, vb.pp("thinker"))
            .context("loading the Thinker")?;
        let speech =
            if config.enable_audio_output && checkpoint.contains("talker.codec_head.weight") {
                let talker = Talker::new(&config.talker_config, vb.pp("talker"))
                    .context("loading the Talker")?;
                // Code2Wav runs in f32, as the reference's decoder does.
                let vb32 = checkpoint.var_builder(DType::F32, device, "code2wav", &["code2wav."]);
                let code2wav = Code2Wav::new(&config.code2wav_config, vb32.pp("code2wav"))
                    .context("loading Code2Wav")?;
                Some((talker, code2wav))
            } else {
                None
            };
        let tokenizer = load_tokenizer(&files.tokenizer, files.tokenizer_config.as_deref())?;
        let processor = if files.processor_config.is_some() {
            files.load_processor_config()?
        } else {
            processor_defaults(&config)
        };
        Ok(Self {
            config,
            thinker,
            speech,
            tokenizer,
            processor,
            generation: files.load_generation_config()?,
        })
    }

    fn token(&self, text: &str) -> anyhow::Result<u32> {
        self.tokenizer
            .token_to_id(text)
            .with_context(|| format!("the tokenizer has no {text} token"))
    }

    fn placeholders(&self) -> anyhow::Result<Placeholders> {
        Ok(Placeholders {
            audio_start: self.config.thinker_config.audio_start_token_id,
            audio_end: self.token("<|audio_end|>")?,
            vision_start: self.config.thinker_config.vision_start_token_id,
            vision_end: self.token("<|vision_end|>")?,
        })
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The chat prompt of one user turn (`system`, then the media in order, then `text`) with
    /// its media placeholders, as the processor lays them out.
    pub fn prompt(
        &self,
        system: Option<&str>,
        media: &[MediaInput],
        text: &str,
    ) -> anyhow::Result<ThinkerPrompt> {
        let tc = &self.config.thinker_config;
        let p = self.placeholders()?;
        let n_window = tc.audio_config.n_window;
        let merge = tc.vision_config.spatial_merge_size;
        let mut ids = Vec::new();
        if let Some(system) = system {
            ids.extend(self.encode(&format!("<|im_start|>system\n{system}<|im_end|>\n"))?);
        }
        ids.extend(self.encode("<|im_start|>user\n")?);
        let mut thinker_media = ThinkerMedia::default();
        let mut images: Vec<(Tensor, [usize; 3])> = Vec::new();
        let mut videos: Vec<(Tensor, [usize; 3])> = Vec::new();
        for item in media {
            match item {
                MediaInput::Audio { features } => {
                    ids.push(p.audio_start);
                    let n = audio_output_length(features.dim(1)?, n_window);
                    ids.extend(std::iter::repeat_n(tc.audio_token_id, n));
                    ids.push(p.audio_end);
                    thinker_media.audio.push(features.clone());
                }
                MediaInput::Image {
                    pixel_values,
                    grid_thw,
                } => {
                    ids.push(p.vision_start);
                    let n = grid_thw.iter().product::<usize>() / (merge * merge);
                    ids.extend(std::iter::repeat_n(tc.image_token_id, n));
                    ids.push(p.vision_end);
                    images.push((pixel_values.clone(), *grid_thw));
                }
                MediaInput::Video {
                    pixel_values,
                    grid_thw,
                    second_per_grid,
                    audio_features,
                } => {
                    let per_frame = grid_thw[1] * grid_thw[2] / (merge * merge);
                    let frame_times: Vec<f32> = (0..grid_thw[0])
                        .flat_map(|k| {
                            let t = k as f32
                                * *second_per_grid as f32
                                * tc.position_id_per_seconds as f32;
                            std::iter::repeat_n(t, per_frame)
                        })
                        .collect();
                    ids.push(p.vision_start);
                    match audio_features {
                        None => {
                            ids.extend(std::iter::repeat_n(tc.video_token_id, frame_times.len()))
                        }
                        Some(audio) => {
                            thinker_media.use_audio_in_video = true;
                            ids.push(p.audio_start);
                            let n = audio_output_length(audio.dim(1)?, n_window);
                            // Frames and audio tokens merged by time, a frame first on a tie.
                            let (mut v, mut a) = (0, 0);
                            while v < frame_times.len() || a < n {
                                if a == n || (v < frame_times.len() && frame_times[v] <= a as f32) {
                                    ids.push(tc.video_token_id);
                                    v += 1;
                                } else {
                                    ids.push(tc.audio_token_id);
                                    a += 1;
                                }
                            }
                            ids.push(p.audio_end);
                            thinker_media.audio.push(audio.clone());
                        }
                    }
                    if audio_features.is_none() && thinker_media.use_audio_in_video {
                        bail!("either every video carries its audio or none does");
                    }
                    ids.push(p.vision_end);
                    videos.push((pixel_values.clone(), *grid_thw));
                    thinker_media
                        .video_second_per_grid
                        .push(*second_per_grid as f32);
                }
            }
        }
        ids.extend(self.encode(&format!("{text}<|im_end|>\n<|im_start|>assistant\n"))?);
        let join = |items: Vec<(Tensor, [usize; 3])>| -> anyhow::Result<Option<VisionInput>> {
            if items.is_empty() {
                return Ok(None);
            }
            let pixels: Vec<Tensor> = items.iter().map(|(p, _)| p.clone()).collect();
            Ok(Some(VisionInput {
                pixels: Tensor::cat(&pixels, 0)?,
                grids: items.into_iter().map(|(_, g)| g).collect(),
            }))
        };
        thinker_media.images = join(images)?;
        thinker_media.videos = join(videos)?;
        Ok(self.thinker.prepare(&ids, &thinker_media)?)
    }

    /// The Thinker's answer (stops at `<|im_end|>` or `max_tokens`).
    pub fn answer(
        &mut self,
        prompt: &ThinkerPrompt,
        max_tokens: usize,
        sampling: SamplingOptions,
    ) -> anyhow::Result<Qwen3Answer> {
        let answer = thinker_answer(
            &mut self.thinker.text,
            prompt,
            self.config.talker_config.accept_hidden_layer,
            max_tokens,
            self.config.im_end_token_id,
            &mut Sampler::new(sampling),
        )?;
        let reply: Vec<u32> = answer.sequence[answer.prompt_len..]
            .iter()
            .copied()
            .filter(|&id| id != self.config.im_end_token_id)
            .collect();
        let text = self
            .tokenizer
            .decode(&reply, true)
            .map_err(|e| anyhow::anyhow!("decoding the answer: {e}"))?;
        Ok(Qwen3Answer { answer, text })
    }

    /// Speaks `answer` (to a prompt with media `layout`) in `voice`: frames until the Talker's
    /// end of speech or `max_frames`, each frame's samples handed to `on_samples` as soon as they
    /// exist.
    #[allow(clippy::too_many_arguments)]
    pub fn speak(
        &mut self,
        answer: &ThinkerAnswer,
        layout: &MediaLayout,
        voice: &str,
        max_frames: usize,
        options: SamplingOptions,
        mut on_samples: impl FnMut(&[f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<Qwen3Speech> {
        let Some((talker, code2wav)) = self.speech.as_mut() else {
            bail!(
                "this checkpoint has no Talker (enable_audio_output is off or the weights are missing)"
            );
        };
        let prompt = talker_prompt(&self.config, &self.thinker.text, talker, answer, voice)?;
        // The Talker lays out its user turn's media with its own config; the audio window is the
        // Thinker's (the reference's Talker config has none).
        let tokens =
            RopeIndexTokens::talker(&self.config.talker_config, &self.config.thinker_config);
        let index = rope_index(&prompt.ids, &tokens, layout)?;
        let positions = index.to_tensor(prompt.embeds.device())?;
        // `max_new_tokens` ids give one frame fewer (the last id's frame is never computed).
        let mut stream = SpeechStream::start(
            &self.config,
            talker,
            &prompt,
            &positions,
            index.delta,
            max_frames + 1,
            options,
        )?;
        let mut wav_stream = Code2WavStream::new(CODE2WAV_LEFT_CONTEXT);
        let mut frames = Vec::new();
        let mut waveform = Vec::new();
        while let Some(frame) = stream.next_frame()? {
            let samples = wav_stream.push_frame(code2wav, &frame.codes)?;
            on_samples(&samples)?;
            waveform.extend(samples);
            frames.push(frame);
        }
        let finished =
            stream.codebook0_ids().last() == Some(&self.config.talker_config.codec_eos_token_id);
        Ok(Qwen3Speech {
            frames,
            waveform,
            finished,
        })
    }
}

/// The processor settings of this family when the folder has no `preprocessor_config.json`:
/// Whisper log-mel with the audio encoder's bins, patches of the vision encoder's sizes,
/// normalised to [-1, 1].
pub fn processor_defaults(config: &Config) -> ProcessorConfig {
    let vision = &config.thinker_config.vision_config;
    let image = ImageProcessorConfig {
        patch_size: vision.patch_size,
        temporal_patch_size: vision.temporal_patch_size,
        merge_size: vision.spatial_merge_size,
        image_mean: IMAGE_MEAN_STD,
        image_std: IMAGE_MEAN_STD,
        ..Default::default()
    };
    let feature_extractor = FeatureExtractorConfig {
        feature_size: config.thinker_config.audio_config.num_mel_bins,
        ..Default::default()
    };
    ProcessorConfig {
        feature_extractor,
        image_processor: image.clone(),
        video_processor: image,
    }
}
