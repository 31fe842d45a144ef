//! The Talker (`Qwen2_5OmniTalkerForConditionalGeneration`, at `talker`): a small Qwen2.5
//! decoder that turns the Thinker's reply, row by row, into codec ids (50 per second of speech).
//!
//! Dual-track input: every position sums a Thinker-width row (text track) and a codec
//! embedding (codec track, `talker.model.embed_tokens`, also Thinker width), then
//! `thinker_to_talker_proj` maps it to the Talker's width.
//! * prefill (L prompt positions + 2): rows 0..L-1 = the Thinker's prompt hidden state (after
//!   its final norm) + the prompt's input embeddings with audio/image/video rows zeroed, no
//!   codec part; row L = E_thinker(voice bos) + C(codec_pad); row L+1 = reply[0] + C(codec_bos);
//! * decode step: C(previous code) + the next reply row.
//!
//! Reply rows are `h_j + E(g_j)` for each Thinker token `g_j` fed back into the Thinker (its
//! final hidden state `h_j` at that step plus its input embedding), then E(tts_text_end) once,
//! then E(tts_text_pad) for every later step. The Thinker's last token (its EOS) is never fed
//! back, so it has no row: "the Thinker finished" is what switches to the end rows. One reply
//! row is consumed per codec id.
//!
//! [`TalkerTurn`] is that state machine for a Talker running on its own thread: reply rows are
//! pushed as the Thinker produces them, [`TalkerTurn::step`] yields one codec id when the row
//! it needs is there ([`TalkerStep::NeedText`] otherwise), and stops at codec_pad / codec_end.
//! A Talker thread fed by a channel of [`TalkerText`] messages:
//!
//! ```ignore
//! let mut turn = TalkerTurn::new(&talker, prompt, text_rows, options)?;
//! loop {
//!     match turn.step(&mut talker)? {
//!         TalkerStep::Code(code) => codes_tx.send(code)?,
//!         // Blocks until the Thinker has produced the next row (or finished).
//!         TalkerStep::NeedText => turn.feed(text_rx.recv()?)?,
//!         TalkerStep::Finished(_) => break,
//!     }
//!     // Rows that arrived meanwhile are queued without waiting.
//!     while let Ok(text) = text_rx.try_recv() {
//!         turn.feed(text)?;
//!     }
//! }
//! ```

use std::collections::VecDeque;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use crate::model::config::{TalkerConfig, ThinkerConfig};
use crate::model::linear::{Linear, linear, linear_no_bias};
use crate::model::sampling::{Sampler, SamplingOptions};
use crate::model::thinker::decoder::{
    DecoderSpec, DecoderStack, SequenceRows, sequential_positions,
};

/// The Talker network: projection, codec embedding, decoder stack, codec head.
#[derive(Debug, Clone)]
pub struct Talker {
    thinker_to_talker_proj: Linear,
    embed_tokens: Embedding,
    model: DecoderStack,
    codec_head: Linear,
    cfg: TalkerConfig,
    device: Device,
    dtype: DType,
}

impl Talker {
    /// `vb` at `talker`.
    pub fn new(cfg: &TalkerConfig, vb: VarBuilder) -> Result<Self> {
        let spec = DecoderSpec::from(cfg);
        if spec.num_key_value_heads == 0
            || !spec
                .num_attention_heads
                .is_multiple_of(spec.num_key_value_heads)
        {
            candle_core::bail!(
                "talker config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                spec.num_attention_heads,
                spec.num_key_value_heads
            );
        }
        for (name, id) in [
            ("tts_codec_start_token_id", cfg.tts_codec_start_token_id),
            ("tts_codec_end_token_id", cfg.tts_codec_end_token_id),
            ("tts_codec_pad_token_id", cfg.tts_codec_pad_token_id),
            ("tts_codec_mask_token_id", cfg.tts_codec_mask_token_id),
        ] {
            if id as usize >= cfg.vocab_size {
                candle_core::bail!(
                    "talker config: {name} {id} is outside the codec vocabulary ({})",
                    cfg.vocab_size
                );
            }
        }
        let model_vb = vb.pp("model");
        Ok(Self {
            thinker_to_talker_proj: linear(
                cfg.embedding_size,
                cfg.hidden_size,
                vb.pp("thinker_to_talker_proj"),
            )?,
            embed_tokens: embedding(
                cfg.vocab_size,
                cfg.embedding_size,
                model_vb.pp("embed_tokens"),
            )?,
            model: DecoderStack::new(&spec, model_vb)?,
            codec_head: linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("codec_head"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &TalkerConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Codec embeddings (Thinker width) of `ids`, any shape.
    pub fn embed_codes(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?;
        self.embed_tokens.forward(&ids)
    }

    /// Checks a Thinker-width row block and brings it to the Talker's device and dtype:
    /// `[E]`, `[T, E]` or `[1, T, E]` -> `[1, T, E]`.
    fn thinker_rows(&self, rows: &Tensor, what: &str) -> Result<Tensor> {
        let rows = match rows.rank() {
            1 => rows.unsqueeze(0)?.unsqueeze(0)?,
            2 => rows.unsqueeze(0)?,
            3 if rows.dim(0)? == 1 => rows.clone(),
            _ => candle_core::bail!(
                "talker: {what} must be [E], [T, E] or [1, T, E], got {:?}",
                rows.dims()
            ),
        };
        if rows.dim(2)? != self.cfg.embedding_size {
            candle_core::bail!(
                "talker: {what} has width {}, the Thinker's hidden size (embedding_size) is {}",
                rows.dim(2)?,
                self.cfg.embedding_size
            );
        }
        rows.to_device(&self.device)?.to_dtype(self.dtype)
    }

    /// What `thinker_to_talker_proj` receives at prefill: `prompt` `[L, E]` (text track of the
    /// prompt), then E_thinker(voice bos) + C(codec_pad), then `first_reply` + C(codec_bos).
    /// Returns `[1, L + 2, E]`.
    pub fn prefill_input(
        &self,
        prompt: &Tensor,
        speaker_bos: &Tensor,
        first_reply: &Tensor,
    ) -> Result<Tensor> {
        let prompt = self.thinker_rows(prompt, "prompt rows")?;
        let tail = self.prefill_tail_input(speaker_bos, first_reply)?;
        Tensor::cat(&[prompt, tail], 1)
    }

    /// The last two rows of the prefill: E_thinker(voice bos) + C(codec_pad), then
    /// `first_reply` + C(codec_bos). Returns `[1, 2, E]`.
    pub fn prefill_tail_input(&self, speaker_bos: &Tensor, first_reply: &Tensor) -> Result<Tensor> {
        let codec = self.embed_codes(&[
            self.cfg.tts_codec_pad_token_id,
            self.cfg.tts_codec_start_token_id,
        ])?; // [2, E]
        Tensor::cat(
            &[
                self.thinker_rows(speaker_bos, "speaker bos row")?,
                self.thinker_rows(first_reply, "reply row")?,
            ],
            1,
        )?
        .broadcast_add(&codec.unsqueeze(0)?)
    }

    /// Runs Thinker-width input rows `[1, T, E]` at `positions` `[3, T]` (or `[3, 1, T]`) after
    /// what the cache holds; returns the final hidden states `[1, T, hidden]`.
    pub fn forward(&mut self, input: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let positions = self.check_positions(input, positions)?;
        let x = self
            .thinker_to_talker_proj
            .forward(&input.to_dtype(self.dtype)?)?;
        self.model.forward(&x, &positions)
    }

    /// `positions` as `[3, T]` on this Talker's device, checked against `input` `[1, T, E]`.
    pub fn check_positions(&self, input: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let t = input.dim(1)?;
        let positions = match positions.rank() {
            3 if positions.dim(1)? == 1 => positions.squeeze(1)?,
            _ => positions.clone(),
        };
        if positions.dims() != [3, t] {
            candle_core::bail!(
                "talker: positions must be [3, {t}] (or [3, 1, {t}]), got {:?}",
                positions.dims()
            );
        }
        positions.to_device(&self.device)
    }

    /// One pass of this Talker's weights over several sessions' rows, each context (a clone
    /// of this Talker) appending to its own cache; the projection, the decoder's linear layers
    /// and the codec head run once on the stacked rows. Returns each sequence's hidden states
    /// `[1, T, hidden]` and the f32 codec logits `[vocab]` of its last row, equal to
    /// [`Talker::forward`] and [`Talker::logits`] on each alone.
    pub fn forward_batch(&self, sequences: &mut [TalkerRows<'_>]) -> Result<Vec<(Tensor, Tensor)>> {
        let mut inputs = Vec::with_capacity(sequences.len());
        let mut positions = Vec::with_capacity(sequences.len());
        for (i, seq) in sequences.iter().enumerate() {
            if !self.model.shares_weights(&seq.context.model) {
                candle_core::bail!(
                    "talker: batched sequence {i}'s Talker does not share this Talker's weights \
                     (contexts must be clones of the batch's Talker)"
                );
            }
            if seq.input.rank() != 3 || seq.input.dim(0)? != 1 {
                candle_core::bail!(
                    "talker: batched sequence {i}'s input must be [1, T, E], got {:?}",
                    seq.input.dims()
                );
            }
            positions.push(self.check_positions(&seq.input, &seq.positions)?);
            inputs.push(seq.input.squeeze(0)?.to_dtype(self.dtype)?);
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let projected = self
            .thinker_to_talker_proj
            .forward(&Tensor::cat(&inputs, 0)?)?;
        let mut start = 0;
        let mut rows = Vec::with_capacity(sequences.len());
        for ((seq, input), positions) in sequences.iter_mut().zip(&inputs).zip(positions) {
            let t = input.dim(0)?;
            rows.push(SequenceRows {
                cache: seq.context.model.cache_mut(),
                embeds: projected.narrow(0, start, t)?,
                positions,
            });
            start += t;
        }
        let hidden = self.model.forward_batch(&mut rows)?;
        let last: Vec<Tensor> = hidden
            .iter()
            .map(|h| h.narrow(0, h.dim(0)? - 1, 1))
            .collect::<Result<_>>()?;
        let logits = self.logits(&Tensor::cat(&last, 0)?)?;
        hidden
            .into_iter()
            .enumerate()
            .map(|(i, h)| Ok((h.unsqueeze(0)?, logits.get(i)?)))
            .collect()
    }

    /// Gets the cache ready for a planned step: cleared for a whole prefill, checked for one
    /// after a cached prompt.
    pub fn prepare_cache(&mut self, step: &TalkerForward) -> Result<()> {
        if step.restart {
            self.clear_cache();
        }
        if let Some(len) = step.cached_len
            && self.cache_len() != len
        {
            candle_core::bail!(
                "talker: the cache holds {} rows, the turn expects its {len} prompt rows",
                self.cache_len()
            );
        }
        Ok(())
    }

    /// Codec logits (f32) of hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.codec_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Positions held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.model.cache_len()
    }

    /// Whether `other` is a clone of this Talker (the very same weight tensors).
    pub fn shares_weights(&self, other: &Talker) -> bool {
        self.model.shares_weights(&other.model)
    }

    pub fn clear_cache(&mut self) {
        self.model.clear_cache()
    }

    /// Rolls the context back to its first `len` positions.
    pub fn truncate_cache(&mut self, len: usize) {
        self.model.truncate_cache(len)
    }

    /// Forgets cached positions `range` (see [`DecoderStack::remove_cache_range`]).
    pub fn remove_cache_range(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        self.model.remove_cache_range(range)
    }
}

/// The audio, image and video placeholder ids of a prompt, whose input-embedding rows the
/// Talker's prompt does not see.
pub fn multimodal_placeholder_ids(thinker: &ThinkerConfig) -> [u32; 3] {
    [
        thinker.audio_token_index,
        thinker.image_token_index,
        thinker.video_token_index,
    ]
}

/// The text track of the prompt: `hidden` (the Thinker's prompt hidden state after its final
/// norm) + `embeds` (the prompt's input embeddings after the multimodal scatter) with the rows
/// of `placeholder_ids` zeroed. `hidden`, `embeds`: `[L, E]` or `[1, L, E]`; returns `[L, E]`.
pub fn prompt_rows(
    hidden: &Tensor,
    embeds: &Tensor,
    input_ids: &[u32],
    placeholder_ids: &[u32],
) -> Result<Tensor> {
    let flat = |t: &Tensor| -> Result<Tensor> {
        match t.rank() {
            3 if t.dim(0)? == 1 => t.squeeze(0),
            2 => Ok(t.clone()),
            _ => candle_core::bail!(
                "talker prompt: expected [L, E] or [1, L, E], got {:?}",
                t.dims()
            ),
        }
    };
    let (hidden, embeds) = (flat(hidden)?, flat(embeds)?);
    let l = hidden.dim(0)?;
    if embeds.dims() != hidden.dims() || input_ids.len() != l {
        candle_core::bail!(
            "talker prompt: hidden {:?}, embeddings {:?} and {} ids must cover the same positions",
            hidden.dims(),
            embeds.dims(),
            input_ids.len()
        );
    }
    let keep: Vec<f32> = input_ids
        .iter()
        .map(|id| {
            if placeholder_ids.contains(id) {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let keep = Tensor::from_vec(keep, (l, 1), embeds.device())?.to_dtype(embeds.dtype())?;
    hidden + embeds.broadcast_mul(&keep)?
}

/// The Thinker-embedding rows the Talker needs besides the reply: the voice's bos token, and
/// the text end / text pad tokens that follow the reply. Each `[E]`.
#[derive(Debug, Clone)]
pub struct TalkerTextRows {
    pub speaker_bos: Tensor,
    pub text_end: Tensor,
    pub text_pad: Tensor,
}

impl TalkerTextRows {
    /// Embeds the ids with the Thinker's token embedding `embed` (id -> `[E]` or `[1, E]`).
    pub fn from_thinker_embedding(
        cfg: &TalkerConfig,
        voice_bos_token: u32,
        mut embed: impl FnMut(u32) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut row = |id: u32| -> Result<Tensor> { embed(id)?.flatten_all() };
        Ok(Self {
            speaker_bos: row(voice_bos_token)?,
            text_end: row(cfg.tts_text_end_token_id)?,
            text_pad: row(cfg.tts_text_pad_token_id)?,
        })
    }
}

/// Everything the Talker's prefill needs from the Thinker's prompt.
#[derive(Debug, Clone)]
pub struct TalkerPrompt {
    /// `[L, E]` from [`prompt_rows`].
    pub rows: Tensor,
    /// `[3, L + 2]` TMRoPE positions of the prefill: `get_rope_index` with the Talker's config
    /// on the text track (prompt ids, voice bos token, first reply token).
    pub positions: Tensor,
    /// Decode positions are `past_len + rope_delta` on all three rows.
    pub rope_delta: i64,
}

/// How codec ids are chosen and when speech stops.
#[derive(Debug, Clone, PartialEq)]
pub struct TalkerOptions {
    pub sampling: SamplingOptions,
    /// Stop after this many codes (the reference's `max_new_tokens`, 4096).
    pub max_codes: usize,
    /// Codec-embedding rows of the DiT (`num_embeds + 1`): every id from there on, except the
    /// end ids, is masked as vllm-omni does, since token2wav could not render it.
    pub dit_codec_rows: Option<usize>,
}

impl TalkerOptions {
    /// The reference's talker defaults (sampled), with the DiT's codec rows from `num_embeds`.
    pub fn reference(seed: u64, dit_num_embeds: usize) -> Self {
        Self {
            sampling: SamplingOptions::talker_default(seed),
            max_codes: 4096,
            dit_codec_rows: Some(dit_num_embeds + 1),
        }
    }
}

/// What the Thinker sends the Talker during a turn.
#[derive(Debug, Clone)]
pub enum TalkerText {
    /// A Thinker token fed back into the Thinker: its final hidden state (after the final norm)
    /// and its input embedding, each `[E]` or `[1, E]`.
    Reply { hidden: Tensor, embedding: Tensor },
    /// The Thinker's turn is over (EOS or its token limit): no more replies.
    Finished,
}

/// Why a turn's speech ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TalkerFinish {
    /// The Talker chose codec_pad or codec_end (not emitted).
    EndCode(u32),
    /// `max_codes` codes were emitted.
    Limit,
    /// The Thinker finished without a single reply row: nothing to say.
    NoText,
}

/// The outcome of one [`TalkerTurn::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TalkerStep {
    /// The next codec id for token2wav.
    Code(u32),
    /// The next step needs a reply row the Thinker has not produced yet.
    NeedText,
    /// Speech ended; every later step answers the same.
    Finished(TalkerFinish),
}

/// What the first step of a turn runs.
#[derive(Debug, Clone)]
enum Prefill {
    /// The whole prompt and the two rows after it, on a cleared cache.
    Whole(TalkerPrompt),
    /// The cache already holds the `len` prompt rows: only the two rows after them run, at
    /// `positions` `[3, 2]`.
    AfterCache { len: usize, positions: Tensor },
}

/// One spoken answer: the Talker's decoding state, fed reply rows as they come.
pub struct TalkerTurn {
    prefill: Option<Prefill>,
    text_rows: TalkerTextRows,
    pending: VecDeque<Tensor>,
    thinker_done: bool,
    text_end_sent: bool,
    /// Distinct ids of the codec track so far (input ids, then codes): the repetition history.
    history: Vec<u32>,
    codes: Vec<u32>,
    past_len: usize,
    rope_delta: i64,
    sampler: Sampler,
    suppress: Vec<u32>,
    stop: [u32; 2],
    max_codes: usize,
    finished: Option<TalkerFinish>,
    last_logits: Option<Tensor>,
}

impl std::fmt::Debug for TalkerTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TalkerTurn")
            .field("prefilled", &self.prefill.is_none())
            .field("pending_rows", &self.pending.len())
            .field("thinker_done", &self.thinker_done)
            .field("codes", &self.codes.len())
            .field("past_len", &self.past_len)
            .field("finished", &self.finished)
            .finish()
    }
}

impl TalkerTurn {
    /// Starts a turn; nothing runs until the first reply row arrives (the prefill needs it).
    pub fn new(
        talker: &Talker,
        prompt: TalkerPrompt,
        text_rows: TalkerTextRows,
        options: TalkerOptions,
    ) -> Result<Self> {
        let l = prompt.rows.dim(prompt.rows.rank().saturating_sub(2))?;
        let pos_len = prompt.positions.dim(D::Minus1)?;
        if pos_len != l + 2 {
            candle_core::bail!(
                "talker: {} prefill positions for {l} prompt rows (needs L + 2 = {})",
                pos_len,
                l + 2
            );
        }
        let rope_delta = prompt.rope_delta;
        Self::start(
            talker,
            Prefill::Whole(prompt),
            l,
            rope_delta,
            text_rows,
            options,
        )
    }

    /// Starts a turn on a Talker whose cache already holds the `cached_len` prompt rows (a
    /// conversation mirrored into the Talker as the Thinker prefilled it): the first step runs
    /// only the voice bos row and the first reply row, at `tail_positions` (`[3, 2]`: the
    /// `get_rope_index` positions of those two rows). Decode steps sit at
    /// `cache_len + rope_delta`. The codes equal those of [`TalkerTurn::new`] on the same
    /// prompt rows and positions.
    pub fn after_cached_prompt(
        talker: &Talker,
        cached_len: usize,
        tail_positions: Tensor,
        rope_delta: i64,
        text_rows: TalkerTextRows,
        options: TalkerOptions,
    ) -> Result<Self> {
        let positions = match tail_positions.rank() {
            3 if tail_positions.dim(1)? == 1 => tail_positions.squeeze(1)?,
            _ => tail_positions,
        };
        if positions.dims() != [3, 2] {
            candle_core::bail!(
                "talker: the two rows after a cached prompt need [3, 2] positions, got {:?}",
                positions.dims()
            );
        }
        let prefill = Prefill::AfterCache {
            len: cached_len,
            positions,
        };
        Self::start(talker, prefill, cached_len, rope_delta, text_rows, options)
    }

    fn start(
        talker: &Talker,
        prefill: Prefill,
        l: usize,
        rope_delta: i64,
        text_rows: TalkerTextRows,
        options: TalkerOptions,
    ) -> Result<Self> {
        let cfg = talker.config();
        if options.max_codes == 0 {
            candle_core::bail!("talker: max_codes must be at least 1");
        }
        let stop = [cfg.tts_codec_pad_token_id, cfg.tts_codec_end_token_id];
        let mut suppress = vec![cfg.tts_codec_start_token_id];
        if let Some(rows) = options.dit_codec_rows {
            suppress.extend((rows as u32..cfg.vocab_size as u32).filter(|id| !stop.contains(id)));
        }
        let mut history = vec![cfg.tts_codec_mask_token_id];
        for id in [cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id] {
            if !history.contains(&id) {
                history.push(id);
            }
        }
        if l == 0 {
            // The reference's input ids are L masks then pad, bos: no mask without a prompt.
            history.retain(|&id| id != cfg.tts_codec_mask_token_id);
        }
        Ok(Self {
            rope_delta,
            prefill: Some(prefill),
            text_rows,
            pending: VecDeque::new(),
            thinker_done: false,
            text_end_sent: false,
            history,
            codes: Vec::new(),
            past_len: 0,
            sampler: Sampler::new(options.sampling),
            suppress,
            stop,
            max_codes: options.max_codes,
            finished: None,
            last_logits: None,
        })
    }

    /// Queues the reply row of one Thinker token fed back into the Thinker: its final hidden
    /// state plus its input embedding (each `[E]` or `[1, E]`).
    pub fn push_reply(&mut self, hidden: &Tensor, embedding: &Tensor) -> Result<()> {
        self.push_reply_row((hidden.flatten_all()? + embedding.flatten_all()?)?)
    }

    /// Queues a ready-made reply row `h_j + E(g_j)`.
    pub fn push_reply_row(&mut self, row: Tensor) -> Result<()> {
        if self.thinker_done {
            candle_core::bail!("talker: a reply row arrived after the Thinker finished");
        }
        self.pending.push_back(row.flatten_all()?);
        Ok(())
    }

    /// Takes one message of the Thinker.
    pub fn feed(&mut self, text: TalkerText) -> Result<()> {
        match text {
            TalkerText::Reply { hidden, embedding } => self.push_reply(&hidden, &embedding),
            TalkerText::Finished => {
                self.finish_text();
                Ok(())
            }
        }
    }

    /// The Thinker will send no more rows: after the queued ones come text end, then text pad.
    pub fn finish_text(&mut self) {
        self.thinker_done = true;
    }

    /// Codes emitted so far.
    pub fn codes(&self) -> &[u32] {
        &self.codes
    }

    /// Reply rows queued and not yet consumed.
    pub fn pending_rows(&self) -> usize {
        self.pending.len()
    }

    /// The ids the repetition penalty of the next step applies to.
    pub fn repetition_history(&self) -> &[u32] {
        &self.history
    }

    /// Raw codec logits `[vocab]` of the last forward (before penalties and masks).
    pub fn last_logits(&self) -> Option<&Tensor> {
        self.last_logits.as_ref()
    }

    pub fn finished(&self) -> Option<TalkerFinish> {
        self.finished
    }

    /// The text-track row of the next decode step, if it is known yet.
    fn next_row(&mut self) -> Option<Tensor> {
        if let Some(row) = self.pending.pop_front() {
            return Some(row);
        }
        if !self.thinker_done {
            return None;
        }
        if self.text_end_sent {
            Some(self.text_rows.text_pad.clone())
        } else {
            self.text_end_sent = true;
            Some(self.text_rows.text_end.clone())
        }
    }

    /// Runs one Talker step if its input is known: the prefill (with the first reply row), or
    /// a decode step (previous code + next reply row).
    pub fn step(&mut self, talker: &mut Talker) -> Result<TalkerStep> {
        let forward = match self.plan(talker)? {
            TalkerPlan::Forward(forward) => forward,
            TalkerPlan::NeedText => return Ok(TalkerStep::NeedText),
            TalkerPlan::Finished(reason) => return Ok(TalkerStep::Finished(reason)),
        };
        talker.prepare_cache(&forward)?;
        let hidden = talker.forward(&forward.input, &forward.positions)?;
        let t = hidden.dim(1)?;
        let logits = talker.logits(&hidden.narrow(1, t - 1, 1)?)?.flatten_all()?; // [vocab]
        self.accept(logits)
    }

    /// The first half of a step: what the network must run next, if its input is known. A
    /// [`TalkerPlan::Forward`] must be run (on this turn's Talker, alone or batched) and its
    /// logits given to [`TalkerTurn::accept`] before the next plan.
    pub fn plan(&mut self, talker: &Talker) -> Result<TalkerPlan> {
        if let Some(reason) = self.finished {
            return Ok(TalkerPlan::Finished(reason));
        }
        if let Some(prefill) = self.prefill.as_ref() {
            let Some(first) = self.pending.pop_front() else {
                if self.thinker_done {
                    self.finished = Some(TalkerFinish::NoText);
                    return Ok(TalkerPlan::Finished(TalkerFinish::NoText));
                }
                return Ok(TalkerPlan::NeedText);
            };
            let speaker_bos = &self.text_rows.speaker_bos;
            let forward = match prefill {
                Prefill::Whole(prompt) => TalkerForward {
                    input: talker.prefill_input(&prompt.rows, speaker_bos, &first)?,
                    positions: prompt.positions.clone(),
                    restart: true,
                    cached_len: None,
                },
                Prefill::AfterCache { len, positions } => TalkerForward {
                    input: talker.prefill_tail_input(speaker_bos, &first)?,
                    positions: positions.clone(),
                    restart: false,
                    cached_len: Some(*len),
                },
            };
            // After the prefill the cache holds what it held (nothing for a whole prefill)
            // plus these rows.
            self.past_len = forward.cached_len.unwrap_or(0) + forward.input.dim(1)?;
            self.prefill = None;
            return Ok(TalkerPlan::Forward(forward));
        }
        let Some(row) = self.next_row() else {
            return Ok(TalkerPlan::NeedText);
        };
        let previous = *self
            .codes
            .last()
            .expect("a decode step follows an emitted code");
        let codec = talker.embed_codes(&[previous])?; // [1, E]
        let row = talker.thinker_rows(&row, "reply row")?; // [1, 1, E]
        let input = row.broadcast_add(&codec.unsqueeze(0)?)?;
        let start = self.past_len as i64 + self.rope_delta;
        let positions = sequential_positions(start, 1, talker.device())?;
        self.past_len += 1;
        Ok(TalkerPlan::Forward(TalkerForward {
            input,
            positions,
            restart: false,
            cached_len: None,
        }))
    }

    /// The second half of a step: chooses the code from the planned forward's raw codec
    /// logits `[vocab]` (of its last row).
    pub fn accept(&mut self, logits: Tensor) -> Result<TalkerStep> {
        let code = self
            .sampler
            .sample(&logits, &self.history, &self.suppress)?;
        self.last_logits = Some(logits);
        if self.stop.contains(&code) {
            self.finished = Some(TalkerFinish::EndCode(code));
            return Ok(TalkerStep::Finished(TalkerFinish::EndCode(code)));
        }
        if !self.history.contains(&code) {
            self.history.push(code);
        }
        self.codes.push(code);
        if self.codes.len() >= self.max_codes {
            self.finished = Some(TalkerFinish::Limit);
        }
        Ok(TalkerStep::Code(code))
    }
}

/// What a turn's next step needs from the network ([`TalkerTurn::plan`]).
#[derive(Debug, Clone)]
pub enum TalkerPlan {
    Forward(TalkerForward),
    NeedText,
    Finished(TalkerFinish),
}

/// One planned forward pass of a turn: Thinker-width rows and their positions.
#[derive(Debug, Clone)]
pub struct TalkerForward {
    /// `[1, T, E]` input rows.
    pub input: Tensor,
    /// `[3, T]` positions.
    pub positions: Tensor,
    /// A whole prefill: the cache is cleared first.
    pub restart: bool,
    /// After a cached prompt: the cache must hold exactly this many rows.
    pub cached_len: Option<usize>,
}

/// One session's rows in a batched Talker pass ([`Talker::forward_batch`]).
#[derive(Debug)]
pub struct TalkerRows<'a> {
    /// The session's Talker: a clone of the batch's, whose cache the rows append to.
    pub context: &'a mut Talker,
    /// `[1, T, E]` Thinker-width input rows.
    pub input: Tensor,
    /// `[3, T]` positions.
    pub positions: Tensor,
}

/// One step of several turns, each on its own Talker context, in one batched pass of
/// `weights`: turns waiting for text or finished answer as [`TalkerTurn::step`] would, the
/// others run together. Equals stepping each turn alone.
pub fn step_batch(
    weights: &Talker,
    turns: &mut [(&mut TalkerTurn, &mut Talker)],
) -> Result<Vec<TalkerStep>> {
    let mut steps = vec![TalkerStep::NeedText; turns.len()];
    let mut running = Vec::new();
    let mut rows = Vec::new();
    for (i, (turn, context)) in turns.iter_mut().enumerate() {
        match turn.plan(weights)? {
            TalkerPlan::Forward(forward) => {
                context.prepare_cache(&forward)?;
                running.push(i);
                rows.push(TalkerRows {
                    context,
                    input: forward.input,
                    positions: forward.positions,
                });
            }
            TalkerPlan::NeedText => steps[i] = TalkerStep::NeedText,
            TalkerPlan::Finished(reason) => steps[i] = TalkerStep::Finished(reason),
        }
    }
    let outputs = weights.forward_batch(&mut rows)?;
    drop(rows);
    for (i, (_, logits)) in running.into_iter().zip(outputs) {
        steps[i] = turns[i].0.accept(logits)?;
    }
    Ok(steps)
}

/// A whole spoken answer at once, when the Thinker has already finished (offline use such as
/// writing a reply to a file): every reply row is queued, then the turn runs to its end.
/// Returns the codes and why they ended.
pub fn generate_codes(
    talker: &mut Talker,
    prompt: TalkerPrompt,
    text_rows: TalkerTextRows,
    reply_rows: &[Tensor],
    options: TalkerOptions,
) -> Result<(Vec<u32>, TalkerFinish)> {
    let mut turn = TalkerTurn::new(talker, prompt, text_rows, options)?;
    for row in reply_rows {
        turn.push_reply_row(row.clone())?;
    }
    turn.finish_text();
    loop {
        match turn.step(talker)? {
            TalkerStep::Code(_) => {}
            TalkerStep::Finished(reason) => return Ok((turn.codes, reason)),
            TalkerStep::NeedText => {
                candle_core::bail!("talker: asked for text after the Thinker finished")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Config;

    fn tiny() -> (Config, Talker) {
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
        let talker = Talker::new(&cfg.talker_config, vb.pp("talker")).unwrap();
        (cfg, talker)
    }

    fn rows(n: usize, width: usize, seed: f64) -> Tensor {
        let v: Vec<f32> = (0..n * width)
            .map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32)
            .collect();
        Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
    }

    fn turn(cfg: &Config, talker: &Talker, prompt_len: usize, max_codes: usize) -> TalkerTurn {
        let e = cfg.talker_config.embedding_size;
        let positions = sequential_positions(0, prompt_len + 2, &Device::Cpu).unwrap();
        let text = TalkerTextRows {
            speaker_bos: rows(1, e, 1.0).squeeze(0).unwrap(),
            text_end: rows(1, e, 2.0).squeeze(0).unwrap(),
            text_pad: rows(1, e, 3.0).squeeze(0).unwrap(),
        };
        TalkerTurn::new(
            talker,
            TalkerPrompt {
                rows: rows(prompt_len, e, 0.0),
                positions,
                rope_delta: 0,
            },
            text,
            TalkerOptions {
                sampling: SamplingOptions::greedy(),
                max_codes,
                dit_codec_rows: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn steps_wait_for_text_and_end_after_the_limit() -> Result<()> {
        let (cfg, mut talker) = tiny();
        let e = cfg.talker_config.embedding_size;
        let (prompt_len, max_codes) = (5, 3);
        let mut t = turn(&cfg, &talker, prompt_len, max_codes);
        assert_eq!(t.step(&mut talker)?, TalkerStep::NeedText);
        t.push_reply_row(rows(1, e, 4.0))?;
        let mut forwards = 1;
        if let TalkerStep::Code(_) = t.step(&mut talker)? {
            // No second row yet and the Thinker is still running.
            assert_eq!(t.step(&mut talker)?, TalkerStep::NeedText);
            t.finish_text();
            assert!(t.push_reply_row(rows(1, e, 5.0)).is_err());
            loop {
                let before = t.finished();
                let step = t.step(&mut talker)?;
                if before.is_none() {
                    forwards += 1;
                }
                if let TalkerStep::Finished(_) = step {
                    break;
                }
            }
        }
        let finish = t.finished().expect("finished");
        assert!(t.codes().len() <= max_codes);
        if finish == TalkerFinish::Limit {
            assert_eq!(t.codes().len(), max_codes);
            forwards = max_codes;
        }
        assert_eq!(talker.cache_len(), prompt_len + 2 + forwards - 1);
        Ok(())
    }

    #[test]
    fn offline_generation_equals_row_by_row_streaming() -> Result<()> {
        let (cfg, mut talker) = tiny();
        let e = cfg.talker_config.embedding_size;
        let replies: Vec<Tensor> = (0..4).map(|i| rows(1, e, 10.0 + i as f64)).collect();
        let mut t = turn(&cfg, &talker, 6, 12);
        let mut next = replies.iter();
        let streamed = loop {
            match t.step(&mut talker)? {
                TalkerStep::Code(_) => {}
                TalkerStep::NeedText => match next.next() {
                    Some(r) => t.push_reply_row(r.clone())?,
                    None => t.finish_text(),
                },
                TalkerStep::Finished(reason) => break (t.codes().to_vec(), reason),
            }
        };
        let fresh = turn(&cfg, &talker, 6, 12);
        let prompt = match fresh.prefill.clone().unwrap() {
            Prefill::Whole(prompt) => prompt,
            other => panic!("{other:?}"),
        };
        let text = fresh.text_rows.clone();
        let offline = generate_codes(
            &mut talker,
            prompt,
            text,
            &replies,
            TalkerOptions {
                sampling: SamplingOptions::greedy(),
                max_codes: 12,
                dit_codec_rows: None,
            },
        )?;
        assert_eq!(offline, streamed);
        Ok(())
    }

    #[test]
    fn a_turn_after_a_cached_prompt_equals_the_whole_prefill() -> Result<()> {
        let (cfg, mut talker) = tiny();
        let e = cfg.talker_config.embedding_size;
        let replies: Vec<Tensor> = (0..5).map(|i| rows(1, e, 20.0 + i as f64)).collect();
        let run = |talker: &mut Talker, mut t: TalkerTurn| -> Result<Vec<u32>> {
            for r in &replies {
                t.push_reply_row(r.clone())?;
            }
            t.finish_text();
            while let TalkerStep::Code(_) = t.step(talker)? {}
            Ok(t.codes().to_vec())
        };
        let whole = turn(&cfg, &talker, 7, 10);
        let Some(Prefill::Whole(prompt)) = whole.prefill.clone() else {
            panic!("a whole prefill")
        };
        let text = whole.text_rows.clone();
        let want = run(&mut talker, whole)?;
        assert!(want.len() >= 3, "{want:?}");
        // The same prompt mirrored in two pieces, then the tail.
        talker.clear_cache();
        let prompt_rows = talker.thinker_rows(&prompt.rows, "rows")?;
        talker.forward(
            &prompt_rows.narrow(1, 0, 3)?,
            &prompt.positions.narrow(1, 0, 3)?,
        )?;
        talker.forward(
            &prompt_rows.narrow(1, 3, 4)?,
            &prompt.positions.narrow(1, 3, 4)?,
        )?;
        let options = TalkerOptions {
            sampling: SamplingOptions::greedy(),
            max_codes: 10,
            dit_codec_rows: None,
        };
        let cached = TalkerTurn::after_cached_prompt(
            &talker,
            7,
            prompt.positions.narrow(1, 7, 2)?,
            prompt.rope_delta,
            text.clone(),
            options.clone(),
        )?;
        assert_eq!(run(&mut talker, cached)?, want);
        // A cache that does not hold the prompt is an error, not a wrong answer.
        talker.truncate_cache(5);
        let mut wrong = TalkerTurn::after_cached_prompt(
            &talker,
            7,
            prompt.positions.narrow(1, 7, 2)?,
            prompt.rope_delta,
            text,
            options,
        )?;
        wrong.push_reply_row(replies[0].clone())?;
        let err = wrong.step(&mut talker).unwrap_err().to_string();
        assert!(err.contains("expects its 7 prompt rows"), "{err}");
        Ok(())
    }

    #[test]
    fn fed_messages_sum_hidden_and_embedding() -> Result<()> {
        let (cfg, talker) = tiny();
        let e = cfg.talker_config.embedding_size;
        let mut t = turn(&cfg, &talker, 3, 4);
        let (h, x) = (rows(1, e, 1.5), rows(1, e, 2.5));
        t.feed(TalkerText::Reply {
            hidden: h.clone(),
            embedding: x.clone(),
        })?;
        let queued = t.pending.front().unwrap().clone();
        let want = (h + x)?.flatten_all()?;
        assert_eq!(queued.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        t.feed(TalkerText::Finished)?;
        assert!(t.thinker_done);
        assert!(t.feed(TalkerText::Finished).is_ok());
        Ok(())
    }

    #[test]
    fn thinker_without_reply_gives_no_speech() -> Result<()> {
        let (cfg, mut talker) = tiny();
        let mut t = turn(&cfg, &talker, 4, 10);
        t.finish_text();
        assert_eq!(
            t.step(&mut talker)?,
            TalkerStep::Finished(TalkerFinish::NoText)
        );
        assert_eq!(talker.cache_len(), 0);
        Ok(())
    }

    #[test]
    fn prompt_rows_zero_placeholder_embeddings_only() -> Result<()> {
        let dev = Device::Cpu;
        let hidden = Tensor::ones((3, 2), DType::F32, &dev)?;
        let embeds = (Tensor::ones((3, 2), DType::F32, &dev)? * 5.0)?;
        let out = prompt_rows(&hidden, &embeds, &[7, 99, 8], &[99])?;
        assert_eq!(
            out.to_vec2::<f32>()?,
            vec![vec![6.0, 6.0], vec![1.0, 1.0], vec![6.0, 6.0]]
        );
        assert!(prompt_rows(&hidden, &embeds, &[7, 8], &[99]).is_err());
        Ok(())
    }

    #[test]
    fn wrong_widths_and_positions_are_errors() -> Result<()> {
        let (cfg, talker) = tiny();
        let e = cfg.talker_config.embedding_size;
        let bad = TalkerTurn::new(
            &talker,
            TalkerPrompt {
                rows: rows(4, e, 0.0),
                positions: sequential_positions(0, 4, &Device::Cpu)?,
                rope_delta: 0,
            },
            TalkerTextRows {
                speaker_bos: rows(1, e, 1.0),
                text_end: rows(1, e, 1.0),
                text_pad: rows(1, e, 1.0),
            },
            TalkerOptions {
                sampling: SamplingOptions::greedy(),
                max_codes: 4,
                dit_codec_rows: None,
            },
        );
        assert!(bad.unwrap_err().to_string().contains("L + 2"));
        let err = talker
            .prefill_input(&rows(4, e + 1, 0.0), &rows(1, e, 0.0), &rows(1, e, 0.0))
            .unwrap_err();
        assert!(err.to_string().contains("embedding_size"), "{err}");
        Ok(())
    }

    #[test]
    fn ids_without_dit_embedding_are_masked_except_the_end_ids() -> Result<()> {
        let (cfg, talker) = tiny();
        let c = &cfg.talker_config;
        let e = c.embedding_size;
        let rows_limit = 10;
        let t = TalkerTurn::new(
            &talker,
            TalkerPrompt {
                rows: rows(2, e, 0.0),
                positions: sequential_positions(0, 4, &Device::Cpu)?,
                rope_delta: 0,
            },
            TalkerTextRows {
                speaker_bos: rows(1, e, 1.0),
                text_end: rows(1, e, 1.0),
                text_pad: rows(1, e, 1.0),
            },
            TalkerOptions {
                sampling: SamplingOptions::greedy(),
                max_codes: 4,
                dit_codec_rows: Some(rows_limit),
            },
        )?;
        assert!(t.suppress.contains(&c.tts_codec_start_token_id));
        assert!(t.suppress.contains(&c.tts_codec_mask_token_id));
        assert!(!t.suppress.contains(&c.tts_codec_pad_token_id));
        assert!(!t.suppress.contains(&c.tts_codec_end_token_id));
        assert!(!t.suppress.contains(&(rows_limit as u32 - 1)));
        assert!(t.suppress.contains(&(rows_limit as u32)));
        Ok(())
    }
}
