//! The flow-matching DiT of token2wav and its ODE sampler.
