"""Reward server: one reward, loaded once, scoring batches over HTTP for trainers elsewhere (another
process, environment or machine). FastAPI + uvicorn: `pip install "diffrl[server]"`.

    diffrl serve-reward pickscore model=yuvalkirstain/PickScore_v1 --port 8000     # loopback, no token
    DIFFRL_REWARD_TOKEN=s3cret diffrl serve-reward ocr --host 0.0.0.0 --port 8000  # a token is required
    # the trainer:  reward: remote   reward_kwargs: {url: "http://host:8000"}   (token from DIFFRL_REWARD_TOKEN)

It binds to loopback (127.0.0.1) by default; bound anywhere else it refuses to start without a token,
and every request must then carry "Authorization: Bearer <token>" (401 otherwise).

Protocol (version 1):
    GET  /info   -> JSON {"protocol", "reward", "differentiable", "accepts", "max_body_bytes"}
    POST /score  body: safetensors bytes, tensor "samples" ([B, 3, H, W] images in [0, 1], or videos /
                 motions) and header metadata {"prompts": JSON list, "metadata": JSON list or null}
                 -> safetensors bytes, tensor "scores" (float32 [B]; NaN = missing)
                 400: the reward rejected the input (message in "detail"), 401: token missing or wrong,
                 413: the body is over max_body_bytes (--max-body-mib), 500: the reward failed
Samples travel in their own dtype, bit for bit, so remote scores equal in-process ones.
(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime.)
"""

import errno
import hmac
import ipaddress
import json
import socket
import struct
import threading
from typing import Any

import torch
from torch import Tensor

PROTOCOL = 1
TOKEN_ENV = "DIFFRL_REWARD_TOKEN"
MAX_BODY_MIB = 64
"""Default cap on a /score request body, in MiB: a larger one is answered 413 unread (a client's bytes cannot fill
the server's memory); the remote client reads the cap from /info and splits its batches to fit."""
LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost"."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve a reward on {host!r} (reachable from other machines) without a token: set "
            f"{TOKEN_ENV} (or pass --token); clients send it as 'Authorization: Bearer <token>'"
        )


# ---- wire format -------------------------------------------------------------------------------
def encode(tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """Tensors (moved to the CPU, made contiguous) and JSON-able header metadata -> safetensors bytes."""
    from safetensors.torch import save

    header = {k: json.dumps(v) for k, v in (meta or {}).items()}
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)


def decode(data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """safetensors bytes -> (tensors, header metadata with JSON values decoded)."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("not a safetensors payload (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return load(data), {k: json.loads(v) for k, v in header.items()}


# ---- the app -----------------------------------------------------------------------------------
def _fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise ImportError('the reward server needs FastAPI and uvicorn: pip install "diffrl[server]"') from err
    return fastapi, uvicorn


def create_app(reward, *, token: str | None = None, name: str | None = None,
               device: torch.device | str | None = None, max_body_bytes: int = MAX_BODY_MIB << 20):
    """A FastAPI app serving `reward` (a Reward instance). Requests are scored one at a time; a body over
    `max_body_bytes` is answered 413 without being read (by its Content-Length, or as it streams in)."""
    fastapi, _ = _fastapi()
    from fastapi import Request, Response
    from fastapi.responses import JSONResponse

    app = fastapi.FastAPI(title="diffrl reward server", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one model: score one batch at a time
    label = name or reward._name()
    device = torch.device(device) if device is not None else None

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if token:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong token (send 'Authorization: Bearer <token>')"},
                                    status_code=401)
        return await call_next(request)

    def too_large(size: str) -> JSONResponse:
        return JSONResponse({"detail": f"request body of {size} is over this server's limit of {max_body_bytes} "
                                       "bytes: send fewer samples a request (reward_kwargs.batch_size) or restart "
                                       "the server with a larger --max-body-mib"}, status_code=413)

    @app.get("/info")
    def info() -> dict:
        return {"protocol": PROTOCOL, "reward": label, "differentiable": bool(reward.differentiable),
                "accepts": list(reward.accepts), "max_body_bytes": max_body_bytes}

    @app.post("/score")
    async def score(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return too_large(f"{int(declared)} bytes")  # refused before a byte of it is read
        chunks, size = [], 0
        async for chunk in request.stream():  # no (or a false) Content-Length: count as it arrives
            size += len(chunk)
            if size > max_body_bytes:
                return too_large(f"more than {max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            tensors, meta = decode(body)
            samples = tensors["samples"]
            prompts = meta["prompts"]
            metadata = meta.get("metadata")
        except Exception as err:  # noqa: BLE001 - any malformed payload is the client's error
            return JSONResponse({"detail": f"malformed request: {err}"}, status_code=400)
        # run the model off the event loop (FastAPI's thread pool), one batch at a time
        from starlette.concurrency import run_in_threadpool

        def run() -> Tensor:
            with lock:
                x = samples.to(device) if device is not None else samples
                return reward(x, prompts, metadata)

        try:
            scores = await run_in_threadpool(run)
        except (ValueError, TypeError) as err:
            return JSONResponse({"detail": f"reward {label!r} rejected the input: {err}"}, status_code=400)
        except Exception as err:  # noqa: BLE001 - reported to the client, the server keeps serving
            return JSONResponse({"detail": f"reward {label!r} failed: {type(err).__name__}: {err}"}, status_code=500)
        return Response(encode({"scores": scores.float()}), media_type="application/octet-stream")

    return app


class PortInUseError(ValueError):
    """The port is taken by another process."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one (read it from getsockname()). PortInUseError
    when another process holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use (another server?): choose another with "
                                 "--port (0 picks a free one)") from None
        raise
    return sock


class RewardServer:
    """A served reward on (host, port): `run()` blocks (the CLI); `start()` serves from a background
    thread and returns self (tests, notebooks), `stop()` ends it. `url` is where clients connect."""

    def __init__(self, reward, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 name: str | None = None, device: str | None = None, log_level: str = "warning",
                 max_body_bytes: int = MAX_BODY_MIB << 20):
        check_bind(host, token)
        if max_body_bytes < 1:
            raise ValueError(f"the request body limit must be > 0 bytes, got {max_body_bytes}")
        _, uvicorn = _fastapi()
        self.sock = bind_socket(host, port)  # a busy port fails before the reward's weights load
        try:
            if device is not None:
                reward.to(device)
            reward.load()  # missing weights fail now, not at the first request
        except BaseException:
            self.sock.close()
            raise
        self.app = create_app(reward, token=token, name=name, device=device, max_body_bytes=max_body_bytes)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_keep_alive=30))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 10.0) -> "RewardServer":
        self.thread = threading.Thread(target=self.run, name="diffrl-reward-server", daemon=True)
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self.server.started:
                return self
            deadline.wait(0.01)
        raise TimeoutError(f"the reward server did not start within {timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_reward(name: str, kwargs: dict | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                 token: str | None = None, device: str | None = None, max_body_mib: float = MAX_BODY_MIB) -> None:
    """Build the reward `name` with `kwargs` and serve it until interrupted (`diffrl serve-reward`)."""
    from .registry import build_reward

    kwargs = dict(kwargs or {})
    server = RewardServer(build_reward(name, **kwargs), host=host, port=port, token=token, name=name,
                          device=device, log_level="info", max_body_bytes=int(max_body_mib * (1 << 20)))
    print(f"diffrl: serving reward {name!r} at {server.url} (bound to {host}:{server.port}"
          f"{', token required' if token else ''}); Ctrl-C stops", flush=True)
    server.run()
