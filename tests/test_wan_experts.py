"""Wan2.2: which experts train (policy.wan_experts high | low | both) on the tiny two-expert model, and Wan2.2 TI2V-5B's
layout (one expert, its VAE, per-token timesteps) against diffusers' own WanPipeline.

Each choice: one optimiser step moves exactly the chosen experts' LoRA tensors and no base weight; a fresh LoRA
(B = 0) predicts the base; the saved LoRA, loaded into a stock WanPipeline by the lines `lora_usage` gives, samples
what the policy samples; a short run through the trainer trains the chosen experts; the option is refused before any
model loads where it cannot apply."""

import math

import pytest
import torch

from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.pipelines.registry import load_policy
from diffrl.pipelines.wan import WanPolicy, expert_count
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.trainers.loop import Trainer

PROMPTS = ["a red circle moving right", "two squares"]
CHOICES = ("high", "low", "both")
TRAINED = {"high": {"transformer"}, "low": {"transformer_2"}, "both": {"transformer", "transformer_2"}}
FAST = ["model=tiny-wan22", "reward=video_temporal", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=4", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2",
        "train.group_size=2", "train.rollout_batch_size=4", "train.train_batch_size=4", "logging.log_with=none",
        "logging.progress=false"]


def experts_policy(experts: str, lora_scale: float | None = None) -> WanPolicy:
    """The tiny two-expert Wan with a rank-4 (alpha 8) LoRA on the chosen experts; `lora_scale`: random LoRA tensors of
    that size instead of peft's B = 0 start, so that every LoRA tensor has a gradient and the LoRA changes the clip."""
    policy = WanPolicy.tiny(two_experts=True)
    policy.set_trained_experts(experts)
    policy.add_lora(4, 8)
    if lora_scale is not None:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.copy_(lora_scale * torch.randn(p.shape, generator=gen))
    return policy


def expert_tensors(policy: WanPolicy) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of each expert, LoRA included, copied: {"transformer": {name: tensor}, "transformer_2": {...}}."""
    return {name: {n: p.detach().clone() for n, p in getattr(policy.pipe, name).named_parameters()}
            for name in ("transformer", "transformer_2")}


def crossing_batch(policy: WanPolicy):
    """4 clips at the 4 steps of schedule(4): t = 1000, 934 (high-noise expert) | 781, 47 (low-noise expert)."""
    t = policy.schedule(4).timesteps  # [4]
    assert policy.expert_of(t).tolist() == [True, True, False, False]
    x = policy.initial_noise(4, generator=torch.Generator().manual_seed(1))  # [4, 16, 3, 4, 4]
    cond = policy.encode_prompt(PROMPTS * 2)
    return x, t, cond


def ode(policy, noise, steps=4, guidance=5.0):
    with torch.no_grad():
        return sample(policy, policy.encode_prompt(PROMPTS[:1]), make_sampler("flow_ode"), policy.schedule(steps), guidance,
                      latents=noise, record=False).final


@pytest.mark.parametrize("experts", CHOICES)
def test_one_step_moves_exactly_the_chosen_experts_lora(experts):
    policy = experts_policy(experts, lora_scale=0.1)
    before = expert_tensors(policy)
    x, t, cond = crossing_batch(policy)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    policy.predict(x, t, cond, 4.5).square().mean().backward()
    optimizer.step()
    after = expert_tensors(policy)
    for name in ("transformer", "transformer_2"):
        lora = [n for n in after[name] if ".lora_A." in n or ".lora_B." in n]
        assert bool(lora) == (name in TRAINED[experts]), name  # LoRA only on the chosen experts
        assert all(not torch.equal(before[name][n], after[name][n]) for n in lora), name  # every LoRA tensor moved
        assert all(torch.equal(before[name][n], after[name][n]) for n in after[name] if n not in lora), name  # no base weight
    assert len(policy.trainable_parameters()) == sum(".lora_" in n for name in TRAINED[experts] for n in after[name])


@pytest.mark.parametrize("experts", CHOICES)
@pytest.mark.parametrize("high_noise", [True, False])
def test_a_batch_on_one_side_of_the_boundary_reaches_every_trained_tensor(experts, high_noise):
    """Rows all at one noise level: the expert with no rows (frozen or trained) does not change the output, yet a loss
    backpropagates to every trained tensor (0 for an expert that did nothing); before, a batch of frozen-expert steps
    left the loss without any gradient and backward failed."""
    policy = experts_policy(experts, lora_scale=0.1)
    x, t, cond = crossing_batch(policy)
    rows = [0, 1] if high_noise else [2, 3]
    with torch.no_grad():
        plain = policy.predict(x[rows], t[rows], cond.index(rows), 4.5)
    out = policy.predict(x[rows], t[rows], cond.index(rows), 4.5)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.square().mean().backward()
    params = dict(policy.trainable_module().named_parameters())
    assert all(p.grad is not None for p in params.values() if p.requires_grad)
    for n, p in params.items():
        if ".lora_B." in n:  # (A's gradient runs through B: nonzero where B is)
            on_high = n.startswith("high.") if experts == "both" else experts == "high"
            assert (p.grad.abs().sum() > 0) == (on_high == high_noise), n


@pytest.mark.parametrize("experts", CHOICES)
def test_a_fresh_lora_predicts_the_base(experts):
    """peft starts LoRA B at 0: right after add_lora every choice predicts exactly the base model, on both experts."""
    base = WanPolicy.tiny(two_experts=True)
    x, t, cond = crossing_batch(base)
    with torch.no_grad():
        expected = base.predict(x, t, cond, 4.5)
        policy = experts_policy(experts)
        torch.testing.assert_close(policy.predict(x, t, cond, 4.5), expected, rtol=0, atol=0)
        with policy.reference():
            torch.testing.assert_close(policy.predict(x, t, cond, 4.5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("experts", CHOICES)
def test_the_lora_loads_in_a_stock_wan22_pipeline_as_lora_usage_says(experts, tmp_path):
    """save_lora writes the high-noise expert's LoRA in the folder and the low-noise expert's in transformer_2/; the
    lines of `lora_usage`, run on a fresh stock WanPipeline, reproduce the policy's ODE (1e-5, float32, 4 steps across
    the boundary); policy.load_lora reads the folder back with the same experts."""
    policy = experts_policy(experts, lora_scale=0.2)
    policy.save_lora(tmp_path / "lora")
    files = sorted(str(f.relative_to(tmp_path / "lora")) for f in (tmp_path / "lora").rglob("*.safetensors"))
    assert files == sorted({"transformer": "pytorch_lora_weights.safetensors",
                            "transformer_2": "transformer_2/pytorch_lora_weights.safetensors"}[n] for n in TRAINED[experts])
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(3))
    ours = ode(policy, noise)
    stock = WanPolicy.tiny(two_experts=True).pipe
    kwargs = dict(prompt=PROMPTS[:1], latents=noise, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                  num_frames=9, output_type="latent", max_sequence_length=16)
    with torch.no_grad():
        base = stock(**kwargs).frames
        usage = policy.lora_usage(str(tmp_path / "lora"))
        exec(usage, {"pipe": stock})  # what the model card tells a user to run
        tuned = stock(**kwargs).frames
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the clip
    torch.testing.assert_close(tuned, ours, rtol=0, atol=1e-5)
    assert ("load_into_transformer_2=True" in usage) == (experts != "high")

    fresh = WanPolicy.tiny(two_experts=True)
    fresh.load_lora(tmp_path / "lora")
    assert fresh.experts == experts
    torch.testing.assert_close(ode(fresh, noise), ours, rtol=0, atol=1e-6)
    assert len(fresh.trainable_parameters()) == len(policy.trainable_parameters())


def test_a_low_noise_lora_is_not_loaded_into_the_high_noise_expert_by_mistake(tmp_path):
    """A plain `load_lora_weights(folder)` of a low-only LoRA finds no file (it is in transformer_2/), and a one-expert
    Wan refuses it."""
    experts_policy("low", lora_scale=0.2).save_lora(tmp_path / "lora")
    with pytest.raises(Exception, match="pytorch_lora_weights"):
        WanPolicy.tiny(two_experts=True).pipe.load_lora_weights(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="low-noise expert.*has one expert"):
        WanPolicy.tiny().load_lora(tmp_path / "lora")


def test_wan_experts_is_checked_before_any_model_loads(monkeypatch, tmp_path):
    import diffrl.pipelines.registry as registry

    for name, two in (("wan21", False), ("wan22", True)):  # model folders: the count is read from model_index.json
        WanPolicy.tiny(two_experts=two).pipeline().save_pretrained(tmp_path / name)
    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    counts = [expert_count(m) for m in ("tiny-wan", "tiny-wan22", "tiny-wan22-ti2v", str(tmp_path / "wan21"),
                                         str(tmp_path / "wan22"), str(tmp_path / "absent"))]
    assert counts == [1, 2, 1, 1, 2, None]
    with pytest.raises(ConfigError, match="'policy.wan_experts' low needs Wan2.2's two experts"):
        load_config(None, [*FAST, f"model={tmp_path / 'wan21'}", "policy.wan_experts=low"])
    assert load_config(None, [*FAST, f"model={tmp_path / 'wan22'}", "policy.wan_experts=low"]).policy.wan_experts == "low"
    for model in ("tiny-wan", "tiny-wan22-ti2v"):
        with pytest.raises(ConfigError, match=rf"'policy.wan_experts' low needs Wan2.2's two experts .*'{model}' has one"):
            load_config(None, [*FAST, f"model={model}", "policy.wan_experts=low"])
    with pytest.raises(ConfigError, match="'policy.wan_experts' both chooses among Wan2.2's two experts; 'tiny-sd3' is a sd3 model"):
        load_config(None, ["model=tiny-sd3", "policy.wan_experts=both"])
    with pytest.raises(ConfigError, match="'policy.wan_experts' is 'middle'; choose one of high, low, both"):
        load_config(None, [*FAST, "policy.wan_experts=middle"])
    assert load_config(None, [*FAST, "policy.wan_experts=both"]).policy.wan_experts == "both"
    with pytest.raises(ValueError, match="needs Wan2.2's two experts"):
        WanPolicy.tiny().set_trained_experts("both")


@pytest.mark.parametrize("experts,algorithm", [("high", "grpo"), ("low", "grpo"), ("both", "grpo"), ("both", "nft")])
def test_a_short_run_trains_the_chosen_experts(tmp_path, experts, algorithm):
    trainer = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", f"algorithm={algorithm}", "max_iterations=2",
                                         f"policy.wan_experts={experts}", "train.learning_rate=1e-2", "logging.save_every=2"]))
    policy = trainer.policy
    before = expert_tensors(policy)
    rows = trainer.train()
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    after = expert_tensors(policy)
    for name in ("transformer", "transformer_2"):
        lora = [n for n in after[name] if ".lora_A.default." in n or ".lora_B.default." in n]
        assert bool(lora) == (name in TRAINED[experts]), name
        assert all(not torch.equal(before[name][n], after[name][n]) for n in lora), name
        assert all(torch.equal(before[name][n], after[name][n]) for n in after[name] if ".lora_" not in n), name
    lora_dir = tmp_path / "checkpoints" / "iter_000002" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file() == (experts != "low")
    assert (lora_dir / "transformer_2" / "pytorch_lora_weights.safetensors").is_file() == (experts != "high")
    assert policy.lora_usage() in (lora_dir / "README.md").read_text()


# ---- Wan2.2 TI2V-5B as text-to-video ---------------------------------------------------------------------------
def test_ti2v_ode_and_decode_equal_the_stock_wan_pipeline():
    """The TI2V-5B layout: 48 latent channels at 1/16 of the frame (64 px -> 4 x 4), one expert, the transformer fed one
    timestep per latent token. Our ODE equals WanPipeline's latents (1e-5, float32) and our decode its frames (1e-5);
    the causal prefix decode holds for the Wan2.2 VAE too."""
    policy = WanPolicy.tiny(ti2v=True, resolution=64)
    assert not policy.two_experts and policy.pipe.config.expand_timesteps
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 48, 3, 4, 4)
    schedule = policy.schedule(4)
    assert policy.expert_of(schedule.timesteps).all()
    assert policy.model_timestep(schedule.timesteps[:2], noise).shape == (2, 3 * 2 * 2)  # frames x (4 / 2) x (4 / 2) tokens
    kwargs = dict(prompt=PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                  num_frames=9, max_sequence_length=16)
    with torch.no_grad():
        ours = sample(policy, policy.encode_prompt(PROMPTS), make_sampler("flow_ode"), schedule, 6.0, latents=noise,
                      record=False).final
        stock = policy.pipeline()(**kwargs, output_type="latent").frames
        torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
        video = policy.decode(ours)  # [2, 9, 3, 64, 64]
        torch.testing.assert_close(video, policy.pipeline()(**kwargs, output_type="pt").frames, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy.decode(ours, num_frames=5), video[:, :5], rtol=0, atol=1e-5)
    assert video.shape == (2, 9, 3, 64, 64)


def test_ti2v_trains_and_its_lora_loads_in_a_stock_pipeline(tmp_path):
    """A short GRPO run on tiny-wan22-ti2v, then its LoRA in a fresh stock pipeline samples what the policy samples."""
    trainer = Trainer(load_config(None, [*FAST, "model=tiny-wan22-ti2v", "policy.resolution=64", f"output_dir={tmp_path}",
                                         "max_iterations=1", "train.learning_rate=1e-2", "logging.save_every=1"]))
    assert load_policy("tiny-wan22-ti2v").latent_shape() == (48, 3, 2, 2)  # the tiny default, 32 px
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    assert math.isfinite(trainer.train()[0]["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    policy = trainer.policy
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(3))
    stock = WanPolicy.tiny(ti2v=True).pipe
    stock.load_lora_weights(str(tmp_path / "checkpoints" / "iter_000001" / "lora"))
    with torch.no_grad():
        theirs = stock(prompt=PROMPTS[:1], latents=noise, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                       num_frames=9, output_type="latent", max_sequence_length=16).frames
    torch.testing.assert_close(theirs, ode(policy, noise), rtol=0, atol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("experts", [pytest.param("high", marks=pytest.mark.slow),  # 12 s each on 2 cores:
                                     pytest.param("low", marks=pytest.mark.slow),   # one choice in the default suite
                                     "both"])
def test_two_processes_train_the_chosen_experts_in_step(tmp_path, experts):
    """DDP on the CPU (torchrun, gloo), one clip per micro-batch so that many batches hold one expert's steps only:
    the run ends (DDP's buffer broadcast at the start of a forward used to leave a process waiting for one that made
    fewer calls of the trained expert: a hang), and every trained tensor is identical on both processes and nonzero
    (LoRA B starts at 0, so it moved)."""
    from safetensors.torch import load_file
    from test_multiprocess import run_two_processes

    run_two_processes(tmp_path, "model=tiny-wan22", "reward=video_temporal", f"policy.wan_experts={experts}",
                      "train.train_batch_size=1")
    dumps = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    keys = [k for k in dumps[0] if k.startswith("param.")]
    assert len(keys) == 32 * len(TRAINED[experts])  # 2 layers x 2 attentions x 4 projections x (A, B) per expert
    assert all(torch.equal(dumps[0][k], dumps[1][k]) for k in keys)
    assert all(dumps[0][k].abs().sum() > 0 for k in keys)


def test_a_resumed_run_of_both_experts_continues_bit_for_bit(tmp_path):
    """Checkpoints hold both experts' LoRA tensors (by their names under WanExperts) and their optimiser state: two
    iterations straight equal one, then a resume for the second."""
    def run(out, iterations, *extra):
        trainer = Trainer(load_config(None, [*FAST, f"output_dir={out}", "policy.wan_experts=both", "logging.save_every=1",
                                             f"max_iterations={iterations}", "train.learning_rate=1e-2", *extra]))
        trainer.train()
        return trainer.policy.trainable_parameters()

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, f"resume={tmp_path / 'b'}")
    assert len(resumed) == 64 and all(torch.equal(a, b) for a, b in zip(straight, resumed))
    run(tmp_path / "c", 1, "policy.wan_experts=low")
    # same tensor names: only the record tells them apart; refused before the model loads (diffrl.checkpoint)
    with pytest.raises(ValueError, match=r"was made by a run with other settings \(policy\.wan_experts low -> high\)"):
        run(tmp_path / "c", 2, f"resume={tmp_path / 'c'}", "policy.wan_experts=high")


@pytest.mark.parametrize("experts", ["low", "both"])
def test_rl_guidance_mixes_the_chosen_experts(experts):
    """RLGuidedPolicy on a policy whose LoRA is on the low-noise expert or on both (through WanExperts, whose forward
    names the batch `hidden_states` as the experts do): w = 0 samples the base, w = 1 the tuned model, one forward or
    two."""
    from diffrl.guidance import RLGuidedPolicy

    policy = experts_policy(experts, lora_scale=0.2)
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(3))
    tuned = ode(policy, noise)
    with policy.reference():
        base = ode(policy, noise)
    assert (tuned - base).abs().max() > 1e-3
    for batched in (True, False):
        torch.testing.assert_close(ode(RLGuidedPolicy(policy, 0.0, batched=batched), noise), base, rtol=0, atol=1e-6)
        torch.testing.assert_close(ode(RLGuidedPolicy(policy, 1.0, batched=batched), noise), tuned, rtol=0, atol=1e-6)
