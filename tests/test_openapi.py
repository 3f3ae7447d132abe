"""The OpenAPI document: valid 3.1, every $ref resolvable, real errors in their envelopes,
examples that validate; a generated client and a bounded schemathesis run against the
live local server."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from devtools.api_server import ApiServer
from handler.app import create_app
from handler.schemas.converse import ConverseRequest
from handler.schemas.dialogue import DialogueRequest, TimestampsRequest
from handler.schemas.storage import VoiceCreate
from tests.helpers import API_KEY, make_settings

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(make_settings(log_requests=False)).openapi()


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    found = set(refs(document))
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref


def test_errors_are_documented_in_their_envelopes(document: dict[str, Any]) -> None:
    paths = document["paths"]
    converse = paths["/v1/converse"]["post"]["responses"]
    assert set(converse) == {"200", "400", "401", "413", "422", "429", "500", "502", "503", "504"}
    assert converse["503"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/KalpaError")
    assert "Retry-After" in converse["429"]["headers"]
    dialogue = paths["/v1/audio/conversation"]["post"]["responses"]
    assert dialogue["400"]["content"]["application/problem+json"]["schema"]["$ref"].endswith(
        "/Problem")
    for status in ("422", "503"):  # moderation blocked a turn, or failed closed
        assert dialogue[status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ModerationError")
    # 503 on every keyed route: the API keys secret may be unreadable for a while.
    assert set(paths["/v1/voices/{voice_id}"]["get"]["responses"]) == {
        "200", "401", "404", "429", "500", "503"}
    assert set(paths["/v1/files/{key}"]["put"]["responses"]) == {
        "204", "401", "404", "413", "500"}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "500"}
    assert set(paths["/ready"]["get"]["responses"]) == {"200", "500", "503"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert all("422" not in op["responses"] for op in paths["/v1/voices"].values()
               if op["operationId"] == "list_voices")


def test_request_examples_come_from_the_specs_and_validate(document: dict[str, Any]) -> None:
    models = {"/v1/converse": ConverseRequest, "/v1/audio/conversation": DialogueRequest,
              "/v1/audio/conversation/with-timestamps": TimestampsRequest,
              "/v1/voices": VoiceCreate}
    for path, model in models.items():
        examples = document["paths"][path]["post"]["requestBody"]["content"][
            "application/json"]["examples"]
        assert examples
        for example in examples.values():
            model.model_validate(example["value"])
    converse = document["paths"]["/v1/converse"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]
    assert converse["author"]["value"]["conversation"][-1] == {"speaker": "0"}


@pytest.fixture(scope="module")
def live_url(triton_url: str) -> Iterator[str]:
    """The API under uvicorn on a loopback port, over the session's Triton (real or double)."""
    app = create_app(make_settings(triton_url=triton_url, log_requests=False))
    with ApiServer(app) as server:
        yield server.base_url


def test_generated_client_calls_every_endpoint(live_url: str, tmp_path: Path,
                                               document: dict[str, Any]) -> None:
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json",
                    "--meta", "none", "--output-path", "converse_client"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    sys.path.insert(0, str(tmp_path))
    try:
        package = importlib.import_module("converse_client")
        api = importlib.import_module("converse_client.api.default")
        models = importlib.import_module("converse_client.models")

        def call(name: str, **kwargs: Any) -> Any:
            module = importlib.import_module(f"{api.__name__}.{name}")
            return module.sync_detailed(client=client, **kwargs)

        client = package.AuthenticatedClient(base_url=live_url, token=API_KEY, timeout=120)
        assert call("health").status_code == 200
        assert call("ready").parsed.models
        assert call("list_models").parsed.data[0].id == "kokoro"
        converse = call("post_converse", body=models.ConverseRequest.from_dict(
            {"conversation": [{"speaker": "0", "text": "Hello there."}]}))
        assert converse.status_code == 200 and converse.parsed.reply.audio.data_b64
        dialogue = call("post_dialogue", body=models.DialogueRequest.from_dict(
            {"turns": [{"voice": "jf_alpha", "text": "Hi."}], "split": True}))
        assert dialogue.status_code == 200 and dialogue.parsed.audio_segments
        timed = call("post_dialogue_with_timestamps", body=models.TimestampsRequest.from_dict(
            {"turns": [{"voice": "jf_alpha", "text": "Hello there."}]}))
        assert timed.status_code == 200 and timed.parsed.timestamps
        bad = call("post_dialogue", body=models.DialogueRequest.from_dict(
            {"turns": [{"voice": "nobody", "text": "Hi."}]}))
        assert bad.status_code == 400 and bad.parsed.code == "unknown_voice"
        voice = call("create_voice", body=models.VoiceCreate.from_dict(
            {"name": "host", "voice": "jf_alpha"})).parsed
        assert call("list_voices").parsed.data[0].id == voice.id
        assert call("get_voice", voice_id=voice.id).parsed.name == "host"
        assert call("delete_voice", voice_id=voice.id).status_code == 204
        missing = call("get_voice", voice_id=voice.id)
        assert missing.status_code == 404 and missing.parsed.error.type_ == "not_found"
        assert call("usage").parsed.requests >= 3
        upload = call("create_upload").parsed
        assert upload.method == "PUT"
        signed = dict(part.split("=", 1) for part in upload.upload_url.split("?", 1)[1].split("&"))
        key = upload.upload_url.split("/v1/files/", 1)[1].split("?", 1)[0]
        gone = call("download", key=key, expires=signed["expires"], signature=signed["signature"])
        assert gone.status_code == 401  # an upload URL does not sign downloads
    finally:
        sys.path.remove(str(tmp_path))


def schemathesis(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_schema_conformance,response_headers_conformance")
    return subprocess.run(
        [str(BIN / "st"), "run", f"{url}/openapi.json", "--checks", checks,
         "--header", f"Authorization: Bearer {API_KEY}", "--seed", "7",
         "--suppress-health-check", "all", "--request-timeout", "60", *args],
        capture_output=True, text=True, check=False)


def test_bounded_schemathesis_run_finds_no_5xx_and_no_contradiction(live_url: str) -> None:
    inference = "^/v1/(converse|audio/.*)$"
    others = schemathesis(live_url, "--exclude-path-regex", inference, "--max-examples", "15",
                          "--phases", "examples,coverage,fuzzing")
    assert others.returncode == 0, others.stdout[-4000:]
    # Inference routes: the documented examples (real synthesis) and invalid bodies.
    voiced = schemathesis(live_url, "--include-path-regex", inference, "--max-examples", "15",
                          "--mode", "negative", "--phases", "examples,fuzzing")
    assert voiced.returncode == 0, voiced.stdout[-4000:]
