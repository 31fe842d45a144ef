#!/usr/bin/env python3
"""Speech probabilities of Silero VAD under onnxruntime, the parity fixture of src/media/silero.rs.

    pip install onnx onnxruntime numpy safetensors
    python3 scripts/silero_vad_reference.py [WHEEL_OR_ONNX] [WAV] [OUT_JSON]

Runs `silero_vad.onnx` (from the wheel, as scripts/extract_silero_vad.py finds it) on a 16 kHz
WAV the way the reference wrapper (silero_vad.utils_vad.OnnxWrapper, pipecat's SileroOnnxModel)
does: 512-sample frames, each prefixed with the last 64 samples of the one before (zeros
before the first), the LSTM state carried from frame to frame. A trailing partial frame is
left out.
"""
import json
import os
import sys
import tempfile
import wave

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from extract_silero_vad import find_onnx  # noqa: E402

FRAME = 512
CONTEXT = 64


def read_wav(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2, path
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def main():
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    wav = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/turn/silero_utterance.wav"
    out = sys.argv[3] if len(sys.argv) > 3 else "tests/fixtures/turn/silero_utterance.json"
    audio = read_wav(wav)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(find_onnx(arg, tmp), sess_options=so)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros((1, CONTEXT), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    probabilities = []
    for start in range(0, len(audio) - FRAME + 1, FRAME):
        x = np.concatenate([context, audio[None, start : start + FRAME]], axis=1)
        out_prob, state = session.run(None, {"input": x, "state": state, "sr": sr})
        context = x[:, -CONTEXT:]
        probabilities.append(float(out_prob[0, 0]))
    with open(out, "w") as f:
        json.dump(
            {
                "wav": os.path.basename(wav),
                "frame_samples": FRAME,
                "context_samples": CONTEXT,
                "probabilities": probabilities,
            },
            f,
            indent=0,
        )
    print(f"{out}: {len(probabilities)} frames, max {max(probabilities):.3f}")


if __name__ == "__main__":
    main()
