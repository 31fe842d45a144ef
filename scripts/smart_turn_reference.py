#!/usr/bin/env python3
"""End-of-turn probabilities of Smart Turn v3.2 under onnxruntime, the parity fixture of
src/media/smart_turn.rs.

    pip install onnx onnxruntime numpy
    python3 scripts/smart_turn_reference.py [WHEEL_OR_ONNX] [SET_DIR] [OUT_JSON]

For every clip of the spoken test set (scripts/make_turn_set.py) it scores the audio from the
start of the clip to 200 ms after the end of each spoken part (what the engine hands the model
when the VAD has seen a short silence): inside a pause the turn is unfinished, after the last
part it is complete. Audio preparation is pipecat's (`LocalSmartTurnAnalyzerV3`): the last 8 s,
zero-padded at the front, `compute_whisper_log_mel_features` from the same wheel.

Two onnxruntime answers are kept per point: `onnxruntime` (the session as pipecat opens it:
all graph optimisations, which fuse the QDQ pairs into int8 kernels) and `onnxruntime_qdq`
(optimisations off: the graph's QuantizeLinear / DequantizeLinear / float ops run as written,
the ONNX reference semantics).
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import wave
import zipfile

import numpy as np
import onnxruntime as ort

WHEEL = "pipecat-ai==1.14.0"
MODEL = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
FEATURES = "pipecat/audio/turn/smart_turn/_whisper_features.py"
AFTER = 0.2
SAMPLES = 8 * 16000


def extract(arg, tmp):
    wheel = arg
    if not wheel:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = glob.glob(os.path.join(tmp, "pipecat_ai-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract(MODEL, tmp)
        z.extract(FEATURES, tmp)
    sys.path.insert(0, os.path.dirname(os.path.join(tmp, FEATURES)))
    from _whisper_features import compute_whisper_log_mel_features

    return os.path.join(tmp, MODEL), compute_whisper_log_mel_features


def read(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def session(path, level):
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so)


def main():
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    set_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/turn/set"
    out = sys.argv[3] if len(sys.argv) > 3 else "tests/fixtures/turn/smart_turn.json"
    with tempfile.TemporaryDirectory() as tmp:
        model, features = extract(arg, tmp)
        fused = session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        plain = session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    segments = json.load(open(os.path.join(set_dir, "segments.json")))
    points = []
    for clip in segments:
        if clip["kind"] not in ("complete", "pause"):
            continue
        audio = read(os.path.join(set_dir, clip["file"]))
        for k, (_, end) in enumerate(clip["speech"]):
            cut = audio[: int(round((end + AFTER) * 16000))]
            x = cut[-SAMPLES:]
            x = np.pad(x, (SAMPLES - len(x), 0))
            feats = features(x, do_normalize=True)[None]
            p_fused = fused.run(None, {"input_features": feats})[0].item()
            p_plain = plain.run(None, {"input_features": feats})[0].item()
            points.append(
                {
                    "file": clip["file"],
                    "end": round(end + AFTER, 4),
                    "complete": k == len(clip["speech"]) - 1,
                    "onnxruntime": p_fused,
                    "onnxruntime_qdq": p_plain,
                }
            )
            print(f"{clip['file']:20} {end + AFTER:6.2f} s  complete={k == len(clip['speech']) - 1!s:5}  "
                  f"ort {p_fused:.4f}  qdq {p_plain:.4f}")
    with open(out, "w") as f:
        json.dump({"after_speech": AFTER, "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
