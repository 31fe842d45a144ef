//! Opus encoding and decoding of 20 ms frames.
