//! The Thinker: a Qwen2.5 decoder fed with text, audio and vision embeddings.
//!
//! [`Thinker`] holds `thinker.model.embed_tokens`, the decoder stack with its KV cache and
//! `thinker.lm_head`. A prompt is embedded ([`Thinker::embed_prompt`]: token embeddings with the
//! audio, image and video features scattered into their placeholder rows), run at its TMRoPE
//! positions ([`Thinker::forward`], appending to the cache), then decoded token by token at
//! `past_len + rope_delta` ([`Thinker::decode_step`], [`Thinker::generate`]). Every step also
//! yields the token's post-norm hidden state and input embedding, which the Talker consumes.

pub mod audio_encoder;
pub mod decoder;
pub mod rope;
pub mod vision_encoder;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::model::config::ThinkerConfig;
use crate::model::linear::{Linear, linear_no_bias};
use crate::model::sampling::{Sampler, SamplingOptions};

use decoder::{DecoderSpec, DecoderStack, SequenceRows, sequential_positions};

/// Encoder outputs to scatter into a prompt's placeholder rows, each (n, hidden) with the items
/// of that modality concatenated in prompt order.
#[derive(Debug, Clone, Default)]
pub struct MultimodalEmbeds {
    pub audio: Option<Tensor>,
    pub image: Option<Tensor>,
    pub video: Option<Tensor>,
}

/// Which rows of a forward pass get logits; the others skip the (vocab x hidden) head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct ThinkerOutput {
    /// (t, hidden) states after the final norm (what the Talker reads).
    pub hidden: Tensor,
    /// (rows, vocab) f32 logits of the rows asked for.
    pub logits: Option<Tensor>,
}

/// One decode step: the token fed, its embedding and hidden state, and the next-token logits.
#[derive(Debug, Clone)]
pub struct DecodeStep {
    /// (hidden,) input embedding of the token fed.
    pub embed: Tensor,
    /// (hidden,) post-norm hidden state at the token fed.
    pub hidden: Tensor,
    /// (vocab,) f32 logits for the next token.
    pub logits: Tensor,
}

/// One sequence's rows in a batched pass ([`Thinker::forward_batch`]).
#[derive(Debug)]
pub struct ThinkerRows<'a> {
    /// The session's context: a clone of the batch's Thinker whose cache the rows append to.
    pub context: &'a mut Thinker,
    /// (t, hidden) input rows.
    pub embeds: Tensor,
    /// (3, t) positions.
    pub positions: Tensor,
    pub logits: LogitsFor,
}

/// One session's token in a batched decode step ([`Thinker::decode_batch`]).
#[derive(Debug)]
pub struct ThinkerDecode<'a> {
    pub context: &'a mut Thinker,
    pub id: u32,
    pub rope_delta: i64,
}

impl DecodeStep {
    /// The decode step of a one-row forward pass (with its last logits) fed with `embed`
    /// (hidden,).
    pub fn from_output(embed: Tensor, out: ThinkerOutput) -> Result<Self> {
        let logits = match out.logits {
            Some(l) => l.squeeze(0)?,
            None => candle_core::bail!("decode step produced no logits"),
        };
        Ok(Self {
            embed,
            hidden: out.hidden.squeeze(0)?,
            logits,
        })
    }
}

/// A prompt ready to prefill.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The processor-expanded ids (for the repetition penalty history).
    pub ids: Vec<u32>,
    /// (L, hidden) input embeddings with the media features merged in.
    pub embeds: Tensor,
    /// (3, L) TMRoPE positions.
    pub positions: Tensor,
    /// Decode steps sit at `cache_len + rope_delta` on all three rows.
    pub rope_delta: i64,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Generation stops after emitting one of these.
    pub eos_token_ids: Vec<u32>,
    /// Ids that are never chosen.
    pub suppress_token_ids: Vec<u32>,
    /// Keep the logits that chose each token in [`Generation::step_logits`].
    pub keep_step_logits: bool,
}

impl GenerationOptions {
    /// Greedy decoding up to `max_new_tokens`, stopping at the config's EOS ids.
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingOptions::greedy(),
            eos_token_ids,
            suppress_token_ids: Vec::new(),
            keep_step_logits: false,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was generated (it is the last of `ids`).
    Eos,
    MaxTokens,
    /// The per-token callback asked to stop.
    Stopped,
}

/// What [`Thinker::generate`] produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the final EOS when there is one.
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    /// (L, hidden) post-norm hidden states of the prompt.
    pub prompt_hidden: Tensor,
    /// (n, hidden) post-norm hidden states at each generated token that was fed back (every
    /// generated id but the last: `ids[..n]`).
    pub token_hidden: Option<Tensor>,
    /// (n, hidden) input embeddings of the same tokens.
    pub token_embeds: Option<Tensor>,
    /// The (vocab,) f32 logits that chose each id, when asked for.
    pub step_logits: Vec<Tensor>,
}

/// A generated token as the per-token callback sees it.
#[derive(Debug, Clone, Copy)]
pub struct GeneratedToken {
    pub id: u32,
    /// 0 for the token chosen from the prompt's last logits.
    pub index: usize,
    pub is_eos: bool,
}

/// The Thinker language model: embeddings, decoder stack, LM head. A clone shares the weights
/// and starts from the same context, but its KV cache is its own (copied on first write).
#[derive(Debug, Clone)]
pub struct Thinker {
    embed_tokens: Embedding,
    decoder: DecoderStack,
    lm_head: Linear,
    audio_token_id: u32,
    image_token_id: u32,
    video_token_id: u32,
    eos_token_ids: Vec<u32>,
    hidden_size: usize,
    vocab_size: usize,
    device: Device,
}

impl Thinker {
    /// `vb` points at `thinker` (the checkpoint's `thinker.model.*` and `thinker.lm_head`); the
    /// head is tied to the embedding when the checkpoint has no `lm_head`.
    pub fn new(cfg: &ThinkerConfig, vb: VarBuilder) -> Result<Self> {
        let text = &cfg.text_config;
        let spec = DecoderSpec::from(text);
        let embed_tokens = candle_nn::embedding(
            text.vocab_size,
            text.hidden_size,
            vb.pp("model").pp("embed_tokens"),
        )?;
        let decoder = DecoderStack::new(&spec, vb.pp("model"))?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            linear_no_bias(text.hidden_size, text.vocab_size, vb.pp("lm_head"))?
        } else {
            Linear::new(embed_tokens.embeddings().clone(), None)
        };
        Ok(Self {
            embed_tokens,
            decoder,
            lm_head,
            audio_token_id: cfg.audio_token_index,
            image_token_id: cfg.image_token_index,
            video_token_id: cfg.video_token_index,
            eos_token_ids: cfg.eos_token_ids(),
            hidden_size: text.hidden_size,
            vocab_size: text.vocab_size,
            device: vb.device().clone(),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.decoder.dtype()
    }

    /// The ids that end a turn, from the config.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` is an audio, image or video placeholder (rows the Talker zeroes).
    pub fn is_media_placeholder(&self, id: u32) -> bool {
        id == self.audio_token_id || id == self.image_token_id || id == self.video_token_id
    }

    /// (L, hidden) token embeddings of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            candle_core::bail!(
                "token id {bad} is outside the Thinker's vocabulary of {}",
                self.vocab_size
            );
        }
        let ids = Tensor::new(ids, &self.device)?;
        self.embed_tokens.forward(&ids)
    }

    /// Replaces the placeholder rows of `embeds` (L, hidden) by the media features, in order:
    /// the k-th audio placeholder of `ids` gets row k of `features.audio`, and so on. The
    /// number of placeholders of each kind must equal the number of feature rows.
    pub fn merge_media(
        &self,
        ids: &[u32],
        embeds: &Tensor,
        features: &MultimodalEmbeds,
    ) -> Result<Tensor> {
        let (len, hidden) = embeds.dims2()?;
        if len != ids.len() {
            candle_core::bail!("{} embeddings for {} ids", len, ids.len());
        }
        let dtype = embeds.dtype();
        let mut sources = vec![embeds.clone()];
        let mut index: Vec<u32> = (0..len as u32).collect();
        let mut offset = len;
        for (name, token, feats) in [
            ("audio", self.audio_token_id, &features.audio),
            ("image", self.image_token_id, &features.image),
            ("video", self.video_token_id, &features.video),
        ] {
            let rows: Vec<usize> = (0..len).filter(|&i| ids[i] == token).collect();
            let n_feats = match feats {
                Some(f) => {
                    let (n, h) = f.dims2()?;
                    if h != hidden {
                        candle_core::bail!(
                            "{name} features are {h} wide but the Thinker's hidden size is {hidden}"
                        );
                    }
                    n
                }
                None => 0,
            };
            if rows.len() != n_feats {
                candle_core::bail!(
                    "the prompt has {} {name} placeholders (id {token}) but {n_feats} {name} \
                     feature rows were given",
                    rows.len()
                );
            }
            if let Some(f) = feats.as_ref().filter(|_| n_feats > 0) {
                for (k, &row) in rows.iter().enumerate() {
                    index[row] = (offset + k) as u32;
                }
                sources.push(f.to_device(&self.device)?.to_dtype(dtype)?);
                offset += n_feats;
            }
        }
        if sources.len() == 1 {
            return Ok(embeds.clone());
        }
        let all = Tensor::cat(&sources, 0)?;
        all.index_select(&Tensor::new(index.as_slice(), &self.device)?, 0)
    }

    /// Token embeddings of `ids` with the media features merged in: the prompt's input rows.
    pub fn embed_prompt(&self, ids: &[u32], features: &MultimodalEmbeds) -> Result<Tensor> {
        let embeds = self.embed(ids)?;
        self.merge_media(ids, &embeds, features)
    }

    /// Runs `embeds` (t, hidden) at `positions` (3, t) after what the cache holds, appending
    /// them to the cache.
    pub fn forward(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        logits: LogitsFor,
    ) -> Result<ThinkerOutput> {
        self.forward_inner(embeds, positions, logits, None)
    }

    /// Like [`Thinker::forward`], also returning each decoder layer's output (before the final
    /// norm), each (t, hidden).
    pub fn forward_with_layer_outputs(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        logits: LogitsFor,
    ) -> Result<(ThinkerOutput, Vec<Tensor>)> {
        let mut layers = Vec::new();
        let out = self.forward_inner(embeds, positions, logits, Some(&mut layers))?;
        let layers = layers
            .into_iter()
            .map(|l| l.squeeze(0))
            .collect::<Result<Vec<_>>>()?;
        Ok((out, layers))
    }

    fn forward_inner(
        &mut self,
        embeds: &Tensor,
        positions: &Tensor,
        logits: LogitsFor,
        layer_outputs: Option<&mut Vec<Tensor>>,
    ) -> Result<ThinkerOutput> {
        self.check_rows(embeds, positions, "")?;
        let x = embeds.to_dtype(self.dtype())?.unsqueeze(0)?;
        let hidden = self
            .decoder
            .forward_with_layer_outputs(&x, positions, layer_outputs)?
            .squeeze(0)?;
        let logits = self.logits_for(&[(&hidden, logits)])?.pop().flatten();
        Ok(ThinkerOutput { hidden, logits })
    }

    /// Checks that `embeds` (t, hidden) and `positions` (3, t) fit this Thinker; `what` names
    /// the sequence in the error.
    pub fn check_rows(&self, embeds: &Tensor, positions: &Tensor, what: &str) -> Result<usize> {
        let (t, hidden) = embeds.dims2()?;
        if hidden != self.hidden_size {
            candle_core::bail!(
                "{what}embeddings are {hidden} wide but the Thinker's hidden size is {}",
                self.hidden_size
            );
        }
        if positions.dims() != [3, t] {
            candle_core::bail!(
                "{what}positions have shape {:?}, expected (3, {t}) for {t} embeddings",
                positions.dims()
            );
        }
        Ok(t)
    }

    /// The logits each sequence asked for, from one LM-head product over all their rows.
    fn logits_for(&self, wanted: &[(&Tensor, LogitsFor)]) -> Result<Vec<Option<Tensor>>> {
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(wanted.len());
        for (hidden, which) in wanted {
            let t = hidden.dim(0)?;
            let picked = match which {
                LogitsFor::None => None,
                LogitsFor::Last => Some(hidden.narrow(0, t - 1, 1)?),
                LogitsFor::All => Some((*hidden).clone()),
            };
            counts.push(picked.as_ref().map(|p| p.dim(0)).transpose()?);
            rows.extend(picked);
        }
        if rows.is_empty() {
            return Ok(vec![None; wanted.len()]);
        }
        let all = if rows.len() == 1 {
            self.logits(&rows[0])?
        } else {
            self.logits(&Tensor::cat(&rows, 0)?)?
        };
        let mut start = 0;
        counts
            .into_iter()
            .map(|count| {
                count
                    .map(|n| {
                        let part = all.narrow(0, start, n);
                        start += n;
                        part
                    })
                    .transpose()
            })
            .collect()
    }

    /// One pass of this Thinker's weights over several sequences, each with its own context:
    /// decode steps of many sessions, and prefill chunks riding along (see
    /// [`DecoderStack::forward_batch`]). Each context must be a clone of this Thinker (the same
    /// weights); its cache gets the rows appended, this Thinker's own cache is not touched.
    /// The outputs equal each sequence's [`Thinker::forward`] alone.
    pub fn forward_batch(&self, sequences: &mut [ThinkerRows<'_>]) -> Result<Vec<ThinkerOutput>> {
        for (i, seq) in sequences.iter().enumerate() {
            if !self.decoder.shares_weights(&seq.context.decoder) {
                candle_core::bail!(
                    "batched pass: sequence {i}'s Thinker does not share this Thinker's weights \
                     (contexts must be clones of the batch's Thinker)"
                );
            }
            self.check_rows(&seq.embeds, &seq.positions, &format!("sequence {i}: "))?;
        }
        let mut rows: Vec<SequenceRows<'_>> = sequences
            .iter_mut()
            .map(|seq| SequenceRows {
                cache: seq.context.decoder.cache_mut(),
                embeds: seq.embeds.clone(),
                positions: seq.positions.clone(),
            })
            .collect();
        let hidden = self.decoder.forward_batch(&mut rows)?;
        let wanted: Vec<(&Tensor, LogitsFor)> = hidden
            .iter()
            .zip(sequences.iter())
            .map(|(h, seq)| (h, seq.logits))
            .collect();
        let logits = self.logits_for(&wanted)?;
        Ok(hidden
            .into_iter()
            .zip(logits)
            .map(|(hidden, logits)| ThinkerOutput { hidden, logits })
            .collect())
    }

    /// One decode step for each of several sessions in one pass: each feeds its token at its
    /// own `cache_len + rope_delta`. Equals [`Thinker::decode_step`] on each context alone.
    pub fn decode_batch(&self, steps: &mut [ThinkerDecode<'_>]) -> Result<Vec<DecodeStep>> {
        let ids: Vec<u32> = steps.iter().map(|s| s.id).collect();
        let embeds = self.embed(&ids)?;
        let mut sequences = steps
            .iter_mut()
            .enumerate()
            .map(|(i, step)| {
                let position = step.context.cache_len() as i64 + step.rope_delta;
                Ok(ThinkerRows {
                    embeds: embeds.narrow(0, i, 1)?,
                    positions: sequential_positions(position, 1, &self.device)?,
                    logits: LogitsFor::Last,
                    context: &mut *step.context,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = self.forward_batch(&mut sequences)?;
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, out)| DecodeStep::from_output(embeds.get(i)?, out))
            .collect()
    }

    /// (rows, vocab) f32 logits of post-norm hidden states (rows, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Feeds one token at position `cache_len + rope_delta` (all three rows).
    pub fn decode_step(&mut self, id: u32, rope_delta: i64) -> Result<DecodeStep> {
        let embed = self.embed(&[id])?;
        let position = self.cache_len() as i64 + rope_delta;
        let positions = sequential_positions(position, 1, &self.device)?;
        let out = self.forward(&embed, &positions, LogitsFor::Last)?;
        DecodeStep::from_output(embed.squeeze(0)?, out)
    }

    /// Prefills `prompt` (after whatever the cache holds) and generates until an EOS id, the
    /// token limit, or the callback's `Break`. `on_token` sees every id as soon as it is chosen.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerationOptions,
        mut on_token: impl FnMut(GeneratedToken) -> anyhow::Result<ControlFlow<()>>,
    ) -> anyhow::Result<Generation> {
        let prefill = self.forward(&prompt.embeds, &prompt.positions, LogitsFor::Last)?;
        let mut logits = match prefill.logits {
            Some(l) => l.squeeze(0)?,
            None => anyhow::bail!("prefill produced no logits"),
        };
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut history = prompt.ids.clone();
        let mut ids = Vec::new();
        let mut step_logits = Vec::new();
        let (mut hiddens, mut embeds) = (Vec::new(), Vec::new());
        let mut finish = FinishReason::MaxTokens;
        while ids.len() < options.max_new_tokens {
            let id = sampler.sample(&logits, &history, &options.suppress_token_ids)?;
            if options.keep_step_logits {
                step_logits.push(logits.clone());
            }
            let is_eos = options.eos_token_ids.contains(&id);
            let token = GeneratedToken {
                id,
                index: ids.len(),
                is_eos,
            };
            ids.push(id);
            history.push(id);
            let flow = on_token(token)?;
            if is_eos {
                finish = FinishReason::Eos;
                break;
            }
            if flow.is_break() {
                finish = FinishReason::Stopped;
                break;
            }
            if ids.len() == options.max_new_tokens {
                break;
            }
            let step = self.decode_step(id, prompt.rope_delta)?;
            hiddens.push(step.hidden);
            embeds.push(step.embed);
            logits = step.logits;
        }
        let stack = |rows: &[Tensor]| -> Result<Option<Tensor>> {
            if rows.is_empty() {
                Ok(None)
            } else {
                Tensor::stack(rows, 0).map(Some)
            }
        };
        Ok(Generation {
            ids,
            finish,
            prompt_hidden: prefill.hidden,
            token_hidden: stack(&hiddens)?,
            token_embeds: stack(&embeds)?,
            step_logits,
        })
    }

    /// Number of positions in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.decoder.cache_len()
    }

    /// Whether `other` is a clone of this Thinker (the very same weight tensors).
    pub fn shares_weights(&self, other: &Thinker) -> bool {
        self.decoder.shares_weights(&other.decoder)
    }

    /// Rolls the context back to its first `len` positions (barge-in drops the unheard reply).
    pub fn truncate_cache(&mut self, len: usize) {
        self.decoder.truncate_cache(len);
    }

    pub fn clear_cache(&mut self) {
        self.decoder.clear_cache();
    }

    /// Forgets cached positions `range`; the others keep their (absolute) positions, so decode
    /// steps must then pass a `rope_delta` that accounts for the removed entries.
    pub fn remove_cache_range(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        self.decoder.remove_cache_range(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Config;
    use candle_core::IndexOp;

    fn tiny() -> (Config, VarBuilder<'static>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let cfg =
            Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .unwrap();
        (cfg, vb)
    }

    #[test]
    fn merge_scatters_rows_in_order_and_checks_counts() -> Result<()> {
        let (cfg, vb) = tiny();
        let thinker = Thinker::new(&cfg.thinker_config, vb.pp("thinker"))?;
        let audio = cfg.thinker_config.audio_token_index;
        let h = thinker.hidden_size();
        let ids = [1, audio, 2, audio];
        let feats = Tensor::arange(0f32, (2 * h) as f32, &Device::Cpu)?.reshape((2, h))?;
        let merged = thinker.embed_prompt(
            &ids,
            &MultimodalEmbeds {
                audio: Some(feats.clone()),
                ..Default::default()
            },
        )?;
        let plain = thinker.embed(&ids)?;
        let row = |t: &Tensor, i: usize| t.i(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row(&merged, 0), row(&plain, 0));
        assert_eq!(row(&merged, 1), row(&feats, 0));
        assert_eq!(row(&merged, 2), row(&plain, 2));
        assert_eq!(row(&merged, 3), row(&feats, 1));
        let err = thinker
            .embed_prompt(&ids[..2], &MultimodalEmbeds::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 audio placeholders"), "{err}");
        Ok(())
    }

    #[test]
    fn cached_decoding_equals_a_full_forward() -> Result<()> {
        let (cfg, vb) = tiny();
        let mut thinker = Thinker::new(&cfg.thinker_config, vb.pp("thinker"))?;
        let ids: Vec<u32> = (10..22).collect();
        let embeds = thinker.embed(&ids)?;
        let full = thinker.forward(
            &embeds,
            &sequential_positions(0, ids.len(), &Device::Cpu)?,
            LogitsFor::All,
        )?;
        thinker.clear_cache();
        thinker.forward(
            &embeds.narrow(0, 0, 8)?,
            &sequential_positions(0, 8, &Device::Cpu)?,
            LogitsFor::None,
        )?;
        for (k, &id) in ids[8..].iter().enumerate() {
            let step = thinker.decode_step(id, 0)?;
            let want = full.logits.as_ref().unwrap().i(8 + k)?;
            let diff = (step.logits - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "step {k}: {diff}");
        }
        // Barge-in: roll back and continue from the same point.
        thinker.truncate_cache(9);
        let step = thinker.decode_step(ids[9], 0)?;
        let want = full.logits.as_ref().unwrap().i(9)?;
        let diff = (step.logits - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "after truncate: {diff}");
        Ok(())
    }
}
