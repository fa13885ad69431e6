"""The client of the reward server (rewards/server.py): a reward scored by another process or machine.

    reward = build_reward("remote", url="http://127.0.0.1:8000")   # token: DIFFRL_REWARD_TOKEN, if set
    scores = reward(images, prompts, metadata)                     # float32 [B], like the served reward

Batches are split into requests of at most `batch_size` samples. Each request waits at most
`timeout` seconds for a connection and for each read; connection failures, timeouts, replies cut
short (a server killed mid-answer) and 503s are retried `retries` times with exponential backoff
(backoff, 2 backoff, ...), so a server restarted within that window is picked up. A server that stays
unreachable raises RewardServerError naming the URL, the attempts and the last error; 400 (the
reward rejected the input), 401 (token) and 500 (the reward failed) raise at once with the server's
message. Set `reward_async: true` in the run config to score each rollout chunk while the next one
samples. Not differentiable: gradients do not cross HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
from torch import Tensor

from .base import Reward
from .registry import register_reward
from .server import PROTOCOL, TOKEN_ENV, decode, encode


class RewardServerError(RuntimeError):
    """The reward server is unreachable or answered with an error."""


@register_reward("remote")
class RemoteReward(Reward):
    """Scores from a `diffrl serve-reward` server."""

    accepts = ("image", "video", "motion")  # the served reward checks its own

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, batch_size: int = 64):
        """url: the server; token: sent as a bearer token (default: the DIFFRL_REWARD_TOKEN
        environment variable, if set); timeout: seconds per connection / read; retries: extra
        attempts after a connection failure, timeout or 503; backoff: first wait in seconds, doubled
        after each retry; batch_size: most samples per request."""
        _check_settings(timeout, retries, backoff, batch_size)
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries, self.backoff, self.batch_size = float(timeout), int(retries), float(backoff), int(batch_size)
        self.max_body_bytes: int | None = None  # the server's request limit, read by info()

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        """Config validation (diffrl.rewards.registry.check_reward_kwargs): the settings, without a connection."""
        from .registry import RewardArgumentError

        try:
            cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RewardArgumentError(str(exc)) from None

    @classmethod
    def check_service(cls, kwargs: dict) -> None:
        """Before a run loads its model (diffrl.rewards.registry.check_reward_service): one short request to the
        server's /info (HEALTH_TIMEOUT at most, no retries), so that a server that is not running fails now rather
        than after the model loaded."""
        from .registry import RewardArgumentError

        probe = cls(**{**kwargs, "timeout": min(float(kwargs.get("timeout", 60.0)), HEALTH_TIMEOUT), "retries": 0})
        try:
            probe.info()
        except RewardServerError as exc:
            port = urllib.parse.urlsplit(probe.url).port or 8000
            raise RewardArgumentError(f"{exc} Start it with `diffrl serve-reward NAME --port {port}` (NAME: the reward "
                                      "to serve), or point reward_kwargs.url at a running one", "url") from None

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        start, wait, last = time.monotonic(), self.backoff, None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = _detail(err)
                if err.code == 503:
                    last = f"HTTP 503 {detail}"
                    continue
                hint = " (set the token: DIFFRL_REWARD_TOKEN or reward_kwargs.token)" if err.code == 401 else ""
                raise RewardServerError(f"reward server {url} answered HTTP {err.code}: {detail}{hint}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                # refused / reset / timed out, or a reply cut short (IncompleteRead: the server died mid-answer)
                last = str(getattr(err, "reason", err)) or type(err).__name__
        raise RewardServerError(
            f"reward server {url} is not answering: {self.retries + 1} attempts in {time.monotonic() - start:.1f} s "
            f"(timeout {self.timeout:g} s each), last error: {last}. Is `diffrl serve-reward` running there?"
        )

    def load(self) -> RemoteReward:
        """Check that the server answers (the trainer calls this before training)."""
        self.info()
        return self

    def info(self) -> dict:
        """The server's /info: protocol, reward name, differentiable, accepts."""
        info = json.loads(self._request("/info"))
        if info.get("protocol") != PROTOCOL:
            raise RewardServerError(f"reward server {self.url} speaks protocol {info.get('protocol')}, this client {PROTOCOL}")
        self.max_body_bytes = info.get("max_body_bytes")
        return info

    def request_size(self, samples: Tensor) -> int:
        """Samples a /score request carries: batch_size, fewer when the server's body limit (known once info() or
        load() ran) holds fewer (each sample's bytes plus an allowance for its prompt and metadata)."""
        if not self.max_body_bytes or samples.shape[0] == 0:
            return self.batch_size
        per_sample = samples[0].numel() * samples.element_size() + REQUEST_ALLOWANCE
        return max(1, min(self.batch_size, (self.max_body_bytes - REQUEST_ALLOWANCE) // per_sample))

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        out = []
        size = self.request_size(samples)
        for start in range(0, samples.shape[0], size):
            sl = slice(start, start + size)
            body = encode({"samples": samples[sl]}, {"prompts": prompts[sl],
                                                      "metadata": metadata[sl] if metadata is not None else None})
            tensors, _ = decode(self._request("/score", body))
            scores = tensors["scores"]
            if scores.shape != (len(prompts[sl]),):
                raise RewardServerError(f"reward server {self.url} returned scores of shape {tuple(scores.shape)} "
                                        f"for {len(prompts[sl])} samples")
            out.append(scores)
        return torch.cat(out)  # [B] float32 on the CPU (the caller moves it to the samples' device)


REQUEST_ALLOWANCE = 4096
"""Bytes allowed per sample (and once per request) for the safetensors header: prompts, metadata, offsets."""
HEALTH_TIMEOUT = 2.0
"""Seconds config validation waits for the server's /info."""


def _check_settings(timeout: float, retries: int, backoff: float, batch_size: int) -> None:
    if not (timeout > 0 and retries >= 0 and backoff >= 0 and batch_size >= 1):
        raise ValueError(f"reward 'remote': need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got "
                         f"timeout={timeout}, retries={retries}, backoff={backoff}, batch_size={batch_size}")


def _detail(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("detail", "")
    except Exception:  # noqa: BLE001 - any unreadable error body
        return err.reason or ""
