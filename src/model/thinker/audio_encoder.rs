//! The Whisper-style audio tower of the Thinker (`thinker.audio_tower`).

/// Number of audio embeddings the tower yields for `mel_frames` valid feature frames: the
/// stride-2 convolution, then the stride-2 average pooling (a trailing odd frame is dropped).
/// It is also the number of `<|AUDIO|>` placeholders and of TMRoPE temporal ids (one per 40 ms).
pub fn output_len(mel_frames: usize) -> usize {
    if mel_frames == 0 {
        return 0;
    }
    let after_conv = (mel_frames - 1) / 2 + 1;
    // Python's floor division makes (1 - 2) // 2 + 1 == 0: a single conv frame yields nothing.
    if after_conv < 2 {
        0
    } else {
        (after_conv - 2) / 2 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_length_rule() {
        // 1 s = 100 frames -> 50 -> 25 tokens; the fixture's 330 frames -> 165 -> 82.
        assert_eq!(output_len(100), 25);
        assert_eq!(output_len(330), 82);
        assert_eq!(output_len(200), 50);
        assert_eq!(output_len(0), 0);
        assert_eq!(output_len(2), 0);
        assert_eq!(output_len(3), 1);
    }
}
