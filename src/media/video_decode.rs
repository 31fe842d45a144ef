//! In-process video decoding: VP8 (libvpx) and H.264 (OpenH264) to RGB frames.
