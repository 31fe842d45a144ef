#!/usr/bin/env python3
"""Speed of the reference (Hugging Face transformers) Qwen2.5-Omni, stage by stage, at the shapes
of a published config with random weights: the same rows `omnicall bench model` prints, so the two
tables can be read side by side.

The model is built from config.json alone (no weight files): `Qwen2_5OmniForConditionalGeneration`
constructed in the target dtype on the target device, token2wav in float32 as the reference keeps it.
Without the `generate` stage only the parts of the chosen stages are built, each just before its
stage and freed after it, so that a 3B stage fits in memory in f32. Random weights cost exactly what real weights cost; what they change is the tokens they
pick, so lengths are forced (min_new_tokens = max_new_tokens) and codec ids the DiT has no embedding
for are masked. No tokenizer ships with a published config, so the chat template's text is made of
ordinary-text filler ids of the right count; specials and placeholders come from config.json, and
the placement of the audio and video placeholders is the processor's own code.

    python3 scripts/reference_bench.py --config models/3b/config.json --device cpu --dtype bf16 \
        [--turns N] [--answer-tokens N] [--codes N] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

# The full-size vocabularies put the speaker tokens here (spk_dict.pt of the published 3B and 7B).
PUBLISHED_SPEAKER = "Chelsie"
PUBLISHED_SPEAKER_BOS = 151872
PUBLISHED_REF_MEL_FRAMES = 400
# token2wav writes 24 kHz audio (the reference's fixed output rate; not in config.json).
OUTPUT_SAMPLE_RATE = 24000
# Browser default camera and the reference processor's default video sampling rate.
DEFAULT_CAMERA = (640, 480)
DEFAULT_FPS = 2.0
# Approximate length of the speech system prompt ("You are Qwen, a virtual human developed by the
# Qwen Team, ...") in the published tokenizer, which is not available here.
DEFAULT_SYSTEM_TOKENS = 36
STAGES = ("audio", "vision", "thinker", "talker", "token2wav", "generate")


class BenchError(Exception):
    """Bad input or a setup the reference cannot run; printed without a traceback."""


@dataclass
class Row:
    """One measured figure; the fields of omnicall's `bench::Measurement`."""

    stage: str
    setup: str
    value: float
    unit: str


def markdown_table(rows: list[Row]) -> str:
    """The same layout and number format as omnicall's `bench::markdown_table`."""
    out = ["| stage | setup | value | unit |", "| --- | --- | ---: | --- |"]
    for r in rows:
        v = abs(r.value)
        text = f"{r.value:.0f}" if v >= 100 else f"{r.value:.2f}" if v >= 1 else f"{r.value:.4f}"
        out.append(f"| {r.stage} | {r.setup} | {text} | {r.unit} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class Clock:
    """Wall time that waits for the device first, so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def median(self, run, warmup: int, iters: int) -> tuple[float, object]:
        """Runs `run` `warmup` times untimed, then `iters` times; median seconds and the last result."""
        out = None
        for _ in range(warmup):
            out = run()
        times = []
        for _ in range(max(iters, 1)):
            start = self.now()
            out = run()
            times.append(self.now() - start)
        return statistics.median(times), out


class CallTimes:
    """Start and end times of every forward call of some modules, taken by hooks that change nothing."""

    def __init__(self, clock: Clock, modules: dict[str, torch.nn.Module]):
        self.clock = clock
        self.starts: dict[str, list[float]] = {name: [] for name in modules}
        self.ends: dict[str, list[float]] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(_module, _args):
            self.starts[name].append(self.clock.now())

        return hook

    def _post(self, name):
        def hook(_module, _args, _out):
            self.ends[name].append(self.clock.now())

        return hook

    def total(self, name: str) -> float:
        return sum(e - s for s, e in zip(self.starts[name], self.ends[name]))

    def remove(self):
        for h in self.handles:
            h.remove()


def decode_split(starts: list[float], end: float) -> tuple[float, float, int]:
    """Splits one `generate` call into the time to its first token (prefill forward and the first
    sampling) and the decode steps after it. Each interval between the starts of two forward calls
    is one whole step (forward, logits processors, sampling, bookkeeping); the last ends at `end`.
    Returns (first-token seconds, decode seconds, decode steps)."""
    if not starts:
        raise BenchError("generate ran no forward call")
    if len(starts) < 2:
        return end - starts[0], 0.0, 0
    return starts[1] - starts[0], end - starts[1], len(starts) - 1


# --------------------------------------------------------------------------------------------------
# Config, model, speakers
# --------------------------------------------------------------------------------------------------


def load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise BenchError(f"{path} is not valid JSON: {e}") from e


def load_config(path: Path):
    from transformers import Qwen2_5OmniConfig

    raw = load_json(path)
    for key in ("thinker_config", "talker_config", "token2wav_config"):
        if key not in raw:
            raise BenchError(f"{path} has no {key}: not a Qwen2.5-Omni config")
    try:
        config = Qwen2_5OmniConfig.from_dict(raw)
    except Exception as e:  # the config classes raise several types on bad values
        raise BenchError(f"{path}: the reference rejects this config: {e}") from e
    # get_rope_index reads vision_start_token_id, which the 5.x thinker config class does not
    # declare: it must come in as an extra key, as it does from the published config.json.
    if getattr(config.thinker_config, "vision_start_token_id", None) is None:
        raise BenchError(f"{path}: thinker_config.vision_start_token_id is missing")
    config.enable_audio_output = True
    return config, raw


def load_processor_settings(config_path: Path) -> dict:
    """The feature-extractor and image-processor settings beside config.json: either a
    preprocessor_config.json (published checkpoints) or a processor_config.json (transformers 5
    layout, as in models/tiny). Missing files leave the processor classes' defaults."""
    folder = config_path.parent
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        s = load_json(pre)
        return {"feature_extractor": s, "video": s, "source": str(pre)}
    proc = folder / "processor_config.json"
    if proc.exists():
        s = load_json(proc)
        return {
            "feature_extractor": s.get("feature_extractor", {}),
            "video": s.get("video_processor", s.get("image_processor", {})),
            "source": str(proc),
        }
    return {"feature_extractor": {}, "video": {}, "source": "processor class defaults"}


# The submodules each stage runs, as attribute paths from the whole model. `generate` runs all of it.
# Each part is a list of the paths it has had across transformers versions (5.24 nests the towers
# and the text decoder under `thinker.model`; 5.17 has them on the thinker, the decoder as `model`):
# the first that exists is used.
STAGE_PARTS = {
    "audio": [["thinker.model.audio_tower", "thinker.audio_tower"]],
    "vision": [["thinker.model.visual", "thinker.visual"]],
    "thinker": [["thinker.model.language_model", "thinker.model"], ["thinker.lm_head"]],
    "talker": [["talker"]],
    "token2wav": [["token2wav"]],
}


def resolve_part(model, paths: list[str]) -> str:
    """The first of a part's paths that exists in this transformers version's model."""
    for path in paths:
        try:
            parent, name = part_of(model, path)
        except AttributeError:
            continue
        if isinstance(getattr(parent, name, None), torch.nn.Module):
            return path
    raise BenchError(f"none of {paths} is in this transformers version's model")


def build_model(config, dtype: torch.dtype, device: torch.device, seed: int, stages: list[str]):
    """The model for `stages`. For `generate`, the whole model, built directly in `dtype` on
    `device` with the library's random init; otherwise its skeleton on the meta device (no
    memory), whose parts `materialize` builds for the stage that runs them and `release` frees,
    so that one f32 stage of the 3B model fits in memory where the whole f32 model does not.
    Every part is cast to `dtype` (token2wav to float32, as `enable_talker` and `generate` do):
    transformers builds the text decoder in the config's torch_dtype whatever `dtype` says."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    whole = "generate" in stages
    with torch.device(device if whole else "meta"):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=dtype)
    if whole:
        model.thinker.to(dtype)
        model.talker.to(dtype)
    model.token2wav.float()
    model.eval()
    return model


def part_of(model, path: str):
    parent = model
    *parents, name = path.split(".")
    for p in parents:
        parent = getattr(parent, p)
    return parent, name


def materialize(model, path: str, dtype: torch.dtype, device: torch.device):
    """Builds the part at `path` for real (random init) in its stage's dtype, in place of its
    meta skeleton; a part already built is left as it is."""
    from transformers import PreTrainedModel

    parent, name = part_of(model, path)
    old = getattr(parent, name)
    if not any(p.is_meta for p in old.parameters()):
        return
    part_dtype = torch.float32 if path == "token2wav" else dtype
    with torch.device(device):
        if isinstance(old, PreTrainedModel):
            new = type(old)._from_config(old.config, dtype=part_dtype)
        elif isinstance(old, torch.nn.Linear):
            new = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        else:
            raise BenchError(f"do not know how to build {path} ({type(old).__name__}) alone")
    setattr(parent, name, new.to(part_dtype).eval())


def release(model, path: str):
    """Frees the part at `path` (back to a meta skeleton)."""
    parent, name = part_of(model, path)
    setattr(parent, name, getattr(parent, name).to("meta"))


def fill_speaker(model, config, config_path: Path, speaker_bos: int | None):
    """`generate` reads the voice from `model.speaker_map` (spk_dict.pt in a checkpoint). A
    spk_dict.pt beside the config is used as it is; otherwise the published shapes are filled with
    random values: bos_token 151872, cond [1, enc_emb_dim], ref_mel [1, 400, mel_dim]."""
    vocab = config.thinker_config.text_config.vocab_size
    spk_file = config_path.parent / "spk_dict.pt"
    if spk_file.exists() and speaker_bos is None:
        speakers = torch.load(spk_file, weights_only=True)
        if PUBLISHED_SPEAKER not in speakers:
            raise BenchError(f"{spk_file} has no speaker {PUBLISHED_SPEAKER}: {list(speakers)}")
        model.speaker_map = dict(speakers)
        source = str(spk_file)
    else:
        bos = PUBLISHED_SPEAKER_BOS if speaker_bos is None else speaker_bos
        if not 0 <= bos < vocab:
            raise BenchError(
                f"speaker bos token {bos} is outside the thinker vocabulary ({vocab}); "
                "pass --speaker-bos with an id of this config's speaker token"
            )
        dit = config.token2wav_config.dit_config
        g = torch.Generator().manual_seed(17)
        model.speaker_map = {
            PUBLISHED_SPEAKER: {
                "bos_token": bos,
                "cond": torch.randn(1, dit.enc_emb_dim, generator=g),
                "ref_mel": -5.0 + 2.0 * torch.randn(1, PUBLISHED_REF_MEL_FRAMES, dit.mel_dim, generator=g),
            }
        }
        source = "published shapes, random values"
    spk = model.speaker_map[PUBLISHED_SPEAKER]
    return f"{PUBLISHED_SPEAKER} ({source}; ref_mel {tuple(spk['ref_mel'].shape)})"


class AllowBelow:
    """Logits processor: only ids below `limit` can be picked. Keeps random weights on what a real
    model emits (ordinary text for the Thinker; codes the DiT has an embedding for, the Talker)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores[:, self.limit :] = float("-inf")
        return scores


def special_ids(thinker_config) -> list[int]:
    t = thinker_config
    ids = [
        t.text_config.bos_token_id,
        t.text_config.eos_token_id,
        t.text_config.pad_token_id,
        t.audio_token_index,
        t.image_token_index,
        t.video_token_index,
        t.audio_start_token_id,
        t.audio_end_token_id,
        t.vision_start_token_id,
        getattr(t, "vision_end_token_id", None),
        getattr(t, "vision_token_id", None),
    ]
    return [i for i in ids if isinstance(i, int)]


class Filler:
    """Deterministic ordinary-text ids (below every special id): their values do not change the cost."""

    def __init__(self, limit: int):
        if limit < 2:
            raise BenchError(f"no ordinary text ids below the first special id ({limit})")
        self.limit = limit
        self.next = 1

    def take(self, n: int) -> list[int]:
        out = [(self.next + i) * 7919 % self.limit for i in range(n)]
        self.next += n
        return out


# --------------------------------------------------------------------------------------------------
# Inputs: one 2-s block of microphone audio and camera video, and the chat-template prompt
# --------------------------------------------------------------------------------------------------


def synthetic_wave(seconds: float, rate: int) -> np.ndarray:
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * (150 * t + 800 * t * t / max(seconds, 1e-6)))
    wave += 0.02 * np.random.RandomState(3).randn(n)
    return wave.astype(np.float32)


def camera_frames(count: int, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        texture = (xx * 7 + yy * 13 + i * 5) % 31
        frame = np.stack([xx * 255 // width, yy * 255 // height, 100 + texture * 3], axis=-1)
        x0 = (i * 37) % max(width - 80, 1)
        frame[height // 3 : height // 3 + 80, x0 : x0 + 80] = [30, 200, 60]
        frames.append(frame.astype(np.uint8))
    return np.stack(frames)


@dataclass
class Block:
    """One 2-s block as the reference processor prepares it."""

    input_features: torch.Tensor  # [1, mel bins, frames]
    feature_attention_mask: torch.Tensor  # [1, frames]
    mel_frames: int
    pixel_values_videos: torch.Tensor  # [patches, C * T * P * P]
    video_grid_thw: torch.Tensor  # [1, 3]
    video_second_per_grid: torch.Tensor  # [1]
    resized_hw: tuple[int, int]
    frames: int
    mel_seconds: float
    mel_window_seconds: float
    prep_seconds_per_frame: float


def processor_video_size() -> dict:
    """The processor's default video size bounds: a `_defaults` table of the kwargs class up to
    transformers 5.17, a class attribute of the processor after."""
    from transformers import Qwen2_5OmniProcessor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessorKwargs

    table = getattr(Qwen2_5OmniProcessorKwargs, "_defaults", None)
    if table is not None:
        return table["videos_kwargs"]["size"]
    return Qwen2_5OmniProcessor.videos_kwargs["size"]


def prepare_block(config, settings: dict, camera: tuple[int, int], fps: float, clock: Clock) -> Block:
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessorKwargs
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    thinker = config.thinker_config
    seconds = float(thinker.seconds_per_chunk)

    fe_keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value", "dither")
    fe = WhisperFeatureExtractor(**{k: v for k, v in settings["feature_extractor"].items() if k in fe_keys})
    if fe.feature_size != thinker.audio_config.num_mel_bins:
        raise BenchError(
            f"feature extractor makes {fe.feature_size} mel bins, the audio encoder takes "
            f"{thinker.audio_config.num_mel_bins}"
        )
    wave = synthetic_wave(seconds, fe.sampling_rate)

    def features():
        # As the processor calls it: padded to the 30-s window, with an attention mask.
        return fe(wave, sampling_rate=fe.sampling_rate, padding="max_length", return_attention_mask=True,
                  return_tensors="pt")

    mel_seconds, audio = clock.median(features, 1, 3)
    mask = audio["attention_mask"]
    valid = int(mask.sum())
    # Only the valid frames reach the audio encoder; the rest of the 30-s window is dropped there.
    input_features = audio["input_features"][:, :, :valid]
    feature_attention_mask = mask[:, :valid]

    vision = thinker.vision_config
    video_settings = settings["video"]
    # The processor's default video bounds (min/max pixels) replace the image ones for videos.
    size = dict(processor_video_size())
    vp_kwargs = dict(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        size=size,
        do_sample_frames=False,
        # qwen-omni-utils' per-frame share of the total video budget (the official examples' path).
        cap_pixels_per_frame=True,
    )
    for key in ("image_mean", "image_std"):
        if key in video_settings:
            vp_kwargs[key] = video_settings[key]
    vp = Qwen2VLVideoProcessor(**vp_kwargs)
    frame_count = int(round(seconds * fps))
    if frame_count % vision.temporal_patch_size != 0:
        raise BenchError(
            f"{seconds} s at {fps} fps is {frame_count} frames, not a whole number of temporal grids "
            f"({vision.temporal_patch_size} frames each)"
        )
    frames = camera_frames(frame_count, camera[0], camera[1])

    def prep():
        return vp(videos=[frames], return_tensors="pt")

    prep_seconds, video = clock.median(prep, 1, 3)
    grid = video["video_grid_thw"]
    t, h, w = (int(x) for x in grid[0])
    return Block(
        input_features=input_features,
        feature_attention_mask=feature_attention_mask,
        mel_frames=valid,
        pixel_values_videos=video["pixel_values_videos"],
        video_grid_thw=grid,
        video_second_per_grid=torch.tensor([vision.temporal_patch_size / fps]),
        resized_hw=(h * vision.patch_size, w * vision.patch_size),
        frames=frame_count,
        mel_seconds=mel_seconds,
        mel_window_seconds=fe.n_samples / fe.sampling_rate,
        prep_seconds_per_frame=prep_seconds / frame_count,
    )


def block_placeholders(config, block: Block, audio_tokens: int) -> list[str]:
    """The video with its sound track, interleaved per 2-s chunk exactly as
    `Qwen2_5OmniProcessor.replace_multimodal_special_tokens(use_audio_in_video=True)` lays it out:
    the processor's own function, run on a stand-in with the processor's token strings."""
    from transformers import Qwen2_5OmniProcessor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessorKwargs

    merge = config.thinker_config.vision_config.spatial_merge_size
    stand_in = SimpleNamespace(
        audio_token="<|AUDIO|>",
        image_token="<|IMAGE|>",
        video_token="<|VIDEO|>",
        vision_bos_token="<|vision_bos|>",
        vision_eos_token="<|vision_eos|>",
        audio_bos_token="<|audio_bos|>",
        audio_eos_token="<|audio_eos|>",
        image_processor=SimpleNamespace(merge_size=merge),
        video_processor=SimpleNamespace(merge_size=merge),
    )
    stand_in.get_chunked_index = lambda indices, per_chunk: Qwen2_5OmniProcessor.get_chunked_index(
        stand_in, indices, per_chunk
    )
    (text,) = Qwen2_5OmniProcessor.replace_multimodal_special_tokens(
        stand_in,
        ["<|vision_bos|><|VIDEO|><|vision_eos|>"],
        audio_lengths=iter([audio_tokens]),
        image_grid_thw=iter([]),
        video_grid_thw=iter([block.video_grid_thw[0]]),
        video_second_per_grid=iter([float(block.video_second_per_grid[0])]),
        use_audio_in_video=True,
        position_id_per_seconds=config.thinker_config.position_id_per_seconds,
        seconds_per_chunk=config.thinker_config.seconds_per_chunk,
    )
    return re.findall(r"<\|[a-zA-Z_]+\|>", text)


def turn_prompt(config, block: Block, audio_tokens: int, system_tokens: int, filler: Filler) -> list[int]:
    """The chat template around one user turn of one 2-s block:
    <|im_start|>system\\n{prompt}<|im_end|>\\n<|im_start|>user\\n{block}<|im_end|>\\n<|im_start|>assistant\\n
    Specials from config.json; "system", "assistant" and "\\n" are one ordinary token each, as in
    the published tokenizer, and the system prompt is `system_tokens` ordinary tokens."""
    t = config.thinker_config
    placeholder_ids = {
        "<|AUDIO|>": t.audio_token_index,
        "<|VIDEO|>": t.video_token_index,
        "<|vision_bos|>": t.vision_start_token_id,
        "<|vision_eos|>": t.vision_end_token_id,
        "<|audio_bos|>": t.audio_start_token_id,
        "<|audio_eos|>": t.audio_end_token_id,
    }
    im_start, im_end = t.text_config.bos_token_id, t.text_config.eos_token_id
    newline = filler.take(1)[0]
    ids = [im_start, *filler.take(1), newline, *filler.take(system_tokens), im_end, newline]
    ids += [im_start, t.user_token_id, newline]
    ids += [placeholder_ids[p] for p in block_placeholders(config, block, audio_tokens)]
    ids += [im_end, newline, im_start, *filler.take(1), newline]
    return ids


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    model: object
    config: object
    block: Block
    device: torch.device
    clock: Clock
    args: argparse.Namespace
    shape: str  # e.g. "bf16 on cpu"

    def median(self, run):
        with torch.inference_mode():
            return self.clock.median(run, self.args.warmup, self.args.iters)


def bench_audio(b: Bench) -> tuple[list[Row], int]:
    thinker = b.model.thinker
    a = b.config.thinker_config.audio_config
    feats = b.block.input_features.to(b.device)
    mask = b.block.feature_attention_mask.to(b.device)
    secs, out = b.median(lambda: thinker.get_audio_features(feats, mask, return_dict=True))
    tokens = out.last_hidden_state.shape[0]
    seconds = b.config.thinker_config.seconds_per_chunk
    setup = (f"{seconds} s block = {b.block.mel_frames} frames; {a.encoder_layers} layers x {a.d_model}, "
             f"{b.shape}, sdpa per {2 * a.n_window}-frame chunk")
    return [
        Row("mel (one block)", f"{seconds} s, {a.num_mel_bins} bins, WhisperFeatureExtractor padded to its "
            f"{b.block.mel_window_seconds:g} s window as the processor calls it (numpy, CPU)",
            b.block.mel_seconds * 1e3, "ms/block"),
        Row("audio encoder (one block)", setup, secs * 1e3, "ms/block"),
        Row("audio encoder tokens", f"Thinker tokens per {b.block.mel_frames}-frame block", tokens, "tokens/block"),
    ], tokens


def bench_vision(b: Bench, audio_tokens: int | None) -> tuple[list[Row], int]:
    thinker = b.model.thinker
    v = b.config.thinker_config.vision_config
    pixels = b.block.pixel_values_videos.to(b.device)
    grid = b.block.video_grid_thw.to(b.device)
    seconds = b.config.thinker_config.seconds_per_chunk
    secs, out = b.median(lambda: thinker.get_video_features(pixels, grid, return_dict=True))
    tokens = sum(x.shape[0] for x in out.pooler_output)
    cam_w, cam_h = b.args.camera
    res_h, res_w = b.block.resized_hw
    t, gh, gw = (int(x) for x in b.block.video_grid_thw[0])
    setup = (f"{b.block.frames} frames {cam_w}x{cam_h} at {b.args.fps:g} fps -> {res_w}x{res_h}, grid {t}x{gh}x{gw}; "
             f"{v.depth} layers x {v.hidden_size}, {b.shape}")
    rows = [
        Row("vision prep", f"{cam_w}x{cam_h} RGB -> {res_w}x{res_h}: Qwen2VLVideoProcessor (torchvision, CPU)",
            b.block.prep_seconds_per_frame * 1e3, "ms/frame"),
        Row("vision encoder", setup, secs * 1e3, "ms/block"),
        Row("vision encoder", setup, seconds / secs, "x real time"),
        Row("vision tokens", f"{seconds} s of {cam_w}x{cam_h} video at {b.args.fps:g} fps", tokens, "tokens/block"),
    ]
    if audio_tokens is not None:
        rows.append(Row("block tokens", f"{tokens} video + {audio_tokens} audio", tokens + audio_tokens,
                        "tokens/block"))
    return rows, tokens


def bench_thinker(b: Bench, block_tokens: int, filler: Filler) -> list[Row]:
    from transformers import DynamicCache

    thinker = b.model.thinker
    text = b.config.thinker_config.text_config
    shape = f"{text.num_hidden_layers} layers x {text.hidden_size}, {b.shape}"
    context = b.args.context
    ctx_ids = torch.tensor([filler.take(context)], device=b.device)
    block_ids = torch.tensor([filler.take(block_tokens)], device=b.device)
    # Text-only positions (the three M-RoPE axes equal): the cost does not depend on them.
    thinker.rope_deltas = None
    text_config = b.model.config.thinker_config.text_config
    cache = DynamicCache(config=text_config)

    def prefill():
        nonlocal cache
        cache = DynamicCache(config=text_config)
        return thinker(input_ids=ctx_ids, past_key_values=cache, use_cache=True)

    prefill_s, _ = b.median(prefill)
    rows = [Row("thinker prefill", f"{shape}, {context}-token prompt, logits for every position",
                context / prefill_s, "tokens/s")]

    def block():
        trim_cache(cache, context)
        return thinker(input_ids=block_ids, past_key_values=cache, use_cache=True)

    block_s, _ = b.median(block)
    setup = (f"{shape}, {block_tokens}-token 2 s block after {context} tokens (DynamicCache), "
             "logits for every position")
    rows.append(Row("thinker block prefill", setup, block_s * 1e3, "ms/block"))
    rows.append(Row("thinker block prefill", setup, block_tokens / block_s, "tokens/s"))

    # Decode after the context: one token per step, as generate's decode step runs the forward.
    steps = b.args.decode_tokens
    limit = min(special_ids(b.config.thinker_config))

    def decode():
        trim_cache(cache, context)
        token = ctx_ids[:, -1:]
        for _ in range(steps):
            logits = thinker(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1, :limit].argmax(-1, keepdim=True)
        return token

    decode_s, _ = b.median(decode)
    rows.append(Row("thinker decode", f"{shape}, {steps} steps after {context} tokens, forward + argmax loop",
                    steps / decode_s, "tokens/s"))
    return rows


def trim_cache(cache, length: int):
    """Drops what was appended after the first `length` positions."""
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise BenchError(f"the cache holds {cache.get_seq_length()} positions, fewer than {length}")
    if extra:
        cache.crop(-extra)


def talker_inputs(b: Bench, prompt_rows: int, reply_rows: int, filler: Filler) -> dict:
    """Talker inputs laid out as `Qwen2_5OmniForConditionalGeneration.generate` builds them for a
    `prompt_rows`-token Thinker prompt: codec track mask*L + pad + bos, text track prompt + speaker
    bos + first reply token, Thinker rows (embedding + hidden state) for the prompt and the reply."""
    talker = b.model.talker
    width = b.config.talker_config.embedding_size
    dtype = b.model.thinker.lm_head.weight.dtype
    g = torch.Generator().manual_seed(5)
    spk_bos = b.model.speaker_map[PUBLISHED_SPEAKER]["bos_token"]
    text_ids = filler.take(prompt_rows) + [spk_bos] + filler.take(1)
    codec_ids = [talker.codec_mask_token] * prompt_rows + [talker.codec_pad_token, talker.codec_bos_token]
    rows = lambda n: (0.5 * torch.randn(1, n, width, generator=g)).to(dtype=dtype, device=b.device)  # noqa: E731
    return dict(
        input_ids=torch.tensor([codec_ids], device=b.device),
        input_text_ids=torch.tensor([text_ids], device=b.device),
        inputs_embeds=rows(prompt_rows + 2),
        thinker_reply_part=rows(reply_rows),
        attention_mask=torch.ones(1, prompt_rows + 2, dtype=torch.long, device=b.device),
    )


def talker_sampling(b: Bench, codes: int) -> dict:
    """`generate`'s talker settings (top-k 40, top-p 0.8, temperature 0.9, repetition penalty 1.05),
    with the end codes of this config and the length forced."""
    from transformers import LogitsProcessorList

    talker = b.model.talker
    limit = b.config.token2wav_config.dit_config.num_embeds + 1  # rows of the DiT codec embedding
    return dict(
        max_new_tokens=codes,
        min_new_tokens=codes,
        do_sample=True,
        top_k=40,
        top_p=0.8,
        temperature=0.9,
        repetition_penalty=1.05,
        eos_token_id=[talker.codec_pad_token, talker.codec_eos_token],
        pad_token_id=talker.codec_pad_token,
        logits_processor=LogitsProcessorList([AllowBelow(limit)]),
    )


def bench_talker(b: Bench, filler: Filler) -> list[Row]:
    talker = b.model.talker
    cfg = b.config.talker_config
    codes = b.args.codes
    prompt_rows = b.args.talker_prompt
    inputs = talker_inputs(b, prompt_rows, b.args.answer_tokens + 1, filler)
    sampling = talker_sampling(b, codes)
    firsts, decodes = [], []

    def run():
        talker.rope_deltas = None
        # generate() adds the codec pad/bos embeddings into inputs_embeds in place: fresh copies.
        kw = {k: v.clone() for k, v in inputs.items()}
        times = CallTimes(b.clock, {"talker": talker})
        try:
            out = talker.generate(**kw, suppress_tokens=[talker.codec_bos_token], **sampling)
            end = b.clock.now()
        finally:
            times.remove()
        first, decode, steps = decode_split(times.starts["talker"], end)
        firsts.append(first)
        decodes.append((decode, steps))
        if out.shape[1] - kw["input_ids"].shape[1] != codes:
            raise BenchError(f"talker made {out.shape[1] - kw['input_ids'].shape[1]} codes, asked for {codes}")
        return out

    torch.manual_seed(b.args.seed)
    b.median(run)
    timed = slice(b.args.warmup, None)
    first = statistics.median(firsts[timed])
    rates = [steps / d for d, steps in decodes[timed] if d > 0]
    setup = (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {b.shape}, prompt {prompt_rows} rows, "
             f"{codes} codes, talker.generate (top-k 40, top-p 0.8, rep. penalty 1.05)")
    rows = [Row("talker prefill", setup + ", prefill forward + first sampling", first * 1e3, "ms")]
    if rates:
        rate = statistics.median(rates)
        cps = codes_per_second(b.config)
        rows.append(Row("talker decode", setup, rate, "codec tokens/s"))
        rows.append(Row("talker decode", setup + f", {cps:g} codes per s of speech", rate / cps, "x real time"))
    return rows


def codes_per_second(config) -> float:
    """Codec tokens per second of speech: each code is `repeats` mel frames of prod(upsample_rates)
    samples at 24 kHz."""
    t2w = config.token2wav_config
    return OUTPUT_SAMPLE_RATE / (math.prod(t2w.bigvgan_config.upsample_rates) * t2w.dit_config.repeats)


def bench_token2wav(b: Bench) -> list[Row]:
    t2w = b.model.token2wav
    dit_cfg = b.config.token2wav_config.dit_config
    codes_n = b.args.codes
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, dit_cfg.num_embeds + 1, (1, codes_n), generator=g).to(b.device)
    spk = b.model.speaker_map[PUBLISHED_SPEAKER]
    cond = spk["cond"].to(b.device).float()
    ref_mel = spk["ref_mel"].to(b.device).float()
    mels = []

    def dit():
        mel = t2w.code2wav_dit_model.sample(cond, ref_mel, codes)  # generate's defaults: 10 steps, CFG 0.5
        mels.append(mel)
        return mel

    dit_s, mel = b.median(dit)
    vocoder_s, wave = b.median(lambda: t2w.code2wav_bigvgan_model(mel))
    audio_s = wave.reshape(-1).shape[0] / OUTPUT_SAMPLE_RATE
    total = dit_s + vocoder_s
    setup = (f"{codes_n} codes = {audio_s:.2f} s audio, f32, 10 ODE steps (36 DiT calls, CFG batch 2), "
             "whole utterance at once (the reference has no streaming decoder)")
    return [
        Row("token2wav offline", setup, total * 1e3, "ms"),
        Row("token2wav offline", setup, total / audio_s, "s compute / s audio"),
        Row("token2wav offline: DiT", setup, dit_s / audio_s, "s compute / s audio"),
        Row("token2wav offline: BigVGAN", setup, vocoder_s / audio_s, "s compute / s audio"),
    ]


def bench_generate(b: Bench, audio_tokens: int, filler: Filler) -> list[Row]:
    """One user turn of one 2-s audio+video block through `model.generate(generation_mode="audio")`.
    The whole waveform comes back at the end, so the wall time is the reference's time from the end
    of the turn to its first audio sample."""
    from transformers import LogitsProcessorList

    model = b.model
    answer, codes = b.args.answer_tokens, b.args.codes
    ids = turn_prompt(b.config, b.block, audio_tokens, b.args.system_tokens, filler)
    input_ids = torch.tensor([ids], device=b.device)
    float_dtype = model.thinker.lm_head.weight.dtype
    talker = {f"talker_{k}": v for k, v in talker_sampling(b, codes).items()}
    text_limit = min(special_ids(b.config.thinker_config))
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        input_features=b.block.input_features.to(b.device, float_dtype),
        feature_attention_mask=b.block.feature_attention_mask.to(b.device),
        # pixel values go to the thinker only: generate forwards unprefixed keys to the talker too,
        # whose generate rejects them; the grid and timing are needed by both for TMRoPE.
        thinker_pixel_values_videos=b.block.pixel_values_videos.to(b.device, float_dtype),
        video_grid_thw=b.block.video_grid_thw.to(b.device),
        video_second_per_grid=b.block.video_second_per_grid.to(b.device),
        use_audio_in_video=True,
        speaker=PUBLISHED_SPEAKER,
        generation_mode="audio",
        thinker_max_new_tokens=answer,
        thinker_min_new_tokens=answer,
        thinker_logits_processor=LogitsProcessorList([AllowBelow(text_limit)]),
        **talker,
    )
    mods = {
        "thinker": model.thinker,
        "audio": model.thinker.audio_tower,
        "vision": model.thinker.visual,
        "talker": model.talker,
        "token2wav": model.token2wav,
        "dit": model.token2wav.code2wav_dit_model,
        "bigvgan": model.token2wav.code2wav_bigvgan_model,
    }
    turns = []

    def turn():
        times = CallTimes(b.clock, mods)
        marks = {}
        orig_thinker, orig_talker = model.thinker.generate, model.talker.generate

        def wrap(name, fn):
            def run(*a, **kw):
                marks[f"{name}_start"] = b.clock.now()
                out = fn(*a, **kw)
                marks[f"{name}_end"] = b.clock.now()
                return out

            return run

        model.thinker.generate = wrap("thinker", orig_thinker)
        model.talker.generate = wrap("talker", orig_talker)
        try:
            start = b.clock.now()
            sequences, wave = model.generate(**kwargs)
            end = b.clock.now()
        finally:
            model.thinker.generate, model.talker.generate = orig_thinker, orig_talker
            times.remove()
        made = sequences.shape[1] - input_ids.shape[1]
        if made != answer:
            raise BenchError(f"the thinker made {made} tokens, asked for {answer}")
        samples = wave.reshape(-1).shape[0]
        t_first, t_decode, t_steps = decode_split(times.starts["thinker"], marks["thinker_end"])
        k_first, k_decode, k_steps = decode_split(times.starts["talker"], marks["talker_end"])
        encoders = times.total("audio") + times.total("vision")
        turns.append(dict(
            total=end - start,
            audio=times.total("audio"),
            vision=times.total("vision"),
            # the Thinker's first forward embeds audio and video, then runs the decoder on the prompt
            thinker_prefill=times.ends["thinker"][0] - times.starts["thinker"][0] - encoders,
            thinker_first=t_first,
            thinker_decode=t_steps / t_decode if t_decode > 0 else None,
            talker_first=k_first,
            talker_decode=k_steps / k_decode if k_decode > 0 else None,
            dit=times.total("dit"),
            bigvgan=times.total("bigvgan"),
            token2wav=times.total("token2wav"),
            audio_seconds=samples / OUTPUT_SAMPLE_RATE,
        ))
        return wave

    torch.manual_seed(b.args.seed)
    with torch.inference_mode():
        b.clock.median(turn, b.args.warmup, b.args.turns)
    timed = turns[b.args.warmup :]

    def med(key):
        values = [t[key] for t in timed if t[key] is not None]
        return statistics.median(values) if values else None

    t = b.config.thinker_config.text_config
    v_tokens = sum(1 for i in ids if i == b.config.thinker_config.video_token_index)
    a_tokens = sum(1 for i in ids if i == b.config.thinker_config.audio_token_index)
    setup = (f"{b.shape}, {len(ids)}-token prompt (chat template + one 2 s block: {v_tokens} video + "
             f"{a_tokens} audio), {answer} text tokens, {codes} codes, model.generate(generation_mode='audio')")
    inner = f"inside generate, {b.shape}"
    rows = [
        Row("end of turn -> first audio", setup + "; the whole waveform comes back at the end", med("total") * 1e3,
            "ms"),
        Row("generate: audio encoder", inner + f", {a_tokens} audio tokens", med("audio") * 1e3, "ms"),
        Row("generate: vision encoder", inner + f", {v_tokens} video tokens", med("vision") * 1e3, "ms"),
        Row("generate: thinker prefill", inner + f", {len(ids)} tokens, {t.num_hidden_layers} layers, encoders excluded",
            med("thinker_prefill") * 1e3, "ms"),
        Row("generate: thinker first token", inner + ", encoders + prefill + first sampling", med("thinker_first") * 1e3,
            "ms"),
    ]
    if med("thinker_decode") is not None:
        rows.append(Row("generate: thinker decode", inner + f", {answer - 1} steps", med("thinker_decode"), "tokens/s"))
    rows.append(Row("generate: talker prefill", inner + f", {len(ids) + 2} rows, prefill + first sampling",
                    med("talker_first") * 1e3, "ms"))
    if med("talker_decode") is not None:
        rows.append(Row("generate: talker decode", inner + f", {codes - 1} steps", med("talker_decode"),
                        "codec tokens/s"))
    audio_s = med("audio_seconds")
    rows.append(Row("generate: token2wav", inner + f", {codes} codes = {audio_s:.2f} s audio, f32 "
                    f"(DiT {med('dit') * 1e3:.0f} ms + BigVGAN {med('bigvgan') * 1e3:.0f} ms)",
                    med("token2wav") * 1e3, "ms"))
    return rows


# --------------------------------------------------------------------------------------------------
# Environment, memory, main
# --------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_average() -> str:
    """Other work on the machine skews CPU figures; the 1-minute load says how much there was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux.
    return "max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="a Qwen2.5-Omni config.json (e.g. models/3b/config.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32", "f16"],
                   help="Thinker and Talker dtype; token2wav always runs in float32")
    p.add_argument("--turns", type=int, default=3, help="timed generate() turns (after --warmup untimed ones)")
    p.add_argument("--answer-tokens", type=int, default=16, help="Thinker answer length, forced")
    p.add_argument("--codes", type=int, default=48, help="Talker codec tokens, forced; also the token2wav length")
    p.add_argument("--context", type=int, default=1000, help="Thinker context before the appended block")
    p.add_argument("--decode-tokens", type=int, default=16, help="timed Thinker decode steps")
    p.add_argument("--talker-prompt", type=int, default=512, help="Thinker prompt rows before the Talker's first code")
    p.add_argument("--system-tokens", type=int, default=DEFAULT_SYSTEM_TOKENS,
                   help="tokens of the system prompt in the generate() prompt")
    p.add_argument("--camera", type=lambda s: tuple(int(x) for x in s.lower().split("x")), default=DEFAULT_CAMERA,
                   metavar="WxH", help="camera resolution (default 640x480)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="video frames per second (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed stage")
    p.add_argument("--iters", type=int, default=3, help="timed runs per stage (the median is reported)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--speaker-bos", type=int, default=None,
                   help=f"speaker bos token id (default: spk_dict.pt beside the config, else {PUBLISHED_SPEAKER_BOS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="keep transformers' warnings")
    p.add_argument("--out", type=Path, default=None, help="also write the rows and environment as JSON here")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    args.stages = stages
    if len(args.camera) != 2 or min(args.camera) <= 0:
        p.error("--camera takes WIDTHxHEIGHT, e.g. 640x480")
    for name in ("turns", "answer_tokens", "codes", "context", "decode_tokens", "talker_prompt", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.system_tokens < 0 or args.fps <= 0:
        p.error("--warmup and --system-tokens must be >= 0, --fps > 0")
    return args


def run(args: argparse.Namespace) -> dict:
    import transformers

    if not args.verbose:
        # The published talker config trips transformers' id-range checks (its tts ids are Thinker
        # ids); those warnings are noise here.
        transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise BenchError(f"--device {args.device}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {args.device}: only cpu and cuda are supported")
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[args.dtype]
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    config, _ = load_config(args.config)
    settings = load_processor_settings(args.config)
    load_before = load_average()
    started = time.perf_counter()
    stages = list(args.stages)
    model = build_model(config, dtype, device, args.seed, stages)
    build_s = time.perf_counter() - started
    speaker = fill_speaker(model, config, args.config, args.speaker_bos)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {args.config} ({params / 1e9:.2f} B parameters, {args.dtype}, token2wav f32; "
          f"{'all of it' if 'generate' in stages else 'each part when its stage runs'}) on "
          f"{device_name(device)} in {build_s:.1f} s", file=sys.stderr)

    block = prepare_block(config, settings, args.camera, args.fps, clock)
    filler = Filler(min(special_ids(config.thinker_config)))
    b = Bench(model, config, block, device, clock, args, f"{args.dtype} on {device.type}")
    rows: list[Row] = []
    audio_tokens = None

    def stage(name, fn):
        t0 = time.perf_counter()
        parts = [] if "generate" in stages else [resolve_part(model, p) for p in STAGE_PARTS[name]]
        for path in parts:
            materialize(model, path, dtype, device)
        built = time.perf_counter()
        out = fn()
        for path in parts:
            release(model, path)
        print(f"stage {name}: {time.perf_counter() - built:.1f} s (building its parts {built - t0:.1f} s)",
              file=sys.stderr)
        return out

    if "audio" in args.stages or "vision" in args.stages or "thinker" in args.stages or "generate" in args.stages:
        # The block's audio token count is needed by the later stages even if not reported.
        audio_rows, audio_tokens = stage("audio", lambda: bench_audio(b))
        if "audio" in args.stages:
            rows += audio_rows
    video_tokens = None
    if "vision" in args.stages or "thinker" in args.stages:
        vision_rows, video_tokens = stage("vision", lambda: bench_vision(b, audio_tokens))
        if "vision" in args.stages:
            rows += vision_rows
    if "thinker" in args.stages:
        rows += stage("thinker", lambda: bench_thinker(b, video_tokens + audio_tokens, filler))
    if "talker" in args.stages:
        rows += stage("talker", lambda: bench_talker(b, filler))
    if "token2wav" in args.stages:
        rows += stage("token2wav", lambda: bench_token2wav(b))
    if "generate" in args.stages:
        rows += stage("generate", lambda: bench_generate(b, audio_tokens, filler))

    mem_kind, mem_gib = peak_memory(device)
    env = {
        "config": str(args.config),
        "processor settings": settings["source"],
        "parameters": params,
        "dtype": f"{args.dtype} (token2wav float32)",
        "device": device.type,
        "device name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch threads": torch.get_num_threads(),
        "attention": model.config._attn_implementation,
        "tf32 matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn tf32": torch.backends.cudnn.allow_tf32,
        "speaker": speaker,
        "iterations": f"{args.warmup} warm-up + median of {args.iters} per stage, {args.turns} generate turns",
        "model build seconds": round(build_s, 1),
        f"peak memory ({mem_kind}), GiB": round(mem_gib, 2),
        "load average (1 min) at start / end": f"{load_before} / {load_average()}",
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return {"environment": env, "rows": [asdict(r) for r in rows]}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as e:
        print(f"reference_bench: {e}", file=sys.stderr)
        return 2
    rows = [Row(**r) for r in result["rows"]]
    print(markdown_table(rows))
    for key, value in result["environment"].items():
        print(f"- {key}: {value}")
    if args.out:
        try:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            print(f"reference_bench: cannot write {args.out}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
