//! TMRoPE position ids (`get_rope_index`) against the reference for text, audio, image, video and
//! video with its sound track, plus the live block-by-block layout of the last one.

use omnicall::model::chat::{ChatTokenizer, Content, Conversation, DEFAULT_SYSTEM_PROMPT};
use omnicall::model::config::Config;
use omnicall::model::loading::ModelFiles;
use omnicall::model::thinker::audio_encoder::output_len;
use omnicall::model::thinker::rope::{
    InterleavedSegment, MediaLayout, PositionIds, RopeIndexConfig, VideoGrid, VisionGrid,
    get_rope_index, interleaved_chunks, text_positions,
};

use crate::common::{self, Cases};

pub fn config() -> Config {
    ModelFiles::from_dir(&common::model_dir())
        .expect("fixture model folder")
        .load_config()
        .expect("fixture config.json")
}

pub fn ids(cases: &Cases, key: &str) -> Vec<u32> {
    cases.i64_vec(key).into_iter().map(|i| i as u32).collect()
}

pub fn grid(cases: &Cases, key: &str) -> VisionGrid {
    let g = cases.i64_vec(key);
    assert_eq!(g.len(), 3, "{key} is one (t, h, w) grid");
    VisionGrid::new(g[0] as usize, g[1] as usize, g[2] as usize)
}

pub fn second_per_grid(cases: &Cases, key: &str) -> f32 {
    cases
        .f32(key)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

/// Audio tokens of a clip of `key` mel frames.
pub fn audio_tokens(cases: &Cases, key: &str) -> usize {
    output_len(cases.i64_vec(key)[0] as usize)
}

/// The media of each rope case, from the fixtures.
pub fn media(cases: &Cases, case: &str) -> MediaLayout {
    match case {
        "text" => MediaLayout::default(),
        "audio" => MediaLayout {
            audio_tokens: vec![audio_tokens(cases, "rope.audio.audio_seqlens")],
            ..Default::default()
        },
        "image" => MediaLayout {
            images: vec![grid(cases, "image.image_grid_thw")],
            ..Default::default()
        },
        "video" => MediaLayout {
            videos: vec![VideoGrid {
                grid: grid(cases, "video.video_grid_thw"),
                second_per_grid: second_per_grid(cases, "rope.video.second_per_grid"),
            }],
            ..Default::default()
        },
        "video_audio" => MediaLayout {
            videos: vec![VideoGrid {
                grid: grid(cases, "rope.video_audio.video_grid_thw"),
                second_per_grid: second_per_grid(cases, "rope.video_audio.second_per_grid"),
            }],
            audio_tokens: vec![audio_tokens(cases, "rope.video_audio.audio_seqlens")],
            use_audio_in_video: true,
            ..Default::default()
        },
        "thinker" => MediaLayout {
            images: vec![grid(cases, "image.image_grid_thw")],
            audio_tokens: vec![audio_tokens(cases, "audio_encoder.feature_lens")],
            ..Default::default()
        },
        other => panic!("no rope case {other}"),
    }
}

/// Asserts `got` equals the fixture's [3, 1, L] positions and [1, 1] delta of `prefix`.
pub fn assert_positions(prefix: &str, cases: &Cases, got: &PositionIds, delta: i64) {
    let want = cases.i64_vec(&format!("{prefix}.position_ids"));
    let len = got.len();
    assert_eq!(want.len(), 3 * len, "{prefix}: position count");
    assert_eq!(got.t, want[..len], "{prefix}: temporal row");
    assert_eq!(got.h, want[len..2 * len], "{prefix}: height row");
    assert_eq!(got.w, want[2 * len..], "{prefix}: width row");
    assert_eq!(
        delta,
        cases.i64_vec(&format!("{prefix}.rope_deltas"))[0],
        "{prefix}: rope delta"
    );
}

fn check_case(case: &str) {
    let cases = Cases::load();
    let cfg = RopeIndexConfig::from(&config().thinker_config);
    let ids = ids(&cases, &format!("rope.{case}.input_ids"));
    let (positions, delta) = get_rope_index(&cfg, &ids, &media(&cases, case)).unwrap();
    assert_positions(&format!("rope.{case}"), &cases, &positions, delta);
}

#[test]
fn rope_index_text() {
    check_case("text");
}

#[test]
fn rope_index_audio() {
    check_case("audio");
}

#[test]
fn rope_index_image() {
    check_case("image");
}

#[test]
fn rope_index_video() {
    check_case("video");
}

#[test]
fn rope_index_video_audio() {
    check_case("video_audio");

    // The same segment laid out live, one chunk at a time.
    let cases = Cases::load();
    let cfg = RopeIndexConfig::from(&config().thinker_config);
    let ids = ids(&cases, "rope.video_audio.input_ids");
    let media = media(&cases, "video_audio");
    let video = media.videos[0];
    let bos = ids
        .iter()
        .position(|&id| id == cfg.vision_start_token_id)
        .expect("a vision bos in the prompt");
    let mut live = text_positions(0, bos);
    let (mut segment, pair) =
        InterleavedSegment::open(&cfg, live.next_start().unwrap_or(0), video.second_per_grid);
    live.extend(&pair);
    let per_frame = video.grid.tokens_per_frame(cfg.spatial_merge_size);
    for chunk in interleaved_chunks(&cfg, &video, media.audio_tokens[0]) {
        assert_eq!(chunk.video.len() % per_frame, 0, "whole grids per chunk");
        let frames = vec![(video.grid.h, video.grid.w); chunk.video.len() / per_frame];
        live.extend(&segment.push_chunk(&frames, chunk.audio.len()).unwrap());
    }
    let eos = segment.close();
    let next = eos.next_start().unwrap();
    live.extend(&eos);
    live.extend(&text_positions(next, ids.len() - live.len()));
    let delta = live.max().unwrap() + 1 - ids.len() as i64;
    assert_positions("rope.video_audio", &cases, &live, delta);
}

/// The user turns of the fixture prompts (gen_reference.py), media first as the generator
/// writes them; sizes come from the fixtures.
fn fixture_conversation(cases: &Cases, case: &str) -> Conversation {
    let media = media(cases, case);
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
        other => panic!("no conversation for {other}"),
    };
    Conversation::new(DEFAULT_SYSTEM_PROMPT, user)
}

#[test]
fn chat_template_ids() {
    let cases = Cases::load();
    let files = ModelFiles::from_dir(&common::model_dir()).expect("fixture model folder");
    let cfg = files.load_config().expect("fixture config");
    let tokenizer = ChatTokenizer::load(&files, &cfg.thinker_config).expect("fixture tokenizer");
    for (case, key) in [
        ("text", "rope.text.input_ids"),
        ("audio", "rope.audio.input_ids"),
        ("image", "rope.image.input_ids"),
        ("video", "rope.video.input_ids"),
        ("video_audio", "rope.video_audio.input_ids"),
        ("thinker", "thinker.input_ids"),
    ] {
        let conversation = fixture_conversation(&cases, case);
        let prompt = tokenizer
            .encode_conversation(&conversation, true)
            .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        assert_eq!(prompt.ids, ids(&cases, key), "{key}");
        let prefix = if case == "thinker" {
            "thinker".to_string()
        } else {
            format!("rope.{case}")
        };
        assert_positions(&prefix, &cases, &prompt.positions, prompt.rope_delta);
    }
}

/// The Talker's prefill positions: the same rules with the talker config, on the text track
/// (prompt, speaker bos, first reply token).
#[test]
fn rope_index_talker() {
    let cases = Cases::load();
    let cfg = RopeIndexConfig::from(&config().talker_config);
    let ids = ids(&cases, "talker.input_text_ids");
    let media = MediaLayout {
        images: vec![grid(&cases, "talker.image_grid_thw")],
        audio_tokens: vec![audio_tokens(&cases, "talker.audio_feature_lengths")],
        ..Default::default()
    };
    let (positions, delta) = get_rope_index(&cfg, &ids, &media).unwrap();
    let len = positions.len();
    let want = cases.i64_vec("talker.prefill_position_ids");
    assert_eq!(want.len(), 3 * len, "talker position count");
    assert_eq!(positions.t, want[..len], "temporal row");
    assert_eq!(positions.h, want[len..2 * len], "height row");
    assert_eq!(positions.w, want[2 * len..], "width row");
    assert_eq!(
        delta,
        cases.i64_vec("talker.prefill_rope_deltas")[0],
        "rope delta"
    );
}
