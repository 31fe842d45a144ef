//! Image preparation as the published processor does it: smart resize, normalise, patchify.
