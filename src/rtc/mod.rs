//! The browser video call over WebRTC: an axum server (static page, WHIP-style signaling), one
//! peer connection and one engine session per call, the data channel protocol, and a headless
//! Rust client for tests and benchmarks.
//!
//! Data flows one way: RTP in ([`media_in`]) -> [`SessionHandle`](crate::engine::session::SessionHandle)
//! inputs; session events -> Opus RTP ([`media_out`]) and data channel JSON ([`protocol`]).

pub mod admission;
pub mod cli;
pub mod client;
pub mod media_in;
pub mod media_out;
pub mod metrics;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod signaling;
pub mod sources;

pub use peer::{EndReason, IceServer, RtcConfig};
pub use server::{
    CallInfo, IceServerInfo, RunningServer, ServeConfig, Server, ServerInfo, SessionFactory, serve,
};
