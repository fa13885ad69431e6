"""SaRA (diffrl.pipelines.sara): the sparse backward against dense autograd restricted to the mask (float64), optimiser
state of the sparse size only, the nuclear-norm gradient against an independent svdvals-through-autograd reference, the
re-mask, the reference bit for bit; then the trainers through the shared loop: exact resume (also across a re-mask),
a merged checkpoint sampled by a stock diffusers pipeline, and GRPO / NFT / CRD with SaRA and the full fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffrl.pipelines.registry import load_policy
from diffrl.pipelines.sara import SaraAdapter, sara_learning_rate

THRESHOLD = 2e-3


def small_weights(module: nn.Module, seed: int, std: float = 3e-3) -> nn.Module:
    """`module` in float64 with weights ~ N(0, std): about half of its entries fall below THRESHOLD."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return module


def dense_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A (possibly parametrized) module's dense tensors by their plain names: what its forward computes with."""
    return {n.replace("parametrizations.", "").replace(".original", ""): p.detach()
            for n, p in module.state_dict(keep_vars=True).items() if not n.endswith(".values")}


def mask_of(param: torch.Tensor) -> torch.Tensor:
    return (param.detach().abs() < THRESHOLD).reshape(-1)  # [numel] bool


# ----------------------------------------------------------------------------- the sparse parametrization


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(12, 9), (5, 12)),
                                         (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6))])
def test_backward_equals_dense_autograd_on_the_mask(make, shape):
    dense = small_weights(make(), seed=0)
    plain = copy.deepcopy(dense)
    masks = {n: mask_of(p) for n, p in dense.named_parameters()}
    sara = SaraAdapter({"net": dense}, threshold=THRESHOLD)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.randn_like(plain(x))

    out = dense(x)
    ((out - target) ** 3).sum().backward()
    ref = plain(x)
    ((ref - target) ** 3).sum().backward()

    assert torch.equal(out, ref)  # the forward is the dense module's
    assert {t.name for t in sara.tensors} == set(masks) and all(m.any() for m in masks.values())
    for t in sara.tensors:
        dense_grad = dict(plain.named_parameters())[t.name].grad.reshape(-1)  # [numel]
        assert torch.equal(t.sparse.index, masks[t.name].nonzero().squeeze(1))
        torch.testing.assert_close(t.sparse.values.grad, dense_grad[masks[t.name]], rtol=0, atol=1e-12)
        assert t.dense.grad is None and not t.dense.requires_grad  # no dense gradient is ever kept


def tiny(model: str, dtype=torch.float64):
    return load_policy(model, torch_dtype=dtype)


def denoiser_loss(policy, seed: int = 0) -> torch.Tensor:
    """A loss through the whole denoiser (CFG on, so both branches run)."""
    g = torch.Generator().manual_seed(seed)
    cond = policy.encode_prompt(["a red cube left of a blue ball"])
    x = policy.initial_noise(1, g).to(policy.dtype)  # [1, *S]
    out = policy.predict(x, torch.tensor([600.0]), cond, 2.0)  # [1, *S]
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd"])
def test_backward_through_a_whole_tiny_denoiser(model):
    policy, plain = tiny(model), tiny(model)
    plain.trainable_module().requires_grad_(True)
    sara = policy.add_sara(THRESHOLD)
    denoiser_loss(policy).backward()
    denoiser_loss(plain).backward()
    named = dict(plain.trainable_module().named_parameters())
    assert len(sara.tensors) > 10
    for t in sara.tensors:
        dense_grad = named[t.name].grad.reshape(-1)  # [numel]
        torch.testing.assert_close(t.sparse.values.grad, dense_grad[t.sparse.index], rtol=0, atol=1e-12)
    # every other entry is frozen: the trainable parameters are exactly the sparse vectors
    assert policy.trainable_parameters() == sara.parameters()
    assert sara.num_trainable == sum(int(mask_of(p).sum()) for p in plain.trainable_module().parameters())


def test_optimizer_state_has_the_mask_size():
    policy = tiny("tiny-sd3", torch.float32)
    sara = policy.add_sara(THRESHOLD)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    denoiser_loss(policy).backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert sum(v.numel() for v in state) == 2 * sara.num_trainable  # exp_avg and exp_avg_sq, each [n]
    assert sara.num_trainable < sara.num_dense / 10


def test_authors_learning_rate_formula():
    assert sara_learning_rate(2e-3) == pytest.approx(1e-3 * 2.718281828459045 ** -0.7)
    assert sara_learning_rate(2e-3) == pytest.approx(4.97e-4, rel=1e-3)


# ----------------------------------------------------------------------------- the nuclear-norm penalty


def penalty_net() -> nn.Module:
    """Two eligible weights (96 x 80, 70 x 96) and one too thin (100 x 8), biases 1-D."""
    return small_weights(nn.Sequential(nn.Linear(80, 96), nn.Linear(96, 70), nn.Linear(8, 100)), seed=3)


def test_nuclear_norm_gradient_matches_svdvals_through_autograd():
    net = penalty_net()
    sara = SaraAdapter({"net": net}, threshold=THRESHOLD)
    assert {t.name for t in sara.eligible()} == {"0.weight", "1.weight"}
    drawn = set()
    for seed in range(8):
        for p in sara.parameters():
            p.grad = None
        value = sara.add_nuclear_gradient(0.3, torch.Generator().manual_seed(seed))
        touched = [t for t in sara.tensors if t.sparse.values.grad is not None]
        assert len(touched) == 1 and touched[0] in sara.eligible()
        t = touched[0]
        drawn.add(t.name)
        v = t.sparse.values.detach().clone().requires_grad_()  # [n]
        X = torch.zeros(t.dense.numel(), dtype=torch.float64).index_put((t.sparse.index,), v).view(t.dense.shape)
        norm = 0.3 * torch.linalg.svdvals(X).sum()
        norm.backward()
        torch.testing.assert_close(t.sparse.values.grad, v.grad, rtol=0, atol=1e-12)
        assert value == pytest.approx(norm.item(), rel=1e-12)
    assert drawn == {"0.weight", "1.weight"}  # both eligible weights are drawn, never the thin one


def test_penalty_adds_to_the_loss_gradient_and_is_a_function_of_the_step():
    net = penalty_net()
    sara = SaraAdapter({"net": net}, threshold=THRESHOLD, lambda_rank=0.5, seed=4)
    for p in sara.parameters():
        p.grad = torch.ones_like(p)
    sara.steps = 7
    sara.before_step()
    first = [p.grad.clone() for p in sara.parameters()]
    for p in sara.parameters():
        p.grad = torch.ones_like(p)
    sara.before_step()  # the same step again: the same draw
    assert all(torch.equal(a, p.grad) for a, p in zip(first, sara.parameters()))
    changed = [i for i, g in enumerate(first) if not torch.equal(g, torch.ones_like(g))]
    assert len(changed) == 1 and sara.last_penalty > 0


# ----------------------------------------------------------------------------- re-masking


def test_remask_recomputes_the_mask_on_the_current_weights_and_resets_the_optimizer():
    net = small_weights(nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10)), seed=5)
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    sara = SaraAdapter({"net": net}, threshold=THRESHOLD, remask_step=1)
    sara.add_snapshot("old")  # the base values, remapped with the layout
    optimizer = torch.optim.AdamW(sara.parameters(), lr=1e-3)
    old_index = [t.sparse.index.clone() for t in sara.tensors]
    g = torch.Generator().manual_seed(6)
    for p in sara.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    optimizer.step()
    with torch.no_grad():  # push some entries over the threshold, as training does
        for p in sara.parameters():
            p[::3] += 4e-3
    trained = {t.name: (t.sparse.index.clone(), t.sparse.values.detach().clone()) for t in sara.tensors}
    assert all(len(s) for s in optimizer.state.values())

    assert sara.after_step(optimizer)  # step 1 = remask_step
    assert not any(len(optimizer.state.get(p, {})) for p in sara.parameters())  # state reset
    for t, old in zip(sara.tensors, old_index):
        sp, flat = t.sparse, t.dense.detach().reshape(-1)
        index, values = trained[t.name]
        current = base[t.name].reshape(-1).clone()
        current[index] = values
        assert torch.equal(flat, current)  # re-masking changes no weight
        assert torch.equal(sp.index, (current.abs() < THRESHOLD).nonzero().squeeze(1))  # the documented mask
        assert torch.isin(sp.index, old).all()  # new alone == new AND old: untrained entries never fall below
        assert torch.equal(torch.sort(sp.union_index()).values, old)  # the rest retired, none lost
        assert torch.equal(sp.values.detach(), current[sp.index])
        assert torch.equal(sp.retired_values, current[sp.retired_index]) and (sp.retired_values.abs() >= THRESHOLD).all()
        assert torch.equal(sp.original, base[t.name].reshape(-1)[sp.index])
        assert torch.equal(sp.retired_original, base[t.name].reshape(-1)[sp.retired_index])
        assert torch.equal(sara.snapshot("old")[sara.tensors.index(t)], base[t.name].reshape(-1)[sp.union_index()])
    with sara.reference():  # retired entries return to their originals too
        assert all(torch.equal(p, base[n]) for n, p in dense_state(net).items())
    sara.sync()
    assert all(torch.equal(t.dense.detach().reshape(-1)[t.sparse.retired_index], t.sparse.retired_values)
               for t in sara.tensors)
    for p in sara.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # fresh moments of the new size
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == sara.num_trainable
    assert sara.steps == 1 and not sara.after_step(optimizer)  # once only


# ----------------------------------------------------------------------------- the reference and snapshots


def images(policy, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return denoiser_loss(policy, seed)


def test_reference_is_the_untouched_base_bit_for_bit_and_the_trained_values_return():
    policy, base = tiny("tiny-sd3", torch.float32), tiny("tiny-sd3", torch.float32)
    sara = policy.add_sara(THRESHOLD)
    with torch.no_grad():
        for p in sara.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 1e-2)
    g = torch.Generator().manual_seed(9)
    cond = base.encode_prompt(["two green stars", "a red cube"])
    x = base.initial_noise(2, g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        trained = policy.predict(x, t, cond, 3.0)
        untouched = base.predict(x, t, cond, 3.0)
        with policy.reference():
            ref = policy.predict(x, t, cond, 3.0)
            weights = {n: p.clone() for n, p in dense_state(policy.trainable_module()).items()}
        after = policy.predict(x, t, cond, 3.0)
    assert torch.equal(ref, untouched) and not torch.equal(trained, untouched)
    assert torch.equal(after, trained)
    assert weights.keys() == base.trainable_module().state_dict().keys()
    assert all(torch.equal(weights[n], p) for n, p in base.trainable_module().state_dict().items())

    policy.add_adapter_copy("old")  # a snapshot of the trained values
    with torch.no_grad():
        for p in sara.parameters():
            p.mul_(0.5)
        with policy.use_adapter("old"):
            assert torch.equal(policy.predict(x, t, cond, 3.0), trained)
        assert not torch.equal(policy.predict(x, t, cond, 3.0), trained)


def test_gradient_is_right_after_a_reference_forward_between_forward_and_backward():
    """GRPO's KL order: a forward with gradient, the reference forward, then backward: the backward must use the
    trained weights, not the originals the reference wrote."""
    policy, plain = tiny("tiny-sd3"), tiny("tiny-sd3")
    sara = policy.add_sara(THRESHOLD)
    with torch.no_grad():
        for p in sara.parameters():
            p.add_(1e-2)
        named = dict(plain.trainable_module().named_parameters())
        for t in sara.tensors:
            named[t.name].view(-1)[t.sparse.index] = t.sparse.values.to(named[t.name].dtype)
    plain.trainable_module().requires_grad_(True)
    loss = denoiser_loss(policy)
    with torch.no_grad(), policy.reference():
        denoiser_loss(policy)
    loss.backward()
    denoiser_loss(plain).backward()
    for t in sara.tensors:
        torch.testing.assert_close(t.sparse.values.grad, named[t.name].grad.reshape(-1)[t.sparse.index], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- through the shared loop

from diffrl.config import load_config  # noqa: E402
from diffrl.trainers.loop import Trainer  # noqa: E402

RUN = ["reward=brightness", "policy.adapter=sara", "sampling.num_steps=2", "sampling.eval_num_steps=2",
       "data.num_eval_prompts=2", "data.eval_images_per_prompt=1", "train.prompts_per_iteration=1", "train.group_size=2",
       "train.rollout_batch_size=2", "train.train_batch_size=1", "logging.log_with=none", "logging.progress=false",
       "logging.eval_every=0", "train.learning_rate=1e-2"]
"""GRPO, two optimiser steps an iteration."""
REMASKED = ["model=toy-sd3", "max_iterations=3", "logging.save_every=1", "policy.sara_remask_step=3",
            "train.learning_rate=1e-3"]
"""toy-sd3 has 2-D weights the nuclear-norm penalty draws from (tiny-sd3 none); the re-mask falls in iteration 2, and
three Adam steps at lr 1e-3 move many entries past the threshold, so it retires them."""


def timeless(row: dict) -> dict:
    """A metrics row without its timings and the paired eval gain (its before-training scores are in the first run's
    output_dir only)."""
    return {k: v for k, v in row.items() if not k.startswith(("time", "seconds", "peak_memory", "eval_gain"))}


@pytest.fixture(scope="module")
def remasked_run(tmp_path_factory):
    """Three GRPO iterations of SaRA on toy-sd3, a checkpoint after each, re-masked after step 3: (trainer, rows)."""
    out = tmp_path_factory.mktemp("sara") / "run"
    trainer = Trainer(load_config(None, [*RUN, *REMASKED, f"output_dir={out}"]))
    return trainer, trainer.train()


def test_a_run_trains_only_masked_entries_with_the_penalty_and_remasks(remasked_run):
    trainer, rows = remasked_run
    sara, base = trainer.policy.sara, load_policy("toy-sd3")
    assert [r["sara_trainable"] for r in rows][0] > rows[-1]["sara_trainable"] > 0  # the re-mask retired entries
    assert all(r["sara_rank_penalty"] > 0 for r in rows) and sara.steps == 6
    trained, untouched = dense_state(trainer.policy.trainable_module()), base.trainable_module().state_dict()
    changed = 0
    for name, weight in untouched.items():
        moved = (trained[name] != weight).reshape(-1)  # [numel]
        assert not (moved & ~mask_of(weight)).any(), name  # nothing outside the first mask ever changes
        changed += int(moved.sum())
    assert changed > sara.num_trainable  # the retired entries kept their trained values


def test_resume_continues_bit_identically_before_and_after_the_remask(remasked_run, tmp_path):
    straight, rows = remasked_run
    out = straight.out / "checkpoints"
    for start in (1, 2):  # iteration 2 re-masked: its checkpoint holds the new layout
        resumed = Trainer(load_config(None, [*RUN, *REMASKED, f"output_dir={tmp_path / str(start)}",
                                             f"resume={out / f'iter_{start:06d}'}"]))
        assert resumed.iteration == start and resumed.policy.sara.steps == 2 * start
        again = resumed.train()
        assert [timeless(r) for r in again] == [timeless(r) for r in rows[start:]]
        theirs, ours = straight.policy.sara.state_dict(), resumed.policy.sara.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
        for a, b in zip(straight.policy.trainable_parameters(), resumed.policy.trainable_parameters(), strict=True):
            assert torch.equal(a, b)
        opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_a_merged_checkpoint_samples_identically_in_a_stock_pipeline(remasked_run, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from diffrl import cli
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler

    trainer, _ = remasked_run
    checkpoint = trainer.out / "checkpoints" / "iter_000003"
    assert cli.main(["sara-merge", str(checkpoint), str(tmp_path / "merged")]) == 0
    policy, prompts, steps = trainer.policy, ["a red cube", "two blue stars"], 4
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(0))  # [2, *S]
    with torch.no_grad():
        traj = sample(policy, policy.encode_prompt(prompts), make_sampler("flow_ode"), policy.schedule(steps), 4.5,
                      latents=noise)
        ours = policy.decode(traj.final)  # [2, 3, H, W]
        with policy.reference():
            base = policy.decode(sample(policy, policy.encode_prompt(prompts), make_sampler("flow_ode"),
                                        policy.schedule(steps), 4.5, latents=noise).final)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged", text_encoder_3=None, tokenizer_3=None)  # no T5
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, latents=noise, num_inference_steps=steps, guidance_scale=4.5, height=policy.height,
                  width=policy.width, max_sequence_length=policy.max_sequence_length, output_type="pt").images
    assert (theirs - ours).abs().max() < 1e-5
    assert (base - ours).abs().max() > 1e-3  # training changed the samples: the match above means something


def test_merge_refuses_a_used_folder_and_a_checkpoint_without_sara_weights(remasked_run, tmp_path, capsys):
    from diffrl.pipelines.sara import main

    trainer, _ = remasked_run
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert main(["merge", str(trainer.out), str(tmp_path / "used")]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (tmp_path / "used" / "keep.txt").read_text() == "mine"
    (tmp_path / "lora_ckpt").mkdir()
    (tmp_path / "lora_ckpt" / "state.json").write_text('{"iteration": 1, "config": {"model": "tiny-sd3"}}')
    assert main(["merge", str(tmp_path / "lora_ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no SaRA weights" in err[0] and not (tmp_path / "out").exists()


TINY = ["model=tiny-sd3", "policy.resolution=32", "reward=brightness", "sampling.num_steps=3", "sampling.eval_num_steps=2",
        "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6",
        "train.train_batch_size=3", "logging.log_with=none", "logging.progress=false", "logging.eval_every=0",
        "train.learning_rate=1e-2", "max_iterations=1"]
ALGORITHMS = {"grpo": ["grpo.kl_beta=0.04"], "grpo_no_kl": ["grpo.kl_beta=0"], "nft": ["algorithm=nft", "nft.kl_coef=1e-2"],
              "crd": ["algorithm=crd", "crd.sampling_decay=[0,0.5,0.0,0.5]"]}


def reference_output(policy) -> torch.Tensor:
    with torch.no_grad(), policy.reference():
        return images(policy)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_trainers_with_sara(algorithm, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, *ALGORITHMS[algorithm], "policy.adapter=sara", f"output_dir={tmp_path}"]))
    base = load_policy("tiny-sd3")
    row = trainer.train()[0]
    assert torch.isfinite(torch.tensor(row["loss"])) and (row["kl"] > 0) == (algorithm != "grpo_no_kl")  # the reference ran
    trained, untouched = dense_state(trainer.policy.trainable_module()), base.trainable_module().state_dict()
    moved = [(trained[n] != w).reshape(-1) for n, w in untouched.items()]
    assert any(m.any() for m in moved)
    assert not any((m & ~mask_of(w)).any() for m, w in zip(moved, untouched.values()))  # only masked entries change
    assert torch.equal(reference_output(trainer.policy), images(base))  # the reference is the base, bit for bit
    assert not torch.equal(images(trainer.policy), images(base))
    if algorithm in ("nft", "crd"):  # the EMA snapshots are sparse vectors of the trained entries, between base and trained
        snapshot, current = trainer.policy.adapter_parameters("old"), trainer.policy.adapter_parameters("default")
        assert [s.shape for s in snapshot] == [c.shape for c in current]
        assert any(not torch.equal(s, c) for s, c in zip(snapshot, current))


@pytest.mark.parametrize("algorithm", ["grpo", "grpo_no_kl", "crd"])
def test_trainers_with_the_full_fine_tune(algorithm, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, *ALGORITHMS[algorithm], "policy.adapter=full", f"output_dir={tmp_path}"]))
    base = load_policy("tiny-sd3")
    row = trainer.train()[0]
    assert torch.isfinite(torch.tensor(row["loss"])) and (row["kl"] > 0) == (algorithm != "grpo_no_kl")
    assert ("reference" in trainer.policy._weight_copies()) == (algorithm != "grpo_no_kl")  # a base copy only if needed
    trained = trainer.policy.trainable_module().state_dict()
    assert sum(not torch.equal(trained[n], w) for n, w in base.trainable_module().state_dict().items()) > 10
    assert not torch.equal(images(trainer.policy), images(base))
    if algorithm == "grpo_no_kl":
        return
    assert torch.equal(reference_output(trainer.policy), images(base))  # the whole-weight copy of the base
    assert not torch.equal(images(trainer.policy), reference_output(trainer.policy))  # swapped back after the context


@pytest.mark.slow  # two torchrun processes: about 25 s
@pytest.mark.multiprocess
def test_two_processes_keep_the_sparse_vectors_identical(tmp_path):
    """DDP over the sparse vectors (torchrun, gloo), NFT: each rank trains on its own prompts and the all-reduced
    gradients keep every vector identical on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("mp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path), "policy.adapter=sara", "algorithm=nft"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dumps = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert not set(dumps[0]["group_ids"].tolist()) & set(dumps[1]["group_ids"].tolist())  # different data per rank
    keys = [k for k in dumps[0] if k.startswith("param.")]
    assert len(keys) == len(SaraAdapter({"t": load_policy("tiny-sd3").trainable_module()}, THRESHOLD).tensors)
    assert all(torch.equal(dumps[0][k], dumps[1][k]) for k in keys)
    base = SaraAdapter({"t": load_policy("tiny-sd3").trainable_module()}, THRESHOLD).parameters()
    assert any(not torch.equal(dumps[0][k], b.detach()) for k, b in zip(keys, base))  # they trained


def test_checkpoints_written_before_policy_adapter_resume_as_lora_runs():
    from diffrl.checkpoint import compare_settings

    cfg = load_config(None, ["model=tiny-sd3"])
    saved = cfg.in_use()
    for key in ("adapter", "sara_threshold", "sara_lambda_rank", "sara_remask_step"):
        del saved["policy"][key]  # a config.yaml from before these options
    assert compare_settings(saved, cfg.in_use()) == ([], [])
    _, refused = compare_settings(saved, load_config(None, ["model=tiny-sd3", "policy.adapter=sara"]).in_use())
    assert refused == ["policy.adapter lora -> sara"]
