//! The realtime session: block assembler, streaming Thinker, Talker and vocoder tasks,
//! turn-taking and barge-in, output pacing, all on an injectable clock.

pub mod activity;
pub mod blocks;
pub(crate) mod cancel;
pub mod clock;
pub mod context;
pub mod end_of_turn;
pub(crate) mod events;
pub mod heard;
pub mod input;
pub(crate) mod links;
pub mod model_access;
pub mod pacer;
pub mod probe;
pub mod profile;
pub mod queues;
pub mod runtime;
pub mod scheduler;
pub mod session;
pub mod simulated;
pub(crate) mod talker_task;
pub(crate) mod thinker_task;
pub mod threads;
pub mod turn;
pub mod turn_media;
pub(crate) mod vocoder_task;
