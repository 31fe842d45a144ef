//! The Talker against the reference fixtures: how its inputs are built from the Thinker's
//! outputs (`talker_inputs`), the prefill (`talker_logits`) and greedy decoding through the
//! streaming step API, fed one reply row at a time (`talker_greedy`).

use candle_core::{Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use omnicall::model::config::Config;
use omnicall::model::sampling::SamplingOptions;
use omnicall::model::speakers::Voices;
use omnicall::model::talker::{
    Talker, TalkerFinish, TalkerOptions, TalkerPrompt, TalkerStep, TalkerTextRows, TalkerTurn,
    multimodal_placeholder_ids, prompt_rows,
};

use crate::common::{self, Cases};

/// README tolerance for every `talker.*` float key.
const ATOL: f32 = 1e-4;

fn load() -> (Config, VarBuilder<'static>) {
    let cfg = common::model_config();
    let vb = common::model_weights();
    (cfg, vb)
}

fn load_talker() -> (Config, Talker, VarBuilder<'static>) {
    let (cfg, vb) = load();
    let talker = Talker::new(&cfg.talker_config, vb.pp("talker")).expect("talker builds");
    (cfg, talker, vb)
}

/// The Thinker's token embedding table (the Talker's text rows are made with it).
fn thinker_embedding(cfg: &Config, vb: &VarBuilder) -> Tensor {
    let text = &cfg.thinker_config.text_config;
    vb.pp("thinker")
        .pp("model")
        .pp("embed_tokens")
        .get((text.vocab_size, text.hidden_size), "weight")
        .expect("thinker.model.embed_tokens.weight")
}

fn fixture_voice_bos() -> u32 {
    let json = Cases::json();
    let name = json["settings"]["speaker"]
        .as_str()
        .expect("settings.speaker in cases.json");
    let voices = Voices::load(&common::model_dir(), &Device::Cpu).expect("voices");
    voices.get(name).expect("fixture voice").bos_token
}

/// The fixture's prompt length L (`talker.inputs_embeds` has L + 2 rows).
fn prompt_len(cases: &Cases) -> usize {
    cases.get("talker.inputs_embeds").dim(1).unwrap() - 2
}

fn rope_delta(cases: &Cases) -> i64 {
    cases.i64_vec("talker.prefill_rope_deltas")[0]
}

#[test]
fn talker_inputs() {
    let cases = Cases::load();
    let (cfg, vb) = load();
    let l = prompt_len(&cases);
    let inputs = cases.f32("talker.inputs_embeds").squeeze(0).unwrap();

    // Rows 0..L-1: Thinker prompt hidden + input embeddings with multimodal rows zeroed.
    let ids: Vec<u32> = cases
        .i64_vec("thinker.input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    let rows = prompt_rows(
        &cases.f32("thinker.last_hidden_state"),
        &cases.f32("thinker.inputs_embeds"),
        &ids,
        &multimodal_placeholder_ids(&cfg.thinker_config),
    )
    .unwrap();
    common::assert_close(
        "talker.inputs_embeds[:L]",
        &rows,
        &inputs.narrow(0, 0, l).unwrap(),
        ATOL,
    );

    // Row L: the voice's bos token through the Thinker's embedding; the reply ends with the
    // text end and text pad embeddings.
    let table = thinker_embedding(&cfg, &vb);
    let bos = fixture_voice_bos();
    assert_eq!(
        cases.i64_vec("talker.input_text_ids")[l],
        bos as i64,
        "text track holds the voice's bos token at L"
    );
    let text = TalkerTextRows::from_thinker_embedding(&cfg.talker_config, bos, |id| {
        table.get(id as usize)
    })
    .unwrap();
    common::assert_close(
        "talker.inputs_embeds[L]",
        &text.speaker_bos,
        &inputs.i(l).unwrap(),
        ATOL,
    );
    let reply = cases.f32("talker.thinker_reply_part").squeeze(0).unwrap();
    let r = reply.dim(0).unwrap();
    common::assert_close(
        "talker.thinker_reply_part[-2] (text end)",
        &text.text_end,
        &reply.i(r - 2).unwrap(),
        ATOL,
    );
    common::assert_close(
        "talker.thinker_reply_part[-1] (text pad)",
        &text.text_pad,
        &reply.i(r - 1).unwrap(),
        ATOL,
    );
}

#[test]
fn talker_logits() {
    let cases = Cases::load();
    let (_, mut talker, _) = load_talker();
    let l = prompt_len(&cases);
    let inputs = cases.f32("talker.inputs_embeds").squeeze(0).unwrap();
    let proj_input = talker
        .prefill_input(
            &inputs.narrow(0, 0, l).unwrap(),
            &inputs.i(l).unwrap(),
            &inputs.i(l + 1).unwrap(),
        )
        .unwrap();
    common::assert_close(
        "talker.prefill_proj_input",
        &proj_input,
        &cases.f32("talker.prefill_proj_input"),
        ATOL,
    );
    let hidden = talker
        .forward(&proj_input, &cases.get("talker.prefill_position_ids"))
        .unwrap();
    let logits = talker.logits(&hidden).unwrap().squeeze(0).unwrap();
    common::assert_close(
        "talker.first_step_logits",
        &logits,
        &cases.f32("talker.first_step_logits"),
        ATOL,
    );
}

/// Greedy codes through [`TalkerTurn`]: the first reply row arrives, the Talker prefills; each
/// later row arrives only when the previous step asked for it; then the Thinker finishes.
fn greedy_codes(cases: &Cases, repetition_penalty: f32) -> (Vec<u32>, Vec<Tensor>, TalkerFinish) {
    let (cfg, mut talker, vb) = load_talker();
    let l = prompt_len(cases);
    let inputs = cases.f32("talker.inputs_embeds").squeeze(0).unwrap();
    let reply = cases.f32("talker.thinker_reply_part").squeeze(0).unwrap();
    let max_codes = Cases::json()["spec"]["inputs"]["talker_new_tokens"]
        .as_u64()
        .expect("spec.inputs.talker_new_tokens in cases.json") as usize;

    let table = thinker_embedding(&cfg, &vb);
    let text =
        TalkerTextRows::from_thinker_embedding(&cfg.talker_config, fixture_voice_bos(), |id| {
            table.get(id as usize)
        })
        .unwrap();
    // Reply rows of the Thinker's tokens: row L+1 of the prefill, then the reply part without
    // its two closing rows (text end, text pad), which the turn adds itself.
    let mut rows = vec![inputs.i(l + 1).unwrap()];
    for j in 0..reply.dim(0).unwrap() - 2 {
        rows.push(reply.i(j).unwrap());
    }
    let mut rows = rows.into_iter();

    let mut turn = TalkerTurn::new(
        &talker,
        TalkerPrompt {
            rows: inputs.narrow(0, 0, l).unwrap(),
            positions: cases.get("talker.prefill_position_ids"),
            rope_delta: rope_delta(cases),
        },
        text,
        TalkerOptions {
            sampling: SamplingOptions {
                repetition_penalty,
                ..SamplingOptions::greedy()
            },
            max_codes,
            // The tiny DiT embeds every talker id, so nothing is masked here either way.
            dit_codec_rows: Some(cfg.token2wav_config.dit_config.num_embeds + 1),
        },
    )
    .unwrap();
    let mut logits = Vec::new();
    let finish = loop {
        match turn.step(&mut talker).unwrap() {
            TalkerStep::Code(_) => logits.push(turn.last_logits().unwrap().clone()),
            TalkerStep::NeedText => match rows.next() {
                Some(row) => turn.push_reply_row(row).unwrap(),
                None => turn.finish_text(),
            },
            TalkerStep::Finished(reason) => {
                if let TalkerFinish::EndCode(_) = reason {
                    logits.push(turn.last_logits().unwrap().clone());
                }
                break reason;
            }
        }
    };
    (turn.codes().to_vec(), logits, finish)
}

/// The reference's codes up to (not including) the first end id, and whether one came.
fn reference_codes(cases: &Cases, key: &str, stop: [u32; 2]) -> (Vec<u32>, bool) {
    let all: Vec<u32> = cases.i64_vec(key).iter().map(|&c| c as u32).collect();
    match all.iter().position(|c| stop.contains(c)) {
        Some(i) => (all[..i].to_vec(), true),
        None => (all, false),
    }
}

#[test]
fn talker_greedy() {
    let cases = Cases::load();
    let (cfg, _) = load();
    let stop = [
        cfg.talker_config.tts_codec_pad_token_id,
        cfg.talker_config.tts_codec_end_token_id,
    ];
    for (key, penalty) in [
        ("talker.generated_codes", 1.0),
        ("talker.generated_codes_rep105", 1.05),
    ] {
        let (codes, logits, finish) = greedy_codes(&cases, penalty);
        let (want, ended) = reference_codes(&cases, key, stop);
        assert_eq!(codes, want, "{key}");
        if ended {
            assert!(
                matches!(finish, TalkerFinish::EndCode(_)),
                "{key}: {finish:?}"
            );
        } else {
            assert_eq!(finish, TalkerFinish::Limit, "{key}");
        }
        eprintln!("{key}: {} codes equal, finish {finish:?}", codes.len());
        if penalty == 1.0 {
            let want = cases.f32("talker.step_logits");
            let got = Tensor::stack(&logits, 0).unwrap();
            common::assert_close("talker.step_logits", &got, &want, ATOL);
        }
    }
}
