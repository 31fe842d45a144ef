//! Whisper log-mel features, on a whole clip or incrementally on a stream.
