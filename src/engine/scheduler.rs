//! One scheduler per loaded model, serving every session: sessions submit model work with a
//! deadline from their playout clock, and one thread runs it, batching the decode steps of all
//! sessions into one forward pass (each over its own KV cache, see
//! [`Thinker::forward_batch`] / [`Talker::forward_batch`]) and interleaving the prefills by
//! deadline.
//!
//! Each session's model state (its Thinker and Talker contexts: clones of the loaded weights
//! with their own caches) lives in the scheduler; a session keeps its decoding state (sampler,
//! [`crate::model::talker::TalkerTurn`]) and sends rows, getting results back over its own
//! bounded channel. Work of one session runs in the order it was submitted, per model.
//!
//! DiT windows (token2wav's flow-matching sampler over a fixed number of codes) of sessions
//! with windows of the same length run as one batch ([`Dit::sample_scheduled_batch`]).
//!
//! **Which work runs next.** The most urgent head request (earliest deadline; the earlier
//! submission on a tie) chooses the model of the pass; every other session's head request for
//! that model that is a single row (a decode step) rides along, most urgent first, up to
//! `max_batch` sequences. A multi-row request (a block prefill) that is not the most urgent waits:
//! a mid-turn block prefill gives way to the decode steps of a listener waiting for audio, and
//! runs as soon as its deadline is the earliest. Cache edits (barge-in roll-backs, the context
//! policy's forgetting) cost nothing and run as soon as they reach the head of their session's
//! queue.
//!
//! **Cancellation** ([`SessionLink::cancel`], hang-up by dropping the link) removes only that
//! session's queued requests, answered [`Outcome::Cancelled`]; the scheduler handles commands
//! between passes, so no pass is ever cut short and no other session's queued or running work
//! is touched.
//!
//! **Headroom** ([`Scheduler::headroom`]): the busy fraction of the scheduler's thread on the
//! clock, deadline misses (work finished after its deadline) and the worst lateness, queue
//! depth and batch sizes.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

use crate::engine::clock::Clock;
use crate::model::omni::OmniModel;
use crate::model::talker::{Talker, TalkerForward, TalkerRows};
use crate::model::thinker::decoder::sequential_positions;
use crate::model::thinker::{DecodeStep, LogitsFor, Thinker, ThinkerOutput, ThinkerRows};
use crate::model::token2wav::dit::{Dit, DitWindow, OdeSchedule, SamplerOptions, SpeakerCondition};

/// The loaded networks the scheduler runs: every session gets clones of the Thinker and
/// Talker with empty caches; the DiT is stateless and shared.
#[derive(Debug, Clone)]
pub struct SchedulerModels {
    pub thinker: Thinker,
    pub talker: Option<Talker>,
    /// token2wav's DiT with the ODE schedule every session's windows are sampled on.
    pub vocoder: Option<(Dit, OdeSchedule)>,
}

impl SchedulerModels {
    /// Every network of `model` a session's passes can run on: the Thinker, and for a model
    /// that speaks the Talker and token2wav's DiT on the sessions' ODE schedule (the vocoder
    /// task's default sampler).
    pub fn of(model: &OmniModel) -> anyhow::Result<Self> {
        let vocoder = match &model.speech {
            Some(speech) => {
                let dit = speech.token2wav.dit().clone();
                let schedule = dit
                    .schedule(&SamplerOptions::default())
                    .context("token2wav sampler schedule")?;
                Some((dit, schedule))
            }
            None => None,
        };
        Ok(Self {
            thinker: model.thinker.clone(),
            talker: model.speech.as_ref().map(|s| s.talker.clone()),
            vocoder,
        })
    }
}

/// A session's id within one scheduler.
pub type SessionId = u64;

/// Numbers a session's requests in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// The model work a session asks for.
#[derive(Debug, Clone)]
pub enum Work {
    /// Feed token `id` to the session's Thinker at `cache_len + rope_delta`.
    ThinkerDecode { id: u32, rope_delta: i64 },
    /// Run `embeds` (t, hidden) at `positions` (3, t) after the session's Thinker context: a
    /// block, the system prompt, the end of a turn.
    ThinkerPrefill {
        embeds: Tensor,
        positions: Tensor,
        logits: LogitsFor,
    },
    /// One planned Talker step ([`crate::model::talker::TalkerTurn::plan`]) on the session's
    /// Talker; the result is the codec logits for [`crate::model::talker::TalkerTurn::accept`].
    TalkerForward(TalkerForward),
    /// Sample one DiT window (`codes` `[1, n]`, `noise` `[1, repeats n, mel_dim]`) in the
    /// session's voice; windows of other sessions with as many codes run in the same batch.
    DitWindow {
        speaker: Arc<SpeakerCondition>,
        codes: Tensor,
        noise: Tensor,
    },
    /// Roll the session's Thinker context back to its first `len` positions.
    TruncateThinker(usize),
    /// Roll the session's Talker context back to its first `len` positions.
    TruncateTalker(usize),
    /// Forget positions `range` of the session's Thinker context (the context policy).
    ForgetThinker(Range<usize>),
    /// Forget positions `range` of the session's Talker context.
    ForgetTalker(Range<usize>),
}

/// The two networks whose passes the scheduler batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Network {
    Thinker,
    Talker,
    Vocoder,
}

const NETWORKS: [Network; 3] = [Network::Thinker, Network::Talker, Network::Vocoder];

impl Work {
    fn network(&self) -> Network {
        match self {
            Work::ThinkerDecode { .. }
            | Work::ThinkerPrefill { .. }
            | Work::TruncateThinker(_)
            | Work::ForgetThinker(_) => Network::Thinker,
            Work::TalkerForward(_) | Work::TruncateTalker(_) | Work::ForgetTalker(_) => {
                Network::Talker
            }
            Work::DitWindow { .. } => Network::Vocoder,
        }
    }

    /// Rows the work feeds through the network (0 for a cache edit).
    fn rows(&self) -> usize {
        match self {
            Work::ThinkerDecode { .. } => 1,
            Work::ThinkerPrefill { embeds, .. } => embeds.dim(0).unwrap_or(0),
            Work::TalkerForward(f) => f.input.dim(1).unwrap_or(0),
            Work::DitWindow { codes, .. } => codes.dim(1).unwrap_or(0),
            _ => 0,
        }
    }

    /// A truncation or forgetting: no pass, it runs as soon as it heads its queue.
    fn is_cache_edit(&self) -> bool {
        matches!(
            self,
            Work::TruncateThinker(_)
                | Work::TruncateTalker(_)
                | Work::ForgetThinker(_)
                | Work::ForgetTalker(_)
        )
    }
}

/// What became of a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    Decoded(DecodeStep),
    Prefilled(ThinkerOutput),
    /// The f32 codec logits `[vocab]` of the Talker step's last row.
    TalkerLogits(Tensor),
    /// A DiT window's mel `[1, mel_dim, repeats n]`.
    Mel(Tensor),
    /// A truncation or forgetting was done.
    CacheEdited,
    /// Dropped by [`SessionLink::cancel`] before it ran.
    Cancelled,
    Failed(String),
}

/// A finished request, sent over the session's own channel.
#[derive(Debug, Clone)]
pub struct Completion {
    pub ticket: Ticket,
    pub deadline: Duration,
    /// Clock time when the result was ready.
    pub done_at: Duration,
    /// Sequences in the pass that ran it (1: alone).
    pub batch: usize,
    pub outcome: Outcome,
}

/// Sizes of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one forward pass.
    pub max_batch: usize,
    /// Requests a session may have outstanding (queued, running or unread): the capacity of
    /// its result channel, so the scheduler never blocks on a slow reader.
    pub per_session_requests: usize,
    /// Capacity of the command channel shared by all sessions.
    pub commands: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            per_session_requests: 64,
            commands: 1024,
        }
    }
}

/// How loaded the scheduler is, measured on its clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headroom {
    /// Clock time since the scheduler started.
    pub elapsed: Duration,
    /// Clock time spent running passes.
    pub busy: Duration,
    pub passes: u64,
    /// Sequences run over all passes (`sequences / passes` is the mean batch).
    pub sequences: u64,
    pub largest_batch: usize,
    pub completed: u64,
    /// Requests finished after their deadline.
    pub deadline_misses: u64,
    pub worst_lateness: Duration,
    /// Requests waiting now.
    pub queued: usize,
    pub sessions: usize,
}

impl Headroom {
    /// Fraction of the time the scheduler was running passes (1.0: no headroom left).
    pub fn busy_fraction(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.busy.as_secs_f64() / self.elapsed.as_secs_f64()
        }
    }

    /// Mean sequences per pass.
    pub fn mean_batch(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            self.sequences as f64 / self.passes as f64
        }
    }
}

#[derive(Debug)]
struct Request {
    ticket: Ticket,
    deadline: Duration,
    /// Global submission order, for ties.
    order: u64,
    work: Work,
}

struct SessionState {
    thinker: Thinker,
    talker: Option<Talker>,
    queues: [VecDeque<Request>; 3],
    results: Sender<Completion>,
}

impl SessionState {
    fn queue(&mut self, network: Network) -> &mut VecDeque<Request> {
        &mut self.queues[network as usize]
    }
}

/// The pass chosen to run next: one network, the sessions whose head request it runs (the
/// most urgent first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub network: Network,
    pub sessions: Vec<SessionId>,
}

/// The scheduling and the model passes, without a thread: [`Scheduler`] drives it from its
/// thread; tests drive it step by step.
pub struct SchedulerCore {
    thinker: Thinker,
    talker: Option<Talker>,
    vocoder: Option<(Dit, OdeSchedule)>,
    sessions: BTreeMap<SessionId, SessionState>,
    config: SchedulerConfig,
    next_order: u64,
    started: Duration,
    headroom: Headroom,
}

impl SchedulerCore {
    /// `models` are the loaded networks. `now` is the clock time at the start.
    pub fn new(
        models: SchedulerModels,
        config: SchedulerConfig,
        now: Duration,
    ) -> anyhow::Result<Self> {
        if config.max_batch == 0 || config.per_session_requests == 0 || config.commands == 0 {
            anyhow::bail!("scheduler: max_batch, per_session_requests and commands must be > 0");
        }
        let SchedulerModels {
            mut thinker,
            mut talker,
            vocoder,
        } = models;
        thinker.clear_cache();
        if let Some(t) = talker.as_mut() {
            t.clear_cache();
        }
        Ok(Self {
            thinker,
            talker,
            vocoder,
            sessions: BTreeMap::new(),
            config,
            next_order: 0,
            started: now,
            headroom: Headroom::default(),
        })
    }

    /// Adds a session with empty contexts; its results go to `results`.
    pub fn open(&mut self, session: SessionId, results: Sender<Completion>) -> anyhow::Result<()> {
        if self.sessions.contains_key(&session) {
            anyhow::bail!("scheduler: session {session} is already open");
        }
        self.sessions.insert(
            session,
            SessionState {
                thinker: self.thinker.clone(),
                talker: self.talker.clone(),
                queues: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
                results,
            },
        );
        Ok(())
    }

    /// Queues `work` of `session`; bad rows are refused here, naming what was wrong, so that
    /// they never fail a batched pass shared with other sessions.
    pub fn submit(
        &mut self,
        session: SessionId,
        ticket: Ticket,
        deadline: Duration,
        work: Work,
    ) -> anyhow::Result<()> {
        self.check(&work)?;
        let order = self.next_order;
        let state = self
            .sessions
            .get_mut(&session)
            .with_context(|| format!("scheduler: session {session} is not open"))?;
        state.queue(work.network()).push_back(Request {
            ticket,
            deadline,
            order,
            work,
        });
        self.next_order += 1;
        Ok(())
    }

    /// Like [`Self::submit`], answering a refused request as [`Outcome::Failed`] on the
    /// session's channel.
    fn submit_or_answer(
        &mut self,
        session: SessionId,
        ticket: Ticket,
        deadline: Duration,
        work: Work,
        now: Duration,
    ) {
        let Err(e) = self.check(&work) else {
            if let Err(e) = self.submit(session, ticket, deadline, work) {
                tracing::error!("{e:#}");
            }
            return;
        };
        if let Some(state) = self.sessions.get(&session) {
            let request = Request {
                ticket,
                deadline,
                order: self.next_order,
                work,
            };
            answer(state, &request, now, 0, Outcome::Failed(format!("{e:#}")));
        }
    }

    fn check(&self, work: &Work) -> anyhow::Result<()> {
        match work {
            Work::ThinkerDecode { id, .. } => {
                if *id as usize >= self.thinker.vocab_size() {
                    anyhow::bail!(
                        "scheduler: token id {id} is outside the Thinker's vocabulary of {}",
                        self.thinker.vocab_size()
                    );
                }
            }
            Work::ThinkerPrefill {
                embeds, positions, ..
            } => {
                let t = self
                    .thinker
                    .check_rows(embeds, positions, "scheduler: prefill ")?;
                if t == 0 {
                    anyhow::bail!("scheduler: a prefill needs at least one row");
                }
            }
            Work::TalkerForward(forward) => {
                let talker = self
                    .talker
                    .as_ref()
                    .context("scheduler: a Talker step, but the model has no Talker")?;
                let dims = forward.input.dims();
                let width = talker.config().embedding_size;
                if dims.len() != 3 || dims[0] != 1 || dims[1] == 0 || dims[2] != width {
                    anyhow::bail!(
                        "scheduler: Talker input must be [1, T, {width}] with T > 0, got {dims:?}"
                    );
                }
                talker.check_positions(&forward.input, &forward.positions)?;
            }
            Work::DitWindow { codes, noise, .. } => {
                let (dit, _) = self
                    .vocoder
                    .as_ref()
                    .context("scheduler: a DiT window, but the model has no token2wav")?;
                let cfg = dit.config();
                let n = match codes.dims() {
                    &[1, n] if n > 0 => n,
                    dims => anyhow::bail!(
                        "scheduler: DiT codes must be [1, n] with n > 0, got {dims:?}"
                    ),
                };
                let want = [1, n * cfg.repeats, cfg.mel_dim];
                if noise.dims() != want {
                    anyhow::bail!(
                        "scheduler: DiT noise must be {want:?} for {n} codes, got {:?}",
                        noise.dims()
                    );
                }
            }
            Work::TruncateTalker(_) | Work::ForgetTalker(_) if self.talker.is_none() => {
                anyhow::bail!("scheduler: a Talker cache edit, but the model has no Talker")
            }
            Work::TruncateThinker(_)
            | Work::TruncateTalker(_)
            | Work::ForgetThinker(_)
            | Work::ForgetTalker(_) => {}
        }
        Ok(())
    }

    /// Drops every queued request of `session` (answered [`Outcome::Cancelled`]); returns how
    /// many. Other sessions are not touched.
    pub fn cancel(&mut self, session: SessionId, now: Duration) -> usize {
        let Some(state) = self.sessions.get_mut(&session) else {
            return 0;
        };
        let dropped: Vec<Request> = state.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
        let n = dropped.len();
        for request in dropped {
            answer(state, &request, now, 1, Outcome::Cancelled);
        }
        n
    }

    /// Forgets `session`: its contexts and queued work.
    pub fn close(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    /// Whether any request is waiting.
    pub fn has_work(&self) -> bool {
        self.sessions
            .values()
            .any(|s| s.queues.iter().any(|q| !q.is_empty()))
    }

    /// The pass to run next (see the module notes), or `None` when nothing is queued or only
    /// cache edits are (which [`Self::step`] runs first).
    pub fn next_pass(&self) -> Option<Pass> {
        let heads = self.sessions.iter().flat_map(|(&id, state)| {
            state
                .queues
                .iter()
                .filter_map(move |q| q.front().map(|r| (id, r)))
                .filter(|(_, r)| !r.work.is_cache_edit())
        });
        let urgency = |r: &Request| (r.deadline, r.order);
        let (first, head) = heads.clone().min_by_key(|(_, r)| urgency(r))?;
        let network = head.work.network();
        // Decode steps ride along any pass of their network; DiT windows ride with windows
        // of the same length (the batch shares one shape).
        let rides = |r: &Request| match network {
            Network::Vocoder => r.work.rows() == head.work.rows(),
            Network::Thinker | Network::Talker => r.work.rows() == 1,
        };
        let mut riders: Vec<(SessionId, &Request)> = heads
            .filter(|&(id, r)| id != first && r.work.network() == network && rides(r))
            .collect();
        riders.sort_by_key(|(_, r)| urgency(r));
        let mut sessions = vec![first];
        sessions.extend(
            riders
                .into_iter()
                .take(self.config.max_batch - 1)
                .map(|(id, _)| id),
        );
        Some(Pass { network, sessions })
    }

    /// Runs the cache edits at the heads of the queues, then one pass; returns whether
    /// anything ran.
    pub fn step(&mut self, clock: &dyn Clock) -> bool {
        let edited = self.run_cache_edits(clock.now());
        match self.next_pass() {
            Some(pass) => {
                self.run_pass(&pass, clock);
                true
            }
            None => edited,
        }
    }

    fn run_cache_edits(&mut self, now: Duration) -> bool {
        let mut ran = false;
        for state in self.sessions.values_mut() {
            for network in NETWORKS {
                while state
                    .queue(network)
                    .front()
                    .is_some_and(|r| r.work.is_cache_edit())
                {
                    let request = state.queue(network).pop_front().expect("a head request");
                    let outcome = match edit_cache(state, &request.work) {
                        Ok(()) => Outcome::CacheEdited,
                        Err(e) => Outcome::Failed(format!("{e:#}")),
                    };
                    answer(state, &request, now, 1, outcome);
                    ran = true;
                }
            }
        }
        ran
    }

    /// Runs `pass`: takes the head request of each of its sessions, runs them in one forward
    /// pass, answers each session.
    pub fn run_pass(&mut self, pass: &Pass, clock: &dyn Clock) {
        let start = clock.now();
        let network = pass.network;
        let mut taken: Vec<(&mut SessionState, Request)> = Vec::with_capacity(pass.sessions.len());
        for (id, state) in self.sessions.iter_mut() {
            if pass.sessions.contains(id)
                && let Some(request) = state.queue(network).pop_front()
            {
                taken.push((state, request));
            }
        }
        let outcomes = match network {
            Network::Thinker => run_thinker(&self.thinker, &mut taken),
            Network::Talker => match self.talker.as_ref() {
                Some(talker) => run_talker(talker, &mut taken),
                None => Err("the model has no Talker".to_string()),
            },
            Network::Vocoder => match self.vocoder.as_ref() {
                Some((dit, schedule)) => run_vocoder(dit, schedule, &taken),
                None => Err("the model has no token2wav".to_string()),
            },
        };
        let done_at = clock.now();
        let batch = taken.len();
        let outcomes: Vec<Outcome> = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => vec![Outcome::Failed(format!("batched {network:?} pass: {e}")); batch],
        };
        self.headroom.passes += 1;
        self.headroom.sequences += batch as u64;
        self.headroom.largest_batch = self.headroom.largest_batch.max(batch);
        self.headroom.busy += done_at.saturating_sub(start);
        for ((state, request), outcome) in taken.into_iter().zip(outcomes) {
            if done_at > request.deadline {
                self.headroom.deadline_misses += 1;
                self.headroom.worst_lateness =
                    self.headroom.worst_lateness.max(done_at - request.deadline);
            }
            self.headroom.completed += 1;
            answer(state, &request, done_at, batch, outcome);
        }
    }

    /// The headroom as of `now`.
    pub fn headroom(&self, now: Duration) -> Headroom {
        Headroom {
            elapsed: now.saturating_sub(self.started),
            queued: self
                .sessions
                .values()
                .map(|s| s.queues.iter().map(VecDeque::len).sum::<usize>())
                .sum(),
            sessions: self.sessions.len(),
            ..self.headroom.clone()
        }
    }
}

/// Sends `request`'s completion to its session; a session that hung up is not waited for.
fn answer(state: &SessionState, request: &Request, now: Duration, batch: usize, outcome: Outcome) {
    let completion = Completion {
        ticket: request.ticket,
        deadline: request.deadline,
        done_at: now,
        batch,
        outcome,
    };
    match state.results.try_send(completion) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(c)) => {
            // The link bounds outstanding requests by this channel's capacity.
            tracing::error!(
                "scheduler: a session's result channel is full; dropped ticket {:?}",
                c.ticket
            );
        }
    }
}

/// Applies a truncation or forgetting to the session's contexts.
fn edit_cache(state: &mut SessionState, work: &Work) -> anyhow::Result<()> {
    fn talker(state: &mut SessionState) -> anyhow::Result<&mut Talker> {
        state
            .talker
            .as_mut()
            .context("scheduler: the session has no Talker")
    }
    match work {
        Work::TruncateThinker(len) => state.thinker.truncate_cache(*len),
        Work::TruncateTalker(len) => talker(state)?.truncate_cache(*len),
        Work::ForgetThinker(range) => state.thinker.remove_cache_range(range.clone())?,
        Work::ForgetTalker(range) => talker(state)?.remove_cache_range(range.clone())?,
        other => anyhow::bail!("scheduler: {other:?} is not a cache edit"),
    }
    Ok(())
}

/// One Thinker pass over the taken head requests; an outcome per request, in order.
fn run_thinker(
    weights: &Thinker,
    taken: &mut [(&mut SessionState, Request)],
) -> Result<Vec<Outcome>, String> {
    let fail = |e: candle_core::Error| e.to_string();
    let mut decode_embeds = Vec::with_capacity(taken.len());
    let mut rows = Vec::with_capacity(taken.len());
    for (state, request) in taken.iter_mut() {
        let (embeds, positions, logits) = match &request.work {
            Work::ThinkerDecode { id, rope_delta } => {
                let embed = weights.embed(&[*id]).map_err(fail)?;
                let position = state.thinker.cache_len() as i64 + rope_delta;
                let positions =
                    sequential_positions(position, 1, weights.device()).map_err(fail)?;
                decode_embeds.push(Some(embed.squeeze(0).map_err(fail)?));
                (embed, positions, LogitsFor::Last)
            }
            Work::ThinkerPrefill {
                embeds,
                positions,
                logits,
            } => {
                decode_embeds.push(None);
                (embeds.clone(), positions.clone(), *logits)
            }
            other => return Err(format!("not Thinker work: {other:?}")),
        };
        rows.push(ThinkerRows {
            context: &mut state.thinker,
            embeds,
            positions,
            logits,
        });
    }
    let outputs = weights.forward_batch(&mut rows).map_err(fail)?;
    outputs
        .into_iter()
        .zip(decode_embeds)
        .map(|(out, embed)| match embed {
            Some(embed) => DecodeStep::from_output(embed, out)
                .map(Outcome::Decoded)
                .map_err(fail),
            None => Ok(Outcome::Prefilled(out)),
        })
        .collect()
}

/// One Talker pass over the taken head requests. A step whose cache does not fit (see
/// [`Talker::prepare_cache`]) fails alone; the others run.
fn run_talker(
    weights: &Talker,
    taken: &mut [(&mut SessionState, Request)],
) -> Result<Vec<Outcome>, String> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; taken.len()];
    let mut running = Vec::with_capacity(taken.len());
    let mut rows = Vec::with_capacity(taken.len());
    for (i, (state, request)) in taken.iter_mut().enumerate() {
        let Work::TalkerForward(forward) = &request.work else {
            return Err(format!("not Talker work: {:?}", request.work));
        };
        let Some(context) = state.talker.as_mut() else {
            outcomes[i] = Some(Outcome::Failed("the session has no Talker".into()));
            continue;
        };
        if let Err(e) = context.prepare_cache(forward) {
            outcomes[i] = Some(Outcome::Failed(e.to_string()));
            continue;
        }
        running.push(i);
        rows.push(TalkerRows {
            context,
            input: forward.input.clone(),
            positions: forward.positions.clone(),
        });
    }
    let outputs = weights
        .forward_batch(&mut rows)
        .map_err(|e| e.to_string())?;
    for (i, (_, logits)) in running.into_iter().zip(outputs) {
        outcomes[i] = Some(Outcome::TalkerLogits(logits));
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every request has an outcome"))
        .collect())
}

/// One batch of DiT windows (all of one length) over the taken head requests.
fn run_vocoder(
    dit: &Dit,
    schedule: &OdeSchedule,
    taken: &[(&mut SessionState, Request)],
) -> Result<Vec<Outcome>, String> {
    let windows = taken
        .iter()
        .map(|(_, request)| match &request.work {
            Work::DitWindow {
                speaker,
                codes,
                noise,
            } => Ok(DitWindow {
                speaker: speaker.as_ref(),
                codes,
                noise,
            }),
            other => Err(format!("not vocoder work: {other:?}")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mels = dit
        .sample_scheduled_batch(&windows, schedule)
        .map_err(|e| e.to_string())?;
    Ok(mels.into_iter().map(Outcome::Mel).collect())
}

enum Command {
    Open {
        session: SessionId,
        results: Sender<Completion>,
    },
    Submit {
        session: SessionId,
        ticket: Ticket,
        deadline: Duration,
        work: Work,
    },
    Cancel(SessionId),
    Close(SessionId),
    Shutdown,
}

/// The scheduler thread of one loaded model, and the way sessions reach it.
pub struct Scheduler {
    commands: Sender<Command>,
    clock: Arc<dyn Clock>,
    /// Clones of the networks it runs (weights shared, caches empty): what a session is
    /// checked against.
    thinker: Thinker,
    talker: Option<Talker>,
    vocoder: Option<(Dit, OdeSchedule)>,
    headroom: Arc<Mutex<Headroom>>,
    next_session: Mutex<SessionId>,
    per_session_requests: usize,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler thread over the loaded `models`, on `clock` (the clock the
    /// sessions' deadlines are on).
    pub fn spawn(
        models: SchedulerModels,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> anyhow::Result<Self> {
        let (thinker, talker) = (models.thinker.clone(), models.talker.clone());
        let vocoder = models.vocoder.clone();
        let mut core = SchedulerCore::new(models, config.clone(), clock.now())?;
        let (commands, rx) = bounded(config.commands);
        let headroom = Arc::new(Mutex::new(core.headroom(clock.now())));
        let published = headroom.clone();
        let thread_clock = clock.clone();
        let thread = std::thread::Builder::new()
            .name("model-scheduler".into())
            .spawn(move || {
                let clock = thread_clock;
                // How long an idle scheduler waits for a command before it refreshes its
                // headroom figures.
                const IDLE: Duration = Duration::from_millis(200);
                loop {
                    // Commands first (they are cheap and may cancel queued work), then a pass.
                    let command = if core.has_work() {
                        rx.try_recv().ok()
                    } else {
                        match rx.recv_timeout(IDLE) {
                            Ok(c) => Some(c),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    };
                    match command {
                        Some(Command::Open { session, results }) => {
                            if let Err(e) = core.open(session, results) {
                                tracing::error!("{e:#}");
                            }
                        }
                        Some(Command::Submit {
                            session,
                            ticket,
                            deadline,
                            work,
                        }) => {
                            core.submit_or_answer(session, ticket, deadline, work, clock.now());
                        }
                        Some(Command::Cancel(session)) => {
                            core.cancel(session, clock.now());
                        }
                        Some(Command::Close(session)) => core.close(session),
                        Some(Command::Shutdown) => break,
                        None => {
                            core.step(clock.as_ref());
                        }
                    }
                    if let Ok(mut h) = published.lock() {
                        *h = core.headroom(clock.now());
                    }
                }
            })
            .context("starting the scheduler thread")?;
        Ok(Self {
            commands,
            clock,
            thinker,
            talker,
            vocoder,
            headroom,
            next_session: Mutex::new(0),
            per_session_requests: config.per_session_requests,
            thread: Some(thread),
        })
    }

    /// A new session with empty contexts.
    pub fn open_session(&self) -> anyhow::Result<SessionLink> {
        let session = {
            let mut next = self
                .next_session
                .lock()
                .map_err(|_| anyhow::anyhow!("scheduler: session counter poisoned"))?;
            *next += 1;
            *next
        };
        let (results_tx, results) = bounded(self.per_session_requests);
        self.commands
            .send(Command::Open {
                session,
                results: results_tx,
            })
            .context("the scheduler has stopped")?;
        Ok(SessionLink {
            session,
            commands: self.commands.clone(),
            clock: self.clock.clone(),
            results,
            next_ticket: 0,
            outstanding: 0,
            capacity: self.per_session_requests,
        })
    }

    /// Whether this scheduler runs these networks (clones of its own: the same weights), so
    /// that a session of that model may run on it.
    pub fn runs(&self, thinker: &Thinker, talker: Option<&Talker>) -> bool {
        let talker_runs = match (talker, self.talker.as_ref()) {
            (Some(session), Some(own)) => own.shares_weights(session),
            (Some(_), None) => false,
            (None, _) => true,
        };
        self.thinker.shares_weights(thinker) && talker_runs
    }

    /// Whether this scheduler samples DiT windows of `dit` (a clone of its own) on `schedule`
    /// (`None`: it samples none; a session then samples its own).
    pub fn runs_vocoder(&self, dit: &Dit, schedule: &OdeSchedule) -> Option<bool> {
        let (own, own_schedule) = self.vocoder.as_ref()?;
        Some(own.shares_weights(dit) && own_schedule.options() == schedule.options())
    }

    /// The latest headroom figures.
    pub fn headroom(&self) -> Headroom {
        self.headroom.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("headroom", &self.headroom())
            .finish_non_exhaustive()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One session's end of the scheduler: submit work, read completions. Dropping it hangs up
/// (the scheduler forgets the session's contexts and queued work).
pub struct SessionLink {
    session: SessionId,
    commands: Sender<Command>,
    /// The scheduler's clock, which deadlines are on.
    clock: Arc<dyn Clock>,
    results: Receiver<Completion>,
    next_ticket: u64,
    outstanding: usize,
    capacity: usize,
}

impl SessionLink {
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The time on the scheduler's clock: deadlines are this plus how long the work may wait
    /// (a session's own clock may have started later).
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Queues `work`, due by `deadline` on the scheduler's clock (the time this session's
    /// listener would run out of audio without it). Refused when the session already has as
    /// many requests outstanding as its result channel holds.
    pub fn submit(&mut self, work: Work, deadline: Duration) -> anyhow::Result<Ticket> {
        if self.outstanding >= self.capacity {
            anyhow::bail!(
                "scheduler: session {} already has {} requests outstanding (the most it may have)",
                self.session,
                self.outstanding
            );
        }
        let ticket = Ticket(self.next_ticket);
        self.commands
            .send(Command::Submit {
                session: self.session,
                ticket,
                deadline,
                work,
            })
            .context("the scheduler has stopped")?;
        self.next_ticket += 1;
        self.outstanding += 1;
        Ok(ticket)
    }

    /// Waits for the next completion.
    pub fn recv(&mut self) -> anyhow::Result<Completion> {
        let completion = self
            .results
            .recv()
            .context("the scheduler stopped before answering")?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Ok(completion)
    }

    /// Submits `work` and waits for its completion (earlier completions still unread are an
    /// error: use [`Self::submit`] and [`Self::recv`] to pipeline).
    pub fn run(&mut self, work: Work, deadline: Duration) -> anyhow::Result<Outcome> {
        let ticket = self.submit(work, deadline)?;
        let completion = self.recv()?;
        if completion.ticket != ticket {
            anyhow::bail!(
                "scheduler: waited for ticket {ticket:?}, got {:?}",
                completion.ticket
            );
        }
        match completion.outcome {
            Outcome::Failed(e) => anyhow::bail!("{e}"),
            outcome => Ok(outcome),
        }
    }

    /// Drops this session's queued requests (barge-in); they complete as
    /// [`Outcome::Cancelled`].
    pub fn cancel(&self) -> anyhow::Result<()> {
        self.commands
            .send(Command::Cancel(self.session))
            .context("the scheduler has stopped")
    }
}

impl Drop for SessionLink {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close(self.session));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_fractions() {
        let mut h = Headroom::default();
        assert_eq!(h.busy_fraction(), 0.0);
        assert_eq!(h.mean_batch(), 0.0);
        h.elapsed = Duration::from_millis(400);
        h.busy = Duration::from_millis(100);
        h.passes = 4;
        h.sequences = 10;
        assert!((h.busy_fraction() - 0.25).abs() < 1e-12);
        assert!((h.mean_batch() - 2.5).abs() < 1e-12);
    }

    #[test]
    fn work_knows_its_network_and_rows() {
        let decode = Work::ThinkerDecode {
            id: 1,
            rope_delta: 0,
        };
        assert_eq!(decode.network(), Network::Thinker);
        assert_eq!(decode.rows(), 1);
        assert_eq!(Work::TruncateTalker(3).network(), Network::Talker);
        assert_eq!(Work::TruncateTalker(3).rows(), 0);
        assert!(Work::TruncateThinker(0).is_cache_edit());
        assert!(Work::ForgetTalker(0..2).is_cache_edit());
        assert!(!decode.is_cache_edit());
    }
}
