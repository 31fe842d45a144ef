//! The Talker: how its inputs are built from the Thinker's outputs (`talker_inputs`), the
//! prefill (`talker_logits`) and greedy decoding through the streaming step API, fed one reply
//! row at a time (`talker_greedy`).

use candle_core::{IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::check::{Checker, Quantity};
use crate::model::config::Config;
use crate::model::sampling::{SamplingOptions, processed_logits};
use crate::model::speakers::Voices;
use crate::model::talker::{
    Talker, TalkerFinish, TalkerOptions, TalkerPrompt, TalkerStep, TalkerTextRows, TalkerTurn,
    multimodal_placeholder_ids, prompt_rows,
};

/// The Thinker's token embedding table (the Talker's text rows are made with it).
fn thinker_embedding(cfg: &Config, vb: &VarBuilder) -> anyhow::Result<Tensor> {
    let text = &cfg.thinker_config.text_config;
    Ok(vb
        .pp("thinker")
        .pp("model")
        .pp("embed_tokens")
        .get((text.vocab_size, text.hidden_size), "weight")?)
}

fn fixture_voice_bos(check: &Checker) -> anyhow::Result<u32> {
    let name = check.fixtures.json_str("settings/speaker")?;
    let voices = Voices::load(&check.fixtures.model_dir(), &check.options.device)?;
    Ok(voices.get(name)?.bos_token)
}

/// The fixture's prompt length L (`talker.inputs_embeds` has L + 2 rows).
fn prompt_len(check: &Checker) -> anyhow::Result<usize> {
    let rows = check.fixtures.get("talker.inputs_embeds")?.dim(1)?;
    anyhow::ensure!(
        rows >= 2,
        "talker.inputs_embeds has {rows} rows, fewer than 2"
    );
    Ok(rows - 2)
}

pub fn inputs(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let vb = check.weights()?;
    let l = prompt_len(check)?;
    let inputs = fx.f32("talker.inputs_embeds")?.squeeze(0)?;

    // Rows 0..L-1: Thinker prompt hidden + input embeddings with multimodal rows zeroed.
    let ids = fx.u32_vec("thinker.input_ids")?;
    let rows = prompt_rows(
        &check.input("thinker.last_hidden_state")?,
        &check.input("thinker.inputs_embeds")?,
        &ids,
        &multimodal_placeholder_ids(&cfg.thinker_config),
    )?;
    check.close(
        "talker.inputs_embeds[:L]",
        &rows,
        &inputs.narrow(0, 0, l)?,
        Quantity::Talker,
    );

    // Row L: the voice's bos token through the Thinker's embedding; the reply ends with the
    // text end and text pad embeddings.
    let table = thinker_embedding(&cfg, &vb)?;
    let bos = fixture_voice_bos(check)?;
    check.equal(
        "talker.input_text_ids[L] (the voice's bos)",
        fx.i64_vec("talker.input_text_ids")?.get(l).copied(),
        Some(bos as i64),
    );
    let text = TalkerTextRows::from_thinker_embedding(&cfg.talker_config, bos, |id| {
        table.get(id as usize)
    })?;
    check.close(
        "talker.inputs_embeds[L]",
        &text.speaker_bos,
        &inputs.i(l)?,
        Quantity::Talker,
    );
    let reply = fx.f32("talker.thinker_reply_part")?.squeeze(0)?;
    let r = reply.dim(0)?;
    anyhow::ensure!(
        r >= 2,
        "talker.thinker_reply_part has {r} rows, fewer than 2"
    );
    check.close(
        "talker.thinker_reply_part[-2] (text end)",
        &text.text_end,
        &reply.i(r - 2)?,
        Quantity::Talker,
    );
    check.close(
        "talker.thinker_reply_part[-1] (text pad)",
        &text.text_pad,
        &reply.i(r - 1)?,
        Quantity::Talker,
    );
    Ok(())
}

pub fn logits(check: &mut Checker) -> anyhow::Result<()> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let mut talker = Talker::new(&cfg.talker_config, check.weights()?.pp("talker"))?;
    let l = prompt_len(check)?;
    let inputs = check.input("talker.inputs_embeds")?.squeeze(0)?;
    let proj_input =
        talker.prefill_input(&inputs.narrow(0, 0, l)?, &inputs.i(l)?, &inputs.i(l + 1)?)?;
    check.close(
        "talker.prefill_proj_input",
        &proj_input,
        &fx.f32("talker.prefill_proj_input")?,
        Quantity::Talker,
    );
    let hidden = talker.forward(
        &proj_input,
        &check.input_ids("talker.prefill_position_ids")?,
    )?;
    let logits = talker.logits(&hidden)?.squeeze(0)?;
    check.close(
        "talker.first_step_logits",
        &logits,
        &fx.f32("talker.first_step_logits")?,
        Quantity::Talker,
    );
    Ok(())
}

/// A greedy run of the Talker.
struct GreedyCodes {
    codes: Vec<u32>,
    /// The raw logits of each code's step.
    logits: Vec<Tensor>,
    /// The logits each code was chosen from (penalised).
    chosen_from: Vec<Tensor>,
    finish: TalkerFinish,
}

/// Greedy codes through [`TalkerTurn`]: the first reply row arrives, the Talker prefills; each
/// later row arrives only when the previous step asked for it; then the Thinker finishes.
fn greedy_codes(check: &Checker, repetition_penalty: f32) -> anyhow::Result<GreedyCodes> {
    let fx = check.fixtures;
    let cfg = check.config()?;
    let vb = check.weights()?;
    let mut talker = Talker::new(&cfg.talker_config, vb.pp("talker"))?;
    let l = prompt_len(check)?;
    let inputs = check.input("talker.inputs_embeds")?.squeeze(0)?;
    let reply = check.input("talker.thinker_reply_part")?.squeeze(0)?;
    let max_codes = fx.json_u64("spec/inputs/talker_new_tokens")? as usize;

    let table = thinker_embedding(&cfg, &vb)?;
    let text = TalkerTextRows::from_thinker_embedding(
        &cfg.talker_config,
        fixture_voice_bos(check)?,
        |id| table.get(id as usize),
    )?;
    // Reply rows of the Thinker's tokens: row L+1 of the prefill, then the reply part without
    // its two closing rows (text end, text pad), which the turn adds itself.
    let mut rows = vec![inputs.i(l + 1)?];
    for j in 0..reply.dim(0)?.saturating_sub(2) {
        rows.push(reply.i(j)?);
    }
    let mut rows = rows.into_iter();

    let sampling = SamplingOptions {
        repetition_penalty,
        ..SamplingOptions::greedy()
    };
    let mut turn = TalkerTurn::new(
        &talker,
        TalkerPrompt {
            rows: inputs.narrow(0, 0, l)?,
            positions: check.input_ids("talker.prefill_position_ids")?,
            rope_delta: fx.i64_vec("talker.prefill_rope_deltas")?[0],
        },
        text,
        TalkerOptions {
            sampling: sampling.clone(),
            max_codes,
            dit_codec_rows: Some(cfg.token2wav_config.dit_config.num_embeds + 1),
        },
    )?;
    let mut logits = Vec::new();
    let mut chosen_from = Vec::new();
    let finish = loop {
        let history = turn.repetition_history().to_vec();
        match turn.step(&mut talker)? {
            TalkerStep::Code(_) => {
                if let Some(raw) = turn.last_logits() {
                    logits.push(raw.clone());
                    // Suppressed ids are never chosen, so only the penalty moves a margin.
                    chosen_from.push(processed_logits(raw, &sampling, &history, &[])?);
                }
            }
            TalkerStep::NeedText => match rows.next() {
                Some(row) => turn.push_reply_row(row)?,
                None => turn.finish_text(),
            },
            TalkerStep::Finished(reason) => {
                if let TalkerFinish::EndCode(_) = reason {
                    logits.extend(turn.last_logits().cloned());
                }
                break reason;
            }
        }
    };
    Ok(GreedyCodes {
        codes: turn.codes().to_vec(),
        logits,
        chosen_from,
        finish,
    })
}

/// The reference's codes up to (not including) the first end id, and whether one came.
fn reference_codes(check: &Checker, key: &str, stop: [u32; 2]) -> anyhow::Result<(Vec<u32>, bool)> {
    let all = check.fixtures.u32_vec(key)?;
    Ok(match all.iter().position(|c| stop.contains(c)) {
        Some(i) => (all[..i].to_vec(), true),
        None => (all, false),
    })
}

pub fn greedy(check: &mut Checker) -> anyhow::Result<()> {
    let cfg = check.config()?;
    let stop = [
        cfg.talker_config.tts_codec_pad_token_id,
        cfg.talker_config.tts_codec_end_token_id,
    ];
    for (key, penalty) in [
        ("talker.generated_codes", 1.0),
        ("talker.generated_codes_rep105", 1.05),
    ] {
        let GreedyCodes {
            codes,
            logits,
            chosen_from,
            finish,
        } = greedy_codes(check, penalty)?;
        let (want, ended) = reference_codes(check, key, stop)?;
        // Step logits of the reference exist for the run without a penalty; the run with one
        // judges a near tie on its own.
        let want_logits = if penalty == 1.0 {
            Some(check.fixtures.f32("talker.step_logits")?)
        } else {
            None
        };
        let same = match &want_logits {
            Some(want_logits) => {
                check.greedy_ids(key, &codes, &want, Some(want_logits), Quantity::Talker)
            }
            None => check.greedy_ids_by_own_logits(
                key,
                &codes,
                &want,
                &chosen_from,
                Quantity::Talker,
            )?,
        };
        if !same {
            continue;
        }
        let finish_agrees = if ended {
            matches!(finish, TalkerFinish::EndCode(_))
        } else {
            finish == TalkerFinish::Limit
        };
        check.holds(&format!("{key} finish"), finish_agrees, || {
            format!(
                "finished with {finish:?}, the reference {}",
                if ended {
                    "with an end code"
                } else {
                    "at the limit"
                }
            )
        });
        if let Some(want) = want_logits {
            let got = Tensor::stack(&logits, 0)?;
            check.close("talker.step_logits", &got, &want, Quantity::Talker);
        }
    }
    Ok(())
}
