//! Signal work around the model: features, image and video preparation, resampling, codecs, VAD.
