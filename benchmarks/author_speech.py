"""Author LM, ASR and alignment benchmarks, side by side in one run.

(d) author LM through Triton (BLS loop over the ONNX step graph) vs
    transformers in-process on the same prompt: time to first token and
    decode tokens per second;
(e) RTF of Whisper ASR and of forced alignment through Triton on 15 s of speech;
(f) the share ASR, authoring and voicing take of a ``/v1/converse`` request
    with one spoken history turn and an open turn to author;
(g) WER of the specs' sentences voiced by each default voice and transcribed
    back (normalised: case, punctuation, digits spelled out).
"""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from devtools.local_stack import LocalStack
from devtools.wer import SPEC_SENTENCES, word_error_rate
from handler.audio import resample
from handler.author_lm import AUTHOR_MODEL, build_prompt
from handler.transcription import SPEECH_SAMPLE_RATE, align, transcribe
from handler.triton import TritonClient

ROOT = Path(__file__).resolve().parent.parent

HISTORY = [("0", "Did you end up trying that recipe?"),
           ("1", "I did, the timing was the hard part.")]
LONG_TEXT = (
    "We walked along the river for an hour, then stopped at the little bakery near the "
    "bridge. They had run out of bread, so we shared a slice of apple cake and talked about "
    "the summer. Later the rain came in from the west and we hurried home."
)
DECODE_TOKENS = 32


async def _author_triton(url: str, prompt: str, repeats: int) -> tuple[float, float, int]:
    client = TritonClient(url)

    async def generate(max_new: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = await client.infer(AUTHOR_MODEL, {
            "PROMPT": np.array([prompt.encode()], dtype=np.object_),
            "TEMPERATURE": np.array([1.0], np.float32), "TOP_K": np.array([50], np.int32),
            "MAX_NEW_TOKENS": np.array([max_new], np.int32), "SEED": np.array([3], np.int64),
        }, ["TOKENS"])
        return time.perf_counter() - start, len(out["TOKENS"])

    ttft = statistics.median([(await generate(1))[0] for _ in range(repeats)])
    runs = [await generate(DECODE_TOKENS) for _ in range(repeats)]
    await client.close()
    seconds, tokens = statistics.median(r[0] for r in runs), int(statistics.median(r[1] for r in runs))
    return ttft, max(tokens - 1, 1) / max(seconds - ttft, 1e-6), tokens


def _author_transformers(prompt: str, repeats: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": "gemma-3-270m-q4_k_m.gguf"}
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "build/author", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(ROOT / "build/author", dtype=torch.float32,
                                                 **kwargs).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=50)
        return time.perf_counter() - start

    generate(2)
    ttft = statistics.median(generate(1) for _ in range(repeats))
    full = statistics.median(generate(DECODE_TOKENS) for _ in range(repeats))
    return ttft, (DECODE_TOKENS - 1) / (full - ttft)


async def _speech(url: str, audio: np.ndarray, repeats: int) -> tuple[float, float]:
    client = TritonClient(url)
    asr, aligned = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        await transcribe(client, audio)
        asr.append(time.perf_counter() - start)
        start = time.perf_counter()
        await align(client, audio, LONG_TEXT)
        aligned.append(time.perf_counter() - start)
    await client.close()
    return statistics.median(asr), statistics.median(aligned)


async def _transcripts(url: str, clips: list[np.ndarray]) -> list[str]:
    client = TritonClient(url)
    texts = [(await transcribe(client, clip))[0] for clip in clips]
    await client.close()
    return texts


def measure_author_speech(stack: LocalStack, repeats: int) -> str:
    """Run (d), (e), (f) on a running stack; returns the markdown section."""
    prompt = build_prompt(HISTORY, "0")
    url = stack.triton.http_url
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=300) as client:
        spoken = client.post("/v1/converse", json={"conversation": [
            {"speaker": "1", "text": LONG_TEXT}]}).json()["reply"]["audio"]["data_b64"]
        samples, rate = sf.read(io.BytesIO(base64.b64decode(spoken)), dtype="float32")
        audio = resample(samples, rate, SPEECH_SAMPLE_RATE)
        seconds = len(samples) / rate
        asr_s, align_s = asyncio.run(_speech(url, audio, repeats))
        triton_ttft, triton_tps, tokens = asyncio.run(_author_triton(url, prompt, repeats))
        hf_ttft, hf_tps = _author_transformers(prompt, repeats)
        request_s, voice_s, authored = [], [], ""
        for seed in range(repeats):
            start = time.perf_counter()
            reply = client.post("/v1/converse", json={
                "conversation": [{"speaker": "1", "audio_wav_b64": spoken}, {"speaker": "0"}],
                "params": {"seed": seed}}).json()["reply"]
            request_s.append(time.perf_counter() - start)
            authored = reply["text"]
            start = time.perf_counter()
            client.post("/v1/converse", json={"conversation": [{"speaker": "0", "text": authored}]})
            voice_s.append(time.perf_counter() - start)
        rates = {}
        for speaker in ("0", "1"):
            clips = []
            for sentence in SPEC_SENTENCES:
                wav = client.post("/v1/converse", json={"conversation": [
                    {"speaker": speaker, "text": sentence}]}).json()["reply"]["audio"]["data_b64"]
                clip, clip_rate = sf.read(io.BytesIO(base64.b64decode(wav)), dtype="float32")
                clips.append(resample(clip, clip_rate, SPEECH_SAMPLE_RATE))
            heard = asyncio.run(_transcripts(url, clips))
            rates[speaker] = word_error_rate(SPEC_SENTENCES, heard)
    total = statistics.median(request_s)
    voicing = statistics.median(voice_s)
    author_s = max(total - asr_s - voicing, 0.0)
    return f"""## Author LM, ASR, alignment

| measurement | value |
|---|---|
| (d) author, Triton (BLS + ONNX step graph): time to first token | {triton_ttft * 1000:.0f} ms |
| (d) author, transformers in-process (float32, eager): time to first token | {hf_ttft * 1000:.0f} ms |
| (d) author, Triton: decode tokens/s (median {tokens} tokens) | {triton_tps:.1f} |
| (d) author, transformers in-process: decode tokens/s ({DECODE_TOKENS} tokens) | {hf_tps:.1f} |
| (e) Whisper-base ASR through Triton, RTF on {seconds:.1f} s of speech | {asr_s / seconds:.3f} |
| (e) forced alignment through Triton, RTF on the same speech | {align_s / seconds:.4f} |
| (f) `/v1/converse` with a {seconds:.1f} s spoken history turn, authored open turn | {total:.2f} s |
| (f) share: ASR / authoring / voicing | {100 * asr_s / total:.0f} % / {100 * author_s / total:.0f} % / {100 * voicing / total:.0f} % |
| (g) WER of the spec sentences read back by Whisper, speaker "0" (jf_alpha) | {100 * rates["0"]:.1f} % |
| (g) WER of the spec sentences read back by Whisper, speaker "1" (jm_kumo) | {100 * rates["1"]:.1f} % |

Notes: (d) prompts are the kalpa-converse recipe conversation in the author
frame ({len(prompt)} characters). Triton's loop stops at a line break, so its
token count can be below {DECODE_TOKENS}. In (f) authoring is the request time
less the ASR and voicing times measured in the same run.
"""
