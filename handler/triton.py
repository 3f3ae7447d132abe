"""The one Triton client of the API process (tritonclient's asyncio clients).

Health, the model index and model configs go over Triton's HTTP endpoint;
inference calls go over HTTP or, when the client is given a gRPC address
(``CONVERSE_TRITON_PROTOCOL=grpc``), over gRPC. The clients are created lazily
inside the running event loop (aiohttp sessions and gRPC channels belong to
one loop; under Mangum each invocation may run a new loop, in which case fresh
clients are made). Transport and server failures map onto the API's error
classes: unreachable, an answer cut short, or Triton's UNAVAILABLE (a model
not ready, a queue full) -> :class:`ServiceUnavailable` (503, ``Retry-After``),
any other error answer -> :class:`InferenceError` (502). Their client-facing
messages name no host or port; Triton's address and its own words go in
``detail`` (logged), its error code (and HTTP status) in ``upstream``.

Stopping work inside Triton: cancelling the awaiting task (deadline passed,
client gone) cancels a gRPC call, and Triton marks the request cancelled
(``request.is_cancelled()`` in the BLS loops). Triton's HTTP endpoint does not
cancel a request whose connection closed (Triton docs, "Request Cancellation";
measured with tritonserver 2.51 in ``tests/test_cancellation.py``). So every
call also carries the request's remaining time as Triton's ``timeout`` request
parameter (microseconds): a model with a dynamic-batching queue policy drops
it from its queue once the time is spent, and the BLS generation loops
(``author``, CSM generators, Whisper) stop at it with a CANCELLED error. A
model's loop can start only after the request waited in Triton's queue, so the
same deadline also goes as an absolute time, :data:`DEADLINE_PARAMETER`
(Unix microseconds), which the loops prefer: work stops at the request's
deadline, not a whole ``timeout`` after it left the queue. The deadline is the
one :func:`bind_deadline` put in the calling task's context
(``handler.services.deadline`` does that).

Each binding is also the owner of the request's calls in the process's
in-flight limit (``max_inflight``): freed places go to the waiting requests in
turn (:class:`~handler.fair_slots.FairSlots`), so one request that starts many
calls at once does not queue them all ahead of the others'. Each model call of
a live session binds its own (its time limit); calls made outside any binding
share one owner.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from handler.errors import InferenceError, ServiceUnavailable, Upstream
from handler.fair_slots import FairSlots

PROVIDER = "triton"
# Request parameter: the request's deadline, Unix microseconds (converse_backend.Budget).
DEADLINE_PARAMETER = "converse_deadline_unix_us"


@dataclass(eq=False)  # compared by identity: one binding, one owner of in-flight places
class _Binding:
    deadline: float | None  # event-loop monotonic seconds (None: no deadline)


# The current request's binding (None: outside any request, e.g. a live session).
_BINDING: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar(
    "converse_request_binding", default=None
)
# Triton's error codes by the HTTP status its HTTP endpoint answers them with.
_TRITON_CODES = {
    400: "INVALID_ARG",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    500: "INTERNAL",
    501: "UNSUPPORTED",
    503: "UNAVAILABLE",
}
# Triton's error codes by the gRPC status code its gRPC endpoint answers them with
# (one code for each TRITONSERVER_Error_Code; tests/test_triton_failures.py checks one).
_TRITON_CODES_BY_GRPC = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "NOT_FOUND": "NOT_FOUND",
    "ALREADY_EXISTS": "ALREADY_EXISTS",
    "INTERNAL": "INTERNAL",
    "UNIMPLEMENTED": "UNSUPPORTED",
    "UNAVAILABLE": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
}


def bind_deadline(deadline: float | None) -> contextvars.Token[_Binding | None]:
    """Make ``deadline`` (``loop.time()`` seconds) the Triton deadline of this context.

    The calls made in it are one owner in the in-flight limit (the module
    docstring). Tasks created afterwards copy it; pass the returned token to
    :func:`unbind_deadline` to restore the previous binding.
    """
    return _BINDING.set(_Binding(deadline))


def unbind_deadline(token: contextvars.Token[_Binding | None]) -> None:
    """Restore the binding that was in place before :func:`bind_deadline`."""
    _BINDING.reset(token)


def _timeout_us() -> int | None:
    """Microseconds left until the bound deadline (at least 1), or None without one."""
    binding = _BINDING.get()
    if binding is None or binding.deadline is None:
        return None
    return max(1, int((binding.deadline - asyncio.get_running_loop().time()) * 1e6))


def deadline_parameters(timeout_us: int | None) -> dict[str, int] | None:
    """The request parameter :data:`DEADLINE_PARAMETER`: ``timeout_us`` from now, Unix µs.

    Read by ``converse_backend.Budget`` in the python models (one clock across
    hosts is assumed: NTP keeps AWS hosts within milliseconds).
    """
    if timeout_us is None:
        return None
    return {DEADLINE_PARAMETER: int(time.time() * 1e6) + timeout_us}


def _inference_error(model: str, error: InferenceServerException) -> InferenceError:
    status_text = str(error.status() or "")
    status = int(status_text) if status_text.isdigit() else None
    code = _TRITON_CODES.get(status or 0, "UNKNOWN")
    return InferenceError(
        f"model {model!r} failed in the inference server ({code})",
        detail=f"model {model!r}: {error.message()}",
        upstream=Upstream(PROVIDER, code, status),
    )


def grpc_status(error: InferenceServerException) -> str:
    """The gRPC status code name of an error from tritonclient's gRPC client.

    tritonclient puts ``str(grpc.StatusCode.X)``, i.e. ``"StatusCode.X"``, in
    ``status()``; this returns ``"X"`` (``"UNKNOWN"`` when there is none).
    """
    return str(error.status() or "UNKNOWN").removeprefix("StatusCode.")


def grpc_inference_error(model: str, error: InferenceServerException) -> InferenceError:
    """A Triton error answered over gRPC as :class:`InferenceError` (502).

    ``upstream.code`` is Triton's own code name (as over HTTP); ``upstream.status``
    stays None: a gRPC answer has no HTTP status.
    """
    code = _TRITON_CODES_BY_GRPC.get(grpc_status(error), "UNKNOWN")
    return InferenceError(
        f"model {model!r} failed in the inference server ({code})",
        detail=f"model {model!r}: {error.message()}",
        upstream=Upstream(PROVIDER, code),
    )


def infer_inputs(make_input: Callable[[str, list[int], str], Any],
                 arrays: Mapping[str, np.ndarray]) -> list[Any]:
    """Numpy arrays as tritonclient request inputs, data attached.

    Args:
        make_input: the ``InferInput`` class of the client in use
            (``tritonclient.http.aio`` or ``tritonclient.grpc.aio``).
        arrays: tensor name -> array; object arrays (UTF-8 bytes) become ``BYTES``,
            other dtypes their Triton equivalent (``np_to_triton_dtype``).

    Returns:
        one input per array, in ``arrays``' order.
    """
    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
        tensor = make_input(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonClient:
    """Thin async wrapper over tritonclient's asyncio HTTP (and gRPC) clients.

    Args:
        url: ``host:port`` of Triton's HTTP endpoint (health, model index, configs,
            and inference when ``grpc_url`` is None).
        max_inflight: most concurrent inference calls (shared round-robin by request).
        retry_after_s: ``Retry-After`` value put on 503 errors.
        grpc_url: ``host:port`` of Triton's gRPC endpoint; given, inference calls
            go over gRPC, so a cancelled call stops its work inside Triton.
    """

    def __init__(self, url: str, max_inflight: int = 8, retry_after_s: int = 5,
                 grpc_url: str | None = None) -> None:
        self.url = url
        self.grpc_url = grpc_url
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self._client: triton_http.InferenceServerClient | None = None
        self._grpc_client: triton_grpc.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: FairSlots | None = None

    def _current(self) -> tuple[triton_http.InferenceServerClient, FairSlots]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._slots is None:
            self._client = triton_http.InferenceServerClient(self.url)
            self._grpc_client = None
            self._slots = FairSlots(self.max_inflight)
            self._loop = loop
        return self._client, self._slots

    def _current_grpc(self, grpc_url: str) -> triton_grpc.InferenceServerClient:
        self._current()
        if self._grpc_client is None:
            self._grpc_client = triton_grpc.InferenceServerClient(grpc_url)
        return self._grpc_client

    def _unavailable(self, error: BaseException, url: str | None = None) -> ServiceUnavailable:
        return ServiceUnavailable(
            "the inference server is unreachable; retry later",
            headers={"Retry-After": str(self.retry_after_s)},
            detail=f"inference server unreachable at {url or self.url}: {error!r}",
            upstream=Upstream(PROVIDER, "UNAVAILABLE"),
        )

    async def is_ready(self) -> bool:
        """True if Triton answers ``/v2/health/ready`` with 200."""
        client, _ = self._current()
        try:
            return bool(await client.is_server_ready())
        except (TimeoutError, aiohttp.ClientError, OSError, InferenceServerException):
            return False

    async def ready_models(self) -> dict[str, dict[str, Any]]:
        """Config of every model Triton reports READY, by name.

        Raises:
            ServiceUnavailable: Triton unreachable.
        """
        client, _ = self._current()
        try:
            index = await client.get_model_repository_index()
            ready = [m["name"] for m in index if m.get("state") == "READY"]
            configs = await asyncio.gather(*(client.get_model_config(name) for name in ready))
        except (aiohttp.ClientError, OSError, InferenceServerException) as error:
            raise self._unavailable(error) from error
        return dict(zip(ready, configs, strict=True))

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """Run one inference; returns the named outputs as numpy arrays.

        Args:
            model: Triton model name.
            inputs: tensor name -> array (object arrays of bytes for BYTES tensors).
            outputs: names of the output tensors to return.

        The request carries the time left until the bound deadline as Triton's
        ``timeout`` parameter (see the module docstring). Over gRPC, cancelling
        the awaiting task cancels the request inside Triton.

        Raises:
            ServiceUnavailable: Triton unreachable (connection refused or reset, an
                answer cut short; over gRPC, status UNAVAILABLE).
            InferenceError: Triton answered with an error.
        """
        http_client, slots = self._current()
        client: Any = http_client
        transport: Any = triton_http
        if self.grpc_url is not None:
            client, transport = self._current_grpc(self.grpc_url), triton_grpc
        request_inputs = infer_inputs(transport.InferInput, inputs)
        requested = [transport.InferRequestedOutput(name) for name in outputs]
        async with slots.slot(_BINDING.get()):
            timeout_us = _timeout_us()
            try:
                result = await client.infer(
                    model, request_inputs, outputs=requested, timeout=timeout_us,
                    parameters=deadline_parameters(timeout_us),
                )
            # A payload cut short: Triton stopped (crashed, restarted) while it answered.
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as error:
                raise self._unavailable(error) from error
            except InferenceServerException as error:
                answer = self._answer_error(model, error)
                if isinstance(answer, ServiceUnavailable):
                    await self._forget_grpc(client)
                raise answer from error
        return {name: result.as_numpy(name) for name in outputs}

    async def _forget_grpc(self, client: Any) -> None:
        """Close ``client`` if it is the current gRPC client; the next call opens a new one.

        A gRPC channel that failed to connect waits out a reconnect backoff (grpc's
        default: 1 s growing to 120 s) and fails fast meanwhile, also after Triton is
        back (a supervised restart takes about 12 s).
        """
        current = self._grpc_client
        if current is not None and current is client:
            self._grpc_client = None
            await current.close()

    def _answer_error(
        self, model: str, error: InferenceServerException
    ) -> ServiceUnavailable | InferenceError:
        """The API error for a failed inference call (UNAVAILABLE: unreachable).

        Triton answers UNAVAILABLE (HTTP 503, gRPC status UNAVAILABLE) when it
        cannot take the request now: a model not ready or a queue full.
        """
        if self.grpc_url is None:
            if str(error.status() or "") == "503":
                return self._unavailable(error)
            return _inference_error(model, error)
        if grpc_status(error) == "UNAVAILABLE":
            return self._unavailable(error, self.grpc_url)
        return grpc_inference_error(model, error)

    async def close(self) -> None:
        """Close the HTTP session and gRPC channel (safe to call when none was opened)."""
        if self._loop is asyncio.get_running_loop():
            if self._client is not None:
                await self._client.close()
            if self._grpc_client is not None:
                await self._grpc_client.close()
        self._client = None
        self._grpc_client = None
