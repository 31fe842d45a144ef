//! BigVGAN: log-mel to 24 kHz waveform.
