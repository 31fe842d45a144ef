//! How much of an interrupted spoken answer the user heard, in answer tokens.
//!
//! Nothing in the model says which codec frame voices which text token, so the engine
//! estimates it from what it does know:
//!
//! * an upper bound: the Talker reads one Thinker token per codec code (code `s` is computed
//!   from the row of token `s`), so after `h` codes it cannot have voiced more than the first
//!   `h` tokens;
//! * a length estimate: when the Talker had already ended the answer's speech (its end code
//!   after `N` codes), the text is spread evenly over the speech: `h / N` of its characters
//!   were heard; while it was still going, a speaking rate of [`CHARS_PER_SECOND`] characters
//!   per second of speech (about 150 words a minute in English).
//!
//! A token is kept when its middle character falls within the estimate (and it is within the
//! bound): the context then holds about what was said, rounded to whole tokens.

use std::time::Duration;

/// Speaking rate assumed while the speech's total length is unknown.
pub const CHARS_PER_SECOND: f64 = 14.0;

/// What the estimate needs to know about the answer.
#[derive(Debug, Clone, Copy)]
pub struct SpokenAnswer<'a> {
    /// Characters of the answer's text after each of its tokens (cumulative, non-decreasing).
    pub cumulative_chars: &'a [usize],
    /// Codec codes in the audio the user heard.
    pub heard_codes: usize,
    /// All the answer's codes, if the Talker had finished it.
    pub total_codes: Option<usize>,
    /// Length of the audio heard.
    pub heard: Duration,
}

/// How many of the answer's tokens to keep.
pub fn tokens_heard(answer: SpokenAnswer<'_>) -> usize {
    let chars = answer.cumulative_chars;
    let upper = answer.heard_codes.min(chars.len());
    let total_chars = chars.last().copied().unwrap_or(0) as f64;
    let estimate = match answer.total_codes {
        Some(total) if total > 0 => {
            total_chars * answer.heard_codes.min(total) as f64 / total as f64
        }
        _ => answer.heard.as_secs_f64() * CHARS_PER_SECOND,
    };
    let mut kept = 0;
    while kept < upper {
        let before = if kept == 0 { 0 } else { chars[kept - 1] };
        let middle = (before + chars[kept]) as f64 / 2.0;
        if middle > estimate {
            break;
        }
        kept += 1;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten tokens of five characters each.
    fn chars() -> Vec<usize> {
        (1..=10).map(|k| 5 * k).collect()
    }

    #[test]
    fn a_finished_speech_spreads_the_text_over_its_length() {
        let c = chars();
        let at = |heard_codes, total| {
            tokens_heard(SpokenAnswer {
                cumulative_chars: &c,
                heard_codes,
                total_codes: Some(total),
                heard: Duration::from_millis(20 * heard_codes as u64),
            })
        };
        // 50 characters over 200 codes: 100 codes heard = 25 characters = 5 tokens
        assert_eq!(at(100, 200), 5);
        assert_eq!(at(0, 200), 0);
        assert_eq!(at(200, 200), 10);
        assert_eq!(at(260, 200), 10);
        // half a token is enough to keep it
        assert_eq!(at(110, 200), 6);
        assert_eq!(at(108, 200), 5);
    }

    #[test]
    fn an_unfinished_speech_uses_the_speaking_rate_within_the_codes_read() {
        let c = chars();
        let at = |heard_codes: usize| {
            tokens_heard(SpokenAnswer {
                cumulative_chars: &c,
                heard_codes,
                total_codes: None,
                heard: Duration::from_millis(20 * heard_codes as u64),
            })
        };
        // 1 s of speech: 14 characters = tokens whose middle is within 14: 3 (middles 2.5,
        // 7.5, 12.5)
        assert_eq!(at(50), 3);
        // 2 s: 28 characters: 6 tokens (the sixth's middle is 27.5)
        assert_eq!(at(100), 6);
        // the Talker cannot have voiced text it had not read: 2 codes, at most 2 tokens
        let bounded = tokens_heard(SpokenAnswer {
            cumulative_chars: &c,
            heard_codes: 2,
            total_codes: None,
            heard: Duration::from_secs(10),
        });
        assert_eq!(bounded, 2);
        assert_eq!(
            tokens_heard(SpokenAnswer {
                cumulative_chars: &[],
                heard_codes: 100,
                total_codes: None,
                heard: Duration::from_secs(2),
            }),
            0
        );
    }
}
