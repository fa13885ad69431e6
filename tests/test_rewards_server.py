"""The reward server and its `remote` client: identical scores to in-process scoring, tokens beyond
loopback, clear errors for dead or hung servers, and a training rollout scored remotely."""

import socket
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffrl.cli import main  # noqa: E402
from diffrl.rewards import build_reward  # noqa: E402
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
        assert remote.info() == {"protocol": 1, "reward": "pickscore", "differentiable": False, "accepts": ["image"]}
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
