//! Voices: speaker conditioning (spk_dict.pt / speakers.safetensors).
