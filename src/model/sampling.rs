//! Token sampling: greedy, temperature, top-k, top-p, repetition penalty, suppressed ids; seeded.
