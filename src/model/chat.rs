//! Tokenizer and chat template, exactly as the published processor formats a conversation.
//!
//! A [`Conversation`] is rendered with Qwen2.5-Omni's chat template (`<|im_start|>role\n...
//! <|im_end|>\n` per message, a default system prompt when the first message is not a system
//! one, `<|im_start|>assistant\n` to ask for an answer) and the processor's placeholder expansion:
//! `<|AUDIO|>` repeated once per audio embedding, `<|IMAGE|>` / `<|VIDEO|>` once per merged vision
//! token, and a video with its sound track interleaved in 2-second chunks. The placeholder ids
//! come from config.json and their text from the tokenizer, so nothing here knows a vocabulary.
//!
//! [`TextStream`] turns generated ids into text as they come, never splitting a UTF-8 character;
//! [`crate::model::omni::OmniModel`] ties tokenizer, encoders and Thinker into a turn.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, ensure};
use tokenizers::Tokenizer;

use crate::model::config::ThinkerConfig;
use crate::model::loading::{GenerationConfig, ModelFiles, TokenizerFiles};
use crate::model::sampling::SamplingOptions;
use crate::model::thinker::FinishReason;
use crate::model::thinker::rope::{
    MediaLayout, PositionIds, RopeIndexConfig, VideoGrid, VisionGrid, get_rope_index,
    interleaved_chunks,
};

/// The system prompt the published chat template inserts when a conversation has none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// The system prompt the model needs for spoken output (the reference warns without it).
pub const SPEECH_SYSTEM_PROMPT: &str = "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and visual inputs, as well as generating text and speech.";

/// Turn markers of the chat template.
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One item of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    /// An audio clip that the audio encoder turns into `tokens` embeddings.
    Audio {
        tokens: usize,
    },
    /// An image of `grid` patches.
    Image {
        grid: VisionGrid,
    },
    /// A video; with `audio_tokens` its sound track is interleaved with it (use_audio_in_video).
    Video {
        video: VideoGrid,
        audio_tokens: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Content>,
}

impl Message {
    pub fn new(role: Role, content: Vec<Content>) -> Self {
        Self { role, content }
    }

    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self::new(role, vec![Content::Text(text.into())])
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A system prompt and one user message.
    pub fn new(system: &str, user: Vec<Content>) -> Self {
        Self {
            messages: vec![
                Message::text(Role::System, system),
                Message::new(Role::User, user),
            ],
        }
    }

    pub fn push(&mut self, message: Message) {
        self.messages.push(message);
    }

    /// The media sizes in prompt order, as `get_rope_index` takes them. Videos must either all
    /// carry their sound track or none (the reference's `use_audio_in_video` is one flag).
    pub fn media_layout(&self) -> anyhow::Result<MediaLayout> {
        let mut layout = MediaLayout::default();
        let mut with_audio = None;
        for item in self.messages.iter().flat_map(|m| &m.content) {
            match item {
                Content::Text(_) => {}
                Content::Audio { tokens } => layout.audio_tokens.push(*tokens),
                Content::Image { grid } => layout.images.push(*grid),
                Content::Video {
                    video,
                    audio_tokens,
                } => {
                    let has_audio = audio_tokens.is_some();
                    ensure!(
                        *with_audio.get_or_insert(has_audio) == has_audio,
                        "videos with and without their sound track cannot be mixed in one prompt"
                    );
                    layout.videos.push(*video);
                    if let Some(n) = audio_tokens {
                        layout.audio_tokens.push(*n);
                    }
                }
            }
        }
        layout.use_audio_in_video = with_audio.unwrap_or(false);
        Ok(layout)
    }
}

/// A token of the template: its id and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// The special tokens the template and the processor write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub im_start: SpecialToken,
    pub im_end: SpecialToken,
    pub audio: SpecialToken,
    pub audio_bos: SpecialToken,
    pub audio_eos: SpecialToken,
    pub image: SpecialToken,
    pub video: SpecialToken,
    pub vision_bos: SpecialToken,
    pub vision_eos: SpecialToken,
}

/// A tokenized prompt with what the Thinker needs to run it.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    pub media: MediaLayout,
    pub positions: PositionIds,
    pub rope_delta: i64,
}

/// The tokenizer with the chat template and the processor's placeholder expansion.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Arc<Tokenizer>,
    special: SpecialTokens,
    rope: RopeIndexConfig,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

impl ChatTokenizer {
    /// Loads the tokenizer of a model folder and resolves the template's special tokens.
    pub fn load(files: &ModelFiles, cfg: &ThinkerConfig) -> anyhow::Result<Self> {
        let tokenizer = load_tokenizer(&files.tokenizer, files.tokenizer_config.as_deref())?;
        Self::new(tokenizer, cfg)
    }

    /// Resolves the special tokens: placeholders and media bos/eos by the ids in the config,
    /// the turn markers by name. Every one must be a single token of the tokenizer.
    pub fn new(tokenizer: Tokenizer, cfg: &ThinkerConfig) -> anyhow::Result<Self> {
        let by_id = |id: u32, what: &str| -> anyhow::Result<SpecialToken> {
            let text = tokenizer.id_to_token(id).with_context(|| {
                format!("config.json gives {what} id {id}, which the tokenizer does not have")
            })?;
            Ok(SpecialToken { id, text })
        };
        let by_name = |text: &str| -> anyhow::Result<SpecialToken> {
            let id = tokenizer
                .token_to_id(text)
                .with_context(|| format!("the tokenizer has no {text} token"))?;
            Ok(SpecialToken {
                id,
                text: text.to_string(),
            })
        };
        let special = SpecialTokens {
            im_start: by_name(IM_START)?,
            im_end: by_name(IM_END)?,
            audio: by_id(cfg.audio_token_index, "audio_token_index")?,
            audio_bos: by_id(cfg.audio_start_token_id, "audio_start_token_id")?,
            audio_eos: by_id(cfg.audio_end_token_id, "audio_end_token_id")?,
            image: by_id(cfg.image_token_index, "image_token_index")?,
            video: by_id(cfg.video_token_index, "video_token_index")?,
            vision_bos: by_id(cfg.vision_start_token_id, "vision_start_token_id")?,
            vision_eos: by_id(cfg.vision_end_token_id, "vision_end_token_id")?,
        };
        let chat = Self {
            tokenizer: Arc::new(tokenizer),
            special,
            rope: RopeIndexConfig::from(cfg),
        };
        // A placeholder written as text must come back as exactly its own id.
        let s = &chat.special;
        for token in [
            &s.im_start,
            &s.im_end,
            &s.audio,
            &s.audio_bos,
            &s.audio_eos,
            &s.image,
            &s.video,
            &s.vision_bos,
            &s.vision_eos,
        ] {
            let ids = chat.encode(&token.text)?;
            ensure!(
                ids == [token.id],
                "the tokenizer splits special token {} into {ids:?} instead of [{}]",
                token.text,
                token.id
            );
        }
        Ok(chat)
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Ids of `text`, special tokens written in it recognised.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(anyhow::Error::msg)
            .context("tokenizing failed")?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(anyhow::Error::msg)
            .context("detokenizing failed")
    }

    /// A streaming decoder of generated ids.
    pub fn stream(&self) -> TextStream {
        TextStream {
            tokenizer: self.tokenizer.clone(),
            pending: Vec::new(),
        }
    }

    /// The conversation as the chat template writes it, placeholders expanded as the processor
    /// does.
    pub fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let s = &self.special;
        let mut out = String::new();
        for (i, message) in conversation.messages.iter().enumerate() {
            if i == 0 && message.role != Role::System {
                out.push_str(&format!(
                    "{}system\n{DEFAULT_SYSTEM_PROMPT}{}\n",
                    s.im_start.text, s.im_end.text
                ));
            }
            out.push_str(&s.im_start.text);
            out.push_str(message.role.as_str());
            out.push('\n');
            for item in &message.content {
                self.render_item(item, &mut out)?;
            }
            out.push_str(&s.im_end.text);
            out.push('\n');
        }
        if add_generation_prompt {
            out.push_str(&s.im_start.text);
            out.push_str("assistant\n");
        }
        Ok(out)
    }

    fn render_item(&self, item: &Content, out: &mut String) -> anyhow::Result<()> {
        let s = &self.special;
        let merge = self.rope.spatial_merge_size;
        let repeat = |out: &mut String, token: &SpecialToken, n: usize| {
            for _ in 0..n {
                out.push_str(&token.text);
            }
        };
        match item {
            Content::Text(text) => out.push_str(text),
            Content::Audio { tokens } => {
                out.push_str(&s.audio_bos.text);
                repeat(out, &s.audio, *tokens);
                out.push_str(&s.audio_eos.text);
            }
            Content::Image { grid } => {
                out.push_str(&s.vision_bos.text);
                repeat(out, &s.image, grid.merged_tokens(merge));
                out.push_str(&s.vision_eos.text);
            }
            Content::Video {
                video,
                audio_tokens: None,
            } => {
                out.push_str(&s.vision_bos.text);
                repeat(out, &s.video, video.grid.merged_tokens(merge));
                out.push_str(&s.vision_eos.text);
            }
            Content::Video {
                video,
                audio_tokens: Some(n_audio),
            } => {
                out.push_str(&s.vision_bos.text);
                out.push_str(&s.audio_bos.text);
                for chunk in interleaved_chunks(&self.rope, video, *n_audio) {
                    repeat(out, &s.video, chunk.video.len());
                    repeat(out, &s.audio, chunk.audio.len());
                }
                out.push_str(&s.audio_eos.text);
                out.push_str(&s.vision_eos.text);
            }
        }
        Ok(())
    }

    /// Renders, tokenizes and lays out the TMRoPE positions of a conversation.
    pub fn encode_conversation(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> anyhow::Result<EncodedPrompt> {
        let media = conversation.media_layout()?;
        let text = self.render(conversation, add_generation_prompt)?;
        let ids = self.encode(&text)?;
        let (positions, rope_delta) = get_rope_index(&self.rope, &ids, &media)
            .context("laying out the prompt's positions")?;
        Ok(EncodedPrompt {
            ids,
            media,
            positions,
            rope_delta,
        })
    }
}

/// Builds the tokenizer from `tokenizer.json`, or from the slow-tokenizer files as
/// transformers converts them for Qwen2 (NFC, the Qwen2 split regex + byte-level BPE, byte-level
/// decoding, special tokens at the ids tokenizer_config.json / added_tokens.json give).
pub fn load_tokenizer(
    files: &TokenizerFiles,
    tokenizer_config: Option<&Path>,
) -> anyhow::Result<Tokenizer> {
    match files {
        TokenizerFiles::Json(path) => Tokenizer::from_file(path)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot load tokenizer {}", path.display())),
        TokenizerFiles::VocabMerges {
            vocab,
            merges,
            added_tokens,
        } => {
            let json =
                qwen2_tokenizer_json(vocab, merges, tokenizer_config, added_tokens.as_deref())?;
            Tokenizer::from_bytes(json.as_bytes())
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!(
                        "cannot build a tokenizer from {} and {}",
                        vocab.display(),
                        merges.display()
                    )
                })
        }
    }
}

/// The pre-tokenizer split of Qwen2's tokenizer.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn qwen2_tokenizer_json(
    vocab: &Path,
    merges: &Path,
    tokenizer_config: Option<&Path>,
    added_tokens: Option<&Path>,
) -> anyhow::Result<String> {
    use serde_json::{Value, json};
    let read_json = |path: &Path| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    };
    let vocab_map = read_json(vocab)?;
    ensure!(
        vocab_map.is_object(),
        "{} is not a token -> id map",
        vocab.display()
    );
    let merges_text = std::fs::read_to_string(merges)
        .with_context(|| format!("cannot read {}", merges.display()))?;
    let merge_lines: Vec<&str> = merges_text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("#version"))
        .collect();

    // id -> (content, special), from tokenizer_config.json's added_tokens_decoder, then
    // added_tokens.json for ids it does not name.
    let mut added: std::collections::BTreeMap<u64, (String, bool)> = Default::default();
    let config = tokenizer_config
        .map(|p| read_json(p).map(|v| (p, v)))
        .transpose()?;
    if let Some((path, config)) = &config
        && let Some(decoder) = config
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
    {
        for (id, token) in decoder {
            let id: u64 = id.parse().with_context(|| {
                format!("{}: added token id {id:?} is not a number", path.display())
            })?;
            let content = token
                .get("content")
                .and_then(Value::as_str)
                .with_context(|| format!("{}: added token {id} has no content", path.display()))?;
            let special = token
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            added.insert(id, (content.to_string(), special));
        }
    }
    if let Some(path) = added_tokens {
        let map = read_json(path)?;
        let map = map
            .as_object()
            .with_context(|| format!("{} is not a token -> id map", path.display()))?;
        for (content, id) in map {
            let id = id
                .as_u64()
                .with_context(|| format!("{}: id of {content} is not a number", path.display()))?;
            added.entry(id).or_insert_with(|| (content.clone(), true));
        }
    }
    ensure!(
        !added.is_empty(),
        "no special tokens found: {} needs tokenizer_config.json (added_tokens_decoder) or \
         added_tokens.json beside it",
        vocab.display()
    );
    let added_tokens: Vec<Value> = added
        .into_iter()
        .map(|(id, (content, special))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": !special, "special": special})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                            "use_regex": false});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated",
             "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab_map,
                  "merges": merge_lines},
    });
    Ok(tokenizer.to_string())
}

const MAX_UTF8_BYTES: usize = 4;

/// Streaming detokenisation: text comes out as soon as it is complete, never half a UTF-8
/// character (a byte-level token can end inside one; the decoder then shows U+FFFD).
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    /// Ids not shown yet: the start of a character cut between tokens.
    pending: Vec<u32>,
}

impl TextStream {
    /// Adds a generated id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> anyhow::Result<Option<String>> {
        self.pending.push(id);
        let text = self
            .tokenizer
            .decode(&self.pending, true)
            .map_err(anyhow::Error::msg)?;
        // A character is at most 4 bytes and every token is at least one: past that, the
        // replacement character is invalid bytes for good, not a character still coming (holding
        // on would decode an ever longer tail on every token).
        if text.ends_with(char::REPLACEMENT_CHARACTER) && self.pending.len() < MAX_UTF8_BYTES {
            return Ok(None);
        }
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Whatever is still held back (an unfinished character at the very end).
    pub fn finish(&mut self) -> anyhow::Result<Option<String>> {
        let text = self
            .tokenizer
            .decode(&self.pending, true)
            .map_err(anyhow::Error::msg)?;
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }
}

/// Sampling settings given on the command line, over the checkpoint's generation config.
#[derive(Debug, Clone, Default)]
pub struct SamplingOverrides {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f32>,
    pub seed: u64,
}

/// How the Thinker picks tokens: greedy unless a temperature above zero is given or the
/// generation config samples; when sampling, unset values take the generation config's, then
/// Hugging Face's defaults (temperature 1, top-k 50, top-p 1).
pub fn sampling_options(
    generation: &GenerationConfig,
    overrides: &SamplingOverrides,
) -> SamplingOptions {
    let samples = match overrides.temperature {
        Some(t) => t > 0.0,
        None => generation.do_sample.unwrap_or(false),
    };
    let repetition_penalty = overrides
        .repetition_penalty
        .or(generation.repetition_penalty)
        .unwrap_or(1.0);
    if !samples {
        return SamplingOptions {
            repetition_penalty,
            seed: overrides.seed,
            ..SamplingOptions::greedy()
        };
    }
    SamplingOptions {
        temperature: overrides
            .temperature
            .or(generation.temperature)
            .unwrap_or(1.0),
        top_k: overrides.top_k.or(generation.top_k).unwrap_or(50),
        top_p: overrides.top_p.or(generation.top_p).unwrap_or(1.0),
        repetition_penalty,
        seed: overrides.seed,
    }
}

/// The answer of one turn.
#[derive(Debug, Clone)]
pub struct Reply {
    pub text: String,
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelFiles, crate::model::config::Config) {
        let files = ModelFiles::from_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny"),
        )
        .unwrap();
        let config = files.load_config().unwrap();
        (files, config)
    }

    #[test]
    fn template_inserts_the_default_system_prompt_and_expands_placeholders() {
        let (files, cfg) = tiny();
        let tok = ChatTokenizer::load(&files, &cfg.thinker_config).unwrap();
        let conv = Conversation {
            messages: vec![Message::new(
                Role::User,
                vec![Content::Audio { tokens: 3 }, Content::Text("Hi".into())],
            )],
        };
        let text = tok.render(&conv, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|>Hi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let prompt = tok.encode_conversation(&conv, true).unwrap();
        assert_eq!(prompt.media.audio_tokens, vec![3]);
        assert_eq!(prompt.positions.len(), prompt.ids.len());
    }

    #[test]
    fn streamed_text_never_splits_a_character() {
        let (files, cfg) = tiny();
        let tok = ChatTokenizer::load(&files, &cfg.thinker_config).unwrap();
        // The tiny vocabulary is byte-level with no merges: one id per UTF-8 byte.
        let text = "héllo ✓ 🙂";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        let mut stream = tok.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(delta) = stream.push(id).unwrap() {
                assert!(!delta.contains(char::REPLACEMENT_CHARACTER), "{delta:?}");
                out.push_str(&delta);
            }
        }
        assert_eq!(stream.finish().unwrap(), None);
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_are_shown_not_held_forever() {
        let (files, cfg) = tiny();
        let tok = ChatTokenizer::load(&files, &cfg.thinker_config).unwrap();
        // a lone continuation byte never completes a character (what a babbling model says)
        let stray = tok.encode("é").unwrap()[1];
        let mut stream = tok.stream();
        let mut shown = 0;
        for _ in 0..10 {
            if stream.push(stray).unwrap().is_some() {
                shown += 1;
            }
        }
        assert!(shown >= 2, "held back: {shown} deltas for 10 invalid bytes");
        assert!(stream.pending.len() < MAX_UTF8_BYTES);
    }

    #[test]
    fn vocab_and_merges_build_the_same_tokenizer() {
        let (files, cfg) = tiny();
        let reference = ChatTokenizer::load(&files, &cfg.thinker_config).unwrap();
        // Write the tiny tokenizer.json out as published Qwen checkpoints ship it.
        let dir = std::env::temp_dir().join(format!("omnicall-slowtok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(files.dir.join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                other => other
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect();
        std::fs::write(
            dir.join("merges.txt"),
            format!("#version: 0.2\n{}", merges.join("\n")),
        )
        .unwrap();
        let decoder: serde_json::Map<String, serde_json::Value> = json["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["id"].to_string(), t.clone()))
            .collect();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({ "added_tokens_decoder": decoder }).to_string(),
        )
        .unwrap();
        let slow = load_tokenizer(
            &TokenizerFiles::VocabMerges {
                vocab: dir.join("vocab.json"),
                merges: dir.join("merges.txt"),
                added_tokens: None,
            },
            Some(&dir.join("tokenizer_config.json")),
        )
        .unwrap();
        let slow = ChatTokenizer::new(slow, &cfg.thinker_config).unwrap();
        let conv = Conversation::new(
            DEFAULT_SYSTEM_PROMPT,
            vec![
                Content::Image {
                    grid: VisionGrid::new(1, 4, 4),
                },
                Content::Text("What's this? Ça va, 42 ✓\n\n  ok".into()),
            ],
        );
        assert_eq!(
            slow.encode_conversation(&conv, true).unwrap().ids,
            reference.encode_conversation(&conv, true).unwrap().ids
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sampling_defaults_follow_the_generation_config() {
        let greedy = sampling_options(&GenerationConfig::default(), &SamplingOverrides::default());
        assert!(greedy.is_greedy());
        let sampled = sampling_options(
            &GenerationConfig::default(),
            &SamplingOverrides {
                temperature: Some(0.7),
                top_p: Some(0.9),
                seed: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            (sampled.temperature, sampled.top_k, sampled.top_p),
            (0.7, 50, 0.9)
        );
        assert_eq!(sampled.seed, 3);
    }
}
