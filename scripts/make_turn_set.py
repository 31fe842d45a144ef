#!/usr/bin/env python3
"""The spoken turn-taking test set: 16 kHz WAV files read by espeak-ng (several voices and
rates), joined with sox, with their segment times in `segments.json` beside them.

    python3 scripts/make_turn_set.py [OUT_DIR]      # default tests/fixtures/turn/set

Needs espeak-ng and sox (scripts/setup.sh installs them) and numpy. Kinds of clips:

- `complete`: a whole question, then silence. The answer may start after `prompt_end`.
- `pause`: a sentence with a 0.5-1.2 s pause in the middle ("Tell me about the weather in ...
  Paris and London tomorrow"); an answer that starts inside a pause is a false cut-off.
- `backchannel`: a short "mm hmm", "yeah", a cough, played over an answer; it must not cut it.
- `interruption`: a real barge-in played over an answer; it must cut it.

Each entry of segments.json: `file`, `kind`, `text`, `voice`, `rate` (espeak words per minute),
`duration`, `speech` (list of [start, end] in seconds: where each spoken part is louder than
-40 dBFS), `pauses` (list of [start, end]: the silences between the parts), `prompt_end` (end of
the last spoken part). espeak-ng and sox are deterministic (no noise is added), but another build
of them writes slightly different samples: the first 8 clips of each kind were made with an
earlier build and are kept as committed (the Smart Turn fixture `smart_turn.json` scores them),
so to add clips, write to a scratch folder and copy only the new files and their entries.
"""
import json
import os
import subprocess
import sys
import tempfile
import wave

import numpy as np

RATE = 16000
LOUD = 0.01  # -40 dBFS

COMPLETE = [
    ("What is the capital of France?", "en-us", 165),
    ("Can you tell me a joke about cats?", "en-gb", 150),
    ("How far away is the moon?", "en-us+f3", 180),
    ("What time does the sun set in winter?", "en-us+m3", 140),
    ("Could you describe what you see on the table?", "en-gb+f2", 170),
    ("Why is the sky blue?", "en-us+f4", 155),
    ("Please recommend a good book to read this weekend.", "en-us", 190),
    ("What should I cook for dinner tonight?", "en-gb+m2", 160),
    ("How do airplanes stay in the air?", "en-us+m1", 135),
    ("Can you help me plan a birthday party?", "en-gb+f1", 200),
    ("What is the tallest mountain in Europe?", "en-us+m4", 150),
    ("Where do penguins live?", "en-gb+m3", 175),
    ("Is it going to rain tomorrow?", "en-us+f2", 145),
    ("What games can we play with three people?", "en-gb+m4", 165),
    ("How many legs does a spider have?", "en-us+m7", 185),
    ("Tell me something interesting about octopuses.", "en-gb+f3", 140),
    ("What is your favourite colour?", "en-us+f1", 195),
    ("How long should I boil an egg?", "en-gb+m1", 155),
    ("Which planet is closest to the sun?", "en-us+m2", 130),
    ("Can you translate good morning into Spanish?", "en-gb+f4", 180),
]
# (first part, pause seconds, second part)
PAUSE = [
    ("Tell me about the weather in", 0.8, "Paris and London tomorrow.", "en-us", 165),
    ("I would like to know", 0.6, "how a rainbow is formed.", "en-gb", 150),
    ("Can you explain", 1.0, "why cats like boxes so much?", "en-us+f3", 175),
    ("My favourite food is", 0.7, "pizza, what is yours?", "en-us+m3", 145),
    ("What is the difference between", 1.2, "a crocodile and an alligator?", "en-gb+f2", 160),
    ("So I was thinking that maybe", 0.9, "we could plan a trip to the mountains.", "en-us+f4", 185),
    ("How many people live in", 0.5, "Tokyo and its suburbs?", "en-us", 155),
    ("Tell me the story of", 1.1, "the three little pigs, please.", "en-gb+m2", 170),
    ("I want to learn how to", 0.7, "play the guitar.", "en-us+m1", 135),
    ("Could you remind me", 0.9, "what the date is today?", "en-gb+f1", 200),
    ("The thing I never understood about", 1.0, "the ocean is the tides.", "en-us+m4", 150),
    ("Do you know if", 0.6, "museums are open on Mondays?", "en-gb+m3", 175),
    ("What would happen if", 1.2, "the moon disappeared?", "en-us+f2", 145),
    ("I was wondering whether", 0.8, "you could help me with my homework.", "en-gb+m4", 165),
    ("Give me three reasons", 0.5, "to learn a new language.", "en-us+m7", 185),
    ("When I go to the market I usually buy", 1.1, "apples and bread.", "en-gb+f3", 140),
    ("Explain to me how", 0.7, "a computer stores numbers.", "en-us+f1", 195),
    ("Is it true that", 0.9, "goldfish have short memories?", "en-gb+m1", 155),
    ("My brother and I", 1.0, "are arguing about who is taller.", "en-us+m2", 130),
    ("Please tell me about", 0.6, "the history of chocolate.", "en-gb+f4", 180),
]
BACKCHANNEL = [
    ("mm hmm", "en-us", 150),
    ("yeah", "en-gb", 160),
    ("okay", "en-us+f3", 170),
    ("uh huh", "en-us+m3", 150),
    ("right", "en-gb+f2", 160),
]
INTERRUPTION = [
    ("Wait, stop, I have a different question.", "en-us", 170),
    ("Actually, can you tell me about Rome instead?", "en-gb", 160),
    ("No no, that is not what I meant at all.", "en-us+f3", 180),
    ("Hold on, let me ask you something else.", "en-us+m3", 150),
]


def speak(text, voice, rate, tmp):
    raw = os.path.join(tmp, "raw.wav")
    wav = os.path.join(tmp, "part.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", raw, text], check=True)
    subprocess.run(["sox", raw, "-r", str(RATE), "-b", "16", "-c", "1", wav], check=True)
    return read(wav)


def read(path):
    with wave.open(path) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def trim(audio):
    loud = np.flatnonzero(np.abs(audio) > LOUD)
    return audio[loud[0] : loud[-1] + 1]


def silence(seconds):
    return np.zeros(int(round(seconds * RATE)), dtype=np.float32)


def write(path, audio):
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def clip(parts, pauses, lead, tail):
    """Audio of spoken `parts` (trimmed) with `pauses` between them; their [start, end] times."""
    audio = [silence(lead)]
    t = lead
    speech = []
    for k, part in enumerate(parts):
        speech.append([round(t, 4), round(t + len(part) / RATE, 4)])
        audio.append(part)
        t += len(part) / RATE
        if k < len(pauses):
            audio.append(silence(pauses[k]))
            t += pauses[k]
    audio.append(silence(tail))
    return np.concatenate(audio), speech


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/turn/set"
    os.makedirs(out, exist_ok=True)
    cough = trim(read(os.path.join(os.path.dirname(__file__), "..", "tests/media/cough.wav")))
    entries = []

    def add(name, kind, text, voice, rate, parts, pauses, lead, tail):
        audio, speech = clip(parts, pauses, lead, tail)
        write(os.path.join(out, name), audio)
        entries.append(
            {
                "file": name,
                "kind": kind,
                "text": text,
                "voice": voice,
                "rate": rate,
                "duration": round(len(audio) / RATE, 4),
                "speech": speech,
                "pauses": [[speech[k][1], speech[k + 1][0]] for k in range(len(speech) - 1)],
                "prompt_end": speech[-1][1],
            }
        )

    with tempfile.TemporaryDirectory() as tmp:
        for k, (text, voice, rate) in enumerate(COMPLETE):
            add(f"complete_{k + 1}.wav", "complete", text, voice, rate, [trim(speak(text, voice, rate, tmp))], [], 0.5, 1.5)
        for k, (a, pause, b, voice, rate) in enumerate(PAUSE):
            parts = [trim(speak(a, voice, rate, tmp)), trim(speak(b, voice, rate, tmp))]
            add(f"pause_{k + 1}.wav", "pause", f"{a} ... {b}", voice, rate, parts, [pause], 0.5, 1.5)
        for k, (text, voice, rate) in enumerate(BACKCHANNEL):
            add(f"backchannel_{k + 1}.wav", "backchannel", text, voice, rate, [trim(speak(text, voice, rate, tmp))], [], 0.3, 0.7)
        add(f"backchannel_{len(BACKCHANNEL) + 1}.wav", "backchannel", "(cough)", "sox", 0, [cough], [], 0.3, 0.7)
        for k, (text, voice, rate) in enumerate(INTERRUPTION):
            add(f"interruption_{k + 1}.wav", "interruption", text, voice, rate, [trim(speak(text, voice, rate, tmp))], [], 0.3, 1.0)
    with open(os.path.join(out, "segments.json"), "w") as f:
        json.dump(entries, f, indent=1)
    print(f"{out}: {len(entries)} clips, {sum(e['duration'] for e in entries):.1f} s")


if __name__ == "__main__":
    main()
