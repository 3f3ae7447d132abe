"""A test double of tritonserver's HTTP API (KServe v2 protocol), for the fast test tier.

``FakeTriton`` serves on 127.0.0.1 (a free port) from a background thread of
the test process and answers what the API's Triton client asks:

* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200;
* ``POST /v2/repository/index``: every served model, state ``READY``;
* ``GET /v2/models/{name}/config``: the model config as JSON;
* ``POST /v2/models/{name}/infer``: tensors as JSON ``data`` or through the
  binary tensor extension (``Inference-Header-Content-Length`` = bytes of the
  JSON header; raw little-endian tensor bytes follow in input order, a BYTES
  element as a 4-byte little-endian length then its bytes). Outputs come back
  binary unless an output asks for ``"binary_data": false``.

Configs are the exporters' own templates (``export/templates``) rendered with
the values the CPU export writes, parsed with Triton's ``ModelConfig``
protobuf into the JSON tritonserver returns: the API's model catalog sees the
voices, sample rate, speed range and families of the real repository. Inputs
are checked against the config (names, datatypes, dims) as Triton does, so a
tensor the API sends wrongly fails here too. Outputs are synthetic and
deterministic, good for validation, stitching, format and storage tests, not
for anything that listens:

* ``kokoro``: a tone (pitch from the voice spec) of ``0.25 + 0.065 * len(text)``
  seconds divided by the speed, between 50 ms of silence at each end;
* ``whisper_asr``: ``"hum"`` twice a second of audio, words spread evenly;
* ``aligner``: the words of the text (as the real aligner splits them) spread
  evenly over the audio;
* ``author``: one of :data:`AUTHOR_LINES`, picked by seed.

Usage::

    with FakeTriton() as triton:
        settings = Settings(triton_url=triton.http_url)
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from devtools.service import Service
from export.kokoro import MAX_TOKENS, SAMPLE_RATE_HZ, SPEED_RANGE, _voice_names
from export.repository import SOURCE_REPOSITORY, render_template
from export.speech import WHISPER_CPU_WINDOW_S

MODELS = ("kokoro", "whisper_asr", "aligner", "author")
AUTHOR_LINES = (
    "That sounds lovely, tell me more.",
    "I kept the flame low the whole time.",
    "Next time I will start an hour earlier.",
)
SPEECH_RATE_HZ = 16_000
_WORD = re.compile(r"[A-Za-z0-9']+")
# KServe v2 datatype -> numpy dtype (little-endian, as on the wire).
_DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_CONFIG_TYPES = {"TYPE_STRING": "BYTES", **{f"TYPE_{name}": name for name in _DTYPES}}
_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/(config|infer)$")


class FakeModelError(ValueError):
    """A request the model refuses; answered as Triton answers errors (400, ``{"error"}``)."""


def _template(model: str) -> Path:
    return SOURCE_REPOSITORY / model / "config.pbtxt.template"


def _template_texts() -> dict[str, str]:
    return {
        "kokoro": render_template(
            _template("kokoro"), sample_rate=SAMPLE_RATE_HZ, voices=",".join(_voice_names()),
            max_tokens=MAX_TOKENS, speed_min=SPEED_RANGE[0], speed_max=SPEED_RANGE[1],
        ),
        "whisper_asr": render_template(
            _template("whisper_asr"), kind="KIND_CPU", device="cpu", compute_type="int8",
            cpu_threads=0, min_encoder_window_s=WHISPER_CPU_WINDOW_S,
        ),
        "aligner": render_template(_template("aligner")),
        "author": render_template(
            _template("author"), display_name="canned lines (test double)", num_layers=0,
            kv_heads=0, head_dim=0, max_context=0, stop_token_ids="",
        ),
    }


def model_configs(models: Iterable[str] = MODELS) -> dict[str, dict[str, Any]]:
    """Model configs as tritonserver's ``GET /v2/models/{name}/config`` returns them.

    Args:
        models: names among :data:`MODELS`.

    Returns:
        name -> config JSON object (``name``, ``input``, ``output``, ``parameters``, ...).

    Raises:
        KeyError: for a name the double does not serve.
    """
    texts = _template_texts()
    configs = {}
    for name in models:
        message = text_format.Parse(texts[name], model_config_pb2.ModelConfig())
        configs[name] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return configs


def _parameter(config: dict[str, Any], key: str) -> str:
    return str(config["parameters"][key]["string_value"])


def _text(array: np.ndarray) -> str:
    return bytes(array.reshape(-1)[0]).decode("utf-8")


def _bytes_tensor(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _spread(words: list[str], seconds: float) -> np.ndarray:
    """JSON ``[{"word", "start", "end"}]`` with ``words`` sharing ``seconds`` evenly."""
    step = seconds / max(len(words), 1)
    items = [
        {"word": word, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
        for i, word in enumerate(words)
    ]
    return _bytes_tensor(json.dumps(items))


def kokoro(config: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Synthetic ``kokoro`` ensemble: TEXT, VOICE BYTES [1] and SPEED FP32 [1] -> AUDIO.

    Returns:
        ``AUDIO`` float32 [n] at the config's sample rate (24 kHz), peak about 0.5.

    Raises:
        FakeModelError: an unknown voice in the spec, or text with nothing to speak
            (the messages of the real ``kokoro_frontend``).
    """
    text, voice = _text(inputs["TEXT"]), _text(inputs["VOICE"])
    speed = float(inputs["SPEED"].reshape(-1)[0])
    voices = set(_parameter(config, "voices").split(","))
    for term in voice.split("+"):
        name = term.split("*")[0].strip()
        if name not in voices:
            raise FakeModelError(f"unknown voice {name!r}")
    if not any(character.isalnum() for character in text):
        raise FakeModelError(f"text has no speakable content: {text[:80]!r}")
    rate = int(_parameter(config, "sample_rate"))
    seconds = (0.25 + 0.065 * len(text)) / speed
    t = np.arange(round(seconds * rate)) / rate
    pitch = 110.0 + zlib.crc32(voice.encode()) % 200
    wave = 0.5 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    pad = np.zeros(rate // 20)
    return {"AUDIO": np.concatenate([pad, wave, pad]).astype(np.float32)}


def whisper_asr(config: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Synthetic ASR: AUDIO FP32 [n] at 16 kHz -> TEXT BYTES [1], WORDS BYTES [1] (JSON)."""
    seconds = inputs["AUDIO"].size / SPEECH_RATE_HZ
    words = ["hum"] * max(1, round(2 * seconds))
    return {"TEXT": _bytes_tensor(" ".join(words)), "WORDS": _spread(words, seconds)}


def aligner(config: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Synthetic alignment: AUDIO FP32 [n] at 16 kHz + TEXT BYTES [1] -> WORDS BYTES [1] (JSON).

    Raises:
        FakeModelError: the text has no words (as the real aligner).
    """
    words = [w.strip("'") for w in _WORD.findall(_text(inputs["TEXT"])) if w.strip("'")]
    if not words:
        raise FakeModelError("text has no words to align")
    return {"WORDS": _spread(words, inputs["AUDIO"].size / SPEECH_RATE_HZ)}


def author(config: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Synthetic author: PROMPT BYTES [1], SEED INT64 [1], ... -> TEXT BYTES [1], TOKENS INT64 [n].

    TOKENS are the line's UTF-8 bytes, cut at MAX_NEW_TOKENS (and TEXT with them).
    """
    line = AUTHOR_LINES[int(inputs["SEED"].reshape(-1)[0]) % len(AUTHOR_LINES)]
    tokens = list(line.encode("utf-8"))[: int(inputs["MAX_NEW_TOKENS"].reshape(-1)[0])]
    return {
        "TEXT": _bytes_tensor(bytes(tokens).decode("utf-8", "ignore")),
        "TOKENS": np.array(tokens, dtype=np.int64),
    }


_BEHAVIOURS: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray]]]
_BEHAVIOURS = {"kokoro": kokoro, "whisper_asr": whisper_asr, "aligner": aligner, "author": author}


def decode_tensor(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor from its binary-extension bytes.

    Args:
        datatype: KServe v2 datatype (``"FP32"``, ``"INT64"``, ``"BYTES"``, ...).
        shape: tensor shape.
        raw: little-endian element bytes; for BYTES, each element is a 4-byte
            little-endian length followed by that many bytes.

    Returns:
        array of ``shape``: numeric dtype, or an object array of ``bytes`` for BYTES.

    Raises:
        FakeModelError: unknown datatype, or byte count that does not fit the shape.
    """
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items, offset = [], 0
        while offset + 4 <= len(raw):
            length = int.from_bytes(raw[offset:offset + 4], "little")
            items.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        if len(items) != count or offset != len(raw):
            raise FakeModelError(f"BYTES tensor of shape {shape} has {len(items)} elements")
        return np.array(items, dtype=np.object_).reshape(shape)
    if datatype not in _DTYPES:
        raise FakeModelError(f"unsupported datatype {datatype}")
    dtype = _DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise FakeModelError(f"{datatype} tensor of shape {shape} cannot hold {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode_tensor(array: np.ndarray) -> tuple[str, bytes]:
    """KServe v2 datatype and binary-extension bytes of ``array`` (inverse of decode_tensor)."""
    if array.dtype == np.object_:
        items = [bytes(item) for item in array.reshape(-1)]
        return "BYTES", b"".join(len(item).to_bytes(4, "little") + item for item in items)
    for name, dtype in _DTYPES.items():
        if array.dtype == dtype.newbyteorder("="):
            return name, np.ascontiguousarray(array, dtype=dtype).tobytes()
    raise TypeError(f"no KServe datatype for {array.dtype}")


def _json_tensor(datatype: str, shape: list[int], data: list[Any]) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([str(d).encode("utf-8") for d in data], dtype=np.object_).reshape(shape)
    if datatype not in _DTYPES:
        raise FakeModelError(f"unsupported datatype {datatype}")
    return np.array(data, dtype=_DTYPES[datatype]).reshape(shape)


def _check_inputs(name: str, config: dict[str, Any], tensors: dict[str, np.ndarray],
                  datatypes: dict[str, str]) -> None:
    declared = {item["name"]: item for item in config.get("input", [])}
    missing = sorted(set(declared) - set(tensors))
    if missing:
        raise FakeModelError(f"expected inputs {sorted(declared)} for model '{name}', "
                             f"missing {missing}")
    for tensor, array in tensors.items():
        if tensor not in declared:
            raise FakeModelError(f"unexpected inference input '{tensor}' for model '{name}'")
        expected = _CONFIG_TYPES[declared[tensor]["data_type"]]
        if datatypes[tensor] != expected:
            raise FakeModelError(f"inference input '{tensor}' data-type is '{datatypes[tensor]}',"
                                 f" but model '{name}' expects '{expected}'")
        dims = [int(d) for d in declared[tensor]["dims"]]
        shape = list(array.shape)
        fits = len(dims) == len(shape) and all(
            d in (-1, s) for d, s in zip(dims, shape, strict=True)
        )
        if not fits:
            raise FakeModelError(f"unexpected shape for input '{tensor}' for model '{name}'. "
                                 f"Expected {dims}, got {shape}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    configs: dict[str, dict[str, Any]]
    inferences: list[str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean: no access log."""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def do_GET(self) -> None:
        """Health and model config routes."""
        if self.path in ("/v2/health/live", "/v2/health/ready"):
            self._send(HTTPStatus.OK)
            return
        route = _ROUTE.match(self.path)
        if route is None or route.group(2) != "config":
            self._error(HTTPStatus.NOT_FOUND, "Not Found")
            return
        config = self.server.configs.get(unquote(route.group(1)))
        if config is None:
            self._error(HTTPStatus.BAD_REQUEST,
                        f"Request for unknown model: '{unquote(route.group(1))}' is not found")
            return
        self._send(HTTPStatus.OK, json.dumps(config).encode())

    def do_POST(self) -> None:
        """Repository index and inference routes."""
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v2/repository/index":
            index = [{"name": n, "version": "1", "state": "READY"} for n in self.server.configs]
            self._send(HTTPStatus.OK, json.dumps(index).encode())
            return
        route = _ROUTE.match(self.path)
        if route is None or route.group(2) != "infer":
            self._error(HTTPStatus.NOT_FOUND, "Not Found")
            return
        name = unquote(route.group(1))
        if name not in self.server.configs:
            self._error(HTTPStatus.BAD_REQUEST, f"Request for unknown model: '{name}' is not found")
            return
        try:
            header_length = self.headers.get("Inference-Header-Content-Length")
            response, response_header_length = self._infer(name, body, header_length)
        except FakeModelError as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error))
            return
        headers = {}
        if response_header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(response_header_length)}
        self._send(HTTPStatus.OK, response, headers)

    def _infer(self, name: str, body: bytes, header_length: str | None) -> tuple[bytes, int | None]:
        size = len(body) if header_length is None else int(header_length)
        request = json.loads(body[:size])
        binary, offset = body[size:], 0
        tensors, datatypes = {}, {}
        for item in request.get("inputs", []):
            length = item.get("parameters", {}).get("binary_data_size")
            if length is None:
                array = _json_tensor(item["datatype"], item["shape"], item["data"])
            else:
                array = decode_tensor(item["datatype"], item["shape"],
                                      binary[offset:offset + length])
                offset += length
            tensors[item["name"]], datatypes[item["name"]] = array, item["datatype"]
        config = self.server.configs[name]
        _check_inputs(name, config, tensors, datatypes)
        self.server.inferences.append(name)
        results = _BEHAVIOURS[name](config, tensors)
        requested = request.get("outputs") or [{"name": n} for n in results]
        outputs, blobs = [], []
        for item in requested:
            if item["name"] not in results:
                raise FakeModelError(f"unexpected inference output '{item['name']}' "
                                     f"for model '{name}'")
            array = results[item["name"]]
            datatype, raw = encode_tensor(array)
            entry: dict[str, Any] = {"name": item["name"], "datatype": datatype,
                                     "shape": list(array.shape)}
            if item.get("parameters", {}).get("binary_data", True):
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            elif datatype == "BYTES":
                entry["data"] = [bytes(v).decode("utf-8") for v in array.reshape(-1)]
            else:
                entry["data"] = array.reshape(-1).tolist()
            outputs.append(entry)
        header = json.dumps({"model_name": name, "model_version": "1", "outputs": outputs})
        encoded = header.encode()
        return (encoded + b"".join(blobs), len(encoded)) if blobs else (encoded, None)


class FakeTriton(Service):
    """The double, serving ``models`` on ``127.0.0.1:<free port>`` until stopped.

    Args:
        models: names among :data:`MODELS` (e.g. ``["kokoro"]`` for a repository
            without the author LM).

    Attributes:
        inferences: model name of every accepted infer request, in arrival order.
    """

    def __init__(self, models: Iterable[str] = MODELS) -> None:
        self.configs = model_configs(models)
        self.inferences: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient's ``url`` form)."""
        assert self._server is not None, "FakeTriton is not started"
        return f"127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeTriton:
        """Bind a free loopback port and serve from a daemon thread ``fake-triton-<port>``."""
        server = _Server(("127.0.0.1", 0), _Handler)
        server.configs, server.inferences = self.configs, self.inferences
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"fake-triton-{server.server_port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
