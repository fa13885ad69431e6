"""The reward server and its `remote` client: identical scores to in-process scoring, tokens beyond
loopback, clear errors for dead or hung servers, and a training rollout scored remotely."""

import http.client
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffrl.cli import main  # noqa: E402
from diffrl.rewards import build_reward  # noqa: E402
from diffrl.rewards import remote as remote_module  # noqa: E402
from diffrl.rewards.remote import RewardServerError  # noqa: E402
from diffrl.rewards.server import RewardServer, decode, encode, is_loopback  # noqa: E402

PROMPTS = ["a photo of a cat", "a red square", 'a sign "open"', "two dogs", "a blue circle"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 32, 24, generator=torch.Generator().manual_seed(0))


def test_wire_format_round_trips_bits_and_metadata():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    tensors, meta = decode(encode({"samples": x}, {"prompts": ["a", "é"], "metadata": [{"k": [1, None]}, None]}))
    assert torch.equal(tensors["samples"], x) and tensors["samples"].dtype == torch.float64
    assert meta == {"prompts": ["a", "é"], "metadata": [{"k": [1, None]}, None]}


def test_served_scores_equal_in_process_scores(images):
    local = build_reward("pickscore", model="tiny")
    with RewardServer(build_reward("pickscore", model="tiny"), port=0) as server:
        remote = build_reward("remote", url=server.url)
        assert remote.info() == {"protocol": 1, "reward": "pickscore", "differentiable": False, "accepts": ["image"],
                                 "max_body_bytes": 64 << 20}
        assert torch.equal(remote(images, PROMPTS), local(images, PROMPTS))
        chunked = build_reward("remote", url=server.url, batch_size=2)  # three requests of 2, 2, 1
        expected = torch.cat([local(images[i:i + 2], PROMPTS[i:i + 2]) for i in range(0, 5, 2)])
        assert torch.equal(chunked(images, PROMPTS), expected)


def test_metadata_and_missing_scores_cross_the_wire():
    from diffrl.toyworld import make_prompt_set, render

    rows = make_prompt_set(6, seed=1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([render(m, rng) for m in rows])).permute(0, 3, 1, 2).float() / 255
    meta = rows[1:] + rows[:1]
    with RewardServer(build_reward("geneval", detector="toyworld", mode="partial"), port=0) as server:
        got = build_reward("remote", url=server.url)(x, [m["prompt"] for m in meta], meta)
    assert torch.equal(got, build_reward("toyworld")(x, [m["prompt"] for m in meta], meta))
    ocr = build_reward("ocr", recognizer="tests.test_rewards_models:fake_engine")
    with RewardServer(ocr, port=0) as server:
        got = build_reward("remote", url=server.url)(x[:2], ['a sign ""', 'a sign "open late"'])
    assert torch.isnan(got[0]) and got[1] == 1.0  # NaN (missing) survives the round trip


def test_server_reports_bad_input_and_reward_failures(images):
    with RewardServer(build_reward("toyworld"), port=0) as server:
        remote = build_reward("remote", url=server.url, retries=0)
        with pytest.raises(RewardServerError, match=r"HTTP 400.*metadata"):
            remote(images, PROMPTS)  # the served reward needs GenEval metadata
        # the server keeps serving after an error
        assert remote.info()["reward"] == "toyworld"


def test_token_required_beyond_loopback(images):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="without a token"):
        RewardServer(build_reward("brightness"), host="0.0.0.0", port=0)
    with RewardServer(build_reward("brightness"), host="0.0.0.0", port=0, token="s3cret") as server:
        for token in (None, "wrong", "s3cre", "Bearer s3cret"):
            with pytest.raises(RewardServerError, match="HTTP 401"):
                build_reward("remote", url=server.url, token=token, retries=0)(images, PROMPTS)
        with pytest.raises(RewardServerError, match="HTTP 401"):
            build_reward("remote", url=server.url, retries=0).info()
        good = build_reward("remote", url=server.url, token="s3cret")(images, PROMPTS)
    torch.testing.assert_close(good, images.flatten(1).mean(1), rtol=0, atol=0)


def test_token_from_the_environment(images, monkeypatch):
    monkeypatch.setenv("DIFFRL_REWARD_TOKEN", "from-env")
    with RewardServer(build_reward("brightness"), port=0, token="from-env") as server:  # loopback, token enforced
        assert build_reward("remote", url=server.url)(images, PROMPTS).shape == (5,)
        with pytest.raises(RewardServerError, match="HTTP 401"):
            build_reward("remote", url=server.url, token="other", retries=0)(images, PROMPTS)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_is_reported_within_the_retry_budget(images):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    remote = build_reward("remote", url=url, timeout=1.0, retries=2, backoff=0.05)
    with pytest.raises(RewardServerError, match="not answering"):
        remote.load()  # what the trainer calls before training
    start = time.monotonic()
    with pytest.raises(RewardServerError) as err:
        remote(images, PROMPTS)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0  # refused at once; waits 0.05 + 0.1 between the 3 attempts
    msg = str(err.value)
    assert url in msg and "3 attempts" in msg and "not answering" in msg and "serve-reward" in msg


def test_hung_server_times_out(images):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # accepts connections in the backlog, never answers
    try:
        remote = build_reward("remote", url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.3, retries=1,
                              backoff=0.05)
        start = time.monotonic()
        with pytest.raises(RewardServerError, match="2 attempts"):
            remote(images, PROMPTS)
        assert time.monotonic() - start < 0.3 * 2 + 0.05 + 1.0
    finally:
        sock.close()


def test_cli_serve_reward_refuses_bad_setups(capsys):
    assert main(["serve-reward", "pickscor"]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert main(["serve-reward", "brightness", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["serve-reward", "ocr", "model"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_training_rollout_scored_by_a_remote_reward_in_the_background(tmp_path):
    from diffrl.config import load_config
    from diffrl.trainers.loop import Trainer

    with RewardServer(build_reward("colorfulness"), port=0) as server:
        cfg = load_config(None, [
            "model=tiny-sd3", "policy.resolution=32", "policy.lora_rank=4", "sampling.num_steps=2",
            "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=4",
            "train.train_batch_size=3", "logging.log_with=none", "logging.progress=false", f"output_dir={tmp_path}",
            "reward=remote", f"reward_kwargs={{url: '{server.url}', timeout: 10}}", "reward_async=true"])
        trainer = Trainer(cfg)
        batch = trainer.rollout(0)
    expected = build_reward("colorfulness")(batch.images, batch.prompts)
    torch.testing.assert_close(batch.rewards, expected, rtol=0, atol=0)


# ---- a real `diffrl serve-reward` process, killed and restarted under a running client --------------
class ServeRewardProcess:
    """`python -m diffrl.cli serve-reward NAME` in a subprocess, as a user starts it. `start()` returns
    once the server prints its URL and its /info answers (polled, no fixed sleeps)."""

    def __init__(self, log_dir, name="brightness"):
        self.log_dir, self.name, self.proc, self.url, self.runs = log_dir, name, None, None, 0

    def start(self, port=0, timeout=60.0):
        self.runs += 1
        self.log = self.log_dir / f"serve-reward-{self.runs}.log"
        cmd = [sys.executable, "-m", "diffrl.cli", "serve-reward", self.name, "--port", str(port), "--device", "cpu"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout  # a guard against hanging, not a measurement
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if " at http://" not in line:
            self.fail(f"printed {line!r} instead of its URL")
        self.url = line.split(" at ", 1)[1].split()[0]
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        while True:
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode}")
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            try:
                conn.request("GET", "/info")
                reply = conn.getresponse()
                if reply.status == 200 and json.loads(reply.read())["reward"] == self.name:
                    return self
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.fail(f"did not answer /info within {timeout} s")
            time.sleep(0.05)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def fail(self, why):
        self.stop()
        pytest.fail(f"serve-reward {why}; its log:\n{self.log.read_text()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.proc.stdout.close()


@pytest.fixture
def served(tmp_path):
    server = ServeRewardProcess(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def client_log(monkeypatch):
    """Records the remote client's attempts (each urlopen: its path, and "ok" if the reply's headers came,
    else the exception's name) and its backoff waits, which are recorded instead of slept (no test here
    depends on the clock); `on_sleep(i)`, if set, runs at the i-th wait (1-based)."""
    log = types.SimpleNamespace(attempts=[], sleeps=[], on_sleep=None)
    real_urlopen = urllib.request.urlopen

    def urlopen(request, *args, **kwargs):
        path = request.full_url.split("/", 3)[3]
        try:
            reply = real_urlopen(request, *args, **kwargs)
        except Exception as err:
            log.attempts.append((path, type(err).__name__))
            raise
        log.attempts.append((path, "ok"))
        return reply

    def sleep(seconds):
        log.sleeps.append(seconds)
        if log.on_sleep is not None:
            log.on_sleep(len(log.sleeps))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(remote_module, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    return log


def test_killed_server_fails_after_exactly_the_retries_and_a_restarted_one_is_picked_up(images, served, client_log):
    expected = build_reward("brightness")(images, PROMPTS)
    served.start()
    url = served.url
    remote = build_reward("remote", url=url, retries=3, backoff=0.25, timeout=10, batch_size=2).load()
    assert client_log.attempts == [("info", "ok")]

    # 1. a batch of 5 is scored in three requests (2, 2, 1), equal to in-process scoring
    client_log.attempts.clear()
    assert torch.equal(remote(images, PROMPTS), expected)
    assert client_log.attempts == [("score", "ok")] * 3 and client_log.sleeps == []

    # 2. killed mid-run: after the first request of the batch the server dies; the second request is
    #    tried 1 + retries times, waiting backoff, 2 backoff, 4 backoff, then fails naming the URL
    client_log.attempts.clear()
    real_request = remote._request
    calls = []

    def request_then_kill(path, data=None):
        calls.append(path)
        if len(calls) == 2:
            served.kill()
        return real_request(path, data)

    remote._request = request_then_kill
    with pytest.raises(RewardServerError) as err:
        remote(images, PROMPTS)
    del remote._request
    assert client_log.attempts[0] == ("score", "ok")
    failed = client_log.attempts[1:]
    assert len(failed) == 1 + 3 and all(path == "score" and outcome != "ok" for path, outcome in failed)
    assert client_log.sleeps == [0.25, 0.5, 1.0]
    msg = str(err.value)
    assert f"{url}/score" in msg and "4 attempts" in msg and "not answering" in msg and "serve-reward" in msg
    assert "refused" in msg.lower()  # the last error: nothing listens on the port any more

    # the check before training fails the same way, on /info
    client_log.attempts.clear(), client_log.sleeps.clear()
    with pytest.raises(RewardServerError, match=f"{url}/info is not answering: 4 attempts"):
        remote.load()
    assert len(client_log.attempts) == 4 and len(client_log.sleeps) == 3

    # 3. restarted on the same port during the retry window (at the second wait): the third attempt
    #    reaches it and the whole batch is scored, nothing lost or reordered
    client_log.attempts.clear(), client_log.sleeps.clear()
    client_log.on_sleep = lambda i: served.start(port=int(url.rsplit(":", 1)[1])) if i == 2 else None
    assert torch.equal(remote(images, PROMPTS), expected)
    assert served.url == url and served.runs == 2
    assert [outcome == "ok" for _, outcome in client_log.attempts] == [False, False, True, True, True]
    assert client_log.sleeps == [0.25, 0.5]


def test_reply_cut_short_is_retried_then_reported(images, client_log):
    """A server dying mid-answer (headers sent, body cut short) is a retryable failure, not a crash."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def answer_half():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                # the whole request first: closing a socket with unread bytes resets the connection, which the client
                # would see instead of the short body (a race that failed once in CI)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(1 << 16)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(1 << 16)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly a few bytes")

    threading.Thread(target=answer_half, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with pytest.raises(RewardServerError, match="IncompleteRead") as err:
            build_reward("remote", url=url, retries=2, backoff=0.1)(images, PROMPTS)
    finally:
        sock.close()
    assert f"{url}/score is not answering: 3 attempts" in str(err.value)
    assert client_log.attempts == [("score", "ok")] * 3  # each got its headers, then lost the body
    assert client_log.sleeps == [0.1, 0.2]


def test_token_and_input_errors_are_not_retried(images, client_log):
    with RewardServer(build_reward("brightness"), host="0.0.0.0", port=0, token="s3cret") as server:
        with pytest.raises(RewardServerError, match="HTTP 401.*DIFFRL_REWARD_TOKEN"):
            build_reward("remote", url=server.url, token="wrong", retries=3)(images, PROMPTS)
        assert len(client_log.attempts) == 1 and client_log.sleeps == []
    client_log.attempts.clear()
    with RewardServer(build_reward("toyworld"), port=0) as server:
        with pytest.raises(RewardServerError, match="HTTP 400.*metadata"):  # toyworld needs GenEval metadata
            build_reward("remote", url=server.url, retries=3)(images, PROMPTS)
    assert len(client_log.attempts) == 1 and client_log.sleeps == []


# ---- request size cap and a busy port ------------------------------------------------------------------
def post_headers(url: str, headers: dict, body: bytes = b"") -> tuple[int, str]:
    """POST /score with `headers` and `body` as given (a Content-Length may promise more than is sent)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", "/score")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())["detail"]
    finally:
        conn.close()


def test_a_body_over_the_cap_is_answered_413_unread(images):
    with RewardServer(build_reward("brightness"), port=0, max_body_bytes=32 << 10) as server:  # 2 of these images a request
        # 1 GiB promised, nothing sent: the answer comes from the header alone
        status, detail = post_headers(server.url, {"Content-Length": str(1 << 30)})
        assert status == 413 and "32768 bytes" in detail and "--max-body-mib" in detail
        # no Content-Length (chunked): refused once the bytes received pass the cap
        chunk = b"x" * 40000
        status, detail = post_headers(server.url, {"Transfer-Encoding": "chunked"},
                                      b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n")
        assert status == 413 and "32768 bytes" in detail
        # the server still scores, and a client that read the cap from /info splits its batch to fit under it
        local = build_reward("brightness")(images, PROMPTS)
        remote = build_reward("remote", url=server.url).load()
        assert remote.max_body_bytes == 32 << 10 and remote.request_size(images) == 2
        assert torch.equal(remote(images, PROMPTS), local)
        with pytest.raises(RewardServerError, match="HTTP 413"):  # one sample alone over the cap
            remote(torch.rand(1, 3, 64, 64), PROMPTS[:1])


def test_serve_reward_on_a_busy_port_says_so_in_one_line(monkeypatch, capsys):
    from diffrl.rewards.base import Reward

    def boom(self):
        raise AssertionError("the reward loaded before the port was bound")

    monkeypatch.setattr(Reward, "load", boom)  # the port is taken before any weights would load
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve-reward", "brightness", "--port", str(port), "--device", "cpu"])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert f"port {port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]
    assert main(["serve-reward", "brightness", "--max-body-mib", "0"]) == 2
    assert "--max-body-mib must be > 0" in capsys.readouterr().err
