"""CSM: per-graph ONNX parity, Triton ensemble vs transformers generation, seeds, quantizers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools.local_triton import LocalTriton
from devtools.tiny_models import FRAME_SAMPLES, speech, transformers_prompt
from export.__main__ import main as export_main
from export.csm import CsmExportOptions, export_csm
from handler.triton import TritonClient
from tests.helpers import (
    AUTH,
    TINY_CSM,
    TinyTriton,
    make_settings,
    sse_events,
    streamed_pcm,
    wav_b64,
)

NAME = TINY_CSM

TEXT_HISTORY = [("0", "Welcome back to the show."), ("1", "Glad to be here.")]
OPEN_TURN = ("0", "Let's pick up where we left off.")
GREEDY = {"temperature": 0.0, "depth_temperature": 0.0, "penalty": 1.0}

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def tiny(tiny_triton: TinyTriton) -> tuple[Path, Path, LocalTriton]:
    return tiny_triton.csm, tiny_triton.repository, tiny_triton.server


def hf_model(checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = CsmForConditionalGeneration.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    return tokenizer, model


def run_ensemble(
    server: LocalTriton,
    segments: list[tuple[str, str, np.ndarray | None]],
    max_new: int,
    temperature: float = 0.9,
    depth_temperature: float = 0.9,
    penalty: float = 1.0,
    seed: int = 0,
    quantizers: int = 32,
) -> dict[str, np.ndarray]:
    clips = [a if a is not None else np.zeros(0, np.float32) for _, _, a in segments]
    inputs = {
        "SEGMENT_TEXT": np.array([t.encode() for _, t, _ in segments], dtype=np.object_),
        "SEGMENT_SPEAKER": np.array([s.encode() for s, _, _ in segments], dtype=np.object_),
        "SEGMENT_AUDIO": np.concatenate(clips).astype(np.float32),
        "SEGMENT_AUDIO_SAMPLES": np.array([len(c) for c in clips], np.int64),
        "MAX_NEW_FRAMES": np.array([max_new], np.int32),
        "TEMPERATURE": np.array([temperature], np.float32),
        "DEPTH_TEMPERATURE": np.array([depth_temperature], np.float32),
        "TOP_K": np.array([50], np.int32),
        "REPETITION_PENALTY": np.array([penalty], np.float32),
        "PENALTY_WINDOW": np.array([20], np.int32),
        "SEED": np.array([seed], np.int64),
        "NUM_QUANTIZERS": np.array([quantizers], np.int64),
    }

    async def call() -> dict[str, np.ndarray]:
        client = TritonClient(server.http_url)
        try:
            return await client.infer(
                NAME, inputs, ["AUDIO", "AUDIO_CODES", "DROPPED_SEGMENTS"]
            )
        finally:
            await client.close()

    return asyncio.run(call())


def transformers_greedy(checkpoint: Path, segments: list[Any], max_new: int) -> np.ndarray:
    """Frames [F, 32] from transformers' CSM generate, greedy, without the all-zero end frame."""
    import torch

    tokenizer, model = hf_model(checkpoint)
    with torch.no_grad():
        frames = model.generate(
            **transformers_prompt(tokenizer, model, segments),
            max_new_tokens=max_new, do_sample=False, depth_decoder_do_sample=False,
        )[0].numpy()
    ends = np.flatnonzero((frames == 0).all(axis=1))
    return frames[: ends[0]] if ends.size else frames


def decode_with_transformers(checkpoint: Path, codes: np.ndarray, quantizers: int) -> np.ndarray:
    import torch

    _, model = hf_model(checkpoint)
    with torch.no_grad():
        audio = model.codec_model.decode(torch.from_numpy(codes[:, :quantizers])).audio_values
    return audio.numpy().reshape(-1)


@pytest.mark.parametrize("with_audio", [False, True], ids=["text-history", "audio-history"])
def test_greedy_frames_match_transformers(tiny: Any, with_audio: bool) -> None:
    checkpoint, _, server = tiny
    history: list[tuple[str, str, np.ndarray | None]] = [(s, t, None) for s, t in TEXT_HISTORY]
    if with_audio:
        history[0] = (*TEXT_HISTORY[0], speech(0.8, seed=1))
        history.append(("1", "", speech(0.56, seed=2)))
    segments = [*history, (*OPEN_TURN, None)]
    expected = transformers_greedy(checkpoint, segments, max_new=10)
    got = run_ensemble(server, segments, max_new=10, **GREEDY)
    codes = got["AUDIO_CODES"]
    assert expected.shape[0] >= 1
    np.testing.assert_array_equal(codes[0].T, expected)
    audio = got["AUDIO"].reshape(-1)
    assert audio.size == codes.shape[-1] * FRAME_SAMPLES
    reference = decode_with_transformers(checkpoint, codes, 32)
    np.testing.assert_allclose(audio, reference, atol=1e-4)


def test_quantizers_decode_only_the_first_codebooks(tiny: Any) -> None:
    checkpoint, _, server = tiny
    segments = [*((s, t, None) for s, t in TEXT_HISTORY), (*OPEN_TURN, None)]
    full = run_ensemble(server, segments, max_new=6, **GREEDY)
    coarse = run_ensemble(server, segments, max_new=6, quantizers=4, **GREEDY)
    np.testing.assert_array_equal(full["AUDIO_CODES"], coarse["AUDIO_CODES"])
    reference = decode_with_transformers(checkpoint, coarse["AUDIO_CODES"], 4)
    np.testing.assert_allclose(coarse["AUDIO"].reshape(-1), reference, atol=1e-4)
    # The random tiny Mimi's later codebooks move the waveform only slightly.
    assert np.abs(coarse["AUDIO"] - full["AUDIO"]).max() > 1e-5


def test_seed_fixes_the_output(tiny: Any) -> None:
    _, _, server = tiny
    segments = [*((s, t, None) for s, t in TEXT_HISTORY), (*OPEN_TURN, None)]
    first, again, other = (
        run_ensemble(server, segments, max_new=8, seed=seed, penalty=3.0) for seed in (7, 7, 8)
    )
    np.testing.assert_array_equal(first["AUDIO"], again["AUDIO"])
    assert first["AUDIO"].shape != other["AUDIO"].shape or not np.array_equal(
        first["AUDIO"], other["AUDIO"]
    )


def test_prompt_keeps_the_most_recent_turns_that_fit(tiny: Any) -> None:
    _, _, server = tiny
    long_turn = "word " * 100  # 500 characters -> 505 text positions with the char tokenizer
    segments = [("0", long_turn, None), ("1", long_turn, None), ("0", "short one", None),
                (*OPEN_TURN, None)]
    got = run_ensemble(server, segments, max_new=16, **GREEDY)
    assert int(got["DROPPED_SEGMENTS"][0]) == 1
    everything = run_ensemble(server, segments[1:], max_new=16, **GREEDY)
    assert int(everything["DROPPED_SEGMENTS"][0]) == 0
    np.testing.assert_array_equal(got["AUDIO_CODES"], everything["AUDIO_CODES"])


def test_graphs_match_pytorch(tiny: Any) -> None:
    import onnxruntime as ort
    import torch

    from export.csm_graphs import (
        backbone_module,
        depth_module,
        mimi_encoder_module,
    )

    checkpoint, repository, _ = tiny
    _, model = hf_model(checkpoint)
    generator = torch.Generator().manual_seed(3)

    def session(role: str) -> Any:
        return ort.InferenceSession(str(repository / f"{NAME}_{role}" / "1" / "model.onnx"))

    backbone = backbone_module(model)
    for past, positions in ((0, 9), (6, 1)):
        mask = torch.rand(1, positions, 33, generator=generator) > 0.5
        feeds = {
            "frames": torch.randint(0, 64, (1, positions, 33), generator=generator),
            "frame_mask": mask,
            "past_keys": torch.randn(2, 1, 2, past, 16, generator=generator),
            "past_values": torch.randn(2, 1, 2, past, 16, generator=generator),
        }
        with torch.no_grad():
            expected = backbone(*feeds.values())
        got = session("backbone").run(None, {k: v.numpy() for k, v in feeds.items()})
        for ours, theirs in zip(got, expected, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)

    depth = depth_module(model)
    for temperature, top_k in ((0.0, 50), (0.9, 5)):
        depth_feeds = {
            "last_hidden": torch.randn(1, 64, generator=generator),
            "codebook0": torch.tensor([17]),
            "temperature": torch.tensor([temperature]),
            "top_k": torch.tensor([top_k]),
            "uniform_noise": torch.rand(31, 64, generator=generator),
        }
        with torch.no_grad():
            expected_codes = depth(*depth_feeds.values()).numpy()
        got_codes = session("depth").run(None, {k: v.numpy() for k, v in depth_feeds.items()})
        np.testing.assert_array_equal(got_codes[0], expected_codes)

    codes = torch.randint(0, 64, (1, 32, 7), generator=generator)
    for quantizers in (32, 3):
        with torch.no_grad():
            expected_audio = model.codec_model.decode(codes[:, :quantizers]).audio_values
        got_audio = session("mimi_decoder").run(
            None, {"audio_codes": codes.numpy(), "num_quantizers": np.array([quantizers])}
        )[0]
        np.testing.assert_allclose(got_audio, expected_audio.numpy(), atol=1e-4)

    audio = torch.from_numpy(speech(1.1, seed=4))[None, None]
    with torch.no_grad():
        expected_codes = model.codec_model.encode(audio).audio_codes.numpy()
        patched = mimi_encoder_module(model)(audio).numpy()
    got_codes = session("mimi_encoder").run(None, {"audio": audio.numpy()})[0]
    assert got_codes.shape == (1, 32, -(-audio.shape[-1] // FRAME_SAMPLES))
    np.testing.assert_array_equal(patched, expected_codes)
    np.testing.assert_array_equal(got_codes, expected_codes)


def test_greedy_depth_graph_matches_transformers_depth_generate(tiny: Any) -> None:
    import onnxruntime as ort
    import torch

    checkpoint, repository, _ = tiny
    _, model = hf_model(checkpoint)
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.depth_decoder.generate(
            input_ids=torch.tensor([[0, 9]]), backbone_last_hidden_state=hidden.clone(),
            do_sample=False, min_new_tokens=31, max_new_tokens=31,
        )[0, 2:].numpy()
    depth = ort.InferenceSession(str(repository / f"{NAME}_depth" / "1" / "model.onnx"))
    got = depth.run(None, {
        "last_hidden": hidden.numpy(), "codebook0": np.array([9]),
        "temperature": np.array([0.0], np.float32), "top_k": np.array([64]),
        "uniform_noise": np.full((31, 64), 0.5, np.float32),
    })[0][0]
    np.testing.assert_array_equal(got, expected)


def test_export_is_idempotent_and_writes_a_manifest(tiny: Any) -> None:
    import json

    checkpoint, repository, _ = tiny
    options = CsmExportOptions(checkpoint=str(checkpoint), out=repository, name=NAME)
    assert export_csm(options) is False
    record = json.loads((repository / "manifest.json").read_text())["models"][f"csm:{NAME}"]
    assert record["inputs"]["precision"] == "fp32"
    assert record["inputs"]["source"]["directory"] == str(checkpoint.resolve())
    assert record["shapes"]["num_codebooks"] == 32
    onnx_files = [k for k in record["outputs"] if k.endswith("model.onnx")]
    assert len(onnx_files) == 4
    assert all(len(record["outputs"][k]["sha256"]) == 64 for k in onnx_files)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is present here")
def test_tensorrt_without_a_gpu_fails_clearly(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _, _ = tiny
    argv = ["csm", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--tensorrt"]
    assert export_main(argv) == 2
    assert "--tensorrt needs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- /v1/converse with the tiny CSM -------------------------------------------------------

OPEN = {"speaker": "0", "text": "Let's pick up where we left off."}
HISTORY = [{"speaker": s, "text": t} for s, t in TEXT_HISTORY]


@pytest.fixture(scope="module")
def csm_client(tiny: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from handler.app import create_app

    _, _, server = tiny
    app = create_app(make_settings(triton_url=server.http_url, default_model=NAME))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def converse(client: Any, body: dict[str, Any]) -> Any:
    return client.post("/v1/converse", json={"model": NAME, **body}, headers=AUTH)


def reply_samples(response: Any) -> tuple[np.ndarray, int]:
    import base64
    import io

    import soundfile as sf

    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["reply"]["audio"]["data_b64"])
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def test_models_lists_the_csm_entry(csm_client: Any) -> None:
    models = {m["id"]: m for m in csm_client.get("/v1/models", headers=AUTH).json()["data"]}
    model = models[NAME]
    assert model["modes"] == ["converse", "tts"]
    assert model["speakers"] == ["0", "1"]
    assert model["num_quantizers"] == 32 and model["sample_rate"] == 24_000
    assert model["voices"] == [] and model["default"] is True


def test_contextual_tts_reply(csm_client: Any) -> None:
    body = {"conversation": [*HISTORY, OPEN], "params": {"max_new_tokens": 16, "seed": 3}}
    response = converse(csm_client, body)
    samples, rate = reply_samples(response)
    reply = response.json()["reply"]
    assert reply["speaker"] == "0" and reply["text"] == OPEN["text"]
    assert reply["audio"]["num_quantizers"] == 32 and rate == 24_000
    assert 0 < samples.size <= 16 * FRAME_SAMPLES and samples.size % FRAME_SAMPLES == 0
    assert response.json()["warnings"] == []
    assert response.json()["usage"]["output_audio_seconds"] == pytest.approx(samples.size / rate)


def test_a_streamed_reply_is_the_json_reply_for_the_same_seed(csm_client: Any) -> None:
    body = {"conversation": [*HISTORY, OPEN], "params": {"max_new_tokens": 16, "seed": 3}}
    samples, _ = reply_samples(converse(csm_client, body))
    streamed = converse(csm_client, {**body, "stream": True})
    assert streamed.status_code == 200, streamed.text
    stream = sse_events(streamed.text)
    assert [name for name, _ in stream] == ["metadata", "audio", "done"]
    as_int16 = np.round(samples * 32768).astype("<i2").tobytes()
    assert streamed_pcm(stream) == as_int16
    other_seed = converse(csm_client, {**body, "stream": True,
                                       "params": {**body["params"], "seed": 4}})
    assert streamed_pcm(sse_events(other_seed.text)) != as_int16


def test_history_audio_conditions_the_turn_and_quantizers_are_reported(csm_client: Any) -> None:
    clip = speech(0.9, seed=6)
    spoken = {"speaker": "1", "audio_wav_b64": wav_b64(clip[::3], 8_000)}  # resampled to 24 kHz
    params = {"max_new_tokens": 16, "seed": 11, "quantizers": 8}
    with_audio = converse(csm_client, {"conversation": [*HISTORY, spoken, OPEN], "params": params})
    again = converse(csm_client, {"conversation": [*HISTORY, spoken, OPEN], "params": params})
    text_only = converse(csm_client, {"conversation": [*HISTORY, OPEN], "params": params})
    first, _ = reply_samples(with_audio)
    np.testing.assert_array_equal(first, reply_samples(again)[0])
    other, _ = reply_samples(text_only)
    assert first.shape != other.shape or not np.array_equal(first, other)
    assert with_audio.json()["reply"]["audio"]["num_quantizers"] == 8
    assert with_audio.json()["usage"]["input_audio_seconds"] == pytest.approx(0.9, abs=0.01)


def test_long_history_keeps_the_most_recent_turns_with_a_warning(csm_client: Any) -> None:
    long_turns = [{"speaker": str(i % 2), "text": "word " * 80} for i in range(4)]
    body = {"conversation": [*long_turns, OPEN], "params": {"max_new_tokens": 512, "seed": 1}}
    response = converse(csm_client, body)
    reply_samples(response)
    (warning,) = response.json()["warnings"]
    assert "oldest turn" in warning and "left out" in warning


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"conversation": [{"speaker": "2", "text": "Hi."}]}, "speaker label"),
        ({"conversation": [*HISTORY, {"speaker": "0"}]}, "author"),
        ({"conversation": [{"speaker": "0", "text": "Hi.", "audio_wav_b64": "UklGRg=="}]},
         "nothing is left"),
        ({"conversation": [{"speaker": "0", "text": " "}, OPEN]}, "history turn"),
        ({"conversation": [OPEN], "params": {"speed": 1.2}}, "speed"),
        ({"conversation": [OPEN], "params": {"quantizers": 33}}, "quantizers"),
        ({"conversation": [OPEN], "params": {"quantizers": 0}}, "quantizers"),
        ({"conversation": [OPEN], "params": {"max_new_tokens": 8}}, "max_new_tokens"),
        ({"conversation": [OPEN], "params": {"max_new_tokens": 4096}}, "max_new_tokens"),
        ({"conversation": [OPEN], "params": {"max_new_tokens": 1024}}, "sequence length"),
        ({"conversation": [OPEN], "params": {"repetition_penalty": 0.5}}, "repetition_penalty"),
        ({"conversation": [{"speaker": "0", "text": "x" * 600}]}, "does not fit"),
    ],
)
def test_spec_rules(csm_client: Any, body: dict[str, Any], needle: str) -> None:
    response = converse(csm_client, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert needle in error["message"]


def test_stitched_dialogue_refuses_a_model_without_voices(csm_client: Any) -> None:
    body = {"model": NAME, "turns": [{"voice": "jf_alpha", "text": "Fine."}]}
    response = csm_client.post("/v1/audio/conversation", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "no named voices" in response.json()["detail"]


def test_fp16_export_keeps_fp32_tensors_and_close_outputs(tiny: Any, tmp_path: Path) -> None:
    import json

    import onnxruntime as ort
    import torch

    from export.csm_graphs import backbone_module

    checkpoint, _, _ = tiny
    options = CsmExportOptions(
        checkpoint=str(checkpoint), out=tmp_path, name="half", precision="fp16"
    )
    assert export_csm(options) is True
    record = json.loads((tmp_path / "manifest.json").read_text())["models"]["csm:half"]
    assert record["inputs"]["precision"] == "fp16"
    session = ort.InferenceSession(str(tmp_path / "half_backbone" / "1" / "model.onnx"))
    assert [i.type for i in session.get_inputs()][2:] == ["tensor(float)", "tensor(float)"]
    rng = np.random.default_rng(2)
    feeds = {
        "frames": rng.integers(0, 64, (1, 9, 33)),
        "frame_mask": rng.random((1, 9, 33)) > 0.5,
        "past_keys": np.zeros((2, 1, 2, 0, 16), np.float32),
        "past_values": np.zeros((2, 1, 2, 0, 16), np.float32),
    }
    logits = session.run(["codebook0_logits"], feeds)[0]
    _, model = hf_model(checkpoint)
    with torch.no_grad():
        expected = backbone_module(model)(*(torch.from_numpy(v) for v in feeds.values()))[0]
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected.numpy(), atol=5e-3)


def test_audio_only_turn_is_conditioned_with_its_transcript(
    csm_client: Any, tiny: Any, real_client: Any
) -> None:
    import base64
    import io

    import soundfile as sf

    from handler.audio import resample
    from handler.transcription import SPEECH_SAMPLE_RATE, transcribe
    _, _, server = tiny
    spoken = real_client.post("/v1/converse", headers=AUTH, json={"conversation": [
        {"speaker": "1", "text": "I finally fixed the old bicycle in the garage."}]})
    clip = spoken.json()["reply"]["audio"]["data_b64"]
    samples, rate = sf.read(io.BytesIO(base64.b64decode(clip)), dtype="float32")

    async def heard() -> str:
        triton = TritonClient(server.http_url)
        try:
            text, _ = await transcribe(triton, resample(samples, rate, SPEECH_SAMPLE_RATE))
        finally:
            await triton.close()
        return text

    transcript = asyncio.run(heard())
    assert "bicycle" in transcript.lower()
    params = {"max_new_tokens": 16, "seed": 5}
    audio_only = converse(csm_client, {"conversation": [
        {"speaker": "1", "audio_wav_b64": clip}, OPEN], "params": params})
    with_transcript = converse(csm_client, {"conversation": [
        {"speaker": "1", "audio_wav_b64": clip, "text": transcript}, OPEN], "params": params})
    np.testing.assert_array_equal(reply_samples(audio_only)[0], reply_samples(with_transcript)[0])
