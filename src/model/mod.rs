//! Pure candle math of Qwen2.5-Omni: configuration, weights, Thinker, Talker and token2wav.
//! No I/O beyond reading a model folder, no threads.

pub mod activation;
pub mod chat;
pub mod config;
pub mod linear;
pub mod loading;
pub mod norm;
pub mod omni;
pub mod pipeline;
pub mod qwen3_omni;
pub mod random_weights;
pub mod sampling;
pub mod silero_vad;
pub mod smart_turn;
pub mod speakers;
pub mod talker;
pub mod thinker;
pub mod token2wav;

/// Helpers the model modules' unit tests share.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Result, Tensor};

    /// The largest absolute difference between `a` and `b`, compared in f32.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
        d.flatten_all()?.max(0)?.to_scalar::<f32>()
    }
}
