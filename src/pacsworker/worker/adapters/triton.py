"""``kind: triton``: a network served by NVIDIA Triton Inference Server, inside pacsworker's MONAI pipeline.

The worker runs what ``kind: torchscript`` runs (pre-transforms, the inferer, the inverse of the
pre-transforms, post-transforms: :class:`~.torchscript.PipelineModel`); only the network is
remote. MONAI's inferer calls it with a batch of images or sliding-window tiles, and each batch
goes to Triton with ``tritonclient`` (``http://``/``https://`` or ``grpc://``, tensors as binary
data), split into requests of at most the model's ``max_batch_size``.

Nothing about the tensors is configured: the input's and output's names, data types and shapes
come from the model's metadata, ``max_batch_size`` from its configuration. The model has one
input, the image; its first output is the network's output.

Loading needs no server: a worker may start before Triton does. Each run first checks that the
server is live and the model ready (and reads its metadata); while it is not, the run waits and
asks again with backoff, up to ``wait_seconds``, and then fails with a :class:`ModelRunError`
naming the URL, the model and what was wrong. A request that fails on the way (connection refused
or reset, 503, gRPC UNAVAILABLE) is sent again after the same wait; the server's refusal of a
request (a bad shape, the model's own error) and ``request_timeout_seconds`` passing without an
answer fail the run at once. Clients are made per thread and dropped after a connection error,
so a restarted server is reached on a fresh connection.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import torch

from ...config import TritonModelSettings
from ..outputs import ModelIdentity, ModelResult, ModelRunError
from ..series import Series
from .torchscript import PipelineModel

log = logging.getLogger("pacsworker.worker")

PROBE_TIMEOUT_S = 10.0  # health and metadata answers are small: a server that takes longer is not there
FIRST_DELAY_S, MAX_DELAY_S = 0.25, 5.0  # backoff between checks while waiting
REQUEST_ATTEMPTS = 4  # one batch of tiles is sent at most this often, waiting for the server in between
UNAVAILABLE = {"502", "503", "StatusCode.UNAVAILABLE"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model, as its metadata states it."""

    name: str
    datatype: str  # Triton's name: FP32, FP16, INT64, ...
    shape: tuple[int, ...]  # -1 = any size; with batching the first dimension is the batch

    @classmethod
    def from_metadata(cls, entry: dict) -> TensorSpec:
        # gRPC metadata as JSON gives int64 dimensions as strings
        return cls(entry["name"], entry["datatype"], tuple(int(d) for d in entry.get("shape", [])))


@dataclass(frozen=True)
class ServedModel:
    """What Triton says about the model: the version it serves, its tensors, its batch limit."""

    version: str
    input: TensorSpec
    output: TensorSpec
    max_batch_size: int  # 0: Triton does not batch; the input's shape says what one request holds

    @classmethod
    def from_server(cls, metadata: dict, config: dict, asked_version: str) -> ServedModel:
        config = config.get("config", config)  # gRPC wraps the configuration
        inputs, outputs = metadata.get("inputs", []), metadata.get("outputs", [])
        if len(inputs) != 1 or not outputs:
            raise ValueError(f"it has {len(inputs)} inputs and {len(outputs)} outputs; kind triton sends one image "
                             "tensor and reads one output")
        versions = sorted(metadata.get("versions", []), key=lambda v: int(v) if str(v).isdigit() else -1)
        version = asked_version or (versions[-1] if versions else "")
        return cls(version, TensorSpec.from_metadata(inputs[0]), TensorSpec.from_metadata(outputs[0]),
                   int(config.get("max_batch_size", 0)))


class ServerProblem(Exception):
    """Why the model cannot be used now; ``unreachable`` tells the server's absence from the model's."""

    def __init__(self, reason: str, unreachable: bool):
        super().__init__(reason)
        self.reason, self.unreachable = reason, unreachable


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "DEADLINE_EXCEEDED" in str(getattr(exc, "status", lambda: "")())


def is_unavailable(exc: BaseException) -> bool:
    """A failure that a later attempt may not meet: no connection, a reset, 503/UNAVAILABLE."""
    from tritonclient.utils import InferenceServerException

    if is_timeout(exc):
        return False
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return True
    return isinstance(exc, InferenceServerException) and str(exc.status()) in UNAVAILABLE


def describe(exc: BaseException) -> str:
    """A failure in words: ``connection refused``, the server's own message, ..."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, InferenceServerException):
        text = exc.message() or str(exc)
        if "Connection refused" in text:
            return "connection refused"
        return f"{exc.status()}: {text}" if exc.status() else text
    return str(exc) or type(exc).__name__


class TritonNetwork:
    """The network as MONAI's inferer sees it: a callable from a batch of tiles to the model's output,
    computed by Triton."""

    def __init__(self, settings: TritonModelSettings):
        if not settings.url:
            raise ValueError("kind triton needs url: (http://host:port or grpc://host:port)")
        if not settings.model_name:
            raise ValueError("kind triton needs model_name: (the model's name on the server)")
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https", "grpc") or not parts.netloc:
            raise ValueError(f"url {settings.url!r}: expected http://host:port, https://host:port or grpc://host:port")
        self.url = settings.url
        self.protocol = "grpc" if parts.scheme == "grpc" else "http"
        self.ssl = parts.scheme == "https"
        self.address = parts.netloc + parts.path.rstrip("/")
        self.model_name, self.model_version = settings.model_name, settings.model_version
        self.request_timeout, self.wait_seconds = settings.request_timeout_seconds, settings.wait_seconds
        self.served: ServedModel | None = None
        self._local = threading.local()

    @property
    def model(self) -> str:
        return f"model {self.model_name}" + (f" (version {self.model_version})" if self.model_version else "")

    # -- connection ---------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as grpcclient

                client = grpcclient.InferenceServerClient(self.address)
            else:
                import tritonclient.http as httpclient

                client = httpclient.InferenceServerClient(
                    self.address, ssl=self.ssl, connection_timeout=min(PROBE_TIMEOUT_S, self.request_timeout),
                    network_timeout=self.request_timeout)
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        """Forget this thread's client: the next request connects afresh (gRPC would otherwise wait
        out its channel's reconnect backoff)."""
        client, self._local.client = getattr(self._local, "client", None), None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                pass

    def _ask(self, method: str, *args, **kwargs):
        """One health or metadata call, with the protocol's own way to state a time limit and get JSON."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = min(PROBE_TIMEOUT_S, self.request_timeout)
            if method.startswith("get_"):
                kwargs["as_json"] = True
        return getattr(self._client(), method)(*args, **kwargs)

    # -- readiness ----------------------------------------------------------------------------

    def _check(self) -> ServedModel:
        """Live server, ready model, its metadata; raises ServerProblem with the reason otherwise."""
        from tritonclient.utils import InferenceServerException

        try:
            if not self._ask("is_server_live"):
                raise ServerProblem("the server is not live", unreachable=True)
            if not self._ask("is_model_ready", self.model_name, self.model_version):
                raise ServerProblem(self._why_not_ready(), unreachable=False)
            metadata = self._ask("get_model_metadata", self.model_name, self.model_version)
            config = self._ask("get_model_config", self.model_name, self.model_version)
        except (OSError, http.client.HTTPException, InferenceServerException) as exc:
            unreachable = is_unavailable(exc) or is_timeout(exc)
            if unreachable:
                self._drop_client()
            raise ServerProblem(describe(exc), unreachable) from exc
        try:
            return ServedModel.from_server(metadata, config, self.model_version)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelRunError(f"{self.model} on Triton at {self.url} cannot be used: {exc}") from exc

    def _why_not_ready(self) -> str:
        """The server's own words where it has them (unknown model, load failure), else 'not ready'."""
        try:
            self._ask("get_model_metadata", self.model_name, self.model_version)
        except Exception as exc:  # noqa: BLE001 - whatever the server answers is the reason
            return describe(exc)
        return "not ready"

    def wait_until_ready(self) -> ServedModel:
        """Check the server and the model until both are usable, for at most ``wait_seconds``.

        Raises
        ------
        ModelRunError
            When ``wait_seconds`` passed: the server unreachable, or the model not ready, and why.
        """
        deadline = time.monotonic() + self.wait_seconds
        delay = FIRST_DELAY_S
        while True:
            try:
                self.served = self._check()
                return self.served
            except ServerProblem as problem:
                left = deadline - time.monotonic()
                if left <= 0:
                    if problem.unreachable:
                        raise ModelRunError(f"Triton at {self.url} unreachable for {self.wait_seconds:g} s "
                                            f"({self.model}): {problem.reason}") from None
                    raise ModelRunError(f"{self.model} not ready on Triton at {self.url} after "
                                        f"{self.wait_seconds:g} s: {problem.reason}") from None
                if delay == FIRST_DELAY_S:
                    log.warning("%s on Triton at %s: %s; waiting up to %g s", self.model, self.url, problem.reason,
                                self.wait_seconds)
                time.sleep(min(delay, left))
                delay = min(delay * 2, MAX_DELAY_S)

    # -- inference ----------------------------------------------------------------------------

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        served = self.served or self.wait_until_ready()
        from tritonclient.utils import triton_to_np_dtype

        array = tiles.detach().cpu().numpy().astype(triton_to_np_dtype(served.input.datatype), copy=False)
        rank = len(served.input.shape)
        if rank == array.ndim:  # the model takes batches: as many tiles a request as it allows
            limit = served.max_batch_size or (served.input.shape[0] if served.input.shape[0] > 0 else len(array))
            answers = [self._infer(array[start:start + limit]) for start in range(0, len(array), limit)]
        elif rank == array.ndim - 1:  # one image a request, without a batch dimension
            answers = [self._infer(tile)[np.newaxis] for tile in array]
        else:
            raise ModelRunError(f"{self.model} on Triton at {self.url} takes {served.input.name} of shape "
                                f"{list(served.input.shape)}; the pipeline gives tiles of {list(array.shape)}")
        output = np.concatenate(answers)
        if output.dtype == np.float16:
            output = output.astype(np.float32)
        return torch.from_numpy(output).to(tiles.device)

    def _infer(self, array: np.ndarray) -> np.ndarray:
        """One request; sent again after a connection failure, once the server is back."""
        from tritonclient.utils import InferenceServerException

        attempt = 1
        while True:
            served = self.served or self.wait_until_ready()
            try:
                return self._send(array, served)
            except (OSError, http.client.HTTPException, InferenceServerException) as exc:
                if is_timeout(exc):
                    raise ModelRunError(f"Triton at {self.url} gave no answer for {self.model} within "
                                        f"{self.request_timeout:g} s (request_timeout_seconds)") from exc
                if not is_unavailable(exc):
                    raise ModelRunError(f"Triton at {self.url} refused the request for {self.model}: "
                                        f"{describe(exc)}") from exc
                self._drop_client()
                if attempt == REQUEST_ATTEMPTS:
                    raise ModelRunError(f"Triton at {self.url} failed {REQUEST_ATTEMPTS} times for {self.model}: "
                                        f"{describe(exc)}") from exc
                log.warning("%s on Triton at %s: %s; trying again", self.model, self.url, describe(exc))
                time.sleep(FIRST_DELAY_S * 2 ** attempt)
                self.served = None  # check the server and re-read the metadata before the next attempt
                attempt += 1

    def _send(self, array: np.ndarray, served: ServedModel) -> np.ndarray:
        if self.protocol == "grpc":
            import tritonclient.grpc as client_module

            tensor = client_module.InferInput(served.input.name, list(array.shape), served.input.datatype)
            tensor.set_data_from_numpy(array)
            wanted = client_module.InferRequestedOutput(served.output.name)
            result = self._client().infer(self.model_name, [tensor], self.model_version, outputs=[wanted],
                                          client_timeout=self.request_timeout)
            answered_version = result.get_response().model_version
        else:
            import tritonclient.http as client_module

            tensor = client_module.InferInput(served.input.name, list(array.shape), served.input.datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            wanted = client_module.InferRequestedOutput(served.output.name, binary_data=True)
            result = self._client().infer(self.model_name, [tensor], self.model_version, outputs=[wanted])
            answered_version = result.get_response().get("model_version", "")
        if answered_version and answered_version != served.version:
            self.served = ServedModel(answered_version, served.input, served.output, served.max_batch_size)
        output = result.as_numpy(served.output.name)
        if output is None:
            raise ModelRunError(f"{self.model} on Triton at {self.url} returned no {served.output.name!r}")
        return output


class TritonModel(PipelineModel):
    """The MONAI pipeline here, the network on a Triton server; see the module's docstring."""

    settings: TritonModelSettings
    network: TritonNetwork

    def _load_network(self) -> TritonNetwork:
        return TritonNetwork(self.settings)

    @property
    def identity(self) -> ModelIdentity:
        """``version:`` if configured, else the model's name and the version Triton served (known
        once a run has reached the server)."""
        if self.settings.version:
            return ModelIdentity(self.settings.name, self.settings.version)
        served = self.network.served.version if self.network.served else self.settings.model_version
        return ModelIdentity(self.settings.name, f"{self.network.model_name} {served or '(not yet asked)'}")

    def run(self, series: Series) -> ModelResult:
        self.network.wait_until_ready()  # before the pre-transforms: a job for a missing server fails fast
        return super().run(series)
