//! The Qwen2.5-VL style vision tower with window attention and the patch merger.
