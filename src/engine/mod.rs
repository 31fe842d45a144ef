//! The realtime session: block assembler, streaming Thinker, Talker and vocoder tasks,
//! turn-taking and barge-in, output pacing, all on an injectable clock.

pub mod activity;
pub mod blocks;
pub mod clock;
pub mod context;
pub mod end_of_turn;
pub mod heard;
pub mod input;
pub mod pacer;
pub mod runtime;
pub mod scheduler;
pub mod session;
pub(crate) mod talker_task;
pub(crate) mod thinker_task;
pub mod turn;
pub mod turn_media;
pub(crate) mod vocoder_task;
