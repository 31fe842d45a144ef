#!/usr/bin/env python3
"""Golden reference fixtures for Qwen3-Omni (Qwen3OmniMoeForConditionalGeneration, HF transformers).

A tiny, randomly initialised model with the architecture of the published Qwen3-Omni-30B-A3B checkpoints
(Thinker = AuT audio encoder + vision encoder + Qwen3-MoE text decoder, Talker + code predictor, Code2Wav) is
built from a config whose sizes, seed and special-token ids come from the command line, saved with
save_pretrained, reloaded, and run stage by stage on fixed inputs. The dumped tensors let another
implementation (omnicall's Rust/candle model layer) check parity without Python at test time.

Usage:
    python3 scripts/gen_reference_qwen3_omni.py --out tests/fixtures/qwen3-omni --model-out models/tiny-qwen3-omni
    python3 scripts/gen_reference_qwen3_omni.py --out DIR --seed 7 --text-hidden 96 --text-layers 3 ...

Output layout (same as the Qwen2.5-Omni fixtures):
    MODEL_OUT/          save_pretrained() of the tiny model (config.json, model.safetensors,
                        generation_config.json) plus tokenizer.json / tokenizer_config.json
    OUT/model           a relative symlink to MODEL_OUT (or the model itself when --model-out is not given)
    OUT/cases.safetensors   every dumped tensor, keyed "<case>.<name>"
    OUT/cases.json      per key: shape, dtype, meaning, the call that produced it; plus the run's settings
    OUT/README.md       every key, generated from cases.json

Everything runs on CPU in float32, eager attention, one thread, deterministic algorithms, fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

SYSTEM_PROMPT = "You are a helpful assistant."


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="fixture folder to write")
    p.add_argument("--model-out", type=Path, help="where to write the tiny model (default OUT/model)")
    p.add_argument("--seed", type=int, default=20251201)
    # Thinker text decoder (Qwen3-MoE).
    p.add_argument("--vocab-size", type=int, default=640)
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-kv-heads", type=int, default=2)
    p.add_argument("--text-head-dim", type=int, default=16)
    p.add_argument("--text-intermediate", type=int, default=96, help="dense MLP size (mlp_only_layers)")
    p.add_argument("--moe-intermediate", type=int, default=32)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--experts-per-token", type=int, default=2)
    p.add_argument("--mlp-only-layers", type=int, nargs="*", default=[], help="layers with a dense MLP")
    p.add_argument("--mrope-section", type=int, nargs=3, default=[2, 3, 3])
    p.add_argument("--rope-theta", type=float, default=1000000.0)
    # AuT audio encoder. The reference's token count formula hard-codes 13 tokens per 100-frame chunk, so
    # n_window stays at the published 50; n_window_infer sets the attention window (published 400).
    p.add_argument("--audio-n-window", type=int, default=50)
    p.add_argument("--audio-n-window-infer", type=int, default=200)
    p.add_argument("--audio-seconds", type=float, default=3.2, help="length of the audio case's clip")
    # Code2Wav.
    p.add_argument("--c2w-hidden", type=int, default=32)
    p.add_argument("--c2w-layers", type=int, default=2)
    p.add_argument("--c2w-heads", type=int, default=4)
    p.add_argument("--c2w-intermediate", type=int, default=64)
    p.add_argument("--c2w-sliding-window", type=int, default=6)
    p.add_argument("--c2w-codebook-size", type=int, default=64)
    p.add_argument("--c2w-quantizers", type=int, default=4)
    p.add_argument("--c2w-decoder-dim", type=int, default=64)
    p.add_argument("--c2w-upsample-rates", type=int, nargs="+", default=[4, 3, 2, 2])
    p.add_argument("--c2w-upsampling-ratios", type=int, nargs="+", default=[2, 2])
    # Special ids, remapped into the tiny vocab (published ids in the help).
    p.add_argument("--id-endoftext", type=int, default=600, help="<|endoftext|> (151643)")
    p.add_argument("--id-im-start", type=int, default=601, help="<|im_start|> (151644)")
    p.add_argument("--id-im-end", type=int, default=602, help="<|im_end|> (151645)")
    p.add_argument("--id-audio", type=int, default=603, help="<|audio_pad|> (151646)")
    p.add_argument("--id-audio-start", type=int, default=604, help="<|audio_start|> (151669)")
    p.add_argument("--id-audio-end", type=int, default=605, help="<|audio_end|> (151670)")
    p.add_argument("--id-vision-start", type=int, default=606, help="<|vision_start|> (151652)")
    p.add_argument("--id-vision-end", type=int, default=607, help="<|vision_end|> (151653)")
    p.add_argument("--id-image", type=int, default=608, help="<|image_pad|> (151655)")
    p.add_argument("--id-video", type=int, default=609, help="<|video_pad|> (151656)")
    p.add_argument("--id-tts-pad", type=int, default=610, help="<|tts_pad|> (151671)")
    p.add_argument("--id-tts-bos", type=int, default=611, help="<|tts_bos|> (151672)")
    p.add_argument("--id-tts-eos", type=int, default=612, help="<|tts_eos|> (151673)")
    # The role words are ordinary BPE tokens in the published vocab; the Talker finds the user and
    # assistant turns by them, so the tiny tokenizer merges each into one token too.
    p.add_argument("--id-system", type=int, default=620, help="'system' (8948)")
    p.add_argument("--id-user", type=int, default=621, help="'user' (872)")
    p.add_argument("--id-assistant", type=int, default=622, help="'assistant' (77091)")
    # Talker codec vocab: the codebook, then special codec ids; the reference suppresses the top 1024 ids
    # except EOS while generating, so the vocab is at least codebook + 1024 (published: 2048 + 1024).
    p.add_argument("--talker-vocab", type=int, default=1088, help="talker codec vocab (3072)")
    p.add_argument("--codec-pad", type=int, default=1070, help="codec_pad_id (2148)")
    p.add_argument("--codec-bos", type=int, default=1071, help="codec_bos_id (2149)")
    p.add_argument("--codec-eos", type=int, default=1072, help="codec_eos_token_id (2150)")
    p.add_argument("--codec-nothink", type=int, default=1073, help="codec_nothink_id (2155)")
    p.add_argument("--codec-think-bos", type=int, default=1074, help="codec_think_bos_id (2156)")
    p.add_argument("--codec-think-eos", type=int, default=1075, help="codec_think_eos_id (2157)")
    p.add_argument("--speaker-ids", type=int, nargs=2, default=[1076, 1077],
                   help="codec ids of the voices ethan, chelsie (2302, 2301)")
    # Inputs.
    p.add_argument("--text-prompt", default="Hello! What is the capital of France?")
    p.add_argument("--thinker-new-tokens", type=int, default=8)
    p.add_argument("--c2w-frames", type=int, default=20, help="frames of random codes for Code2Wav")
    p.add_argument("--c2w-chunk-size", type=int, default=7, help="chunked_decode chunk size (frames)")
    p.add_argument("--c2w-left-context", type=int, default=3, help="chunked_decode left context (frames)")
    p.add_argument("--speech-thinker-tokens", type=int, default=8, help="Thinker tokens of the spoken answer")
    p.add_argument("--speech-talker-tokens", type=int, default=12, help="Talker max_new_tokens (codebook-0 ids)")
    p.add_argument("--speaker", default="ethan", help="voice of the speech case")
    return p.parse_args()


class Recorder:
    """Collects tensors with a description each; writes cases.safetensors, cases.json and README.md."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict] = {}

    def add(self, key: str, value, meaning: str, call: str):
        if key in self.tensors:
            raise KeyError(f"duplicate key {key}")
        t = torch.as_tensor(value).detach().cpu()
        if t.dtype in (torch.bool, torch.int32, torch.int16, torch.int8, torch.uint8):
            t = t.to(torch.int64)
        self.tensors[key] = t.contiguous().clone()
        self.meta[key] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                          "meaning": meaning, "call": call}

    def write(self, out_dir: Path, header: dict):
        from safetensors.torch import save_file

        save_file(self.tensors, str(out_dir / "cases.safetensors"), metadata={"format": "pt"})
        doc = dict(header)
        doc["keys"] = self.meta
        with open(out_dir / "cases.json", "w") as f:
            json.dump(doc, f, indent=1)
        lines = ["# Qwen3-Omni reference fixtures (tiny random model)", "",
                 "Generated by `scripts/gen_reference_qwen3_omni.py` with transformers "
                 f"{header['versions']['transformers']} / torch {header['versions']['torch']} on CPU, float32, "
                 "eager attention. `model/` links to the tiny model folder; "
                 "`cases.json` holds the run's arguments and, per key, shape, dtype, meaning and the call.", "",
                 "Weights: every matrix N(0, 1/fan_in) (experts: fan_in = the expert's input size), norm gains "
                 "1 + N(0, 0.01), other vectors N(0, 0.01), from the seed; Code2Wav's last conv is scaled by "
                 "0.005 so the clamp to [-1, 1] rarely bites.", "",
                 "| key | shape | dtype | meaning | call |", "| --- | --- | --- | --- | --- |"]
        for k, m in self.meta.items():
            lines.append(f"| `{k}` | {m['shape']} | {m['dtype']} | {m['meaning']} | `{m['call']}` |")
        (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def special_ids(a) -> dict[str, int]:
    return {
        "<|endoftext|>": a.id_endoftext, "<|im_start|>": a.id_im_start, "<|im_end|>": a.id_im_end,
        "<|audio_pad|>": a.id_audio, "<|audio_start|>": a.id_audio_start, "<|audio_end|>": a.id_audio_end,
        "<|vision_start|>": a.id_vision_start, "<|vision_end|>": a.id_vision_end,
        "<|image_pad|>": a.id_image, "<|video_pad|>": a.id_video,
        "<|tts_pad|>": a.id_tts_pad, "<|tts_bos|>": a.id_tts_bos, "<|tts_eos|>": a.id_tts_eos,
    }


def role_ids(a) -> dict[str, int]:
    return {"system": a.id_system, "user": a.id_user, "assistant": a.id_assistant}


def build_tokenizer(a):
    """Qwen2's byte-level BPE: each byte of ordinary text is the token whose id is the byte value (0..255),
    except the role words, which merge letter by letter into one token at the id given on the command line
    (their prefixes take the free ids from 256); the special tokens sit at the ids given too."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ids = special_ids(a)
    roles = role_ids(a)
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update(ids)
    vocab.update(roles)
    taken = set(vocab.values())
    free = (i for i in range(256, a.vocab_size) if i not in taken)
    merges = []
    for word in roles:
        for n in range(2, len(word) + 1):
            merges.append((word[:n - 1], word[n - 1]))
            if word[:n] not in vocab:
                vocab[word[:n]] = next(free)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ids])
    for t, i in ids.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    for word, i in roles.items():
        assert tok("\n" + word).input_ids == [ord("\n"), i], (word, tok("\n" + word).input_ids)
    return tok


def build_config(a):
    from transformers import Qwen3OmniMoeConfig

    text = dict(
        vocab_size=a.vocab_size, hidden_size=a.text_hidden, intermediate_size=a.text_intermediate,
        num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads, num_key_value_heads=a.text_kv_heads,
        head_dim=a.text_head_dim, moe_intermediate_size=a.moe_intermediate, num_experts=a.num_experts,
        num_experts_per_tok=a.experts_per_token, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=list(a.mlp_only_layers), rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta,
                         "mrope_section": list(a.mrope_section), "interleaved": True, "mrope_interleaved": True},
        pad_token_id=a.id_endoftext, tie_word_embeddings=False,
    )
    audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=a.text_hidden, n_window=a.audio_n_window, n_window_infer=a.audio_n_window_infer, downsample_hidden_size=16,
                 max_source_positions=1500, conv_chunksize=500)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=a.text_hidden,
                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    talker_text = dict(vocab_size=a.talker_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                       shared_expert_intermediate_size=32,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [1, 1, 2], "interleaved": True})
    code_predictor = dict(vocab_size=a.c2w_codebook_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_code_groups=a.c2w_quantizers)
    talker = dict(text_config=talker_text, code_predictor_config=code_predictor,
                  num_code_groups=a.c2w_quantizers, thinker_hidden_size=a.text_hidden,
                  accept_hidden_layer=a.text_layers - 1, codec_pad_id=a.codec_pad, codec_bos_id=a.codec_bos,
                  codec_eos_token_id=a.codec_eos, codec_nothink_id=a.codec_nothink,
                  codec_think_bos_id=a.codec_think_bos, codec_think_eos_id=a.codec_think_eos,
                  audio_token_id=a.id_audio, image_token_id=a.id_image, video_token_id=a.id_video,
                  vision_start_token_id=a.id_vision_start, audio_start_token_id=a.id_audio_start,
                  speaker_id={"ethan": a.speaker_ids[0], "chelsie": a.speaker_ids[1]}, spatial_merge_size=2)
    code2wav = dict(codebook_size=a.c2w_codebook_size, hidden_size=a.c2w_hidden,
                    num_hidden_layers=a.c2w_layers, num_attention_heads=a.c2w_heads,
                    num_key_value_heads=a.c2w_heads, intermediate_size=a.c2w_intermediate,
                    sliding_window=a.c2w_sliding_window, num_quantizers=a.c2w_quantizers,
                    decoder_dim=a.c2w_decoder_dim, upsample_rates=list(a.c2w_upsample_rates),
                    upsampling_ratios=list(a.c2w_upsampling_ratios), max_position_embeddings=4096)
    thinker = dict(text_config=text, audio_config=audio, vision_config=vision,
                   audio_token_id=a.id_audio, image_token_id=a.id_image, video_token_id=a.id_video,
                   audio_start_token_id=a.id_audio_start, vision_start_token_id=a.id_vision_start,
                   audio_end_token_id=a.id_audio_end, vision_end_token_id=a.id_vision_end)
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                              im_start_token_id=a.id_im_start, im_end_token_id=a.id_im_end,
                              tts_pad_token_id=a.id_tts_pad, tts_bos_token_id=a.id_tts_bos,
                              tts_eos_token_id=a.id_tts_eos, system_token_id=a.id_system,
                              user_token_id=a.id_user, assistant_token_id=a.id_assistant)


def reinit_parameters(model, seed: int):
    """Seeded O(1)-activation init instead of the library's std-0.02 one (near-flat logits, fragile argmax)."""
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
            for pname, _ in mod.named_parameters(recurse=False):
                if pname == "weight":
                    norm_params.add(f"{mname}.{pname}")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                # Fused experts are stacked (experts, out, in): each expert is its own matrix.
                fan_in = p.shape[-1] if ".experts." in name else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).div(math.sqrt(fan_in)).to(p.dtype))
            elif name in norm_params:
                p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
            else:
                p.copy_((0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
        model.code2wav.decoder[-1].conv.weight.mul_(0.005)


def prompt(user_content: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user_content}<|im_end|>\n"
            "<|im_start|>assistant\n")


def audio_tokens(n_frames: int, n_window: int) -> int:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(n_frames), n_window))


def add_rope_index_cases(rec, thinker, tok, a):
    """Prompts laid out as the processor lays them out (placeholders per encoder output token), with
    the grids, seconds per grid and mel lengths given; positions from thinker.get_rope_index."""
    cfg = thinker.config
    merge = cfg.vision_config.spatial_merge_size
    n_window = cfg.audio_config.n_window
    text = lambda s: tok(s).input_ids

    def audio(frames):
        return [a.id_audio_start] + [a.id_audio] * audio_tokens(frames, n_window) + [a.id_audio_end]

    def vision(pad, grid):
        return [a.id_vision_start] + [pad] * (grid[0] * grid[1] * grid[2] // merge ** 2) + [a.id_vision_end]

    def audio_in_video(grid, second_per_grid, frames):
        # The processor's order: frame tokens and audio tokens merged by time, a frame first on a tie.
        per_frame = grid[1] * grid[2] // merge ** 2
        video_t = [k * second_per_grid * cfg.position_id_per_seconds for k in range(grid[0]) for _ in range(per_frame)]
        audio_t = list(range(audio_tokens(frames, n_window)))
        out, v, u = [], 0, 0
        while v < len(video_t) and u < len(audio_t):
            if video_t[v] <= audio_t[u]:
                out.append(a.id_video); v += 1
            else:
                out.append(a.id_audio); u += 1
        out += [a.id_video] * (len(video_t) - v) + [a.id_audio] * (len(audio_t) - u)
        return [a.id_vision_start, a.id_audio_start] + out + [a.id_audio_end, a.id_vision_end]

    head = text("<|im_start|>user\n")
    tail = text("<|im_end|>\n<|im_start|>assistant\n")
    image_grid, video_grid, av_grid = [1, 4, 6], [3, 4, 4], [2, 4, 4]
    cases = {
        "audio": dict(ids=head + audio(37) + text("What is said?") + tail, audio=[37]),
        "image": dict(ids=head + vision(a.id_image, image_grid) + text("What is this?") + tail, image=[image_grid]),
        "video": dict(ids=head + text("Watch ") + vision(a.id_video, video_grid) + tail, video=[video_grid],
                      spg=[0.6]),
        "audio_in_video": dict(ids=head + audio_in_video(av_grid, 1.0, 40) + text("Who speaks?") + tail,
                               video=[av_grid], spg=[1.0], audio=[40], use_audio_in_video=True),
        "mixed": dict(ids=head + audio(20) + text(" and ") + vision(a.id_image, image_grid) + text(" then ")
                      + vision(a.id_video, video_grid) + tail, image=[image_grid], video=[video_grid], spg=[0.5],
                      audio=[20]),
    }
    for name, c in cases.items():
        ids = torch.tensor([c["ids"]])
        image = torch.tensor(c["image"]) if "image" in c else None
        video = torch.tensor(c["video"]) if "video" in c else None
        spg = torch.tensor(c["spg"], dtype=torch.float32) if "spg" in c else None
        audio_lens = torch.tensor(c["audio"]) if "audio" in c else None
        with torch.no_grad():
            pos, delta = thinker.get_rope_index(ids, image, video, torch.ones_like(ids),
                                                c.get("use_audio_in_video", False), audio_lens, spg)
        k = f"rope_index.{name}"
        rec.add(f"{k}.input_ids", ids, "prompt ids with the media placeholders", "processor layout")
        rec.add(f"{k}.image_grid_thw", image if image is not None else torch.zeros(0, 3, dtype=torch.int64),
                "(t, h, w) patch grid per image", "image processor")
        rec.add(f"{k}.video_grid_thw", video if video is not None else torch.zeros(0, 3, dtype=torch.int64),
                "(t, h, w) patch grid per video", "video processor")
        rec.add(f"{k}.video_second_per_grid", spg if spg is not None else torch.zeros(0),
                "seconds per temporal patch per video", "video processor")
        rec.add(f"{k}.audio_feature_lengths", audio_lens if audio_lens is not None else torch.zeros(0, dtype=torch.int64),
                "mel frames per audio clip", "feature extractor")
        rec.add(f"{k}.use_audio_in_video", torch.tensor([int(c.get("use_audio_in_video", False))]),
                "1: videos carry their audio, interleaved", "generate(use_audio_in_video=...)")
        rec.add(f"{k}.position_ids", pos.to(torch.float32), "rotary positions (3, 1, len), float as the reference computes them",
                "thinker.get_rope_index(...)")
        rec.add(f"{k}.rope_deltas", delta.to(torch.float32), "max position + 1 - length", "get_rope_index")


def add_audio_case(rec, thinker, a):
    """A chirp plus noise, the processor's Whisper log-mel of it (128 bins, padding to the longest clip),
    and the audio tower's output on the valid frames."""
    from transformers import WhisperFeatureExtractor

    g = torch.Generator().manual_seed(a.seed + 3)
    n = int(a.audio_seconds * 16000)
    t = torch.arange(n, dtype=torch.float64) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * (200 * t + 300 * t * t)) + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    wave = wave.to(torch.float32)
    fe = WhisperFeatureExtractor(feature_size=thinker.config.audio_config.num_mel_bins, sampling_rate=16000,
                                 hop_length=160, n_fft=400, chunk_length=30)
    feats = fe(wave.numpy(), sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
               return_tensors="pt")
    mask = feats["attention_mask"]
    rec.add("audio.waveform", wave, f"{a.audio_seconds} s at 16 kHz: a chirp plus seeded noise", "torch")
    rec.add("audio.feature_attention_mask", mask, "valid mel frames", "WhisperFeatureExtractor(padding=True)")
    valid = feats["input_features"].permute(0, 2, 1)[mask.bool()].permute(1, 0)
    rec.add("audio.input_features", valid, "(mel bins, valid frames) log-mel the encoder reads",
            "WhisperFeatureExtractor(...).input_features[mask]")
    captured = {}
    def capture(module, args):
        captured["embedded"] = args[0].clone()

    hook = thinker.audio_tower.layers[0].register_forward_pre_hook(capture)
    with torch.no_grad():
        out = thinker.get_audio_features(feats["input_features"], feature_attention_mask=mask).last_hidden_state
    hook.remove()
    rec.add("audio.embedded", captured["embedded"], "(tokens, d_model) after the convolutions, conv_out and the "
            "per-chunk sinusoid positions, valid frames only", "audio_tower.layers[0] input")
    rec.add("audio.features", out, "(tokens, output_dim) audio tower output", "thinker.get_audio_features(...)")
    return valid


def add_multimodal_cases(rec, thinker, audio_features, a):
    """The vision encoder on seeded pixel patches (an image and a video, their grids from the rope_index.mixed
    case), then the Thinker's logits on that prompt with the audio (the audio case's first frames), the image
    and the video merged in, DeepStack included."""
    g = torch.Generator().manual_seed(a.seed + 4)
    vc = thinker.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    grids = {}
    for kind in ("image", "video"):
        grid = rec.tensors[f"rope_index.mixed.{kind}_grid_thw"]
        grids[kind] = grid
        pixels = torch.rand(int(grid.prod(-1).sum()), patch_dim, generator=g) * 2 - 1
        with torch.no_grad():
            out = thinker.visual(pixels, grid_thw=grid)
        rec.add(f"vision.{kind}.pixel_values", pixels, "(patches, C * temporal_patch * patch^2) seeded uniform [-1, 1], "
                "in the processor's merge-block order", "torch.rand")
        rec.add(f"vision.{kind}.embeds", out.pooler_output, "(tokens, out_hidden_size) merged vision tokens",
                "thinker.visual(pixels, grid_thw).pooler_output")
        rec.add(f"vision.{kind}.deepstack", torch.stack(out.deepstack_features),
                "(deepstack layers, tokens, out_hidden_size) the DeepStack mergers' outputs",
                "thinker.visual(...).deepstack_features")
    ids = rec.tensors["rope_index.mixed.input_ids"]
    frames = int(rec.tensors["rope_index.mixed.audio_feature_lengths"][0])
    feats = audio_features[:, :frames].unsqueeze(0)
    rec.add("thinker_mm.input_features", feats, "(1, mel bins, frames) the audio case's first frames",
            "audio.input_features[:, :frames]")
    with torch.no_grad():
        out = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                      feature_attention_mask=torch.ones(1, frames, dtype=torch.long),
                      pixel_values=rec.tensors["vision.image.pixel_values"], image_grid_thw=grids["image"],
                      pixel_values_videos=rec.tensors["vision.video.pixel_values"], video_grid_thw=grids["video"],
                      video_second_per_grid=rec.tensors["rope_index.mixed.video_second_per_grid"],
                      use_cache=False, output_hidden_states=True)
    rec.add("thinker_mm.inputs_embeds", out.hidden_states[0], "embeddings with the audio, image and video tokens "
            "merged in", "thinker.forward hidden_states[0]")
    rec.add("thinker_mm.logits", out.logits, "logits at every position of rope_index.mixed",
            "thinker.forward(input_ids, input_features, pixel_values, pixel_values_videos, ...)")


def main():
    a = parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import transformers
    from transformers import Qwen3OmniMoeForConditionalGeneration

    out = a.out
    model_dir = a.model_out or (out / "model")
    out.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)

    config = build_config(a)
    config._attn_implementation = "eager"
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    reinit_parameters(model, a.seed)
    model.save_pretrained(str(model_dir))
    tok = build_tokenizer(a)
    tok.save_pretrained(str(model_dir))
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32).eval()
    if a.model_out is not None:
        link = out / "model"
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(model_dir.resolve(), out.resolve()))

    rec = Recorder()
    thinker = model.thinker

    # ---- thinker_text: the Qwen3-MoE decoder on a text-only chat prompt -------------------------------
    ids = tok(prompt(a.text_prompt), return_tensors="pt").input_ids
    rec.add("thinker_text.input_ids", ids, "the tokenised chat prompt (system + user text + assistant header)",
            "tokenizer(prompt)")
    with torch.no_grad():
        pos, delta = thinker.get_rope_index(ids, attention_mask=torch.ones_like(ids))
        # The reference builds positions in floating point; they are whole numbers, stored as int64.
        assert torch.equal(pos, pos.round()), "non-integral position ids"
        rec.add("thinker_text.position_ids", pos.to(torch.int64), "rotary positions (3 rows t/h/w, equal for text)",
                "thinker.get_rope_index(input_ids)")
        rec.add("thinker_text.rope_deltas", delta.to(torch.int64), "max position + 1 - sequence length", "get_rope_index")
        outputs = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                          use_cache=False)
        hs = outputs.hidden_states
        rec.add("thinker_text.inputs_embeds", hs[0], "embed_tokens(input_ids)", "thinker.forward hidden_states[0]")
        for i in range(1, len(hs) - 1):
            rec.add(f"thinker_text.layer{i - 1}_output", hs[i], f"output of decoder layer {i - 1}",
                    f"thinker.forward hidden_states[{i}]")
        rec.add("thinker_text.logits", outputs.logits, "logits at every position", "thinker.forward(...).logits")
        gen = thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.thinker_new_tokens,
                               min_new_tokens=a.thinker_new_tokens, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, eos_token_id=None, pad_token_id=a.id_endoftext)
        rec.add("thinker_text.generated_ids", gen.sequences[:, ids.shape[1]:],
                f"{a.thinker_new_tokens} greedy tokens (KV-cache decode)", "thinker.generate(do_sample=False)")
        rec.add("thinker_text.generation_step_logits", torch.stack(gen.logits, dim=1),
                "the raw logits that chose each generated token", "thinker.generate(output_logits=True)")

    # ---- rope_index: multimodal positions (text, audio, image, video, audio in video) -----------------
    add_rope_index_cases(rec, thinker, tok, a)

    # ---- audio: log-mel of a seeded clip and the AuT encoder's tokens ----------------------------------
    audio_features = add_audio_case(rec, thinker, a)

    # ---- vision and the multimodal Thinker: the rope_index.mixed prompt with its audio, image, video ---
    add_multimodal_cases(rec, thinker, audio_features, a)

    # ---- code2wav: waveform from seeded random codes, offline and chunked ------------------------------
    c2w = model.code2wav
    g = torch.Generator().manual_seed(a.seed + 1)
    codes = torch.randint(0, a.c2w_codebook_size, (1, a.c2w_quantizers, a.c2w_frames), generator=g)
    with torch.no_grad():
        rec.add("code2wav.codes", codes, "codes (batch, quantizer, frame), seeded uniform", "torch.randint")
        hidden = c2w.code_embedding(codes + c2w.code_offset).mean(1)
        rec.add("code2wav.embedded", hidden, "mean over quantizers of the offset code embeddings",
                "code_embedding(codes + code_offset).mean(1)")
        pre = c2w.pre_transformer(inputs_embeds=hidden).last_hidden_state
        rec.add("code2wav.pre_transformer", pre, "pre-transformer output (sliding-window causal)",
                "code2wav.pre_transformer(inputs_embeds=embedded)")
        up = pre.permute(0, 2, 1)
        for blocks in c2w.upsample:
            for block in blocks:
                up = block(up)
        rec.add("code2wav.upsampled", up, "after the upsampling stages (channels, frames * prod ratios)",
                "code2wav.upsample")
        rec.add("code2wav.waveform", c2w(codes), "24 kHz waveform (batch, 1, samples), clamped to [-1, 1]",
                "code2wav(codes)")
        rec.add("code2wav.chunked_waveform",
                c2w.chunked_decode(codes, chunk_size=a.c2w_chunk_size, left_context_size=a.c2w_left_context),
                f"chunked_decode with chunk_size {a.c2w_chunk_size}, left_context_size {a.c2w_left_context}",
                "code2wav.chunked_decode(codes, chunk_size, left_context_size)")

    # ---- code_predictor: one frame's residual codebooks from a Talker hidden state -------------------
    talker = model.talker
    cp = talker.code_predictor
    g = torch.Generator().manual_seed(a.seed + 2)
    groups = config.talker_config.num_code_groups
    with torch.no_grad():
        past_hidden = torch.randn(1, 1, config.talker_config.text_config.hidden_size, generator=g)
        code0 = torch.randint(0, a.c2w_codebook_size, (1, 1), generator=g)
        last_id_hidden = talker.get_input_embeddings()(code0)
        rec.add("code_predictor.past_hidden", past_hidden, "a Talker last-layer hidden state (seeded normal)",
                "torch.randn")
        rec.add("code_predictor.code0", code0, "the frame's codebook-0 code (what the Talker chose)",
                "torch.randint")
        rec.add("code_predictor.code0_embedding", last_id_hidden, "talker.model.codec_embedding(code0)",
                "talker.get_input_embeddings()(code0)")
        res = cp.generate(inputs_embeds=torch.cat((past_hidden, last_id_hidden), dim=1),
                          max_new_tokens=groups - 1, min_new_tokens=groups - 1, do_sample=False,
                          output_hidden_states=True, output_logits=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0)
        rec.add("code_predictor.residual_codes", res.sequences, f"greedy codes of codebooks 1..{groups - 1}",
                "talker.code_predictor.generate(inputs_embeds=[past_hidden, code0_embedding], do_sample=False)")
        rec.add("code_predictor.step_logits", torch.stack(res.logits, dim=1),
                "the logits that chose each residual code (lm_head[step])", "generate(output_logits=True)")
        mids = [hid[0] for hid in res.hidden_states[1:]]
        last = cp.get_input_embeddings()[-1](res.sequences[..., -1:])
        rec.add("code_predictor.next_talker_input", torch.cat([last_id_hidden] + mids + [last], dim=1).sum(1, keepdim=True),
                "sum of the frame's code embeddings (Talker codec embedding for code 0, the predictor's "
                "codec_embedding[g-1] for code g): the Talker's next input before the text part is added",
                "Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation")

    # ---- talker: the projections from the Thinker and the MoE decoder with its codec head -------------
    with torch.no_grad():
        thinker_embeds = thinker.get_input_embeddings()(ids)
        thinker_hidden = torch.randn(1, ids.shape[1], config.thinker_config.text_config.hidden_size, generator=g)
        rec.add("talker.thinker_hidden", thinker_hidden, "stand-in Thinker hidden states (seeded normal)",
                "torch.randn")
        rec.add("talker.text_projection", talker.text_projection(thinker_embeds),
                "text_projection of the Thinker's embeddings of thinker_text.input_ids",
                "talker.text_projection(thinker.get_input_embeddings()(input_ids))")
        rec.add("talker.hidden_projection", talker.hidden_projection(thinker_hidden),
                "hidden_projection of talker.thinker_hidden", "talker.hidden_projection(thinker_hidden)")
        steps = 12
        talker_embeds = torch.randn(1, steps, config.talker_config.text_config.hidden_size, generator=g)
        pos = torch.arange(steps).view(1, 1, -1).expand(3, 1, -1)
        rec.add("talker.inputs_embeds", talker_embeds, "Talker input embeddings (seeded normal)", "torch.randn")
        talker_out = talker.model(inputs_embeds=talker_embeds, position_ids=pos, use_cache=False,
                           output_hidden_states=True)
        rec.add("talker.last_hidden", talker_out.last_hidden_state, "talker.model output after its final norm at text "
                "positions 0..n-1", "talker.model(inputs_embeds, position_ids)")
        rec.add("talker.logits", talker.codec_head(talker_out.last_hidden_state), "codec_head logits at every position",
                "talker.codec_head(last_hidden)")

    # ---- speech: the whole model's generate, Thinker then Talker + code predictor, greedy --------------
    captured = {}
    talker_generate = talker.generate

    def recording_generate(*args, **kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]
        captured["trailing_text_hidden"] = kwargs["trailing_text_hidden"]
        captured["talker_input_ids"] = kwargs["talker_input_ids"]
        captured["result"] = talker_generate(*args, **kwargs)
        return captured["result"]

    talker.generate = recording_generate
    with torch.no_grad():
        sequences, wav = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), speaker=a.speaker, return_audio=True,
            thinker_max_new_tokens=a.speech_thinker_tokens, thinker_eos_token_id=a.id_im_end,
            thinker_do_sample=False, talker_max_new_tokens=a.speech_talker_tokens, talker_do_sample=False,
            talker_output_logits=True)
    talker.generate = talker_generate
    result = captured["result"]
    frames = torch.stack([hid[-1] for hid in result.hidden_states if hid[-1] is not None], dim=1)  # (1, f, groups)
    rec.add("speech.thinker_ids", sequences[:, ids.shape[1]:],
            "the Thinker's greedy answer to thinker_text.input_ids (stops at <|im_end|>)",
            "model.generate(thinker_do_sample=False)")
    rec.add("speech.talker_input_ids", captured["talker_input_ids"],
            "ids the Talker's rotary positions come from (user turn ids, then tts_pad per assistant prefix slot)",
            "talker.generate(talker_input_ids=...)")
    rec.add("speech.talker_inputs_embeds", captured["inputs_embeds"],
            "the Talker's prompt: projected user turn, then the assistant prefix (text + codec specials + speaker)",
            "_get_talker_user_parts + _get_talker_assistant_parts")
    rec.add("speech.trailing_text_hidden", captured["trailing_text_hidden"],
            "text_projection of the answer's tokens after the first, then tts_eos: one per Talker step",
            "_get_talker_assistant_parts")
    rec.add("speech.codebook0_ids", result.sequences,
            f"greedy codebook-0 ids (repetition penalty 1.05, top 1024 ids but EOS suppressed), <= "
            f"{a.speech_talker_tokens}", "talker.generate(do_sample=False)")
    rec.add("speech.talker_step_logits", torch.stack(result.logits, dim=1),
            "the raw codec_head logits that chose each codebook-0 id", "talker.generate(output_logits=True)")
    rec.add("speech.codes", frames.transpose(1, 2),
            "codes (batch, codebook, frame) of every frame the Talker completed (its code 0 and the code "
            "predictor's greedy residual codes)", "hidden_states[-1] of each talker step")
    rec.add("speech.waveform", wav, "24 kHz waveform of speech.codes", "code2wav.chunked_decode(codes, 300, 25)")

    header = {
        "generator": "scripts/gen_reference_qwen3_omni.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "special_ids": special_ids(a),
        "role_ids": role_ids(a),
    }
    rec.write(out, header)
    print(f"wrote {len(rec.tensors)} keys to {out}")


if __name__ == "__main__":
    main()
