//! Voice activity detection on 16 kHz audio.
