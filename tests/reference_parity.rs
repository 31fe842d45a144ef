//! Parity with the reference implementation (Hugging Face transformers) on the golden fixtures
//! of `$OMNICALL_REFERENCE_DIR` (default: tests/fixtures/reference/a). One test per stage, named
//! after it, so that `cargo test --test reference_parity STAGE` selects it. Nothing here knows a
//! value of the tiny config: everything comes from the fixture folder.

#[path = "parity/audio.rs"]
mod audio;
mod common;
#[path = "parity/pipeline.rs"]
mod pipeline;
#[path = "parity/rope.rs"]
mod rope;
#[path = "parity/talker.rs"]
mod talker;
#[path = "parity/thinker.rs"]
mod thinker;
#[path = "parity/token2wav.rs"]
mod token2wav;
#[path = "parity/vision.rs"]
mod vision;
