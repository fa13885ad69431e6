"""MotionPolicy (MDM-style text-to-motion): closed-form schedule and step log-probs on [B, T, 263] with
x0-prediction, parity with diffusers' DDIM / DDPM schedulers and with the stock MotionDiffusionPipeline, on-policy
ratio 1 when re-scoring, save / load and LoRA round trips (also into the stock pipeline), frame masking, and the
errors for wrong sizes. Reference values are computed here in float64 from the formulas, never by the code under
test."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffrl.pipelines.motion import MotionPolicy
from diffrl.pipelines.motion_model import MotionDiffusionPipeline, MotionTransformer
from diffrl.pipelines.registry import load_policy, resolve_family
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.trainers.base import Algorithm

PROMPTS = ["a person walks forward", "a person jumps twice"]
T_TRAIN = 1000
FRAMES = 24
D = 263
GUIDANCE = 2.5  # MDM's sampling guidance


def ref_alphas_cumprod() -> torch.Tensor:
    """The cosine schedule ("squaredcos_cap_v2") in float64: beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999),
    f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / T_TRAIN) / f(i / T_TRAIN), 0.999) for i in range(T_TRAIN)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)  # [T]


def make_policy(dtype=torch.float32, scheduler="ddpm", prediction_type="sample", normalised=True) -> MotionPolicy:
    """The tiny model; "ddim": SD's DDIM convention instead (steps_offset 1, set_alpha_to_one False, so every step
    is stochastic). `normalised`: a made-up, unequal data mean / std in the buffers."""
    policy = MotionPolicy.tiny(seed=0, dtype=dtype, num_frames=FRAMES, prediction_type=prediction_type)
    if scheduler == "ddim":
        policy.pipe.scheduler = DDIMScheduler.from_config(policy.pipe.scheduler.config, steps_offset=1,
                                                          set_alpha_to_one=False)
    if normalised:
        k = torch.arange(D, dtype=torch.float64)
        policy.denoiser.set_normalization(0.1 * torch.sin(k), 0.5 + 0.25 * (k % 5))
    return policy


@pytest.fixture(scope="module")
def policy32() -> MotionPolicy:
    return make_policy()


def stock_pipeline(policy: MotionPolicy, scheduler_cls) -> MotionDiffusionPipeline:
    """A stock pipeline over the policy's own modules, with a scheduler of `scheduler_cls` from its config."""
    pipe = policy.pipeline()
    return MotionDiffusionPipeline(transformer=pipe.transformer, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                   scheduler=scheduler_cls.from_config(pipe.scheduler.config),
                                   default_frames=pipe.config.default_frames)


def ode(policy, noise, n=6):
    with torch.no_grad():
        traj = sample(policy, policy.encode_prompt(PROMPTS), make_sampler("ddim", eta=0.0), policy.schedule(n), GUIDANCE,
                      latents=noise, record=False)
    return policy.decode(traj.final)  # [B, T, D]


def x0_and_eps(policy, x, t, a_t, cond):
    """The guided prediction as (x0, eps) in float64, whichever the model outputs."""
    with torch.no_grad():
        out = policy.predict(x, t.expand(x.shape[0]), cond, GUIDANCE).double()  # [B, T, D]
    x = x.double()
    if policy.prediction_type == "sample":
        return out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    return (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out


# ---- schedule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 50])
def test_schedule_is_the_ddpm_timesteps_with_the_cosine_alphas(n):
    """A DDPMScheduler config: timesteps (n - 1 - i) * T // n, alpha_cumprod of the cosine schedule there, and the
    last step lands on alpha 1 (t = 0's previous step, DDPM's clean sample)."""
    sched = make_policy(normalised=False).schedule(n)
    timesteps = torch.arange(n - 1, -1, -1) * (T_TRAIN // n)  # [N]
    ac = ref_alphas_cumprod()
    expected = torch.cat([ac[timesteps], torch.ones(1, dtype=torch.float64)])  # [N + 1]
    assert sched.kind == "ddim" and torch.equal(sched.timesteps, timesteps)
    torch.testing.assert_close(sched.alphas_cumprod.double(), expected, atol=2e-6, rtol=0)  # float32 cumprod
    assert float(sched.alphas_cumprod[-1]) == 1.0


def test_a_ddpm_scheduler_ends_on_alpha_one_whatever_its_config_carries():
    """A DDPMScheduler made from SD's DDIM config keeps set_alpha_to_one False (and steps_offset 1) in its config;
    DDPMScheduler.step still uses alpha_prev 1 once t - T // n < 0, so the schedule ends on 1, the rest being
    alpha_cumprod at timesteps (n - 1 - i) T // n + 1. (The config's _class_name, once read to tell, is absent
    from a scheduler built in memory.)"""
    policy = make_policy(normalised=False)
    sd_style = DDIMScheduler.from_config(policy.pipe.scheduler.config, steps_offset=1, set_alpha_to_one=False)
    policy.pipe.scheduler = DDPMScheduler.from_config(sd_style.config)
    assert policy.pipe.scheduler.config.set_alpha_to_one is False
    n = 4
    sched = policy.schedule(n)
    timesteps = torch.arange(n - 1, -1, -1) * (T_TRAIN // n) + 1  # [N]
    assert torch.equal(sched.timesteps, timesteps) and float(sched.alphas_cumprod[-1]) == 1.0
    torch.testing.assert_close(sched.alphas_cumprod[:-1].double(), ref_alphas_cumprod()[timesteps], atol=2e-6, rtol=0)


# ---- step log-probs against the Gaussian posterior ---------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_log_probs_are_the_posterior_gaussian(scheduler, eta, prediction_type):
    """float64 end to end, CFG 2.5, [2, 24, 263]. eta 1: each recorded log-prob is the mean over elements of
    log N(x_prev; mu, beta~_t), mu the DDPM posterior mean from the x0 prediction; a step to alpha 1 (DDPM's last)
    is deterministic and recorded without log-prob. eta 0: no log-probs, x_prev = sqrt(a') x0 + sqrt(1 - a') eps."""
    policy = make_policy(torch.float64, scheduler, prediction_type)
    n = 5
    sched = policy.schedule(n)
    cond = policy.encode_prompt(PROMPTS)
    noise = policy.initial_noise(len(PROMPTS), torch.Generator().manual_seed(1))
    assert noise.shape == (2, FRAMES, D) and noise.dtype == torch.float64
    with torch.no_grad():
        traj = sample(policy, cond, make_sampler("ddim", eta=eta), sched, GUIDANCE, latents=noise,
                      generator=torch.Generator().manual_seed(2))
    stochastic = list(range(n - 1)) if scheduler == "ddpm" else list(range(n))  # DDPM's last step: alpha_prev 1
    if eta == 0:
        assert traj.log_probs is None
    else:
        assert traj.steps.tolist() == stochastic and traj.log_probs.dtype == torch.float64
    alphas = sched.alphas_cumprod.double()
    zs = []
    for i in range(n):
        x, x_prev = traj.latents[:, i], traj.latents[:, i + 1]  # [B, T, D]
        a_t, a_prev = alphas[i], alphas[i + 1]
        x0, eps = x0_and_eps(policy, x, sched.timesteps[i], a_t, cond)
        if eta == 0 or i not in stochastic:
            torch.testing.assert_close(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-12, rtol=1e-12)
            continue
        alpha_step = a_t / a_prev  # one-step alpha between the two timesteps
        mean = (a_prev.sqrt() * (1 - alpha_step) * x0 + alpha_step.sqrt() * (1 - a_prev) * x) / (1 - a_t)  # [B, T, D]
        var = (1 - a_prev) / (1 - a_t) * (1 - alpha_step)  # beta~_t
        elem = -((x_prev - mean) ** 2) / (2 * var) - 0.5 * var.log() - 0.5 * math.log(2 * math.pi)  # [B, T, D]
        torch.testing.assert_close(traj.log_probs[:, stochastic.index(i)], elem.mean(dim=(1, 2)), atol=1e-10, rtol=0)
        zs.append(((x_prev - mean) / var.sqrt()).flatten())
    if zs:  # the drawn noise is standard normal
        z = torch.cat(zs)
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


# ---- our step against diffusers' DDIMScheduler.step / DDPMScheduler.step --------------------------------
def _float64(scheduler):
    """A diffusers scheduler computing in float64 from its own (float32-built) alpha products."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def test_steps_equal_diffusers_ddim_and_ddpm_steps():
    """x0-prediction, float64: our eta-0 step equals DDIMScheduler.step, our eta-1 step equals DDPMScheduler.step
    (posterior mean + sqrt(beta~_t) z) for two noise draws, which pins both its mean and its variance; the last
    step (t = 0) adds no noise in both."""
    policy = make_policy(torch.float64, normalised=False)
    config = policy.pipe.scheduler.config
    n = 5
    sched = policy.schedule(n)
    ddim = _float64(DDIMScheduler.from_config(config))
    ddpm = _float64(DDPMScheduler.from_config(config))
    ddim.set_timesteps(n)
    ddpm.set_timesteps(n)
    assert torch.equal(ddim.timesteps, sched.timesteps) and torch.equal(ddpm.timesteps, sched.timesteps)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x = torch.randn(2, FRAMES, D, dtype=torch.float64, generator=gen)  # [B, T, D]
        x0 = torch.randn(2, FRAMES, D, dtype=torch.float64, generator=gen)  # [B, T, D]: a model's x0 prediction
        ours = make_sampler("ddim", eta=0.0).step(sched, i, x, x0, prediction_type="sample").prev_sample
        theirs = ddim.step(x0, t, x, eta=0.0, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
        for seed in (3, 4):
            ours = make_sampler("ddim", eta=1.0).step(sched, i, x, x0, prediction_type="sample",
                                                      generator=torch.Generator().manual_seed(seed)).prev_sample
            theirs = ddpm.step(x0, t, x, generator=torch.Generator().manual_seed(seed), return_dict=False)[0]
            torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


# ---- the rollout loop against the stock pipeline -----------------------------------------------------
def test_ddim_rollout_reproduces_the_stock_pipeline(policy32):
    """Our loop with the eta-0 DDIM sampler, CFG 2.5, 6 steps, then decode, equals MotionDiffusionPipeline.__call__
    with a DDIMScheduler from the same latents (float32), de-normalised by the stored mean / std."""
    noise = policy32.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    ours = ode(policy32, noise)
    stock = stock_pipeline(policy32, DDIMScheduler)(PROMPTS, num_inference_steps=6, guidance_scale=GUIDANCE,
                                                    latents=noise).motions
    assert ours.shape == (2, FRAMES, D)
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=1e-6)
    normalised = stock_pipeline(policy32, DDIMScheduler)(PROMPTS, num_inference_steps=6, guidance_scale=GUIDANCE,
                                                         latents=noise, output_type="normalized").motions
    mean, std = policy32.denoiser.feature_mean, policy32.denoiser.feature_std
    torch.testing.assert_close(stock, normalised * std + mean, atol=1e-6, rtol=1e-6)
    assert float((stock - normalised).abs().max()) > 0.1  # the normalisation is not the identity here


def test_ancestral_rollout_reproduces_the_stock_ddpm_pipeline(policy32):
    """eta 1 on the DDPM config's timesteps with the same generator draws the same noise as DDPMScheduler.step,
    step for step (none at t = 0 in either), so the samples agree (float32)."""
    noise = policy32.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sample(policy32, policy32.encode_prompt(PROMPTS), make_sampler("ddim", eta=1.0), policy32.schedule(6),
                      GUIDANCE, latents=noise, generator=torch.Generator().manual_seed(5), record=False)
    stock = stock_pipeline(policy32, DDPMScheduler)(PROMPTS, num_inference_steps=6, guidance_scale=GUIDANCE,
                                                    latents=noise, generator=torch.Generator().manual_seed(5)).motions
    torch.testing.assert_close(policy32.decode(traj.final), stock, atol=1e-5, rtol=1e-5)


# ---- GRPO's on-policy ratio ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_rescoring_a_rollout_gives_its_log_probs(dtype, tol):
    """The trainers' `Algorithm.rescore` on stored transitions gives the rollout's log-probs (ratio 1), although the
    rollout ran 4 samples at once with CFG and re-scoring runs 2 rows at a time at shuffled, per-row steps."""
    policy = make_policy(dtype)
    policy.add_lora(rank=4, alpha=8)
    prompts = PROMPTS * 2
    cond = policy.encode_prompt(prompts)
    sampler = make_sampler("ddim", eta=1.0)
    with torch.no_grad():
        noise = policy.initial_noise(4, torch.Generator().manual_seed(0))
        traj = sample(policy, cond, sampler, policy.schedule(4), GUIDANCE, latents=noise,
                      generator=torch.Generator().manual_seed(1))
    B, W = traj.log_probs.shape
    assert (B, W) == (4, 3)  # the last DDPM step is deterministic
    trainer = SimpleNamespace(policy=policy, sampler=sampler, accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
                              cfg=SimpleNamespace(sampling=SimpleNamespace(guidance_scale=GUIDANCE)), cfg_gradient="both")
    batch = SimpleNamespace(trajectory=traj, cond=cond)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(B, generator=gen)
    with torch.no_grad():
        for start in range(0, B, 2):
            rows = order[start : start + 2]
            cols = torch.randint(0, W, (2,), generator=gen)
            new = Algorithm.rescore(trainer, batch, rows, traj.steps[cols]).log_prob  # [2]
            ratio = torch.exp(new - traj.log_probs[rows, cols])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=tol, rtol=0)


# ---- save / load, LoRA -----------------------------------------------------------------------------------
def test_saved_folder_loads_offline_with_its_normalisation(policy32, tmp_path):
    """save_pretrained -> load_policy(folder) (the family read from model_index.json) and the stock
    MotionDiffusionPipeline.from_pretrained (offline): the same denoiser class, mean / std, default length and
    samples."""
    policy32.pipeline().save_pretrained(tmp_path)
    assert resolve_family(str(tmp_path)) == "motion"
    loaded = load_policy(str(tmp_path))
    assert isinstance(loaded.denoiser, MotionTransformer) and loaded.num_frames == FRAMES
    assert torch.equal(loaded.denoiser.feature_std, policy32.denoiser.feature_std)
    assert torch.equal(loaded.denoiser.feature_mean, policy32.denoiser.feature_mean)
    noise = policy32.initial_noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(ode(loaded, noise), ode(policy32, noise))
    stock = MotionDiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(stock.transformer) is MotionTransformer
    assert torch.equal(stock.transformer.feature_std, policy32.denoiser.feature_std)


def test_lora_round_trip_and_stock_pipeline_load(tmp_path):
    """A LoRA with alpha != rank and perturbed B: save_lora -> load_lora into a fresh model gives identical samples,
    and the stock pipeline, loading the file with the model-level API exactly as `lora_usage` says, samples the
    same; the LoRA changes the samples (the test is not vacuous); another family's LoRA card is refused."""
    policy = make_policy()
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    base = ode(policy, noise)
    policy.add_lora(rank=4, alpha=8)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    tuned = ode(policy, noise)
    assert float((tuned - base).abs().max()) > 1e-3
    policy.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    fresh = make_policy()
    fresh.load_lora(tmp_path / "lora")
    assert fresh.has_lora and all(".lora_" in n for n, p in fresh.denoiser.named_parameters() if p.requires_grad)
    torch.testing.assert_close(ode(fresh, noise), tuned, atol=1e-6, rtol=1e-6)

    stock = stock_pipeline(make_policy(), DDIMScheduler)
    usage = fresh.lora_usage(str(tmp_path / "lora"))
    assert usage.startswith("pipe.transformer.load_lora_adapter(")
    eval(usage, {"pipe": stock})  # noqa: S307 - the documented line, run as a user would
    motions = stock(PROMPTS, num_inference_steps=6, guidance_scale=GUIDANCE, latents=noise).motions
    torch.testing.assert_close(motions, tuned, atol=1e-6, rtol=1e-6)

    (tmp_path / "lora" / "README.md").write_text("---\nbase_model: tiny-sd\nfamily: sd\n---\n")
    with pytest.raises(ValueError, match="a sd model"):
        make_policy().load_lora(tmp_path / "lora")


# ---- the denoiser: masking, checkpointing, sizes ----------------------------------------------------------
@pytest.fixture(scope="module")
def transformer64() -> MotionTransformer:
    torch.manual_seed(0)
    return MotionTransformer(feature_dim=D, latent_dim=32, num_layers=2, num_heads=4, ff_dim=64, text_dim=16,
                             max_frames=40, dropout=0.0).double().eval()


def test_padded_frames_neither_leak_nor_output(transformer64):
    """With frame_mask, the valid frames' output does not depend on the padded frames (two fillings) and equals
    the output of the clip cut to its length; the output on padded frames is exactly 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, D, dtype=torch.float64, generator=gen)  # [B, T, D]
    text = torch.randn(2, 16, dtype=torch.float64, generator=gen)  # [B, C]
    t = torch.tensor([10, 700])
    lengths = torch.tensor([20, 12])
    mask = torch.arange(20)[None] < lengths[:, None]  # [B, T]
    other = torch.where(mask[..., None], x, 1e3 * torch.randn(x.shape, dtype=torch.float64, generator=gen))
    with torch.no_grad():
        out = transformer64(x, t, text, frame_mask=mask).sample  # [B, T, D]
        out_other = transformer64(other, t, text, frame_mask=mask).sample
        cut = transformer64(x[1:, :12], t[1:], text[1:]).sample  # [1, 12, D]
    torch.testing.assert_close(out[mask], out_other[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1, :12], cut[0], atol=1e-12, rtol=0)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(out_other[~mask], torch.zeros_like(out_other[~mask]))


def test_gradient_checkpointing_gives_the_same_gradients(transformer64):
    """Checkpointed blocks recompute activations in backward: the same loss gradients (float64)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, D, dtype=torch.float64, generator=gen)
    text = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    mask = torch.arange(10)[None] < torch.tensor([[10], [6]])

    def grads():
        transformer64.zero_grad()
        transformer64(x, torch.tensor([3, 500]), text, frame_mask=mask).sample.square().sum().backward()
        return [p.grad.clone() for p in transformer64.parameters()]

    plain = grads()
    transformer64.enable_gradient_checkpointing()
    try:
        checkpointed = grads()
    finally:
        transformer64.disable_gradient_checkpointing()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_sizes_are_checked_with_clear_errors(transformer64, policy32):
    text = torch.zeros(1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"41 frames .* max_frames=40"):
        transformer64(torch.zeros(1, 41, D, dtype=torch.float64), torch.tensor([1]), text)
    with pytest.raises(ValueError, match=r"feature_dim=263"):
        transformer64(torch.zeros(1, 8, 67, dtype=torch.float64), torch.tensor([1]), text)
    with pytest.raises(ValueError, match=r"'num_frames' must be in 1\.\.196"):
        MotionPolicy.tiny(num_frames=197)
    with pytest.raises(ValueError, match=r"num_frames must be in 1\.\.196"):
        policy32.pipeline()(PROMPTS, num_frames=197, num_inference_steps=1)
    with pytest.raises(ValueError, match="no resolution"):
        load_policy("tiny-motion", resolution=32)
    with pytest.raises(ValueError, match="no resolution"):
        load_policy("tiny-motion", height=64, width=64)
    assert load_policy("tiny-motion", num_frames=60).initial_noise(1).shape == (1, 60, D)
    with pytest.raises(ValueError, match="use 'sdpa'"):
        policy32.set_attention_backend("flash")
