#!/usr/bin/env python3
"""Extracts Silero VAD v5's 16 kHz weights from the PyPI wheel into safetensors.

    pip install onnx safetensors numpy
    python3 scripts/extract_silero_vad.py [WHEEL_OR_ONNX] [OUT_DIR]

Without WHEEL_OR_ONNX it runs `pip download --no-deps silero-vad==6.2.3` into a temporary
folder. `silero_vad.onnx` holds two graphs behind an `If` on the sample rate; the 16 kHz
branch's constants carry the PyTorch module names (stft.forward_basis_buffer,
encoder.N.reparam_conv.*, decoder.rnn.* of the LSTM cell, decoder.decoder.2.*), which become
the tensor names of `models/silero-vad/silero_vad_16k.safetensors` (read by
src/model/silero_vad.rs). The ONNX file itself is kept beside it for the parity script.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save_file

WHEEL = "silero-vad==6.2.3"
MEMBER = "silero_vad/data/silero_vad.onnx"
PREFIX = "If_0_then_branch__Inline_0__"


def find_onnx(arg, tmp):
    if arg and arg.endswith(".onnx"):
        return arg
    wheel = arg
    if not wheel:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = glob.glob(os.path.join(tmp, "silero_vad-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, tmp)
        lic = [n for n in z.namelist() if n.endswith("licenses/LICENSE")]
        if lic:
            z.extract(lic[0], tmp)
    return os.path.join(tmp, MEMBER)


def main():
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    out = sys.argv[2] if len(sys.argv) > 2 else "models/silero-vad"
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = find_onnx(arg, tmp)
        model = onnx.load(path)
        branch = model.graph.node[2]
        assert branch.op_type == "If", "unexpected graph: no sample-rate If at node 2"
        # `sr == 16000` selects the then-branch
        graph = next(a.g for a in branch.attribute if a.name == "then_branch")
        tensors = {}
        for node in graph.node:
            name = node.output[0]
            if node.op_type != "Constant" or not name.startswith(PREFIX):
                continue
            key = name[len(PREFIX):]
            if key.startswith("/"):
                continue
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.dtype == np.float32 and value.size > 1:
                tensors[key] = np.ascontiguousarray(value)
        expected = {"stft.forward_basis_buffer", "decoder.rnn.weight_ih", "decoder.decoder.2.weight"}
        assert expected <= tensors.keys(), f"missing tensors: {expected - tensors.keys()}"
        # the 1-element decoder bias is a scalar-sized constant: keep it too
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == PREFIX + "decoder.decoder.2.bias":
                tensors["decoder.decoder.2.bias"] = numpy_helper.to_array(node.attribute[0].t)
        save_file(tensors, os.path.join(out, "silero_vad_16k.safetensors"))
        lic = glob.glob(os.path.join(tmp, "*.dist-info/licenses/LICENSE"))
        if lic:
            shutil.copy(lic[0], os.path.join(out, "LICENSE"))
        for k, v in sorted(tensors.items()):
            print(k, v.shape)


if __name__ == "__main__":
    main()
