//! The real Qwen2.5-Omni tokenizer (full Qwen2 BPE with its merges, the Omni added tokens) and
//! the chat template against the ids of the reference processor (tests/fixtures/tokenizer,
//! made by scripts/make_tokenizer_fixture.py), loaded both from `tokenizer.json` and from the
//! slow-tokenizer files published checkpoints ship; streaming detokenisation gives back the
//! reference's text.

use std::io::Read;
use std::path::{Path, PathBuf};

use omnicall::model::chat::{ChatTokenizer, Content, Conversation, Message, Role, load_tokenizer};
use omnicall::model::config::Config;
use omnicall::model::loading::TokenizerFiles;
use omnicall::model::thinker::rope::{VideoGrid, VisionGrid};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn golden() -> Value {
    let path = fixture_dir().join("chat_cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A scratch folder removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("omnicall-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tokenizer.json`, decompressed.
fn tokenizer_json() -> String {
    let path = fixture_dir().join("tokenizer.json.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// The published 3B config: its thinker names the placeholder ids.
fn published_config() -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/3b/config.json");
    Config::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn chat_tokenizer(files: &TokenizerFiles, tokenizer_config: Option<&Path>) -> ChatTokenizer {
    let tokenizer = load_tokenizer(files, tokenizer_config).unwrap();
    ChatTokenizer::new(tokenizer, &published_config().thinker_config).unwrap()
}

/// From `tokenizer.json`.
fn from_tokenizer_json(dir: &TempDir) -> ChatTokenizer {
    let path = dir.0.join("tokenizer.json");
    std::fs::write(&path, tokenizer_json()).unwrap();
    chat_tokenizer(&TokenizerFiles::Json(path), None)
}

/// From the slow-tokenizer files a published checkpoint ships (vocab.json, merges.txt and the
/// added tokens in tokenizer_config.json), written from the same tokenizer.json.
fn from_vocab_and_merges(dir: &TempDir) -> ChatTokenizer {
    let json: Value = serde_json::from_str(&tokenizer_json()).unwrap();
    let model = &json["model"];
    let merges: Vec<String> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => panic!("merge {other}"),
        })
        .collect();
    let decoder: serde_json::Map<String, Value> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].to_string(), t.clone()))
        .collect();
    let (vocab, merges_path, config) = (
        dir.0.join("vocab.json"),
        dir.0.join("merges.txt"),
        dir.0.join("tokenizer_config.json"),
    );
    std::fs::write(&vocab, model["vocab"].to_string()).unwrap();
    std::fs::write(
        &merges_path,
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
    std::fs::write(
        &config,
        serde_json::json!({"added_tokens_decoder": decoder}).to_string(),
    )
    .unwrap();
    chat_tokenizer(
        &TokenizerFiles::VocabMerges {
            vocab,
            merges: merges_path,
            added_tokens: None,
        },
        Some(&config),
    )
}

/// The conversation of a golden case, media sized as the reference processor found them.
fn conversation(case: &Value) -> Conversation {
    let sizes = &case["sizes"];
    let list = |key: &str| -> Vec<Value> { sizes[key].as_array().cloned().unwrap_or_default() };
    let grid = |v: &Value| {
        let d: Vec<usize> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        VisionGrid::new(d[0], d[1], d[2])
    };
    let mut audio = list("audio_tokens")
        .into_iter()
        .map(|n| n.as_u64().unwrap() as usize);
    let mut images = list("image_grids").into_iter();
    let mut videos = list("video_grids")
        .into_iter()
        .zip(list("video_second_per_grid"));
    let audio_in_video = sizes["audio_in_video"].as_bool().unwrap();
    let mut out = Conversation::default();
    for message in case["messages"].as_array().unwrap() {
        let role = match message["role"].as_str().unwrap() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => panic!("role {other}"),
        };
        let content = message["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| match item["type"].as_str().unwrap() {
                "text" => Content::Text(item["text"].as_str().unwrap().to_string()),
                "audio" => Content::Audio {
                    tokens: audio.next().expect("an audio size"),
                },
                "image" => Content::Image {
                    grid: grid(&images.next().expect("an image grid")),
                },
                "video" => {
                    let (g, spg) = videos.next().expect("a video grid");
                    Content::Video {
                        video: VideoGrid {
                            grid: grid(&g),
                            second_per_grid: spg.as_f64().unwrap() as f32,
                        },
                        audio_tokens: audio_in_video.then(|| audio.next().expect("its audio")),
                    }
                }
                other => panic!("content type {other}"),
            })
            .collect();
        out.push(Message::new(role, content));
    }
    out
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `None` when `got == want`, else where they first differ, with the tokens there.
fn id_mismatch(chat: &ChatTokenizer, got: &[u32], want: &[u32]) -> Option<String> {
    let at = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))?;
    let token = |ids: &[u32]| match ids.get(at) {
        Some(&id) => format!(
            "{id} {:?}",
            chat.tokenizer().id_to_token(id).unwrap_or_default()
        ),
        None => "nothing".to_string(),
    };
    let context = |ids: &[u32]| chat.decode(&ids[at.saturating_sub(5)..(at + 5).min(ids.len())]);
    Some(format!(
        "ids differ at position {at} ({} ids vs {} expected): got {}, expected {}; \
         around it we have {:?}, the reference {:?}",
        got.len(),
        want.len(),
        token(got),
        token(want),
        context(got).unwrap_or_default(),
        context(want).unwrap_or_default()
    ))
}

fn check_cases(chat: &ChatTokenizer, how: &str) {
    let golden = golden();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = chat
            .encode_conversation(&conversation(case), case["add_generation_prompt"] == true)
            .unwrap_or_else(|e| panic!("{how}: {name}: {e:#}"));
        if let Some(msg) = id_mismatch(chat, &prompt.ids, &ids_of(&case["ids"])) {
            panic!("{how}: {name}: {msg}");
        }
    }
    for text in golden["texts"].as_array().unwrap() {
        let name = text["name"].as_str().unwrap();
        let got = chat.encode(text["text"].as_str().unwrap()).unwrap();
        if let Some(msg) = id_mismatch(chat, &got, &ids_of(&text["ids"])) {
            panic!("{how}: text {name}: {msg}");
        }
    }
}

#[test]
fn chat_template_and_tokenizer_json_give_the_reference_ids() {
    let dir = TempDir::new("tokenizer-json");
    let chat = from_tokenizer_json(&dir);
    assert_eq!(
        chat.tokenizer().get_vocab_size(true) as u64,
        golden()["vocab_size"].as_u64().unwrap()
    );
    check_cases(&chat, "tokenizer.json");
}

#[test]
fn chat_template_and_vocab_merges_give_the_reference_ids() {
    let dir = TempDir::new("vocab-merges");
    check_cases(&from_vocab_and_merges(&dir), "vocab.json + merges.txt");
}

#[test]
fn a_one_token_difference_is_reported_with_its_position() {
    let dir = TempDir::new("tokenizer-diff");
    let chat = from_tokenizer_json(&dir);
    let golden = golden();
    let case = &golden["cases"][0];
    let got = chat
        .encode_conversation(&conversation(case), true)
        .unwrap()
        .ids;
    let mut want = ids_of(&case["ids"]);
    let at = want.len() / 2;
    want[at] += 1;
    let msg = id_mismatch(&chat, &got, &want).expect("a difference");
    assert!(
        msg.starts_with(&format!("ids differ at position {at} (")),
        "{msg}"
    );
    assert!(msg.contains(&format!("expected {} ", want[at])), "{msg}");
    want.pop();
    want[at] -= 1;
    let msg = id_mismatch(&chat, &got, &want).expect("a shorter reference");
    assert!(
        msg.starts_with(&format!("ids differ at position {} (", want.len())),
        "{msg}"
    );
}

#[test]
fn streaming_detokenisation_gives_back_the_reference_text() {
    let dir = TempDir::new("tokenizer-stream");
    let chat = from_tokenizer_json(&dir);
    for text in golden()["texts"].as_array().unwrap() {
        let name = text["name"].as_str().unwrap();
        let mut stream = chat.stream();
        let mut pieces = Vec::new();
        for id in ids_of(&text["ids"]) {
            pieces.extend(stream.push(id).unwrap());
        }
        pieces.extend(stream.finish().unwrap());
        assert!(
            pieces
                .iter()
                .all(|p| !p.contains(char::REPLACEMENT_CHARACTER)),
            "{name}: a piece with half a character: {pieces:?}"
        );
        let want = text["decoded"].as_str().unwrap();
        assert_eq!(pieces.concat(), want, "{name}: {pieces:?}");
        assert_eq!(chat.decode(&ids_of(&text["ids"])).unwrap(), want, "{name}");
    }
}
