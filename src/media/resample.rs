//! Resampling between sample rates (rubato).
