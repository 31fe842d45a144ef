//! Streaming token2wav: chunked DiT + vocoder with bounded look-ahead.
