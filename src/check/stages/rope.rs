//! TMRoPE position ids (`get_rope_index`) for text, audio, image, video and video with its
//! sound track, the live block-by-block layout of the last one, the Talker's positions and the
//! chat template's ids.

use anyhow::Context;

use crate::check::Checker;
use crate::model::chat::{ChatTokenizer, Content, Conversation, DEFAULT_SYSTEM_PROMPT};
use crate::model::thinker::audio_encoder::output_len;
use crate::model::thinker::rope::{
    InterleavedSegment, MediaLayout, PositionIds, RopeIndexConfig, VideoGrid, VisionGrid,
    get_rope_index, interleaved_chunks, text_positions,
};

fn grid(check: &Checker, key: &str) -> anyhow::Result<VisionGrid> {
    let g = check.fixtures.usize_vec(key)?;
    anyhow::ensure!(g.len() == 3, "{key} is not one (t, h, w) grid: {g:?}");
    Ok(VisionGrid::new(g[0], g[1], g[2]))
}

/// Audio tokens of a clip of `key` mel frames.
fn audio_tokens(check: &Checker, key: &str) -> anyhow::Result<usize> {
    Ok(output_len(check.fixtures.i64_vec(key)?[0] as usize))
}

/// The media of each rope case, from the fixtures.
pub(super) fn media(check: &Checker, case: &str) -> anyhow::Result<MediaLayout> {
    let fx = check.fixtures;
    Ok(match case {
        "text" => MediaLayout::default(),
        "audio" => MediaLayout {
            audio_tokens: vec![audio_tokens(check, "rope.audio.audio_seqlens")?],
            ..Default::default()
        },
        "image" => MediaLayout {
            images: vec![grid(check, "image.image_grid_thw")?],
            ..Default::default()
        },
        "video" => MediaLayout {
            videos: vec![VideoGrid {
                grid: grid(check, "video.video_grid_thw")?,
                second_per_grid: fx.f32_scalar("rope.video.second_per_grid")?,
            }],
            ..Default::default()
        },
        "video_audio" => MediaLayout {
            videos: vec![VideoGrid {
                grid: grid(check, "rope.video_audio.video_grid_thw")?,
                second_per_grid: fx.f32_scalar("rope.video_audio.second_per_grid")?,
            }],
            audio_tokens: vec![audio_tokens(check, "rope.video_audio.audio_seqlens")?],
            use_audio_in_video: true,
            ..Default::default()
        },
        "thinker" => MediaLayout {
            images: vec![grid(check, "image.image_grid_thw")?],
            audio_tokens: vec![audio_tokens(check, "audio_encoder.feature_lens")?],
            ..Default::default()
        },
        other => anyhow::bail!("no rope case {other}"),
    })
}

/// Records whether `got` equals the fixture's [3, 1, L] positions and [1, 1] delta of `prefix`.
pub(super) fn positions(
    check: &mut Checker,
    prefix: &str,
    got: &PositionIds,
    delta: i64,
) -> anyhow::Result<()> {
    positions_against(
        check,
        prefix,
        &format!("{prefix}.position_ids"),
        &format!("{prefix}.rope_deltas"),
        got,
        delta,
    )
}

/// Records whether `got` and `delta` equal the fixtures `positions_key` and `deltas_key`.
fn positions_against(
    check: &mut Checker,
    label: &str,
    positions_key: &str,
    deltas_key: &str,
    got: &PositionIds,
    delta: i64,
) -> anyhow::Result<()> {
    let want = check.fixtures.i64_vec(positions_key)?;
    let want_delta = check.fixtures.i64_vec(deltas_key)?[0];
    let len = got.len();
    check.equal(&format!("{label} position count"), want.len(), 3 * len);
    if want.len() == 3 * len {
        check.equal(
            &format!("{label} temporal positions"),
            &got.t[..],
            &want[..len],
        );
        check.equal(
            &format!("{label} height positions"),
            &got.h[..],
            &want[len..2 * len],
        );
        check.equal(
            &format!("{label} width positions"),
            &got.w[..],
            &want[2 * len..],
        );
    }
    check.equal(&format!("{label} rope delta"), delta, want_delta);
    Ok(())
}

fn rope_config(check: &Checker) -> anyhow::Result<RopeIndexConfig> {
    Ok(RopeIndexConfig::from(&check.config()?.thinker_config))
}

pub fn case(check: &mut Checker, case: &str) -> anyhow::Result<()> {
    let cfg = rope_config(check)?;
    let ids = check.fixtures.u32_vec(&format!("rope.{case}.input_ids"))?;
    let (got, delta) = get_rope_index(&cfg, &ids, &media(check, case)?)?;
    positions(check, &format!("rope.{case}"), &got, delta)
}

pub fn video_audio(check: &mut Checker) -> anyhow::Result<()> {
    case(check, "video_audio")?;

    // The same segment laid out live, one chunk at a time.
    let cfg = rope_config(check)?;
    let ids = check.fixtures.u32_vec("rope.video_audio.input_ids")?;
    let media = media(check, "video_audio")?;
    let video = media.videos[0];
    let bos = ids
        .iter()
        .position(|&id| id == cfg.vision_start_token_id)
        .context("no vision bos in the video+audio prompt")?;
    let mut live = text_positions(0, bos);
    let (mut segment, pair) =
        InterleavedSegment::open(&cfg, live.next_start().unwrap_or(0), video.second_per_grid);
    live.extend(&pair);
    let per_frame = video.grid.tokens_per_frame(cfg.spatial_merge_size);
    for chunk in interleaved_chunks(&cfg, &video, media.audio_tokens[0]) {
        anyhow::ensure!(
            chunk.video.len() % per_frame == 0,
            "a chunk holds part of a grid"
        );
        let frames = vec![(video.grid.h, video.grid.w); chunk.video.len() / per_frame];
        live.extend(&segment.push_chunk(&frames, chunk.audio.len())?);
    }
    let eos = segment.close();
    let next = eos
        .next_start()
        .context("the segment's end has no position")?;
    live.extend(&eos);
    live.extend(&text_positions(next, ids.len().saturating_sub(live.len())));
    let delta = live.max().unwrap_or(0) + 1 - ids.len() as i64;
    positions_against(
        check,
        "rope.video_audio (laid out live)",
        "rope.video_audio.position_ids",
        "rope.video_audio.rope_deltas",
        &live,
        delta,
    )
}

/// The Talker's prefill positions: the same rules with the talker config, on the text track
/// (prompt, speaker bos, first reply token).
pub fn talker(check: &mut Checker) -> anyhow::Result<()> {
    let cfg = RopeIndexConfig::from(&check.config()?.talker_config);
    let ids = check.fixtures.u32_vec("talker.input_text_ids")?;
    let media = MediaLayout {
        images: vec![grid(check, "talker.image_grid_thw")?],
        audio_tokens: vec![audio_tokens(check, "talker.audio_feature_lengths")?],
        ..Default::default()
    };
    let (got, delta) = get_rope_index(&cfg, &ids, &media)?;
    positions_against(
        check,
        "talker.prefill",
        "talker.prefill_position_ids",
        "talker.prefill_rope_deltas",
        &got,
        delta,
    )
}

/// The user turns of the fixture prompts (gen_reference.py), media first as the generator
/// writes them; sizes come from the fixtures.
fn fixture_conversation(check: &Checker, case: &str) -> anyhow::Result<Conversation> {
    let media = media(check, case)?;
    let video = |with_audio: bool| Content::Video {
        video: media.videos[0],
        audio_tokens: with_audio.then(|| media.audio_tokens[0]),
    };
    let user = match case {
        "text" => vec![Content::Text("Hello, who are you?".into())],
        "audio" => vec![
            Content::Audio {
                tokens: media.audio_tokens[0],
            },
            Content::Text("What is this sound?".into()),
        ],
        "image" => vec![
            Content::Image {
                grid: media.images[0],
            },
            Content::Text("Describe the picture.".into()),
        ],
        "video" => vec![
            video(false),
            Content::Text("What happens in the video?".into()),
        ],
        "video_audio" => vec![
            video(true),
            Content::Text("What happens and what is said?".into()),
        ],
        "thinker" => vec![
            Content::Audio {
                tokens: media.audio_tokens[0],
            },
            Content::Image {
                grid: media.images[0],
            },
            Content::Text("What do you hear and see?".into()),
        ],
        other => anyhow::bail!("no conversation for {other}"),
    };
    Ok(Conversation::new(DEFAULT_SYSTEM_PROMPT, user))
}

pub fn chat_template_ids(check: &mut Checker) -> anyhow::Result<()> {
    let files = check.model_files()?;
    let cfg = check.config()?;
    let tokenizer =
        ChatTokenizer::load(&files, &cfg.thinker_config).context("fixture tokenizer")?;
    for (case, key) in [
        ("text", "rope.text.input_ids"),
        ("audio", "rope.audio.input_ids"),
        ("image", "rope.image.input_ids"),
        ("video", "rope.video.input_ids"),
        ("video_audio", "rope.video_audio.input_ids"),
        ("thinker", "thinker.input_ids"),
    ] {
        let conversation = fixture_conversation(check, case)?;
        let prompt = tokenizer
            .encode_conversation(&conversation, true)
            .with_context(|| format!("chat template of {case}"))?;
        check.equal(key, prompt.ids.clone(), check.fixtures.u32_vec(key)?);
        let prefix = if case == "thinker" {
            "thinker".to_string()
        } else {
            format!("rope.{case}")
        };
        positions(check, &prefix, &prompt.positions, prompt.rope_delta)?;
    }
    Ok(())
}
