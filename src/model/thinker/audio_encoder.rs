//! The Whisper-style audio tower with block-wise attention.
