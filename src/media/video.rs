//! Video preparation: frame sampling at the model's fps, temporal grouping, seconds per grid.
