//! Batched decode steps (one pass of the weights for several sessions, each attending over its
//! own KV cache) against each session run alone: the Thinker on the fixture model and on
//! `models/tiny`, the Talker's codes, and a barge-in truncating one sequence mid-way.

mod common;

use candle_core::{Device, Result, Tensor};
use omnicall::model::config::Config;
use omnicall::model::sampling::SamplingOptions;
use omnicall::model::talker::{
    Talker, TalkerOptions, TalkerPrompt, TalkerStep, TalkerTextRows, TalkerTurn, step_batch,
};
use omnicall::model::thinker::decoder::sequential_positions;
use omnicall::model::thinker::{LogitsFor, Thinker, ThinkerDecode, ThinkerRows};

/// Logits of a batched step may differ from the lone step's only by summation order.
const LOGITS_ATOL: f32 = 1e-5;

fn tiny_model() -> (Config, candle_nn::VarBuilder<'static>) {
    common::tiny_model()
}

/// One session: a prompt at multimodal positions, a rope delta and how many tokens it decodes.
struct Session {
    ids: Vec<u32>,
    positions: Tensor,
    rope_delta: i64,
    steps: usize,
}

/// Sessions of different prompt lengths and decode lengths; the first prompts carry 3-D
/// positions whose rows differ (as image and video tokens' do), so their rope deltas differ.
fn sessions(vocab: usize) -> Vec<Session> {
    let spec = [(3usize, 6usize), (11, 9), (6, 4), (17, 7)];
    spec.iter()
        .enumerate()
        .map(|(s, &(len, steps))| {
            let ids: Vec<u32> = (0..len)
                .map(|i| ((i * 7919 + s * 104_729 + 13) % vocab) as u32)
                .collect();
            // Temporal row runs ahead, height and width rows lag: like a grid of media tokens.
            let rows: Vec<i64> = (0..3)
                .flat_map(|row| (0..len as i64).map(move |i| i + (s as i64) * (2 - row) / 2))
                .collect();
            let positions = Tensor::from_vec(rows, (3, len), &Device::Cpu).unwrap();
            let last = positions.max_all().unwrap().to_scalar::<i64>().unwrap();
            Session {
                ids,
                positions,
                rope_delta: last + 1 - len as i64,
                steps,
            }
        })
        .collect()
}

fn argmax(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// What one session produced: greedy ids and the logits that chose each.
#[derive(Debug)]
struct Decoded {
    ids: Vec<u32>,
    logits: Vec<Tensor>,
}

/// A barge-in: after `after_steps` decode steps the context rolls back to the prompt and
/// decoding goes on from `restart_id`.
#[derive(Debug, Clone, Copy)]
struct BargeIn {
    session: usize,
    after_steps: usize,
    restart_id: u32,
}

fn decode_alone(thinker: &Thinker, session: &Session, barge_in: Option<BargeIn>) -> Decoded {
    let mut context = thinker.clone();
    let embeds = context.embed(&session.ids).unwrap();
    let out = context
        .forward(&embeds, &session.positions, LogitsFor::Last)
        .unwrap();
    let mut logits = out.logits.unwrap().squeeze(0).unwrap();
    let mut decoded = Decoded {
        ids: Vec::new(),
        logits: Vec::new(),
    };
    for step in 0..session.steps {
        let mut id = argmax(&logits);
        if let Some(b) = barge_in.filter(|b| b.after_steps == step) {
            context.truncate_cache(session.ids.len());
            id = b.restart_id;
        }
        decoded.ids.push(id);
        decoded.logits.push(logits.clone());
        logits = context.decode_step(id, session.rope_delta).unwrap().logits;
    }
    decoded
}

/// Every session prefilled in one batched pass (prompts of different lengths riding together),
/// then one batched decode step per round for the sessions still decoding.
fn decode_batched(
    thinker: &Thinker,
    sessions: &[Session],
    barge_in: Option<BargeIn>,
) -> Vec<Decoded> {
    let mut contexts: Vec<Thinker> = sessions.iter().map(|_| thinker.clone()).collect();
    for c in contexts.iter_mut() {
        c.clear_cache();
    }
    let mut prefill: Vec<ThinkerRows<'_>> = contexts
        .iter_mut()
        .zip(sessions)
        .map(|(context, s)| ThinkerRows {
            embeds: thinker.embed(&s.ids).unwrap(),
            positions: s.positions.clone(),
            logits: LogitsFor::Last,
            context,
        })
        .collect();
    let outputs = thinker.forward_batch(&mut prefill).unwrap();
    drop(prefill);
    let mut logits: Vec<Tensor> = outputs
        .into_iter()
        .map(|o| o.logits.unwrap().squeeze(0).unwrap())
        .collect();
    let mut decoded: Vec<Decoded> = sessions
        .iter()
        .map(|_| Decoded {
            ids: Vec::new(),
            logits: Vec::new(),
        })
        .collect();
    let rounds = sessions.iter().map(|s| s.steps).max().unwrap_or(0);
    for round in 0..rounds {
        let mut running = Vec::new();
        let mut steps = Vec::new();
        for (i, context) in contexts.iter_mut().enumerate() {
            if round >= sessions[i].steps {
                continue;
            }
            let mut id = argmax(&logits[i]);
            if let Some(b) = barge_in.filter(|b| b.session == i && b.after_steps == round) {
                context.truncate_cache(sessions[i].ids.len());
                id = b.restart_id;
            }
            decoded[i].ids.push(id);
            decoded[i].logits.push(logits[i].clone());
            running.push(i);
            steps.push(ThinkerDecode {
                context,
                id,
                rope_delta: sessions[i].rope_delta,
            });
        }
        let outs = thinker.decode_batch(&mut steps).unwrap();
        for (i, out) in running.into_iter().zip(outs) {
            logits[i] = out.logits;
        }
    }
    decoded
}

fn assert_batched_equals_alone(thinker: &Thinker, barge_in: Option<BargeIn>) {
    let sessions = sessions(thinker.vocab_size());
    let batched = decode_batched(thinker, &sessions, barge_in);
    for (i, session) in sessions.iter().enumerate() {
        let alone = decode_alone(thinker, session, barge_in.filter(|b| b.session == i));
        assert_eq!(batched[i].ids, alone.ids, "session {i}: greedy ids");
        for (k, (b, a)) in batched[i].logits.iter().zip(&alone.logits).enumerate() {
            let diff = max_diff(b, a);
            assert!(
                diff <= LOGITS_ATOL,
                "session {i} step {k}: logits differ by {diff:e} (atol {LOGITS_ATOL:e})"
            );
        }
        assert_eq!(batched[i].ids.len(), session.steps);
    }
}

#[test]
fn batched_thinker_decode_equals_each_session_alone_on_the_fixture_model() {
    let cfg = common::model_config();
    let thinker = Thinker::new(&cfg.thinker_config, common::model_weights().pp("thinker")).unwrap();
    assert_batched_equals_alone(&thinker, None);
}

#[test]
fn batched_thinker_decode_equals_each_session_alone_on_the_tiny_model() {
    let (cfg, vb) = tiny_model();
    let thinker = Thinker::new(&cfg.thinker_config, vb.pp("thinker")).unwrap();
    assert_batched_equals_alone(&thinker, None);
}

#[test]
fn a_barge_in_on_one_sequence_leaves_the_others_unchanged() {
    let cfg = common::model_config();
    let thinker = Thinker::new(&cfg.thinker_config, common::model_weights().pp("thinker")).unwrap();
    let barge_in = BargeIn {
        session: 1,
        after_steps: 3,
        restart_id: 5,
    };
    // The others equal their lone runs without any barge-in, the cut one its lone run with it.
    assert_batched_equals_alone(&thinker, Some(barge_in));
}

#[test]
fn a_context_that_is_not_a_clone_of_the_batch_weights_is_refused() {
    let cfg = common::model_config();
    let vb = common::model_weights();
    let thinker = Thinker::new(&cfg.thinker_config, vb.pp("thinker")).unwrap();
    let mut foreign = Thinker::new(&cfg.thinker_config, vb.pp("thinker")).unwrap();
    let err = thinker
        .decode_batch(&mut [ThinkerDecode {
            context: &mut foreign,
            id: 1,
            rope_delta: 0,
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not share"), "{err}");
    let mut context = thinker.clone();
    let err = thinker
        .forward_batch(&mut [ThinkerRows {
            context: &mut context,
            embeds: thinker.embed(&[1, 2]).unwrap(),
            positions: sequential_positions(0, 3, &Device::Cpu).unwrap(),
            logits: LogitsFor::Last,
        }])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sequence 0") && err.contains("positions"),
        "{err}"
    );
}

fn rows(n: usize, width: usize, seed: f64) -> Tensor {
    let v: Vec<f32> = (0..n * width)
        .map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32)
        .collect();
    Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
}

/// A turn with `prompt_len` prompt rows and every one of `replies` reply rows queued.
fn talker_turn(
    cfg: &Config,
    talker: &Talker,
    prompt_len: usize,
    replies: usize,
    seed: f64,
) -> TalkerTurn {
    let e = cfg.talker_config.embedding_size;
    let text = TalkerTextRows {
        speaker_bos: rows(1, e, seed + 1.0).squeeze(0).unwrap(),
        text_end: rows(1, e, seed + 2.0).squeeze(0).unwrap(),
        text_pad: rows(1, e, seed + 3.0).squeeze(0).unwrap(),
    };
    let mut turn = TalkerTurn::new(
        talker,
        TalkerPrompt {
            rows: rows(prompt_len, e, seed),
            positions: sequential_positions(0, prompt_len + 2, &Device::Cpu).unwrap(),
            rope_delta: 0,
        },
        text,
        TalkerOptions {
            sampling: SamplingOptions::greedy(),
            max_codes: 12,
            dit_codec_rows: None,
        },
    )
    .unwrap();
    for r in 0..replies {
        turn.push_reply_row(rows(1, e, seed + 10.0 + r as f64).squeeze(0).unwrap())
            .unwrap();
    }
    turn.finish_text();
    turn
}

#[test]
fn batched_talker_steps_give_each_turn_its_lone_codes() -> Result<()> {
    let cfg = common::model_config();
    let talker = Talker::new(&cfg.talker_config, common::model_weights().pp("talker"))?;
    let shapes = [(4usize, 3usize, 0.0f64), (9, 6, 0.7), (2, 1, 1.9)];
    let mut alone_codes = Vec::new();
    let mut alone_logits = Vec::new();
    let mut alone_cache_lens = Vec::new();
    for &(len, replies, seed) in &shapes {
        let mut context = talker.clone();
        let mut turn = talker_turn(&cfg, &talker, len, replies, seed);
        let mut logits = Vec::new();
        while let TalkerStep::Code(_) = turn.step(&mut context)? {
            logits.push(turn.last_logits().unwrap().clone());
        }
        alone_codes.push(turn.codes().to_vec());
        alone_cache_lens.push(context.cache_len());
        alone_logits.push(logits);
    }
    let mut contexts: Vec<Talker> = shapes.iter().map(|_| talker.clone()).collect();
    let mut turns: Vec<TalkerTurn> = shapes
        .iter()
        .map(|&(len, replies, seed)| talker_turn(&cfg, &talker, len, replies, seed))
        .collect();
    let mut batched_logits: Vec<Vec<Tensor>> = shapes.iter().map(|_| Vec::new()).collect();
    loop {
        let mut pairs: Vec<(&mut TalkerTurn, &mut Talker)> =
            turns.iter_mut().zip(contexts.iter_mut()).collect();
        let steps = step_batch(&talker, &mut pairs)?;
        for (i, step) in steps.iter().enumerate() {
            if let TalkerStep::Code(_) = step {
                batched_logits[i].push(turns[i].last_logits().unwrap().clone());
            }
        }
        if steps.iter().all(|s| matches!(s, TalkerStep::Finished(_))) {
            break;
        }
    }
    let total: usize = alone_codes.iter().map(Vec::len).sum();
    assert!(total > shapes.len(), "the turns spoke {total} codes in all");
    for i in 0..shapes.len() {
        assert_eq!(
            turns[i].codes(),
            alone_codes[i].as_slice(),
            "turn {i}: codes"
        );
        for (k, (b, a)) in batched_logits[i].iter().zip(&alone_logits[i]).enumerate() {
            let diff = max_diff(b, a);
            assert!(
                diff <= LOGITS_ATOL,
                "turn {i} code {k}: logits differ by {diff:e}"
            );
        }
        assert_eq!(
            contexts[i].cache_len(),
            alone_cache_lens[i],
            "turn {i}: cache"
        );
    }
    Ok(())
}

#[test]
fn batched_dit_windows_equal_each_window_alone() -> Result<()> {
    use omnicall::model::token2wav::Token2Wav;
    use omnicall::model::token2wav::dit::{DitWindow, SamplerOptions};
    let cfg = common::model_config();
    let t2w = Token2Wav::new(
        &cfg.token2wav_config,
        common::model_weights().pp("token2wav"),
    )?;
    let dit = t2w.dit();
    let dc = dit.config();
    let schedule = dit.schedule(&SamplerOptions::default())?;
    let codes_per_window = 6;
    let frames = codes_per_window * dc.repeats;
    // Three sessions: their own voices, codes and noise.
    let sessions: Vec<_> = (0..3)
        .map(|s| {
            let cond = rows(1, dc.enc_emb_dim, s as f64 * 3.1);
            let ref_mel = rows(20, dc.mel_dim, s as f64 * 1.7).unsqueeze(0)?;
            let speaker = dit.speaker_condition(&cond, &ref_mel)?;
            let codes: Vec<u32> = (0..codes_per_window)
                .map(|i| ((i * 31 + s * 7) % dc.num_embeds) as u32)
                .collect();
            let codes = Tensor::new(codes.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let noise = rows(frames, dc.mel_dim, 0.3 + s as f64).unsqueeze(0)?;
            Ok((speaker, codes, noise))
        })
        .collect::<Result<_>>()?;
    let windows: Vec<DitWindow<'_>> = sessions
        .iter()
        .map(|(speaker, codes, noise)| DitWindow {
            speaker,
            codes,
            noise,
        })
        .collect();
    let batched = dit.sample_scheduled_batch(&windows, &schedule)?;
    for (i, (speaker, codes, noise)) in sessions.iter().enumerate() {
        let alone = dit.sample_scheduled(speaker, codes, noise, &schedule)?;
        assert_eq!(batched[i].dims(), alone.dims());
        let diff = max_diff(&batched[i], &alone);
        assert!(diff <= 1e-4, "window {i}: mel differs by {diff:e}");
    }
    // Windows of different lengths cannot share a batch.
    let short = sessions[0].1.narrow(1, 0, codes_per_window - 1)?;
    let short_noise = sessions[0].2.narrow(1, 0, frames - dc.repeats)?;
    let err = dit
        .sample_scheduled_batch(
            &[
                windows[1],
                DitWindow {
                    speaker: &sessions[0].0,
                    codes: &short,
                    noise: &short_noise,
                },
            ],
            &schedule,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("same number of codes"), "{err}");
    Ok(())
}
