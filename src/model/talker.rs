//! The Talker: dual-track autoregressive codec-token decoder fed by the Thinker.
