//! TMRoPE: 3-D position ids for text, audio, image and video, and the rope deltas.
