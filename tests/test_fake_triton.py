"""The Triton test double: KServe v2 wire format, input checks, and parity with the real server."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from fastapi.testclient import TestClient
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from devtools.fake_triton import MODELS, FakeTriton, decode_tensor, encode_tensor
from devtools.local_triton import LocalTriton
from handler.app import create_app
from handler.errors import InferenceError
from handler.triton import TritonClient
from tests.helpers import AUTH, make_settings

KOKORO_INPUTS = {
    "TEXT": np.array([b"Hello there."], dtype=np.object_),
    "VOICE": np.array([b"jf_alpha*1"], dtype=np.object_),
    "SPEED": np.array([1.0], np.float32),
}


def infer(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> Any:
    async def call() -> Any:
        client = TritonClient(url)
        try:
            return await client.infer(model, inputs, outputs)
        finally:
            await client.close()

    return asyncio.run(call())


def test_bytes_tensors_use_tritonclients_wire_format() -> None:
    array = np.array([b"ab", b"", "é".encode(), b"\x00\xff"], dtype=np.object_).reshape(2, 2)
    wire = serialize_byte_tensor(array).item()
    decoded = decode_tensor("BYTES", [2, 2], wire)
    assert decoded.shape == (2, 2) and decoded.tolist() == array.tolist()
    datatype, raw = encode_tensor(array)
    assert datatype == "BYTES" and raw == wire
    assert deserialize_bytes_tensor(raw).tolist() == array.reshape(-1).tolist()


@pytest.mark.parametrize(("datatype", "dtype"), [("FP32", "<f4"), ("INT64", "<i8"),
                                                 ("INT32", "<i4"), ("FP16", "<f2")])
def test_numeric_tensors_are_little_endian_bytes(datatype: str, dtype: str) -> None:
    array = (np.arange(6) - 2).astype(dtype).reshape(3, 2)
    assert encode_tensor(array) == (datatype, array.tobytes())
    np.testing.assert_array_equal(decode_tensor(datatype, [3, 2], array.tobytes()), array)
    with pytest.raises(ValueError, match="cannot hold"):
        decode_tensor(datatype, [4, 2], array.tobytes())


def test_kokoro_audio_follows_text_length_speed_and_voice(fake_triton: FakeTriton) -> None:
    def audio(text: bytes, voice: bytes, speed: float) -> np.ndarray:
        inputs = {"TEXT": np.array([text], dtype=np.object_),
                  "VOICE": np.array([voice], dtype=np.object_),
                  "SPEED": np.array([speed], np.float32)}
        result = infer(fake_triton.http_url, "kokoro", inputs, ["AUDIO"])["AUDIO"]
        assert result.dtype == np.float32 and result.ndim == 1
        return np.asarray(result)

    short = audio(b"Hi.", b"jf_alpha*1", 1.0)
    long = audio(b"Hi, how was your weekend?", b"jf_alpha*1", 1.0)
    slow = audio(b"Hi, how was your weekend?", b"jf_alpha*1", 0.5)
    other = audio(b"Hi.", b"jm_kumo*1", 1.0)
    assert len(short) < len(long) < len(slow)
    np.testing.assert_array_equal(short, audio(b"Hi.", b"jf_alpha*1", 1.0))
    assert len(other) == len(short) and not np.array_equal(other, short)
    assert 0.4 < np.abs(long).max() <= 0.5 and not long[:1200].any()


def refusal(url: str, inputs: dict[str, np.ndarray], model: str = "kokoro") -> str:
    """The operator detail of the error the double answers ``inputs`` with."""
    with pytest.raises(InferenceError) as raised:
        infer(url, model, inputs, ["AUDIO"])
    return raised.value.detail


def test_infer_checks_tensors_against_the_config(fake_triton: FakeTriton) -> None:
    url = fake_triton.http_url
    assert "data-type is 'FP64'" in refusal(url, {**KOKORO_INPUTS, "SPEED": np.array([1.0])})
    assert "missing ['VOICE']" in refusal(
        url, {k: v for k, v in KOKORO_INPUTS.items() if k != "VOICE"})
    assert "Expected [1], got [2]" in refusal(
        url, {**KOKORO_INPUTS, "SPEED": np.ones(2, np.float32)})
    assert "unknown voice 'nobody'" in refusal(
        url, {**KOKORO_INPUTS, "VOICE": np.array([b"nobody*1"], np.object_)})
    assert "unknown model" in refusal(url, KOKORO_INPUTS, model="csm")


def test_json_tensors_and_json_outputs(fake_triton: FakeTriton) -> None:
    client = triton_http.InferenceServerClient(fake_triton.http_url)
    try:
        inputs = []
        for name, array in KOKORO_INPUTS.items():
            datatype = "BYTES" if array.dtype == np.object_ else "FP32"
            tensor = triton_http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=False)
            inputs.append(tensor)
        outputs = [triton_http.InferRequestedOutput("AUDIO", binary_data=False)]
        as_json = client.infer("kokoro", inputs, outputs=outputs)
        binary = client.infer("kokoro", inputs)
    finally:
        client.close()
    assert as_json.get_response()["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(as_json.as_numpy("AUDIO"), binary.as_numpy("AUDIO"), rtol=1e-6)


def test_a_bad_turn_reaches_no_model() -> None:
    turns = [{"voice": "jf_alpha", "text": "Fine."}, {"voice": "alloy", "text": "Hi."}]
    with FakeTriton(models=["kokoro"]) as double, TestClient(
        create_app(make_settings(triton_url=double.http_url))
    ) as client:
        refused = client.post("/v1/audio/conversation", json={"turns": turns}, headers=AUTH)
        assert refused.status_code == 400 and double.inferences == []
        turns[1]["voice"] = "jm_kumo"
        voiced = client.post("/v1/audio/conversation", json={"turns": turns}, headers=AUTH)
        assert voiced.status_code == 200 and double.inferences == ["kokoro", "kokoro"]


def test_stop_frees_the_port_and_leaves_no_thread() -> None:
    double = FakeTriton().start()
    url = double.http_url
    thread = f"fake-triton-{url.rsplit(':', 1)[1]}"
    urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=5).close()
    assert any(t.name == thread for t in threading.enumerate())
    double.stop()
    assert not any(t.name == thread for t in threading.enumerate())
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=5)


def config_of(url: str, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/config", timeout=10) as answer:
        return dict(json.loads(answer.read()))


def tensors(config: dict[str, Any], key: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config[key]]


@pytest.mark.triton
@pytest.mark.parametrize("model", MODELS)
def test_double_serves_the_real_repositorys_contract(
    triton: LocalTriton, fake_triton: FakeTriton, model: str
) -> None:
    real, fake = config_of(triton.http_url, model), config_of(fake_triton.http_url, model)
    assert tensors(fake, "input") == tensors(real, "input")
    assert tensors(fake, "output") == tensors(real, "output")
    if model == "author":  # the double has no network: only what the catalog reads must match
        assert fake["parameters"].keys() == real["parameters"].keys()
        assert fake["parameters"]["family"] == real["parameters"]["family"]
    else:
        assert fake["parameters"] == real["parameters"]


@pytest.mark.triton
def test_api_lists_the_same_models_over_the_double(
    real_client: TestClient, fake_triton: FakeTriton
) -> None:
    with TestClient(create_app(make_settings(triton_url=fake_triton.http_url))) as over_double:
        listed = over_double.get("/v1/models", headers=AUTH).json()["data"]
    assert listed == real_client.get("/v1/models", headers=AUTH).json()["data"]
