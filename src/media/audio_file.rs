//! Decoding audio files (WAV, FLAC, MP3, OGG) to mono samples.
