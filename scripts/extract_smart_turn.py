#!/usr/bin/env python3
"""Extracts Smart Turn v3.2 (the int8 CPU model) from the pipecat-ai wheel into safetensors.

    pip install onnx safetensors numpy
    python3 scripts/extract_smart_turn.py [WHEEL_OR_ONNX] [OUT_DIR]

Without WHEEL_OR_ONNX it runs `pip download --no-deps pipecat-ai==1.14.0` into a temporary
folder and reads `pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx`.

The graph is a statically quantized (QDQ) Whisper-tiny encoder with an attention-pooling
classifier head. The safetensors file keeps it as it is, under the PyTorch module names
(`encoder.layers.N.self_attn.q_proj`, `pool_attention.0`, `classifier.0`, ...), which
src/model/smart_turn.rs reads:

- `{module}.weight`: the int8 weights stored as u8 (value + 128), `{module}.weight_scale` and
  `{module}.weight_zero_point` (f32, per output channel, zero point + 128); linear weights are
  laid out (out, in) as in PyTorch;
- `{module}.bias` in f32 (int32-quantized biases dequantized, which is exact);
- every activation quantization point (QuantizeLinear) as `{module}.{point}_q`, a 2-vector
  [scale, zero point] of the uint8 activation.
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

WHEEL = "pipecat-ai==1.14.0"
MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def find_onnx(arg, tmp):
    if arg and arg.endswith(".onnx"):
        return arg
    wheel = arg
    if not wheel:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = glob.glob(os.path.join(tmp, "pipecat_ai-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, tmp)
        lic = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        if lic:
            z.extract(lic[0], tmp)
    return os.path.join(tmp, MEMBER)


class Graph:
    def __init__(self, model):
        g = model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = list(g.node)

    def const(self, name):
        if name in self.inits:
            return self.inits[name]
        node = self.producer[name]
        assert node.op_type == "Constant", name
        return numpy_helper.to_array(node.attribute[0].t)

    def consumer(self, tensor, op):
        found = [n for n in self.consumers.get(tensor, []) if n.op_type == op]
        assert len(found) == 1, f"{tensor}: {len(found)} {op} consumers"
        return found[0]

    def qparams(self, q):
        return np.array(
            [np.asarray(self.const(q.input[i])).reshape(-1)[0] for i in (1, 2)], dtype=np.float32
        )

    def q_of(self, tensor):
        """The QuantizeLinear right after `tensor`."""
        return self.qparams(self.consumer(tensor, "QuantizeLinear"))

    def dq_source(self, tensor):
        """(quantized initializer, scale, zero point, axis) behind a DequantizeLinear output."""
        dq = self.producer[tensor]
        assert dq.op_type == "DequantizeLinear", tensor
        axis = [a.i for a in dq.attribute if a.name == "axis"]
        return (
            self.const(dq.input[0]),
            np.asarray(self.const(dq.input[1]), dtype=np.float32),
            np.asarray(self.const(dq.input[2])),
            axis[0] if axis else 1,
        )

    def dequantized(self, tensor):
        q, s, z, axis = self.dq_source(tensor)
        if s.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return ((q.astype(np.float64) - z) * s).astype(np.float32)


def put_weight(out, name, g, tensor, transpose):
    """int8 weight (out, ...) as u8 + per-output-channel scale and zero point."""
    q, s, z, axis = g.dq_source(tensor)
    assert q.dtype == np.int8, f"{name}: {q.dtype}"
    if transpose:  # MatMul weights are (in, out), quantized per output column
        q = q.T
        assert axis == 1 or s.size == 1, name
    channels = q.shape[0]
    s = np.broadcast_to(s.reshape(-1), (channels,)).astype(np.float32)
    z = np.broadcast_to(z.reshape(-1).astype(np.float32), (channels,))
    out[f"{name}.weight"] = np.ascontiguousarray((q.astype(np.int16) + 128).astype(np.uint8))
    out[f"{name}.weight_scale"] = np.ascontiguousarray(s)
    out[f"{name}.weight_zero_point"] = np.ascontiguousarray(z + 128.0)


def main():
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "models/smart-turn"
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        g = Graph(onnx.load(find_onnx(arg, tmp)))
        # pipecat's BSD-2 licence covers the bundled Smart Turn model
        for lic in glob.glob(os.path.join(tmp, "*.dist-info/licenses/LICENSE")):
            shutil.copy(lic, os.path.join(out_dir, "LICENSE"))
    out = {}
    nodes = g.nodes

    first_q = g.consumer("input_features", "QuantizeLinear")
    out["encoder.input_q"] = g.qparams(first_q)
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert len(convs) == 2
    for k, conv in enumerate(convs, start=1):
        name = f"encoder.conv{k}"
        put_weight(out, name, g, conv.input[1], transpose=False)
        bias = conv.input[2]
        out[f"{name}.bias"] = (
            g.dequantized(bias) if bias in g.producer and g.producer[bias].op_type == "DequantizeLinear" else g.const(bias)
        ).astype(np.float32)
        out[f"{name}.output_q"] = g.q_of(conv.output[0])
        if k == 1:
            # gelu → Q before conv2
            gelu_q = g.producer[convs[1].input[0]]
            out[f"{name}.gelu_q"] = g.qparams(g.producer[gelu_q.input[0]])
    out["encoder.embed_positions.weight"] = g.const("inner.encoder.embed_positions.weight")

    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    layers = sorted({int(i.split(".")[3]) for i in g.inits if i.startswith("inner.encoder.layers.")})
    assert len(matmuls) == 8 * len(layers) + 2, len(matmuls)
    lns = [n for n in nodes if n.op_type == "LayerNormalization"]
    for l in layers:
        p = f"encoder.layers.{l}"
        mm = matmuls[8 * l : 8 * l + 8]
        ln1, ln2 = lns[2 * l], lns[2 * l + 1]
        for ln, name in [(ln1, "self_attn_layer_norm"), (ln2, "final_layer_norm")]:
            assert ln.input[1] == f"inner.{p}.{name}.weight", ln.input[1]
            out[f"{p}.{name}.weight"] = g.const(ln.input[1])
            out[f"{p}.{name}.bias"] = g.const(ln.input[2])
            out[f"{p}.{name}.output_q"] = g.q_of(ln.output[0])
        # the three projections read the first layer norm; which is which: by the bias added
        projections = {}
        for n in mm:
            w = n.input[1]
            if w in g.producer and g.producer[w].input[0] in g.inits and g.inits[g.producer[w].input[0]].shape == (384, 384):
                dq = g.consumer(g.consumer(n.output[0], "QuantizeLinear").output[0], "DequantizeLinear")
                adds = [c for c in g.consumers.get(dq.output[0], []) if c.op_type == "Add"]
                bias = next((a.input[1] for a in adds if a.input[1].startswith("inner.")), None)
                projections[n.name] = (n, bias)
        named = {}
        for n, bias in projections.values():
            if bias is None and n.input[0] == g.consumer(ln1.output[0], "QuantizeLinear").output[0].replace("QuantizeLinear_Output", "DequantizeLinear_Output"):
                named["k_proj"] = n
            elif bias and ".q_proj." in bias:
                named["q_proj"] = n
            elif bias and ".v_proj." in bias:
                named["v_proj"] = n
            elif bias and ".out_proj." in bias:
                named["out_proj"] = n
        assert set(named) == {"k_proj", "q_proj", "v_proj", "out_proj"}, named.keys()
        for name, n in named.items():
            m = f"{p}.self_attn.{name}"
            put_weight(out, m, g, n.input[1], transpose=True)
            if name != "k_proj":
                out[f"{m}.bias"] = g.const(f"inner.{m}.bias")
            out[f"{m}.output_q"] = g.q_of(n.output[0])
        fc1, fc2 = mm[6], mm[7]
        for name, n in [("fc1", fc1), ("fc2", fc2)]:
            put_weight(out, f"{p}.{name}", g, n.input[1], transpose=True)
            out[f"{p}.{name}.bias"] = g.const(f"inner.{p}.{name}.bias")
            out[f"{p}.{name}.output_q"] = g.q_of(n.output[0])
        out[f"{p}.fc1.gelu_q"] = g.qparams(g.producer[g.producer[fc2.input[0]].input[0]])
        scores, context = mm[3], mm[4]
        a = f"{p}.self_attn"
        out[f"{a}.query_q"] = g.qparams(g.producer[g.producer[scores.input[0]].input[0]])
        out[f"{a}.key_q"] = g.qparams(g.producer[g.producer[scores.input[1]].input[0]])
        out[f"{a}.scores_q"] = g.q_of(scores.output[0])
        out[f"{a}.probs_q"] = g.qparams(g.producer[g.producer[context.input[0]].input[0]])
        out[f"{a}.value_q"] = g.qparams(g.producer[g.producer[context.input[1]].input[0]])
        out[f"{a}.context_q"] = g.q_of(context.output[0])
        out[f"{a}.merged_q"] = g.qparams(g.producer[g.producer[named["out_proj"].input[0]].input[0]])
        # q and k are each scaled by head_dim ** -0.25 before the product
        scale = [n for n in nodes if n.op_type == "Mul" and n.output[0] == g.producer[g.producer[scores.input[0]].input[0]].input[0]][0]
        out[f"{a}.qk_scale"] = np.array([np.asarray(g.const(scale.input[1])).reshape(-1)[0]], dtype=np.float32)

    final_ln = lns[2 * len(layers)]
    out["encoder.layer_norm.weight"] = g.const(final_ln.input[1])
    out["encoder.layer_norm.bias"] = g.const(final_ln.input[2])
    out["encoder.layer_norm.output_q"] = g.q_of(final_ln.output[0])
    pool0, pool2 = matmuls[-2], matmuls[-1]
    for name, n in [("pool_attention.0", pool0), ("pool_attention.2", pool2)]:
        put_weight(out, name, g, n.input[1], transpose=True)
        out[f"{name}.bias"] = np.asarray(g.const(f"inner.{name}.bias"), dtype=np.float32).reshape(-1)
        out[f"{name}.output_q"] = g.q_of(n.output[0])
    out["pool_attention.0.tanh_q"] = g.qparams(g.producer[g.producer[pool2.input[0]].input[0]])
    reduce = [n for n in nodes if n.op_type == "ReduceSum"][0]
    out["pool_attention.pooled_q"] = g.q_of(reduce.output[0])
    gemms = [n for n in nodes if n.op_type == "Gemm"]
    for k, n in zip([0, 4, 6], gemms):
        name = f"classifier.{k}"
        put_weight(out, name, g, n.input[1], transpose=False)
        out[f"{name}.bias"] = g.dequantized(n.input[2]) if g.producer.get(n.input[2]) is not None and g.producer[n.input[2]].op_type == "DequantizeLinear" else np.asarray(g.const(n.input[2]), dtype=np.float32).reshape(-1)
        out[f"{name}.output_q"] = g.q_of(n.output[0])
    ln = lns[-1]
    out["classifier.1.weight"] = g.const(ln.input[1])
    out["classifier.1.bias"] = g.const(ln.input[2])
    out["classifier.4.input_q"] = g.qparams(g.producer[g.producer[gemms[1].input[0]].input[0]])
    out["classifier.6.input_q"] = g.qparams(g.producer[g.producer[gemms[2].input[0]].input[0]])
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    save_file(out, os.path.join(out_dir, "smart_turn_v3.2_int8.safetensors"))
    print(f"{len(out)} tensors, {sum(v.nbytes for v in out.values()) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
