"""RL guidance (diffrl.guidance): the maths against independent computations, the policy wrapper in the
rollout loop (ODE and SDE), the plugin on stock diffusers pipelines against `diffrl sample`, the per-step
cost, `diffrl eval`, the sweep script and the README example. Tiny random models, 32 px, few steps.

References: the stock `StableDiffusion3Pipeline` / `StableDiffusionPipeline` / `FluxPipeline.__call__`
with a LoRA from `pipe.load_lora_weights` (tuned) and `pipe.disable_lora()` or no LoRA (base); the raw
denoiser module called branch by branch in float64 for the CFG-then-mix formula of docs/algorithms.md.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl import cli
from diffrl.benchmarks.evaluate import generate, load_png, to_uint8
from diffrl.guidance import GuidanceSchedule, RLGuidedPolicy, rl_guidance
from diffrl.pipelines.flux import FluxPolicy
from diffrl.pipelines.registry import load_policy
from diffrl.pipelines.sd import StableDiffusionPolicy
from diffrl.pipelines.sd3 import SD3Policy
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.runtime import derive_generator

FAMILIES = {"sd3": SD3Policy, "sd": StableDiffusionPolicy, "flux": FluxPolicy}
GUIDANCE = {"sd3": 4.5, "sd": 5.0, "flux": 3.5}  # CFG for sd3 / sd, the distilled guidance embedding for flux
FIRST_LAYER = {"sd3": "pos_embed", "sd": "conv_in", "flux": "x_embedder"}  # runs once per network forward
PROMPTS = ["a red circle and a blue square", "two green triangles"]
STEPS = 3


def perturb_lora(policy, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def tuned_policy(family, dtype=torch.float32):
    """The tiny policy of `family` (weights seed 0, as `diffrl sample --model tiny-<family>`) with a random LoRA."""
    policy = FAMILIES[family].tiny(seed=0, dtype=dtype)
    policy.add_lora(rank=4, alpha=8)
    perturb_lora(policy)
    return policy


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Per family: the LoRA policy and its saved diffusers LoRA folder."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for family in FAMILIES:
        policy = tuned_policy(family)
        policy.save_lora(root / family)
        out[family] = (policy, root / family)
    return out


def stock_pipe(family, lora_dir=None):
    """A fresh stock diffusers pipeline of the tiny model, with the LoRA loaded by diffusers' own loader."""
    pipe = load_policy(f"tiny-{family}", resolution=32).pipeline()
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe


def pipe_images(pipe, family, seeds, prompts=PROMPTS, steps=STEPS):
    """pipe(...) one image per (prompt, seed), with the seeds' generators: [B, 3, H, W] in [0, 1]."""
    extra = {} if family == "sd" else {"max_sequence_length": 32}  # the tiny policies' T5 length
    return torch.cat([
        pipe(prompt=p, generator=derive_generator(s), num_inference_steps=steps, guidance_scale=GUIDANCE[family],
             height=32, width=32, output_type="pt", **extra).images
        for p, s in zip(prompts, seeds)
    ])


def count_forwards(net, family):
    """Batch sizes of every network forward of `net` (a hook on its first layer); returns the list."""
    sizes: list[int] = []
    getattr(net, FIRST_LAYER[family]).register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    return sizes


# ---- the weight schedule ----------------------------------------------------------------------------
def test_schedule_weights_by_hand():
    assert GuidanceSchedule(1.5).weights(4) == [1.5] * 4
    assert GuidanceSchedule(1.5).constant and not GuidanceSchedule(1.5, skip_steps=1).constant
    assert GuidanceSchedule(2.0, start_scale=0.5, skip_steps=1).weights(5) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert GuidanceSchedule(1.0, start_scale=3.0).weights(3) == [3.0, 2.0, 1.0]  # a ramp down
    assert GuidanceSchedule(2.0, skip_steps=2, skip_scale=1.0).weights(4) == [1.0, 1.0, 2.0, 2.0]
    assert GuidanceSchedule(2.0, start_scale=0.0, skip_steps=4).weights(5) == [0.0] * 4 + [2.0]
    with pytest.raises(ValueError, match="skip_steps"):
        GuidanceSchedule(1.0, skip_steps=-1)
    with pytest.raises(ValueError, match="finite"):
        GuidanceSchedule(float("nan"))
    with pytest.raises(ValueError, match="outside"):
        GuidanceSchedule(1.0).weight(3, 3)


# ---- the maths, against the raw denoiser in float64 ----------------------------------------------------
def raw_output(policy, family, x, t, cond, branch):
    """One unguided denoiser call on one branch ("cond" / "uncond"), written out against the module."""
    emb = getattr(cond, branch)
    net = policy.trainable_module()
    if family == "sd3":
        return net(hidden_states=x, timestep=t, encoder_hidden_states=emb["encoder_hidden_states"],
                   pooled_projections=emb["pooled_projections"], return_dict=False)[0]
    return net(x, t, encoder_hidden_states=emb["encoder_hidden_states"], return_dict=False)[0]  # sd UNet


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_cfg_is_applied_to_each_model_before_mixing(family):
    """v = CFG(base) + w (CFG(tuned) - CFG(base)), each CFG from separate uncond / cond calls (float64)."""
    policy = tuned_policy(family, torch.float64)
    g, w = GUIDANCE[family], 1.7
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))  # [B, C, h, w]
    t = policy.schedule(STEPS).timesteps[1].expand(2)  # [B]
    with torch.no_grad():
        def cfg():
            u, c = (raw_output(policy, family, x, t, cond, b) for b in ("uncond", "cond"))
            return u + g * (c - u)  # [B, C, h, w]

        v_rl = cfg()
        with policy.reference():
            v_ref = cfg()
        expected = v_ref + w * (v_rl - v_ref)
        for batched in (True, False):
            got = RLGuidedPolicy(policy, w, batched=batched).predict(x, t, cond, g)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        # mixing the raw branches first and guiding after is the same (CFG is affine): the plugin's premise
        mixed = {b: None for b in ("uncond", "cond")}
        for b in mixed:
            tuned_b = raw_output(policy, family, x, t, cond, b)
            with policy.reference():
                base_b = raw_output(policy, family, x, t, cond, b)
            mixed[b] = base_b + w * (tuned_b - base_b)
        torch.testing.assert_close(mixed["uncond"] + g * (mixed["cond"] - mixed["uncond"]), expected, rtol=0, atol=1e-10)
        assert (v_rl - v_ref).abs().max() > 1e-2  # the LoRA matters


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guided_output_is_affine_in_w(family):
    policy = tuned_policy(family, torch.float64)
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    t = policy.schedule(STEPS).timesteps[1].expand(2)
    g = GUIDANCE[family]
    with torch.no_grad():
        tuned = policy.predict(x, t, cond, g)
        with policy.reference():
            base = policy.predict(x, t, cond, g)
        v = {w: RLGuidedPolicy(policy, w).predict(x, t, cond, g) for w in (0.0, 1.0, 0.5, 1.5, 3.0)}
    assert torch.equal(v[0.0], base) and torch.equal(v[1.0], tuned)  # exactly the two models
    # three values on one line: equal slopes, and the slope is tuned - base
    slope_a = (v[1.5] - v[0.5]) / 1.0
    slope_b = (v[3.0] - v[0.5]) / 2.5
    torch.testing.assert_close(slope_a, slope_b, rtol=0, atol=1e-10)
    torch.testing.assert_close(slope_a, tuned - base, rtol=0, atol=1e-10)
    torch.testing.assert_close(v[1.5], base + 1.5 * (tuned - base), rtol=0, atol=1e-10)


def test_a_separate_base_denoiser():
    """Two denoisers: the policy holds the tuned weights, base_denoiser the base; same result as LoRA on/off."""
    policy = tuned_policy("sd3", torch.float64)
    base_net = copy.deepcopy(policy.trainable_module())
    with torch.no_grad():
        base_net.disable_adapters()
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    t = policy.schedule(STEPS).timesteps[0].expand(2)
    with torch.no_grad():
        two = RLGuidedPolicy(policy, 2.0, base_denoiser=base_net).predict(x, t, cond, 4.5)
        one = RLGuidedPolicy(policy, 2.0).predict(x, t, cond, 4.5)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-10)


# ---- the policy wrapper in the rollout loop -------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["flow_ode", "flow_sde"])
def test_rollout_w0_is_the_base_and_w1_the_tuned_model(sampler):
    policy = tuned_policy("sd3")
    cond = policy.encode_prompt(PROMPTS)
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))

    def run(p):
        s = make_sampler(sampler, noise_level=0.7)
        with torch.no_grad():
            return sample(p, cond, s, p.schedule(STEPS), 4.5, latents=noise, generator=torch.Generator().manual_seed(5))

    tuned, mid = run(policy), run(RLGuidedPolicy(policy, 0.5))
    with policy.reference():
        base = run(policy)
    assert torch.equal(run(RLGuidedPolicy(policy, 0.0)).latents, base.latents)
    assert torch.equal(run(RLGuidedPolicy(policy, 1.0)).latents, tuned.latents)
    if sampler == "flow_sde":  # the wrapper is a full policy for the stochastic sampler: log-probs come along
        assert mid.log_probs.shape == (2, STEPS) and torch.isfinite(mid.log_probs).all()
    assert (mid.final - base.final).abs().max() > 1e-3 and (mid.final - tuned.final).abs().max() > 1e-3


def test_policy_schedule_reads_the_step_from_the_timestep():
    """skip 1 step then w = 2: step 0 is the base model's prediction, step 1 the w = 2 mix."""
    policy = tuned_policy("sd3")
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    guided = RLGuidedPolicy(policy, GuidanceSchedule(2.0, skip_steps=1))
    with pytest.raises(RuntimeError, match="schedule"):
        guided.predict(x, torch.full([2], 1000.0), cond, 4.5)  # no schedule(n) yet
    ts = guided.schedule(STEPS).timesteps
    with torch.no_grad():
        tuned = [policy.predict(x, t.expand(2), cond, 4.5) for t in ts[:2]]
        with policy.reference():
            base = [policy.predict(x, t.expand(2), cond, 4.5) for t in ts[:2]]
        assert torch.equal(guided.predict(x, ts[0].expand(2), cond, 4.5), base[0])
        torch.testing.assert_close(guided.predict(x, ts[1].expand(2), cond, 4.5), 2 * tuned[1] - base[1], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="not a step"):
            guided.predict(x, torch.full([2], 1.234), cond, 4.5)


# ---- the diffusers plugin -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plugin_w0_and_w1_reproduce_the_base_and_tuned_pipelines(loras, family):
    _, lora_dir = loras[family]
    seeds = [0, 1]
    base = pipe_images(stock_pipe(family), family, seeds)  # a pipeline that never saw the LoRA
    pipe = stock_pipe(family, lora_dir)
    tuned = pipe_images(pipe, family, seeds)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA matters
    with rl_guidance(pipe, scale=0.0):
        assert torch.equal(pipe_images(pipe, family, seeds), base)
    with rl_guidance(pipe, scale=1.0):
        assert torch.equal(pipe_images(pipe, family, seeds), tuned)
    net = pipe.unet if family == "sd" else pipe.transformer
    assert "forward" not in net.__dict__ and "step" not in pipe.scheduler.__dict__  # removed on exit
    assert torch.equal(pipe_images(pipe, family, seeds), tuned)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plugin_gives_the_images_of_diffrl_sample(loras, family, tmp_path):
    _, lora_dir = loras[family]
    schedule = ["--rlg-start-scale", "0.5", "--rlg-skip-steps", "1"] if family == "sd3" else []
    code = cli.main(["sample", "--model", f"tiny-{family}", "--lora", str(lora_dir), "--rlg-scale", "1.5", *schedule,
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", str(STEPS), "--resolution", "32",
                     "--guidance-scale", str(GUIDANCE[family]), "--device", "cpu", "--output-dir", str(tmp_path)])
    assert code == 0
    meta = json.loads((tmp_path / "samples.json").read_text())
    assert meta["rlg_scale"] == 1.5 and meta["lora"] == str(lora_dir)
    ours = torch.stack([load_png(tmp_path / s["file"]) for s in meta["samples"]]).int()  # [2, 3, H, W] uint8
    seeds = [s["seed"] for s in meta["samples"]]

    pipe = stock_pipe(family, lora_dir)
    w = GuidanceSchedule(1.5, start_scale=0.5, skip_steps=1) if family == "sd3" else 1.5
    with rl_guidance(pipe, w):
        theirs = to_uint8(pipe_images(pipe, family, seeds)).int()
    assert (ours - theirs).abs().max() <= 1  # 8-bit rounding of float noise between the two loops
    tuned, base = (to_uint8(pipe_images(p, family, seeds)).int() for p in (pipe, stock_pipe(family)))
    assert (ours - tuned).abs().max() > 3 and (ours - base).abs().max() > 3  # neither endpoint


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_step_cost_is_two_guided_evaluations_in_one_batch(loras, family):
    """Per step with 0 < w != 1: ONE forward of twice the pipeline's batch (2 prompts x [uncond, cond] for
    CFG -> 8 rows; FLUX has no CFG batch -> 4). Unbatched: two forwards. A skipped step: one, base only."""
    _, lora_dir = loras[family]
    pipe = stock_pipe(family, lora_dir)
    net = pipe.unet if family == "sd" else pipe.transformer
    sizes = count_forwards(net, family)
    rows = 2 * (1 if family == "flux" else 2)  # what the pipeline sends per call (2 prompts)
    with rl_guidance(pipe, 1.5):
        pipe_images(pipe, family, [0], prompts=[PROMPTS], steps=STEPS)
    assert sizes == [2 * rows] * STEPS
    sizes.clear()
    with rl_guidance(pipe, 1.5, batched=False):
        pipe_images(pipe, family, [0], prompts=[PROMPTS], steps=STEPS)
    assert sizes == [rows] * (2 * STEPS)
    sizes.clear()
    with rl_guidance(pipe, GuidanceSchedule(1.5, skip_steps=1)):
        pipe_images(pipe, family, [0], prompts=[PROMPTS], steps=STEPS)
    assert sizes == [rows] + [2 * rows] * (STEPS - 1)


def test_per_step_cost_with_a_separate_base_denoiser(loras):
    _, lora_dir = loras["sd3"]
    pipe = stock_pipe("sd3", lora_dir)
    base_net = stock_pipe("sd3").transformer
    tuned_sizes, base_sizes = count_forwards(pipe.transformer, "sd3"), count_forwards(base_net, "sd3")
    with rl_guidance(pipe, 1.5, base=base_net):
        two = pipe_images(pipe, "sd3", [0], prompts=[PROMPTS])
    assert tuned_sizes == base_sizes == [4] * STEPS  # one guided evaluation each per step
    with rl_guidance(pipe, 1.5):
        one = pipe_images(pipe, "sd3", [0], prompts=[PROMPTS])
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)


def test_rollout_cost_is_one_doubled_forward_per_step():
    policy = tuned_policy("sd3")
    sizes = count_forwards(policy.trainable_module(), "sd3")
    guided = RLGuidedPolicy(policy, 1.5)
    with torch.no_grad():
        sample(guided, policy.encode_prompt(PROMPTS), make_sampler("flow_ode"), guided.schedule(STEPS), 4.5,
               latents=policy.initial_noise(2, torch.Generator().manual_seed(0)))
    assert sizes == [8] * STEPS  # 2 prompts x [uncond, cond] x [tuned, base]


def test_plugin_refuses_what_it_cannot_do_exactly(loras):
    with pytest.raises(ValueError, match="no LoRA"):
        rl_guidance(stock_pipe("sd3"), 1.5)
    pipe = stock_pipe("sd", loras["sd"][1])
    with rl_guidance(pipe, 1.5):
        with pytest.raises(RuntimeError, match="already on"):
            rl_guidance(pipe, 2.0)
        with pytest.raises(ValueError, match="guidance_rescale"):
            pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, guidance_rescale=0.7)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), pipe.text_encoder)
    with pytest.raises(ValueError, match="text_encoder carries a LoRA"):
        rl_guidance(pipe, 1.5)


def test_plugin_scale_can_change_between_calls(loras):
    pipe = stock_pipe("sd3", loras["sd3"][1])
    guidance = rl_guidance(pipe, 0.0)  # without `with`: on until remove()
    base = pipe_images(pipe, "sd3", [0], prompts=PROMPTS[:1])
    guidance.schedule = 1.0
    tuned = pipe_images(pipe, "sd3", [0], prompts=PROMPTS[:1])
    guidance.remove()
    assert torch.equal(tuned, pipe_images(pipe, "sd3", [0], prompts=PROMPTS[:1]))
    assert (tuned - base).abs().max() > 1e-2


# ---- the command line, the sweep, the README ------------------------------------------------------------
def test_cli_rlg_needs_a_lora(tmp_path, capsys):
    assert cli.main(["sample", "--prompt", "x", "--rlg-scale", "1.5", "--output-dir", str(tmp_path)]) == 2
    assert "--rlg-scale needs --lora" in capsys.readouterr().err
    assert cli.main(["sample", "--prompt", "x", "--rlg-skip-steps", "2", "--output-dir", str(tmp_path)]) == 2
    assert "need --rlg-scale" in capsys.readouterr().err


def test_eval_accepts_rlg_options_and_matches_sample(loras, tmp_path):
    _, lora_dir = loras["sd3"]
    common = ["--model", "tiny-sd3", "--lora", str(lora_dir), "--rlg-scale", "2", "--rlg-skip-steps", "1",
              "--steps", "2", "--resolution", "32", "--device", "cpu"]
    assert cli.main(["eval", *common, "--prompts", "builtin:toy_eval", "--num-prompts", "1", "--images-per-prompt", "1",
                     "--rewards", "brightness", "--output-dir", str(tmp_path / "e")]) == 0
    settings = json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]
    assert settings["rlg_scale"] == 2.0 and settings["rlg_skip_steps"] == 1
    from diffrl.data import load_prompts

    prompt = load_prompts("builtin:toy_eval").prompts[0]
    assert cli.main(["sample", *common, "--prompt", prompt, "--output-dir", str(tmp_path / "s")]) == 0
    assert torch.equal(load_png(tmp_path / "e" / "images" / "0000_00.png"), load_png(tmp_path / "s" / "0000_00.png"))
    # a resume with another w is refused instead of mixing images of two settings
    assert cli.main(["eval", *common[:5], "3", *common[6:], "--prompts", "builtin:toy_eval", "--num-prompts", "1",
                     "--images-per-prompt", "1", "--rewards", "brightness", "--output-dir", str(tmp_path / "e")]) == 2


def test_sweep_script_on_a_tiny_setting(loras, tmp_path):
    from diffrl.benchmarks import rl_guidance as sweep

    _, lora_dir = loras["sd3"]
    out = tmp_path / "sweep"
    assert sweep.main(["--model", "tiny-sd3", "--lora", str(lora_dir), "--output-dir", str(out), "--num-prompts", "3",
                       "--scales", "0", "1.5", "--steps", "2", "--resolution", "32", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["w"] for r in res["results"]] == [0.0, 1.5]
    assert (out / "rlg_sweep.png").is_file() and "| 1.5 |" in (out / "results.md").read_text()
    for r in res["results"]:  # each row is its folder's scores
        rows = [json.loads(line) for line in (out / "eval" / sweep.scale_dir(r["w"]) / "scores.jsonl").open()]
        assert len(rows) == r["num_images"] == 3
        assert r["reward"] == pytest.approx(np.mean([x["toyworld"] for x in rows]))
        assert r["accuracy"] == pytest.approx(np.mean([x["toyworld_accuracy"] for x in rows]))
    # w = 0 is the base model: the images are the LoRA-free model's, pixel for pixel
    from diffrl.data import load_prompts

    base = load_policy("tiny-sd3", resolution=32)
    prompts = load_prompts("builtin:toy_eval").prompts[:3]
    expected = to_uint8(generate(base, prompts, [0, 1, 2], steps=2, guidance_scale=4.5))
    got = torch.stack([load_png(out / "eval" / "w_0" / "images" / f"{i:04d}_00.png") for i in range(3)])
    assert torch.equal(got, expected)


def readme_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## RL guidance", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's code, verbatim, on the shipped toy-sd3 with a LoRA at the path the README names."""
    code = readme_example()
    lora_path = re.search(r'load_lora_weights\("([^"]+)"\)', code).group(1)
    policy = load_policy("toy-sd3")
    policy.add_lora(rank=4, alpha=8)
    perturb_lora(policy, scale=0.05)
    monkeypatch.chdir(tmp_path)
    policy.save_lora(tmp_path / lora_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    pipe = scope["pipe"]
    assert "forward" not in pipe.transformer.__dict__  # guidance is off again after the with blocks
    images = scope["images"]
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (32, 32)
    plain = pipe(scope["prompt"], num_inference_steps=20, guidance_scale=4.5, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(np.asarray(images[0], dtype=int) - np.asarray(plain[0], dtype=int)).max() > 0  # w = 1.5 is not w = 1
