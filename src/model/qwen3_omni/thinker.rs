//! The whole Thinker (`thinker.*`): the audio tower and the vision encoder feed their tokens into
//! the text decoder's embeddings at the placeholder ids (the reference's `masked_scatter`), the
//! vision DeepStack features go to the first decoder layers, and the positions come from
//! [`rope_index`].

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::qwen3_omni::audio_encoder::AudioEncoder;
use crate::model::qwen3_omni::config::ThinkerConfig;
use crate::model::qwen3_omni::moe_decoder::Deepstack;
use crate::model::qwen3_omni::rope_index::{MediaLayout, RopeIndexTokens, rope_index};
use crate::model::qwen3_omni::thinker_text::ThinkerText;
use crate::model::qwen3_omni::vision_encoder::{VisionEncoder, VisionOutput};

/// Vision input of one kind: processor patches and their grids.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// (patches, channels * temporal_patch * patch^2), in the processor's order.
    pub pixels: Tensor,
    /// (t, h, w) patch grid per image or video.
    pub grids: Vec<[usize; 3]>,
}

/// The media of one prompt, each kind in prompt order.
#[derive(Debug, Clone, Default)]
pub struct ThinkerMedia {
    /// Log-mel (mel bins, frames) per audio clip (those of videos included).
    pub audio: Vec<Tensor>,
    pub images: Option<VisionInput>,
    pub videos: Option<VisionInput>,
    /// Seconds per temporal patch of each video.
    pub video_second_per_grid: Vec<f32>,
    pub use_audio_in_video: bool,
}

impl ThinkerMedia {
    /// What [`rope_index`] needs to know of these media.
    pub fn layout(&self) -> Result<MediaLayout> {
        Ok(MediaLayout {
            image_grid_thw: self.images.iter().flat_map(|v| v.grids.clone()).collect(),
            video_grid_thw: self.videos.iter().flat_map(|v| v.grids.clone()).collect(),
            video_second_per_grid: self.video_second_per_grid.clone(),
            audio_feature_lengths: self
                .audio
                .iter()
                .map(|clip| clip.dim(1))
                .collect::<Result<_>>()?,
            use_audio_in_video: self.use_audio_in_video,
        })
    }
}

/// A prompt ready for the decoder.
#[derive(Debug, Clone)]
pub struct ThinkerPrompt {
    pub ids: Vec<u32>,
    /// (1, t, hidden) with the media tokens merged in.
    pub embeds: Tensor,
    pub deepstack: Option<Deepstack>,
    /// (3, t) f32 rotary positions.
    pub positions: Tensor,
    /// Decode step at cache length `n` sits at `n + rope_delta`.
    pub rope_delta: f32,
    /// The media's grids and lengths (the Talker lays out its positions from them too).
    pub layout: MediaLayout,
}

/// `thinker`: audio tower, vision encoder, text decoder.
#[derive(Debug, Clone)]
pub struct Thinker {
    pub text: ThinkerText,
    audio: AudioEncoder,
    vision: VisionEncoder,
    tokens: RopeIndexTokens,
}

/// Rows of `sources` (concatenated) chosen so that position `i` of `ids` takes the next feature
/// row of its kind when `ids[i]` is that kind's placeholder, else its own text row.
fn merge_rows(
    ids: &[u32],
    text_rows: usize,
    kinds: &[(u32, usize, &str)],
) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let mut index: Vec<u32> = (0..ids.len() as u32).collect();
    let mut per_kind = Vec::with_capacity(kinds.len());
    let mut offset = text_rows;
    for &(token, rows, name) in kinds {
        let positions: Vec<u32> = (0..ids.len() as u32)
            .filter(|&i| ids[i as usize] == token)
            .collect();
        if positions.len() != rows {
            candle_core::bail!(
                "the prompt has {} {name} placeholders for {rows} {name} tokens from the encoder",
                positions.len()
            );
        }
        for (k, &p) in positions.iter().enumerate() {
            index[p as usize] = (offset + k) as u32;
        }
        offset += rows;
        per_kind.push(positions);
    }
    Ok((index, per_kind))
}

impl Thinker {
    pub fn new(c: &ThinkerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            text: ThinkerText::new(&c.text_config, c.tie_word_embeddings, vb.clone())?,
            audio: AudioEncoder::new(&c.audio_config, vb.pp("audio_tower"))?,
            vision: VisionEncoder::new(&c.vision_config, vb.pp("visual"))?,
            tokens: RopeIndexTokens::thinker(c),
        })
    }

    pub fn audio_encoder(&self) -> &AudioEncoder {
        &self.audio
    }

    pub fn vision_encoder(&self) -> &VisionEncoder {
        &self.vision
    }

    /// Embeds `ids` with `media` merged in and lays out their positions.
    pub fn prepare(&self, ids: &[u32], media: &ThinkerMedia) -> Result<ThinkerPrompt> {
        let device = self.text.device();
        let text = self
            .text
            .embed(&Tensor::new(ids, &device)?.unsqueeze(0)?)?
            .squeeze(0)?;
        let audio = if media.audio.is_empty() {
            None
        } else {
            Some(self.audio.forward_clips(&media.audio)?)
        };
        let encode = |v: &Option<VisionInput>| -> Result<Option<VisionOutput>> {
            v.as_ref()
                .map(|v| self.vision.forward(&v.pixels, &v.grids))
                .transpose()
        };
        let (images, videos) = (encode(&media.images)?, encode(&media.videos)?);
        let rows = |t: &Option<Tensor>| t.as_ref().map(|t| t.dim(0)).transpose();
        let audio_rows = rows(&audio)?.unwrap_or(0);
        let image_rows = rows(&images.as_ref().map(|o| o.embeds.clone()))?.unwrap_or(0);
        let video_rows = rows(&videos.as_ref().map(|o| o.embeds.clone()))?.unwrap_or(0);
        let (index, positions) = merge_rows(
            ids,
            ids.len(),
            &[
                (self.tokens.audio, audio_rows, "audio"),
                (self.tokens.image, image_rows, "image"),
                (self.tokens.video, video_rows, "video"),
            ],
        )?;
        let dtype = text.dtype();
        let mut sources = vec![text];
        sources.extend(
            audio
                .iter()
                .map(|a| a.to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?,
        );
        for v in [&images, &videos].into_iter().flatten() {
            sources.push(v.embeds.to_dtype(dtype)?);
        }
        let n = index.len();
        let embeds = Tensor::cat(&sources, 0)?
            .index_select(&Tensor::from_vec(index, n, &device)?, 0)?
            .unsqueeze(0)?;

        let deepstack = self.deepstack(&positions[1], &positions[2], &images, &videos)?;
        let layout = media.layout()?;
        let index = rope_index(ids, &self.tokens, &layout)?;
        Ok(ThinkerPrompt {
            ids: ids.to_vec(),
            embeds,
            deepstack,
            positions: index.to_tensor(&device)?,
            rope_delta: index.delta,
            layout,
        })
    }

    /// The images' and videos' DeepStack features joined in sequence order.
    fn deepstack(
        &self,
        image_positions: &[u32],
        video_positions: &[u32],
        images: &Option<VisionOutput>,
        videos: &Option<VisionOutput>,
    ) -> Result<Option<Deepstack>> {
        let mut visual: Vec<(u32, usize)> = image_positions
            .iter()
            .enumerate()
            .map(|(k, &p)| (p, k))
            .chain(
                video_positions
                    .iter()
                    .enumerate()
                    .map(|(k, &p)| (p, image_positions.len() + k)),
            )
            .collect();
        if visual.is_empty() {
            return Ok(None);
        }
        visual.sort_unstable();
        let device = self.text.device();
        let order: Vec<u32> = visual.iter().map(|&(_, row)| row as u32).collect();
        let order = Tensor::from_vec(order, visual.len(), &device)?;
        let layers = images
            .as_ref()
            .or(videos.as_ref())
            .map(|o| o.deepstack.len())
            .unwrap_or(0);
        let features = (0..layers)
            .map(|l| {
                let parts: Vec<&Tensor> = [images, videos]
                    .into_iter()
                    .flatten()
                    .map(|o| &o.deepstack[l])
                    .collect();
                Tensor::cat(&parts, 0)?.index_select(&order, 0)
            })
            .collect::<Result<Vec<_>>>()?;
        let positions: Vec<u32> = visual.iter().map(|&(p, _)| p).collect();
        Ok(Some(Deepstack {
            positions: Tensor::from_vec(positions, visual.len(), &device)?,
            features,
        }))
    }

    /// Logits (1, t, vocab) of a prepared prompt at every position, from an empty cache.
    pub fn prompt_logits(&mut self, prompt: &ThinkerPrompt) -> Result<Tensor> {
        self.text.clear_cache();
        let hidden = self.text.forward_hidden_deepstack(
            &prompt.embeds,
            &prompt.positions,
            None,
            prompt.deepstack.as_ref(),
        )?;
        self.text.logits(&hidden)
    }
}
