"""Issue 17 ("nothing lost, nothing silent"): every invalid `diffrl train` config fails before any model or reward
loads, with exit code 2 and one line naming the field or file, no traceback, and nothing created on disk.

One table: each row is the command's arguments after `train` (a recipe and key=value overrides; no recipe for the
all-defaults rows), or the text of a YAML recipe, and what the error must name. `{tmp}` is the test's folder (with
the prompt files of `prompt_files`), `{port}` a local port where nothing listens. Most rows start from the tiny
GRPO recipe; each is run through the real CLI entry, in-process, with every model and reward loader replaced by one
that fails the test.
"""

import os
import socket
from pathlib import Path

import pytest

from diffrl import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "image" / "tiny_sd3_jpeg.yaml")


def recipe(*overrides: str) -> list[str]:
    return [RECIPE, *overrides]


DRAFT = ("algorithm=draft", "reward=colorfulness")
EASYTUNE = ("algorithm=easytune", "reward=colorfulness")

ROWS = [
    # the recipe file itself
    ("", "run.yaml"),  # an empty file would silently run every default
    ("- grpo\n- tiny-sd3\n", "run.yaml"),
    ("just some words\n", "run.yaml"),
    ("model: [unclosed\n", "run.yaml"),
    ("base: missing.yaml\n", "missing.yaml"),
    (["{tmp}/nosuch.yaml"], "nosuch.yaml"),
    ("algoritm: grpo\n", "algorithm"),
    ("trian:\n  group_size: 2\n", "train"),
    # overrides
    (["notakeyvalue"], "notakeyvalue"),
    (recipe("train.learnig_rate=1e-4"), "train.learning_rate"),
    (recipe("train.group_size=many"), "train.group_size"),
    (recipe("algorithm=gpro"), "algorithm"),
    (recipe("reward=jpeg_compresibility"), "reward"),
    (recipe("model=tiny-sd4"), "model"),  # the recipe states the family: an unknown name passed before
    (recipe("policy.family=sd"), "policy.family"),
    (recipe("grpo.std_eps=1e-4"), "advantages.std_eps"),  # moved to advantages
    # policy
    (recipe("policy.resolution=30"), "policy.resolution"),
    (recipe("policy.dtype=float8"), "policy.dtype"),
    (recipe("policy.lora_alpha=-1"), "policy.lora_alpha"),
    (recipe("policy.lora_rank=0", "grpo.kl_beta=0.04"), "grpo.kl_beta"),
    (recipe("policy.lora_targets=[to_qq]"), "policy.lora_targets"),
    (recipe("policy.lora_targets=[to_q,attn.nonexistent]"), "policy.lora_targets"),
    (recipe("policy.lora_targets=['']"), "policy.lora_targets"),
    (recipe("policy.height=48", "policy.width=64"), "policy.height"),  # the tiny models are square
    (recipe("policy.num_frames=9"), "policy.num_frames"),
    (recipe("policy.vae_tiling=true"), "policy.vae_tiling"),
    (recipe("policy.wan_experts=both"), "policy.wan_experts"),
    (recipe("policy.adapter=sarah"), "policy.adapter"),
    (recipe("policy.adapter=sara", "policy.sara_threshold=0"), "policy.sara_threshold"),
    (recipe("policy.adapter=sara", "policy.sara_lambda_rank=-1e-4"), "policy.sara_lambda_rank"),
    (recipe("policy.adapter=sara", "policy.sara_remask_step=0"), "policy.sara_remask_step"),
    (recipe("policy.adapter=sara", "policy.sara_remask_step=2.5"), "policy.sara_remask_step"),
    (recipe("policy.adapter=sara", "policy.sara_remask_step=10", "train.ema=true"), "policy.sara_remask_step"),
    (recipe("policy.adapter=sara", "policy.lora_targets=[to_q]"), "policy.lora_targets"),
    (recipe("policy.adapter=sara", "policy.compile=true"), "policy.compile"),
    (recipe("policy.adapter=sara", "policy.dtype=bfloat16", "policy.lora_dtype=bfloat16"), "policy.lora_dtype"),
    (["model=toy-arith", "algorithm=lm_grpo", "policy.adapter=sara"], "policy.adapter"),
    (recipe("policy.gradient_checkpointing=partial"), "policy.gradient_checkpointing"),
    (recipe("policy.compile=true", "policy.compile_mode=max_autotune"), "policy.compile_mode"),
    (recipe("policy.compile_mode=max-autotune"), "policy.compile_mode"),  # without policy.compile
    (recipe("policy.lora_dtype=float16"), "policy.lora_dtype"),
    (recipe("policy.lora_dtype=bfloat16"), "policy.lora_dtype"),  # on the recipe's float32 base
    (recipe("policy.dtype=bfloat16", "policy.lora_dtype=bfloat16", "train.mixed_precision=fp16"), "policy.lora_dtype"),
    (["model=toy-arith", "algorithm=lm_grpo", "train.activation_offload=true"], "train.activation_offload"),
    # sampling
    (recipe("sampling.num_steps=0"), "sampling.num_steps"),
    (recipe("sampling.sampler=ddim"), "sampling.sampler"),
    (recipe("sampling.sampler=flow_ode"), "sampling.sampler"),
    (recipe("policy.family=null", "model=tiny-sd", "sampling.sampler=flow_sde"), "sampling.sampler"),
    (recipe("sampling.eta=2"), "sampling.eta"),
    (recipe("sampling.noise_level=nan"), "sampling.noise_level"),
    (recipe("sampling.guidance_scale_2=3"), "sampling.guidance_scale_2"),
    (recipe("sampling.sde_window_size=7"), "sampling.sde_window_size"),
    (recipe("sampling.sde_window_size=-1"), "sampling.sde_window_size"),
    (recipe("sampling.sde_window_size=3", "sampling.sde_window_range=[2,4]"), "sampling.sde_window_range"),
    # data: prompt files are read at validation
    (recipe("data.prompts={tmp}/missing.txt"), "data.prompts"),
    (recipe("data.prompts={tmp}/empty.txt"), "data.prompts"),
    (recipe("data.prompts={tmp}/empty.jsonl"), "data.prompts"),
    (recipe("data.prompts={tmp}/number.jsonl"), "data.prompts"),
    (recipe("data.prompts={tmp}/no_prompt.jsonl"), "data.prompts"),
    (recipe("data.prompts={tmp}/not_json.jsonl"), "data.prompts"),
    (recipe("data.prompts=builtin:nosuch"), "data.prompts"),
    (recipe("data.eval_prompts={tmp}/missing.txt"), "data.eval_prompts"),
    (recipe("data.eval_prompts={tmp}/number.jsonl"), "data.eval_prompts"),
    (recipe("data.eval_sets.extra={tmp}/missing.txt"), "data.eval_sets.extra"),
    (recipe("data.eval_sets.extra.prompts={tmp}/empty.txt"), "data.eval_sets.extra"),
    (recipe("data.eval_images_per_prompt=0"), "data.eval_images_per_prompt"),
    (recipe("data.eval_images_per_prompt=-2"), "data.eval_images_per_prompt"),
    (recipe("data.num_eval_prompts=0"), "data.num_eval_prompts"),
    (recipe("data.eval_name=my set"), "data.eval_name"),
    (recipe("data.eval_reward=nosuch"), "data.eval_reward"),
    # train
    (recipe("train.train_batch_size=5"), "train.train_batch_size"),
    (recipe("train.learning_rate=-1"), "train.learning_rate"),
    (recipe("train.learning_rate=nan"), "train.learning_rate"),
    (recipe("train.max_grad_norm=-1"), "train.max_grad_norm"),
    (recipe("train.group_size=1", "train.train_batch_size=2"), "train.group_size"),
    (recipe("train.adam_beta1=1.5"), "train.adam_beta1"),
    (recipe("train.adam_beta2=1.0"), "train.adam_beta2"),
    (recipe("train.adam_epsilon=-1"), "train.adam_epsilon"),
    (recipe("train.adam_weight_decay=-0.1"), "train.adam_weight_decay"),
    (recipe("train.mixed_precision=fp8"), "train.mixed_precision"),
    (recipe("train.lr_schedule=exp"), "train.lr_schedule"),
    (recipe("train.ema_decay=1.0"), "train.ema_decay"),
    (recipe("train.micro_batch_size=4"), "train.micro_batch_size"),
    # advantages
    (recipe("advantages.std_eps=-1"), "advantages.std_eps"),
    (recipe("advantages.std_eps=nan"), "advantages.std_eps"),
    (recipe("advantages.std_scope=batch"), "advantages.std_scope"),
    # algorithms
    (recipe("grpo.kl_convention=approx"), "grpo.kl_convention"),
    (recipe("grpo.clip_range=-1e-4"), "grpo.clip_range"),
    (recipe("grpo.clip_range=nan"), "grpo.clip_range"),
    (recipe("grpo.clip_range_high=-1"), "grpo.clip_range_high"),
    (recipe("grpo.clip_range_high=nan"), "grpo.clip_range_high"),
    (recipe("grpo.adv_clip_max=0"), "grpo.adv_clip_max"),
    (recipe("grpo.kl_beta=nan"), "grpo.kl_beta"),
    (recipe("grpo.kl_beta=0", "grpo.kl_batched=true"), "grpo.kl_batched"),  # no reference pass to batch
    (recipe("grpo.kl_batched=true", "policy.adapter=sara"), "grpo.kl_batched"),  # the reference rows switch a LoRA off
    (recipe("grpo.kl_batched=true", "policy.compile=true"), "grpo.kl_batched"),
    (recipe("algorithm=nft", "nft.kl_coef=0", "nft.kl_batched=true"), "nft.kl_batched"),
    (recipe("grpo.cfg_gradient=uncond"), "grpo.cfg_gradient"),
    (recipe("grpo.cfg_gradient=cond", "sampling.guidance_scale=1"), "grpo.cfg_gradient"),  # no CFG branch to detach
    (recipe("grpo.cfg_gradient=cond", "model=tiny-flux", "policy.family=flux"), "grpo.cfg_gradient"),  # guidance-distilled
    (recipe("policy.merge_lora_for_rollout=true", "policy.adapter=sara"), "policy.merge_lora_for_rollout"),  # no LoRA
    (recipe("policy.merge_lora_for_rollout=true", "policy.dtype=bfloat16"), "policy.merge_lora_for_rollout"),  # grpo's log-probs
    (recipe("policy.merge_lora_for_rollout=true", "policy.compile=true", "policy.compile_mode=reduce-overhead"),
     "policy.merge_lora_for_rollout"),
    (["model=toy-arith", "algorithm=lm_grpo", "policy.merge_lora_for_rollout=true"], "policy.merge_lora_for_rollout"),
    (recipe("algorithm=nft", "nft.timestep_fraction=0"), "nft.timestep_fraction"),
    (recipe("algorithm=nft", "nft.beta=0"), "nft.beta"),
    (recipe("algorithm=nft", "nft.kl_coef=-1"), "nft.kl_coef"),
    (recipe("algorithm=nft", "nft.adv_clip_max=nan"), "nft.adv_clip_max"),
    (recipe("algorithm=nft", "nft.old_decay=[0,0.0,0.001,1.5]"), "nft.old_decay"),
    (recipe("algorithm=nft", "nft.timestep_source=cosine"), "nft.timestep_source"),
    (recipe("algorithm=crd", "crd.loss=hinge"), "crd.loss"),
    (recipe("algorithm=crd", "crd.kl_floor=0.5"), "crd.kl_floor"),
    (recipe("algorithm=crd", "crd.ref_guidance_scale=0"), "crd.ref_guidance_scale"),
    (recipe("algorithm=crd", "crd.sampling_decay=[75,0.0,-1,0.999]"), "crd.sampling_decay"),
    (recipe("algorithm=prdp", "prdp.beta=0"), "prdp.beta"),
    (recipe("algorithm=prdp", "prdp.clip_range=-1e-4"), "prdp.clip_range"),
    (recipe("algorithm=prdp", "prdp.clip_range=nan"), "prdp.clip_range"),
    (recipe("algorithm=prdp", "prdp.timestep_fraction=0"), "prdp.timestep_fraction"),
    (recipe(*EASYTUNE, "easytune.window_fraction=0"), "easytune.window_fraction"),
    (recipe(*EASYTUNE, "easytune.curriculum_fraction=1.5"), "easytune.curriculum_fraction"),
    (recipe(*EASYTUNE, "easytune.reward_scale=0"), "easytune.reward_scale"),
    (recipe(*DRAFT, "draft.k=0"), "draft.k"),
    (recipe(*DRAFT, "draft.refl_range=[0.9,0.5]"), "draft.refl_range"),
    (recipe(*DRAFT, "draft.keep_prob=1.5"), "draft.keep_prob"),
    (recipe(*DRAFT, "draft.reward_scale=-1"), "draft.reward_scale"),
    # rewards: constructor arguments checked against the signature, a remote server asked whether it answers
    (recipe("reward_kwargs={qualty: 50}"), "reward_kwargs.qualty"),
    (recipe("reward=colorfulness", "reward_kwargs={model: tiny}"), "reward_kwargs.model"),
    (recipe("rewards={jpeg_compressibility: {weight: 1.0, kwargs: {qualty: 50}}, colorfulness: 0.5}"),
     "rewards.jpeg_compressibility.kwargs.qualty"),
    (recipe("rewards={pickscor: 1.0}"), "rewards.pickscor"),
    (recipe("rewards={jpeg_compressibility: 1.0}", "reward_kwargs={quality: 50}"), "reward_kwargs"),
    (recipe("reward_combine=mean"), "reward_combine"),
    (recipe("reward_source_weights={s: {clipscore: 1.0}}"), "reward_source_weights"),
    (recipe("reward=remote", "reward_kwargs={url: 'http://127.0.0.1:{port}'}"), "http://127.0.0.1:{port}"),
    (recipe("reward=remote", "reward_kwargs={url: 'http://127.0.0.1:{port}', timeout: -1}"), "reward_kwargs"),
    # the run
    (recipe("max_iterations=0"), "max_iterations"),
    (recipe("seed=-1"), "seed"),
    (recipe("logging.log_with=mlflow"), "logging.log_with"),
    (recipe("logging.eval_every=-1"), "logging.eval_every"),
    (recipe("logging.checkpoints_total_limit=0"), "logging.checkpoints_total_limit"),
    (recipe("output_dir={tmp}/a_file"), "output_dir"),
    (recipe("output_dir={tmp}/a_file/run"), "output_dir"),
    pytest.param(recipe("output_dir={tmp}/read_only/run"), "output_dir",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")),
    # no recipe: the defaults with one wrong value
    (["max_iterations=1", "data.prompts={tmp}/empty.txt"], "data.prompts"),
    (["max_iterations=1", "policy.lora_targets=[to_qq]"], "policy.lora_targets"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model or reward fails the test: every row must be refused by config validation."""
    import diffrl.pipelines.registry as registry
    import diffrl.rewards as rewards
    import diffrl.rewards.mixture as mixture
    import diffrl.rewards.registry as reward_registry
    from diffrl.rewards.base import Reward

    def boom(*args, **kwargs):
        raise AssertionError("a model or reward was loaded before the config was validated")

    for module, name in ((registry, "load_policy"), (registry, "load_pipeline"), (reward_registry, "build_reward"),
                         (rewards, "build_reward"), (mixture, "build_reward"), (mixture, "build_training_reward")):
        monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(Reward, "load", boom)


@pytest.fixture
def prompt_files(tmp_path):
    """The test folder with bad prompt files, a file where a folder is expected, and a read-only folder."""
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "number.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "a cat"}\n')
    (tmp_path / "not_json.jsonl").write_text("a cat\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "read_only").mkdir()
    (tmp_path / "read_only").chmod(0o555)
    yield tmp_path
    (tmp_path / "read_only").chmod(0o755)


@pytest.fixture
def closed_port():
    """A local port where nothing listens (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("row, expected", ROWS)
def test_invalid_config_fails_before_loading_naming_the_field(row, expected, prompt_files, closed_port, no_loading,
                                                               monkeypatch, capsys):
    tmp = prompt_files
    monkeypatch.chdir(tmp)  # a recipe's relative output_dir would land here
    fill = lambda text: text.replace("{tmp}", str(tmp)).replace("{port}", str(closed_port))  # noqa: E731
    if isinstance(row, str):
        (tmp / "run.yaml").write_text(fill(row))
        argv = [str(tmp / "run.yaml")]
    else:
        argv = [fill(item) for item in row]
    if not any(item.startswith("output_dir=") for item in argv):
        argv.append(f"output_dir={tmp / 'run'}")
    before = snapshot(tmp)
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exc:  # the console script's exit
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2, lines
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("diffrl: invalid config:"), lines
    assert fill(expected) in lines[0]
    assert snapshot(tmp) == before  # no output_dir, nothing else written
