//! The shared model scheduler with the real tiny model on the simulated clock: sessions sharing
//! it get exactly what each gets alone (greedy Thinker ids, Talker codes), one session's
//! cancellation or hang-up never changes another's results, work runs by deadline, and the
//! headroom counts passes, batches and deadline misses.

mod common;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{Receiver, bounded};
use omnicall::engine::clock::{Clock, SimulatedClock};
use omnicall::engine::scheduler::{
    Completion, Network, Outcome, Pass, Scheduler, SchedulerConfig, SchedulerCore, SchedulerModels,
    SessionId, Ticket, Work,
};
use omnicall::model::config::Config;
use omnicall::model::sampling::SamplingOptions;
use omnicall::model::talker::{
    Talker, TalkerOptions, TalkerPlan, TalkerPrompt, TalkerStep, TalkerTextRows, TalkerTurn,
};
use omnicall::model::thinker::decoder::sequential_positions;
use omnicall::model::thinker::{LogitsFor, Thinker};

fn tiny() -> (Config, Thinker, Talker) {
    let (cfg, vb) = common::tiny_model();
    let thinker = Thinker::new(&cfg.thinker_config, vb.pp("thinker")).unwrap();
    let talker = Talker::new(&cfg.talker_config, vb.pp("talker")).unwrap();
    (cfg, thinker, talker)
}

fn models(thinker: &Thinker, talker: Option<&Talker>) -> SchedulerModels {
    SchedulerModels {
        thinker: thinker.clone(),
        talker: talker.cloned(),
        vocoder: None,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A session's conversation: a prompt, then greedy decoding; optionally a barge-in after
/// `barge_after` tokens rolls the context back to the prompt and decoding restarts from
/// `restart_id`.
#[derive(Debug, Clone)]
struct Script {
    prompt: Vec<u32>,
    steps: usize,
    barge_after: Option<(usize, u32)>,
}

fn scripts(vocab: usize) -> Vec<Script> {
    [(4usize, 7usize), (13, 5), (8, 9)]
        .iter()
        .enumerate()
        .map(|(s, &(len, steps))| Script {
            prompt: (0..len)
                .map(|i| ((i * 7919 + s * 104_729 + 3) % vocab) as u32)
                .collect(),
            steps,
            barge_after: None,
        })
        .collect()
}

fn argmax(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The script run on a Thinker of its own: the ids each session must get through the scheduler.
fn alone(thinker: &Thinker, script: &Script) -> Vec<u32> {
    let mut context = thinker.clone();
    context.clear_cache();
    let embeds = context.embed(&script.prompt).unwrap();
    let positions = sequential_positions(0, script.prompt.len(), &Device::Cpu).unwrap();
    let out = context
        .forward(&embeds, &positions, LogitsFor::Last)
        .unwrap();
    let mut logits = out.logits.unwrap().squeeze(0).unwrap();
    let mut ids = Vec::new();
    for step in 0..script.steps {
        let mut id = argmax(&logits);
        if let Some((_, restart)) = script.barge_after.filter(|&(a, _)| a == step) {
            context.truncate_cache(script.prompt.len());
            id = restart;
        }
        ids.push(id);
        logits = context.decode_step(id, 0).unwrap().logits;
    }
    ids
}

/// Where a session driven by [`drive_core`] is in its script.
struct Driven {
    session: SessionId,
    results: Receiver<Completion>,
    script: Script,
    ids: Vec<u32>,
    next_ticket: u64,
    /// Deadline of this session's work: an earlier one for a listener waiting for audio.
    deadline: Duration,
    done: bool,
}

impl Driven {
    fn submit(&mut self, core: &mut SchedulerCore, work: Work) {
        core.submit(self.session, Ticket(self.next_ticket), self.deadline, work)
            .unwrap();
        self.next_ticket += 1;
    }

    /// Reads this session's completions; submits its next decode step.
    fn advance(&mut self, core: &mut SchedulerCore) {
        while let Ok(c) = self.results.try_recv() {
            let logits = match c.outcome {
                Outcome::Prefilled(out) => out.logits.unwrap().squeeze(0).unwrap(),
                Outcome::Decoded(step) => step.logits,
                Outcome::CacheEdited | Outcome::Cancelled => continue,
                Outcome::Failed(e) => panic!("session {}: {e}", self.session),
                other => panic!("unexpected {other:?}"),
            };
            if self.ids.len() == self.script.steps {
                self.done = true;
                continue;
            }
            let mut id = argmax(&logits);
            if let Some((_, restart)) = self
                .script
                .barge_after
                .filter(|&(a, _)| a == self.ids.len())
            {
                // Barge-in: whatever is queued is dropped, the context rolls back.
                core.cancel(self.session, Duration::ZERO);
                self.submit(core, Work::TruncateThinker(self.script.prompt.len()));
                id = restart;
            }
            self.ids.push(id);
            self.submit(core, Work::ThinkerDecode { id, rope_delta: 0 });
        }
    }
}

/// Every session's script through one `SchedulerCore`, in lockstep: each round every session
/// submits its next step and the core runs until nothing is queued.
fn drive_core(
    thinker: &Thinker,
    scripts: &[Script],
    clock: &SimulatedClock,
) -> (Vec<Vec<u32>>, SchedulerCore) {
    let mut core = SchedulerCore::new(
        models(thinker, None),
        SchedulerConfig::default(),
        clock.now(),
    )
    .unwrap();
    let mut sessions: Vec<Driven> = scripts
        .iter()
        .enumerate()
        .map(|(i, script)| {
            let (tx, rx) = bounded(64);
            let session = i as SessionId + 1;
            core.open(session, tx).unwrap();
            Driven {
                session,
                results: rx,
                script: script.clone(),
                ids: Vec::new(),
                next_ticket: 0,
                deadline: ms(1000 + 100 * i as u64),
                done: false,
            }
        })
        .collect();
    for s in sessions.iter_mut() {
        let embeds = thinker.embed(&s.script.prompt).unwrap();
        let positions = sequential_positions(0, s.script.prompt.len(), &Device::Cpu).unwrap();
        s.submit(
            &mut core,
            Work::ThinkerPrefill {
                embeds,
                positions,
                logits: LogitsFor::Last,
            },
        );
    }
    while sessions.iter().any(|s| !s.done) {
        while core.step(clock) {
            clock.advance(ms(5));
        }
        for s in sessions.iter_mut() {
            s.advance(&mut core);
        }
        if !core.has_work() && sessions.iter().all(|s| s.results.is_empty()) {
            break;
        }
    }
    (sessions.into_iter().map(|s| s.ids).collect(), core)
}

#[test]
fn sessions_sharing_the_scheduler_get_what_each_gets_alone() {
    let (_, thinker, _) = tiny();
    let scripts = scripts(thinker.vocab_size());
    let clock = SimulatedClock::new();
    let (ids, core) = drive_core(&thinker, &scripts, &clock);
    for (i, script) in scripts.iter().enumerate() {
        assert_eq!(ids[i], alone(&thinker, script), "session {i}");
    }
    let headroom = core.headroom(clock.now());
    assert_eq!(headroom.largest_batch, scripts.len(), "{headroom:?}");
    assert!(headroom.mean_batch() > 1.0, "{headroom:?}");
    assert_eq!(headroom.queued, 0);
    assert_eq!(headroom.sessions, scripts.len());
}

#[test]
fn one_sessions_barge_in_never_changes_anothers_results() {
    let (_, thinker, _) = tiny();
    let mut scripts = scripts(thinker.vocab_size());
    scripts[1].barge_after = Some((2, 7));
    let clock = SimulatedClock::new();
    let (ids, _) = drive_core(&thinker, &scripts, &clock);
    for (i, script) in scripts.iter().enumerate() {
        assert_eq!(ids[i], alone(&thinker, script), "session {i}");
    }
    // The cut session really diverged from its uncut run.
    let mut uncut = scripts[1].clone();
    uncut.barge_after = None;
    assert_ne!(ids[1], alone(&thinker, &uncut));
}

#[test]
fn cancelling_drops_only_that_sessions_queued_work() {
    let (_, thinker, _) = tiny();
    let clock = SimulatedClock::new();
    let mut core = SchedulerCore::new(
        models(&thinker, None),
        SchedulerConfig::default(),
        clock.now(),
    )
    .unwrap();
    let (tx1, rx1) = bounded(8);
    let (tx2, rx2) = bounded(8);
    core.open(1, tx1).unwrap();
    core.open(2, tx2).unwrap();
    for (session, id) in [(1, 3u32), (2, 4)] {
        for t in 0..3 {
            core.submit(
                session,
                Ticket(t),
                ms(100),
                Work::ThinkerDecode { id, rope_delta: 0 },
            )
            .unwrap();
        }
    }
    assert_eq!(core.cancel(2, clock.now()), 3);
    while core.step(&clock) {}
    let got1: Vec<Completion> = rx1.try_iter().collect();
    let got2: Vec<Completion> = rx2.try_iter().collect();
    assert_eq!(got1.len(), 3);
    assert!(
        got1.iter()
            .all(|c| matches!(c.outcome, Outcome::Decoded(_)))
    );
    assert_eq!(got2.len(), 3);
    assert!(got2.iter().all(|c| matches!(c.outcome, Outcome::Cancelled)));
    // Session 1's steps equal three decode steps alone.
    let mut context = thinker.clone();
    for c in &got1 {
        let want = context.decode_step(3, 0).unwrap().logits;
        let Outcome::Decoded(step) = &c.outcome else {
            unreachable!()
        };
        let diff = (&step.logits - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "ticket {:?}: {diff:e}", c.ticket);
    }
}

#[test]
fn passes_follow_deadlines_and_decode_steps_ride_along() {
    let (cfg, thinker, talker) = tiny();
    let clock = SimulatedClock::new();
    let mut core = SchedulerCore::new(
        models(&thinker, Some(&talker)),
        SchedulerConfig::default(),
        clock.now(),
    )
    .unwrap();
    let mut receivers = Vec::new();
    for session in 1..=4 {
        let (tx, rx) = bounded(8);
        core.open(session, tx).unwrap();
        receivers.push(rx);
    }
    let block = |n: usize| Work::ThinkerPrefill {
        embeds: thinker.embed(&vec![5; n]).unwrap(),
        positions: sequential_positions(0, n, &Device::Cpu).unwrap(),
        logits: LogitsFor::None,
    };
    let decode = Work::ThinkerDecode {
        id: 9,
        rope_delta: 0,
    };
    // Session 1: a mid-turn block, due late. Sessions 2 and 3: decode steps of answers
    // under way. Session 4: a Talker step for a listener waiting for first audio.
    core.submit(1, Ticket(0), ms(500), block(6)).unwrap();
    core.submit(2, Ticket(0), ms(100), decode.clone()).unwrap();
    core.submit(3, Ticket(0), ms(300), decode.clone()).unwrap();
    let e = cfg.talker_config.embedding_size;
    let talker_step = Work::TalkerForward(omnicall::model::talker::TalkerForward {
        input: Tensor::zeros((1, 3, e), DType::F32, &Device::Cpu).unwrap(),
        positions: sequential_positions(0, 3, &Device::Cpu).unwrap(),
        restart: true,
        cached_len: None,
    });
    core.submit(4, Ticket(0), ms(20), talker_step).unwrap();

    let first = core.next_pass().unwrap();
    assert_eq!(
        first,
        Pass {
            network: Network::Talker,
            sessions: vec![4]
        }
    );
    core.run_pass(&first, &clock);
    // The block waits a step: the decode steps go first, batched, most urgent first.
    let second = core.next_pass().unwrap();
    assert_eq!(
        second,
        Pass {
            network: Network::Thinker,
            sessions: vec![2, 3]
        }
    );
    core.run_pass(&second, &clock);
    // A block prefill that has become the most urgent runs, and decode steps ride along.
    core.submit(2, Ticket(1), ms(600), decode.clone()).unwrap();
    let third = core.next_pass().unwrap();
    assert_eq!(
        third,
        Pass {
            network: Network::Thinker,
            sessions: vec![1, 2]
        }
    );
    // Late: the clock is past session 1's deadline when the pass ends.
    clock.set(ms(550));
    core.run_pass(&third, &clock);
    assert!(core.next_pass().is_none());
    let headroom = core.headroom(clock.now());
    assert_eq!(headroom.passes, 3);
    assert_eq!(headroom.completed, 5);
    assert_eq!(headroom.deadline_misses, 1, "{headroom:?}");
    assert_eq!(headroom.worst_lateness, ms(50));
    let batches: Vec<usize> = receivers
        .iter()
        .flat_map(|rx| rx.try_iter().map(|c| c.batch))
        .collect();
    assert_eq!(batches, vec![2, 2, 2, 2, 1]);
}

#[test]
fn bad_work_is_refused_naming_what_was_wrong() {
    let (_, thinker, _) = tiny();
    let mut core = SchedulerCore::new(
        models(&thinker, None),
        SchedulerConfig::default(),
        Duration::ZERO,
    )
    .unwrap();
    let (tx, _rx) = bounded(8);
    core.open(1, tx).unwrap();
    let err = core
        .submit(
            1,
            Ticket(0),
            ms(1),
            Work::ThinkerPrefill {
                embeds: thinker.embed(&[1, 2]).unwrap(),
                positions: sequential_positions(0, 5, &Device::Cpu).unwrap(),
                logits: LogitsFor::Last,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("positions"), "{err}");
    let err = core
        .submit(
            1,
            Ticket(0),
            ms(1),
            Work::ThinkerDecode {
                id: u32::MAX,
                rope_delta: 0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
    let err = core
        .submit(1, Ticket(0), ms(1), Work::TruncateTalker(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no Talker"), "{err}");
    let err = core
        .submit(9, Ticket(0), ms(1), Work::TruncateThinker(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("session 9 is not open"), "{err}");
}

fn rows(n: usize, width: usize, seed: f64) -> Tensor {
    let v: Vec<f32> = (0..n * width)
        .map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32)
        .collect();
    Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
}

fn talker_turn(cfg: &Config, talker: &Talker, prompt_len: usize, seed: f64) -> TalkerTurn {
    let e = cfg.talker_config.embedding_size;
    let mut turn = TalkerTurn::new(
        talker,
        TalkerPrompt {
            rows: rows(prompt_len, e, seed),
            positions: sequential_positions(0, prompt_len + 2, &Device::Cpu).unwrap(),
            rope_delta: 0,
        },
        TalkerTextRows {
            speaker_bos: rows(1, e, seed + 1.0).squeeze(0).unwrap(),
            text_end: rows(1, e, seed + 2.0).squeeze(0).unwrap(),
            text_pad: rows(1, e, seed + 3.0).squeeze(0).unwrap(),
        },
        TalkerOptions {
            sampling: SamplingOptions::greedy(),
            max_codes: 10,
            dit_codec_rows: None,
        },
    )
    .unwrap();
    for r in 0..4 {
        turn.push_reply_row(rows(1, e, seed + 10.0 + r as f64).squeeze(0).unwrap())
            .unwrap();
    }
    turn.finish_text();
    turn
}

/// A session thread: its Thinker script and a spoken answer through the scheduler thread,
/// each request submitted with `deadline` ahead of the clock.
fn run_session(
    scheduler: &Scheduler,
    thinker: &Thinker,
    talker: &Talker,
    mut turn: TalkerTurn,
    script: &Script,
    hang_up_after: Option<usize>,
) -> (Vec<u32>, Vec<u32>) {
    let mut link = scheduler.open_session().unwrap();
    let deadline = ms(200);
    let embeds = thinker.embed(&script.prompt).unwrap();
    let positions = sequential_positions(0, script.prompt.len(), &Device::Cpu).unwrap();
    let Outcome::Prefilled(out) = link
        .run(
            Work::ThinkerPrefill {
                embeds,
                positions,
                logits: LogitsFor::Last,
            },
            deadline,
        )
        .unwrap()
    else {
        panic!("a prefill answers Prefilled")
    };
    let mut logits = out.logits.unwrap().squeeze(0).unwrap();
    let mut ids = Vec::new();
    for _ in 0..script.steps {
        if hang_up_after == Some(ids.len()) {
            return (ids, turn.codes().to_vec());
        }
        let id = argmax(&logits);
        ids.push(id);
        let Outcome::Decoded(step) = link
            .run(Work::ThinkerDecode { id, rope_delta: 0 }, deadline)
            .unwrap()
        else {
            panic!("a decode step answers Decoded")
        };
        logits = step.logits;
    }
    loop {
        match turn.plan(talker).unwrap() {
            TalkerPlan::Forward(forward) => {
                let Outcome::TalkerLogits(logits) =
                    link.run(Work::TalkerForward(forward), deadline).unwrap()
                else {
                    panic!("a Talker step answers TalkerLogits")
                };
                if let TalkerStep::Finished(_) = turn.accept(logits).unwrap() {
                    break;
                }
            }
            TalkerPlan::NeedText => panic!("every reply row was queued"),
            TalkerPlan::Finished(_) => break,
        }
    }
    (ids, turn.codes().to_vec())
}

#[test]
fn session_threads_on_the_scheduler_thread_get_their_lone_results_and_a_hang_up_touches_no_other() {
    let (cfg, thinker, talker) = tiny();
    let scripts = scripts(thinker.vocab_size());
    let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::new());
    let scheduler = Scheduler::spawn(
        models(&thinker, Some(&talker)),
        clock,
        SchedulerConfig::default(),
    )
    .unwrap();
    let lone_codes: Vec<Vec<u32>> = (0..scripts.len())
        .map(|i| {
            let mut context = talker.clone();
            let mut turn = talker_turn(&cfg, &talker, 3 + 2 * i, i as f64);
            while let TalkerStep::Code(_) = turn.step(&mut context).unwrap() {}
            turn.codes().to_vec()
        })
        .collect();
    let hang_up = 1;
    let results: Vec<(Vec<u32>, Vec<u32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = scripts
            .iter()
            .enumerate()
            .map(|(i, script)| {
                let (scheduler, thinker, talker, cfg) = (&scheduler, &thinker, &talker, &cfg);
                scope.spawn(move || {
                    let turn = talker_turn(cfg, talker, 3 + 2 * i, i as f64);
                    let hang = (i == hang_up).then_some(2);
                    run_session(scheduler, thinker, talker, turn, script, hang)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, script) in scripts.iter().enumerate() {
        let want = alone(&thinker, script);
        if i == hang_up {
            assert_eq!(results[i].0, want[..2], "session {i} before hanging up");
            continue;
        }
        assert_eq!(results[i].0, want, "session {i}: ids");
        assert_eq!(results[i].1, lone_codes[i], "session {i}: codes");
        assert!(!lone_codes[i].is_empty());
    }
    let headroom = scheduler.headroom();
    assert!(headroom.passes > 0 && headroom.completed >= headroom.passes);
}

#[test]
fn cache_edits_run_in_order_with_the_sessions_work() {
    let (_, thinker, _) = tiny();
    let clock = SimulatedClock::new();
    let mut core = SchedulerCore::new(
        models(&thinker, None),
        SchedulerConfig::default(),
        clock.now(),
    )
    .unwrap();
    let (tx, rx) = bounded(8);
    core.open(1, tx).unwrap();
    let prompt: Vec<u32> = (20..28).collect();
    let work = [
        Work::ThinkerPrefill {
            embeds: thinker.embed(&prompt).unwrap(),
            positions: sequential_positions(0, prompt.len(), &Device::Cpu).unwrap(),
            logits: LogitsFor::None,
        },
        Work::ForgetThinker(2..5),
        Work::ThinkerDecode {
            id: 11,
            rope_delta: 3,
        },
        Work::TruncateThinker(4),
        Work::ThinkerDecode {
            id: 12,
            rope_delta: 3,
        },
    ];
    for (t, w) in work.into_iter().enumerate() {
        core.submit(1, Ticket(t as u64), ms(10), w).unwrap();
    }
    while core.step(&clock) {}
    let got: Vec<Outcome> = rx.try_iter().map(|c| c.outcome).collect();
    assert_eq!(got.len(), 5);
    // The same edits on a Thinker of its own.
    let mut context = thinker.clone();
    context
        .forward(
            &thinker.embed(&prompt).unwrap(),
            &sequential_positions(0, prompt.len(), &Device::Cpu).unwrap(),
            LogitsFor::None,
        )
        .unwrap();
    context.remove_cache_range(2..5).unwrap();
    let first = context.decode_step(11, 3).unwrap().logits;
    context.truncate_cache(4);
    let second = context.decode_step(12, 3).unwrap().logits;
    for (outcome, want) in [(&got[2], &first), (&got[4], &second)] {
        let Outcome::Decoded(step) = outcome else {
            panic!("{outcome:?}")
        };
        let diff = (&step.logits - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "{diff:e}");
    }
    assert!(matches!(got[1], Outcome::CacheEdited));
    assert!(matches!(got[3], Outcome::CacheEdited));
}

#[test]
fn dit_windows_of_one_length_share_a_batch_and_equal_each_alone() {
    use omnicall::model::token2wav::Token2Wav;
    use omnicall::model::token2wav::dit::SamplerOptions;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let (cfg, thinker, _) = tiny();
    // SAFETY: the model file is not modified while the tests map it.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let t2w = Token2Wav::new(&cfg.token2wav_config, vb.pp("token2wav")).unwrap();
    let dit = t2w.dit().clone();
    let schedule = dit.schedule(&SamplerOptions::default()).unwrap();
    let dc = dit.config().clone();
    let clock = SimulatedClock::new();
    let mut core = SchedulerCore::new(
        SchedulerModels {
            thinker: thinker.clone(),
            talker: None,
            vocoder: Some((dit.clone(), schedule.clone())),
        },
        SchedulerConfig::default(),
        clock.now(),
    )
    .unwrap();
    let window = |s: usize, n: usize| {
        let cond = rows(1, dc.enc_emb_dim, s as f64);
        let ref_mel = rows(12, dc.mel_dim, s as f64 + 0.5).unsqueeze(0).unwrap();
        let speaker = Arc::new(dit.speaker_condition(&cond, &ref_mel).unwrap());
        let codes: Vec<u32> = (0..n)
            .map(|i| ((i * 13 + s) % dc.num_embeds) as u32)
            .collect();
        let codes = Tensor::new(codes.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let noise = rows(n * dc.repeats, dc.mel_dim, s as f64 + 0.9)
            .unsqueeze(0)
            .unwrap();
        (speaker, codes, noise)
    };
    let windows = [window(1, 4), window(2, 4), window(3, 3)];
    let mut receivers = Vec::new();
    for (i, (speaker, codes, noise)) in windows.iter().enumerate() {
        let (tx, rx) = bounded(4);
        let session = i as SessionId + 1;
        core.open(session, tx).unwrap();
        let work = Work::DitWindow {
            speaker: speaker.clone(),
            codes: codes.clone(),
            noise: noise.clone(),
        };
        core.submit(session, Ticket(0), ms(40 + 10 * i as u64), work)
            .unwrap();
        receivers.push(rx);
    }
    assert_eq!(
        core.next_pass().unwrap(),
        Pass {
            network: Network::Vocoder,
            sessions: vec![1, 2]
        }
    );
    while core.step(&clock) {}
    for (i, rx) in receivers.iter().enumerate() {
        let c = rx.try_recv().unwrap();
        assert_eq!(c.batch, if i < 2 { 2 } else { 1 });
        let Outcome::Mel(mel) = c.outcome else {
            panic!("{:?}", c.outcome)
        };
        let (speaker, codes, noise) = &windows[i];
        let alone = dit
            .sample_scheduled(speaker, codes, noise, &schedule)
            .unwrap();
        let diff = (&mel - &alone)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4, "window {i}: {diff:e}");
    }
    // A window whose noise does not fit its codes is refused at submission.
    let (speaker, codes, _) = window(4, 4);
    let err = core
        .submit(
            1,
            Ticket(1),
            ms(1),
            Work::DitWindow {
                speaker,
                codes,
                noise: rows(5, dc.mel_dim, 0.0).unsqueeze(0).unwrap(),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("DiT noise"), "{err}");
}
