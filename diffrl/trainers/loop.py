"""The loop every algorithm shares: sample -> decode -> reward -> advantages -> update -> log ->
evaluate -> checkpoint, under accelerate (one CPU, one GPU, many GPUs or nodes: the same code).

Reward-backprop methods (EasyTune, DRaFT; `Algorithm.samples_in_update`) sample inside update() with
gradients; for them the loop draws the prompts and initial noise, and scores the samples afterwards.

Processes never split a prompt group: each draws whole groups, and advantages are computed on the
gathered batch of all processes. Every random draw is seeded by (seed, iteration, process), so a
resumed run continues exactly and processes never share initial noise.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from diffrl.runloop import TrainLoop
from diffrl.checkpoint import latest_checkpoint, load_checkpoint, save_policy_checkpoint
from diffrl.core import PerPromptStatTracker, combine_rewards, zero_std_fraction
from diffrl.distributed import shard_like_params, whole_tensors
from diffrl.data import PromptSet, draw_prompt_indices, load_prompts
from diffrl.optim import NonFiniteTrainingError
from diffrl.rewards.mixture import RolloutScorer, prompt_group_ids
from diffrl.rollout import Trajectory, sample
from diffrl.runtime import DTYPES, derive_generator, peak_memory_mb
from diffrl.sampling import make_sampler
from diffrl.sections import resolve_sampler
from diffrl.stats import headline, paired, score_summary
from diffrl.trainers import ALGORITHMS
from diffrl.trainers.base import RolloutBatch

PANEL_CELLS = 32
"""Images in an evaluation panel (8 x 4 cells of 160 px: 1280 x 816 px, a grid a person can read) ..."""
PANEL_IMAGES = 4
"""... from the first prompts, up to 4 images of each."""


def phase_clock(device: torch.device) -> float:
    """time.perf_counter() for the phase timings of a metrics row; on CUDA after the queued kernels finish, so that a
    phase's seconds are its own (called between phases only, never inside the training maths)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def decode_kwargs(policy, reward) -> dict:
    """{"num_frames": k} when a video reward reads only the first k frames of a clip, else {}: a causal video VAE
    decodes that prefix exactly and in a fraction of the time and memory (evaluation still decodes whole clips)."""
    if policy.sample_kind != "video":
        return {}
    needed = reward.frames_needed(policy.num_frames)
    return {"num_frames": needed} if needed is not None and needed < policy.num_frames else {}


class Trainer(TrainLoop):
    """Builds everything from a validated diffrl.config.RunConfig and runs the shared loop."""

    def __init__(self, cfg, accelerator: Accelerator | None = None, prompts: PromptSet | None = None,
                 eval_prompts: PromptSet | None = None, policy=None):
        """cfg: a validated RunConfig (diffrl.load_config, or diffrl.train which also takes prompts and rewards as
        Python objects); `prompts` / `eval_prompts` replace data.prompts / data.eval_prompts; `policy`, a Policy
        built by the caller (without LoRA), replaces cfg.model (benchmarks: full-size architectures with random
        weights); cfg.policy's LoRA, checkpointing and attention settings still apply to it."""
        if cfg.sampling.guidance_scale is None:
            raise ValueError("the config has no sampling.guidance_scale: build it with diffrl.load_config or train "
                             "with diffrl.train, which fill the algorithm's defaults and validate it")
        from diffrl.pipelines.registry import load_policy
        from diffrl.rewards import build_reward
        from diffrl.rewards.mixture import build_training_reward

        self.setup_run(cfg, accelerator)
        acc = self.accelerator

        p = cfg.policy
        self.policy = policy if policy is not None else load_policy(
            cfg.model, family=p.family, torch_dtype=DTYPES[p.dtype], device=acc.device, num_frames=p.num_frames,
            **p.size_kwargs(cfg.model), **p.vae_chunking()
        )  # tiny models are built with a fixed weight seed: the run seed must not change the base model
        if cfg.sampling.guidance_scale_2 is not None:
            self.policy.set_low_noise_guidance(cfg.sampling.guidance_scale_2)
        if p.wan_experts != "high":  # Wan2.2: the low-noise expert, or both, train (before the LoRA goes on)
            self.policy.set_trained_experts(p.wan_experts)
        adapter = p.resolved_adapter()  # "lora" at lora_rank 0 is a full fine-tune
        if adapter == "lora":
            self.policy.add_lora(p.lora_rank, p.lora_alpha, p.lora_targets, compute_dtype=DTYPES[p.lora_dtype])
        elif adapter == "sara":  # diffrl.pipelines.sara: the entries below the threshold train as sparse vectors
            self.policy.add_sara(p.sara_threshold, p.sara_lambda_rank, p.sara_remask_step, seed=cfg.seed)
        else:  # a KL to the base needs a whole-weight copy of it (one more copy of the denoiser's weights)
            self.policy.train_full(keep_reference=ALGORITHMS.get(cfg.algorithm).uses_reference(cfg))
        if p.gradient_checkpointing != "none":
            self.policy.enable_gradient_checkpointing(p.gradient_checkpointing)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
        self.policy.set_attention_backend(p.attention_backend, compute_dtype=autocast_dtype)
        if p.compile:  # after the LoRA, checkpointing and attention hooks: the compiled blocks trace them
            self.policy.compile_networks(p.compile_mode)

        s = cfg.sampling
        flow = self.policy.prediction_type == "flow"
        kind = resolve_sampler(s, ALGORITHMS.get(cfg.algorithm).default_flow_sampler, flow)
        self.sampler = make_sampler(kind, noise_level=s.noise_level, eta=s.eta, reduction=s.logprob_reduction)
        self.eval_sampler = make_sampler("flow_ode" if flow else "ddim", eta=0.0)
        # a mixture when cfg.rewards is set; load() now, so that missing reward weights fail before training
        self.reward = build_training_reward(cfg.reward, cfg.reward_kwargs, cfg.rewards, cfg.reward_combine,
                                            cfg.reward_source_weights).to(acc.device).load()
        self.reward_pool = ThreadPoolExecutor(1, thread_name_prefix="diffrl-reward") if cfg.reward_async else None
        self.decode_kwargs = decode_kwargs(self.policy, self.reward)  # rollouts decode what the reward reads
        self.eval_reward_name = cfg.data.eval_reward or self.reward._name()  # a mixture names its parts
        self.eval_reward = self.reward if cfg.data.eval_reward is None else build_reward(cfg.data.eval_reward).to(acc.device)
        self.prompts = prompts or load_prompts(cfg.data.prompts)
        self.eval_sets: dict[str, PromptSet] = {}  # headline first; each its first num_prompts prompts
        for index, (name, (spec, n)) in enumerate(cfg.data.eval_specs().items()):
            if index == 0 and eval_prompts is not None:
                full = eval_prompts
            else:
                full = self.prompts if spec is None else load_prompts(spec)
            self.eval_sets[name] = PromptSet(full.prompts[:n], full.metadata[:n])

        t = cfg.train
        params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )
        if acc.distributed_type == DistributedType.DEEPSPEED:  # no dataloader is prepared to size its micro-batch from
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.train_batch_size
        self.policy.denoiser, self.optimizer = acc.prepare(self.policy.denoiser, self.optimizer)
        self.ema = [q.detach().clone() for q in params] if t.ema else None
        a = cfg.advantages
        self.tracker = PerPromptStatTracker(std_scope=a.std_scope, ddof=a.std_ddof, eps=a.std_eps)
        self.algorithm = ALGORITHMS.get(cfg.algorithm)(cfg, self.policy, self.sampler, acc)
        self.algorithm.reward = self.reward
        if self.policy.sara is not None:  # every trainer's optimiser steps go through its GuardedStep
            self.algorithm.step_guard.before_step = self.policy.sara.before_step  # the nuclear-norm gradient
            self.algorithm.step_guard.after_step = self.policy.sara.after_step  # step count, the re-mask
        self.iteration = 0
        self.samples_seen = 0
        if self.resume_from is not None:  # verified before the model loaded (TrainLoop.setup_run)
            self._resume(self.resume_from)

    # ---- one iteration ---------------------------------------------------------------------
    def rollout(self, iteration: int) -> RolloutBatch:
        """This process's P prompts x K samples, sampled, decoded and scored (no gradient)."""
        cfg, acc = self.cfg, self.accelerator
        P, K = cfg.train.prompts_per_iteration, cfg.train.group_size
        idx = draw_prompt_indices(len(self.prompts), P * self.world, iteration, cfg.seed)  # [P * world]
        local = idx[self.rank * P : (self.rank + 1) * P]  # [P]: whole groups on this process
        prompts = [self.prompts.prompts[i] for i in local.tolist() for _ in range(K)]
        metadata = [self.prompts.metadata[i] for i in local.tolist() for _ in range(K)]
        group_ids = (torch.arange(P) + self.rank * P).repeat_interleave(K)  # [B]

        gen = derive_generator(cfg.seed, iteration, self.rank, 1)
        sampler = self.rollout_sampler(iteration)
        cond = self.policy.encode_prompt(prompts[::K], cfg.sampling.negative_prompt).repeat_interleave(K)
        noise = self.policy.initial_noise(P * K, generator=gen).to(acc.device)  # [B, *S]: one draw per sample
        schedule = self.policy.schedule(cfg.sampling.num_steps)
        if self.algorithm.samples_in_update:  # update() samples with gradients from this noise; scored after it
            return RolloutBatch(
                prompts=prompts, metadata=metadata, group_ids=group_ids.to(acc.device), cond=cond,
                trajectory=Trajectory(latents=noise[:, None], log_probs=None, schedule=schedule),
                images=None, rewards=None, valid=None,
            )
        chunks, images = [], []
        scorer = RolloutScorer(self.reward, self.reward_pool)  # scores each chunk (in the background if reward_async)
        # seconds of the rollout spent decoding and scoring (or waiting for the background scorer); no CUDA sync
        # around a background scorer's submit, which would wait for its kernels and undo the overlap
        seconds = {"decode": 0.0, "reward": 0.0}
        reward_clock = time.perf_counter if self.reward_pool is not None else lambda: phase_clock(acc.device)
        for start in range(0, P * K, cfg.train.rollout_batch_size):
            sl = slice(start, start + cfg.train.rollout_batch_size)
            with acc.autocast(), self.algorithm.rollout_context(), self.sampling_weights():
                traj = sample(
                    self.policy, cond.index(sl), sampler, schedule, cfg.sampling.guidance_scale,
                    latents=noise[sl], generator=gen, record=self.algorithm.record_trajectory,
                )
                started = phase_clock(acc.device)
                images.append(self.policy.decode(traj.final, **self.decode_kwargs).float())
                seconds["decode"] += phase_clock(acc.device) - started
            started = reward_clock()
            scorer.submit(images[-1], prompts[sl], metadata[sl])
            seconds["reward"] += reward_clock() - started
            chunks.append(traj)
        trajectory = type(chunks[0])(
            latents=torch.cat([c.latents for c in chunks]),
            log_probs=torch.cat([c.log_probs for c in chunks]) if chunks[0].log_probs is not None else None,
            schedule=schedule, log_prob_steps=chunks[0].log_prob_steps,
        )
        images = torch.cat(images)  # [B, 3, H, W]
        started = reward_clock()
        rewards, components = scorer.collect()  # [B]; a mixture's parts, name -> [B]
        seconds["reward"] += reward_clock() - started
        return RolloutBatch(
            prompts=prompts, metadata=metadata, group_ids=group_ids.to(acc.device), cond=cond,
            trajectory=trajectory, images=images, rewards=rewards, valid=torch.isfinite(rewards),
            reward_components=components, seconds=seconds,
        )

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> None:
        """Rewards of the samples update() drew (samples_in_update), in rollout_batch_size chunks."""
        scorer = RolloutScorer(self.reward)
        for start in range(0, len(batch), self.cfg.train.rollout_batch_size):
            sl = slice(start, start + self.cfg.train.rollout_batch_size)
            scorer.submit(batch.images[sl], batch.prompts[sl], batch.metadata[sl])
        batch.rewards, batch.reward_components = scorer.collect()  # [B]; a mixture's parts, name -> [B]
        batch.valid = torch.isfinite(batch.rewards)

    def rollout_sampler(self, iteration: int):
        """The training sampler, restricted to this iteration's stochastic window when
        sampling.sde_window_size > 0 (the same window on every process: drawn from (seed, iteration))."""
        s = self.cfg.sampling
        if not s.sde_window_size:
            return self.sampler
        lo, hi = s.sde_window_range or (0, s.num_steps)
        draw = derive_generator(self.cfg.seed, iteration, 3)
        start = lo + int(torch.randint(0, hi - lo - s.sde_window_size + 1, (1,), generator=draw))
        return dataclasses.replace(self.sampler, window=(start, start + s.sde_window_size))

    def advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """Group-relative advantages on the batch gathered from every process; keeps this process's rows."""
        acc = self.accelerator
        rewards = acc.gather(batch.rewards)  # [world * B]
        valid = acc.gather(batch.valid)  # [world * B]
        prompts = gather_object(batch.prompts) if self.world > 1 else batch.prompts
        group_ids = acc.gather(batch.group_ids)  # [world * B]
        bad = int((~valid).sum())
        if bad == len(valid):
            raise NonFiniteTrainingError(f"every reward of iteration {self.iteration + 1} is NaN/inf: check the reward "
                                         f"'{self.reward._name()}' (and the samples: a NaN/inf sample scores NaN)")
        adv = torch.zeros_like(rewards)
        keep = valid.nonzero().squeeze(1)
        kept_prompts = [prompts[i] for i in keep.tolist()]
        self.tracker.clear()
        components = None
        if batch.reward_components is not None:
            components = {k: acc.gather(v)[keep].cpu() for k, v in batch.reward_components.items()}  # name -> [kept]
        if components is not None and self.reward.combine == "normalize_then_sum":  # GDPO / MR-GRPO
            metadata = gather_object(batch.metadata) if self.world > 1 else batch.metadata
            a = self.cfg.advantages
            weights = self.reward.sample_weights([metadata[i] for i in keep.tolist()], len(kept_prompts))  # name -> [kept]
            adv[keep] = combine_rewards({k: v.double() for k, v in components.items()}, weights,
                                        prompt_group_ids(kept_prompts), mode="normalize_then_sum",
                                        std_scope=a.std_scope, ddof=a.std_ddof, eps=a.std_eps).to(adv)
        else:  # one reward, or a mixture's weighted sum (sum_then_normalize)
            adv[keep] = self.tracker.update(kept_prompts, rewards[keep].cpu()).to(adv)
        B = len(batch)
        batch.advantages = adv[self.rank * B : (self.rank + 1) * B]  # [B]
        r = rewards[keep]
        return {
            "reward_mean": r.mean().item(),
            "reward_std": r.std(unbiased=False).item(),
            **(self.reward.component_metrics(components) if components is not None else {}),
            "zero_std_frac": zero_std_fraction(r.cpu(), group_ids[keep].cpu()),
            "nonfinite_rewards": bad,
        }

    # ---- evaluation --------------------------------------------------------------------------
    def eval_prefix(self, index: int, name: str) -> str:
        """Metric-name prefix of evaluation set `index`: eval_ for the headline set, eval_<name>_ for the others."""
        return "eval_" if index == 0 else f"eval_{name}_"

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, float]:
        """Every evaluation set (data.eval_prompts, then data.eval_sets): deterministic samples (ODE / DDIM eta 0)
        of its prompts from fixed seeds, scored by the eval reward.

        Returns per set: reward_mean / reward_stderr (stderr over prompts), with tagged prompts the mean over
        tags and its stderr (GenEval's overall score), and, once the before-training scores are on disk, the
        paired gain over them (same prompts and seeds). Writes every image's score to eval/<tag>.jsonl and a
        captioned panel of its first images to images/<tag>[_<set>].png (also to the trackers)."""
        cfg, acc = self.cfg, self.accelerator
        K = cfg.data.eval_images_per_prompt
        metrics, rows = {}, []
        before = self._eval_scores("iter_000000") if tag != "iter_000000" else None
        for index, (name, prompt_set) in enumerate(self.eval_sets.items()):
            images, scores = self._sample_eval_set(prompt_set, K, derive_generator(7_777, index))
            set_rows = [{"set": name, "prompt_index": b // K, "image_index": b % K, "prompt": prompt_set.prompts[b // K],
                         "tag": prompt_set.metadata[b // K].get("tag"), "score": v} for b, v in enumerate(scores.tolist())]
            rows += set_rows
            tags = [r["tag"] for r in set_rows] if any(r["tag"] for r in set_rows) else None
            values, groups = [r["score"] for r in set_rows], [r["prompt_index"] for r in set_rows]
            summary = score_summary(values, groups, tags)
            prefix = self.eval_prefix(index, name)
            metrics[f"{prefix}reward_mean"], metrics[f"{prefix}reward_stderr"] = summary["mean"], summary["stderr"]
            if "mean_over_tags" in summary:
                metrics[f"{prefix}mean_over_tags"] = summary["mean_over_tags"]
                metrics[f"{prefix}mean_over_tags_stderr"] = summary["mean_over_tags_stderr"]
            if before is not None and len(before.get(name, [])) == len(values):
                metrics[f"{prefix}gain"], metrics[f"{prefix}gain_stderr"] = headline(paired(before[name], values, groups, tags))
            if acc.is_main_process:
                self._save_panel(images, set_rows, tag if index == 0 else f"{tag}_{name}", f"eval/{name}")
        if acc.is_main_process:
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            with open(self.out / "eval" / f"{tag}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        return metrics

    def _sample_eval_set(self, prompt_set: PromptSet, K: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """K images per prompt of `prompt_set` from noise drawn once for the whole set (an image does not depend
        on its batch-mates): (images [P * K, 3, H, W], eval reward [P * K])."""
        cfg, acc = self.cfg, self.accelerator
        prompts = [p for p in prompt_set.prompts for _ in range(K)]
        metadata = [m for m in prompt_set.metadata for _ in range(K)]
        batch = cfg.data.eval_batch_size or cfg.train.rollout_batch_size
        with self._ema_weights():
            cond = self.policy.encode_prompt(prompts, cfg.sampling.negative_prompt)
            noise = self.policy.initial_noise(len(prompts), generator=generator).to(acc.device)  # [P * K, *S]
            schedule = self.policy.schedule(cfg.sampling.eval_num_steps)
            images = []
            for start in range(0, len(prompts), batch):
                sl = slice(start, start + batch)
                with acc.autocast(), self.sampling_weights():
                    traj = sample(self.policy, cond.index(sl), self.eval_sampler, schedule,
                                  cfg.sampling.guidance_scale, latents=noise[sl], record=False)
                    images.append(self.policy.decode(traj.final).float())
        images = torch.cat(images)  # [P * K, 3, H, W]
        return images, self.eval_reward(images, prompts, metadata).float().cpu()

    def sampling_weights(self):
        """Entered around no-grad sampling (rollout chunks, evaluation batches), inside the algorithm's rollout
        context and the EMA swap: with policy.merge_lora_for_rollout the active LoRA merged into the base weights,
        which are the very same tensors again on exit (Policy.merged_lora)."""
        import contextlib

        return self.policy.merged_lora() if self.cfg.policy.merge_lora_for_rollout else contextlib.nullcontext()

    def _save_panel(self, images: torch.Tensor, rows: list[dict], name: str, tracker_key: str) -> None:
        """A panel of PANEL_CELLS images (8 per row) captioned with prompt and score: the first prompts with up to
        PANEL_IMAGES images each (32 prompts x 1, 16 x 2, 8 x 4); every image's score is in eval/<tag>.jsonl.
        Clips: the panel shows 4 frames of each, and images/<name>.gif plays the same clips side by side. Motions
        (features [B, T, 263]): a strip of stick-figure key frames each, and the GIF plays them."""
        from diffrl.visual import save_clip_grid, save_grid

        per_prompt = min(PANEL_IMAGES, self.cfg.data.eval_images_per_prompt)
        motion = self.policy.sample_kind == "motion"
        video = images.ndim == 5 or motion  # a clip or a motion is a strip of frames: 8 of them, 2 a row
        keep = [b for b, r in enumerate(rows) if r["image_index"] < per_prompt][: PANEL_CELLS // 4 if video else PANEL_CELLS]
        captions = [f"{rows[b]['prompt']}\nreward {rows[b]['score']:.3f}" for b in keep]
        if motion:
            from diffrl.motion.render import save_motion_gif, save_motion_grid
            from diffrl.motion.representation import recover_from_ric

            joints = recover_from_ric(images[keep].float().cpu())  # [k, T, 22, 3]
            path = save_motion_grid(joints, captions, self.out / "images" / f"{name}.png")
            save_motion_gif(joints, captions, self.out / "images" / f"{name}.gif")
            self.log_image(tracker_key, path)
            return
        path = save_grid(images[keep], captions, self.out / "images" / f"{name}.png", cols=2 if video else 8)
        if video:
            save_clip_grid(images[keep], captions, self.out / "images" / f"{name}.gif", cols=4)
        self.log_image(tracker_key, path)

    def _eval_scores(self, tag: str) -> dict[str, list[float]] | None:
        """Per set, the scores an earlier evaluation wrote to eval/<tag>.jsonl (None when it is not there)."""
        path = self.out / "eval" / f"{tag}.jsonl"
        if not path.is_file():
            return None
        out: dict[str, list[float]] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["set"], []).append(row["score"])
        return out

    def eval_line(self, row: dict) -> str:
        """Each set's headline (mean over tags, or mean) ± stderr, and the paired gain when the row has it."""
        parts, tagged = [], False
        for index, name in enumerate(self.eval_sets):
            p = self.eval_prefix(index, name)
            tagged |= f"{p}mean_over_tags" in row
            value, se = row.get(f"{p}mean_over_tags", row[f"{p}reward_mean"]), row.get(f"{p}mean_over_tags_stderr", row[f"{p}reward_stderr"])
            gain = f" (paired gain {row[f'{p}gain']:+.3f} ± {row[f'{p}gain_stderr']:.3f})" if f"{p}gain" in row else ""
            parts.append(f"{name} {value:.3f} ± {se:.3f}{gain}")
        return ", ".join(parts) + (" (GenEval mean over tags ± s.e.)" if tagged else " (mean ± s.e.)")

    def activation_offload(self):
        """train.activation_offload: what the update's forwards keep for backward is moved to CPU memory (pinned on
        CUDA) as it is saved and copied back when backward reads it (torch.autograd.graph.save_on_cpu)."""
        import contextlib

        if not self.cfg.train.activation_offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.accelerator.device.type == "cuda")

    # ---- state -------------------------------------------------------------------------------
    def _ema_weights(self):
        import contextlib

        if self.ema is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def swap():
            params = self.policy.trainable_parameters()
            saved = [q.detach().clone() for q in params]
            with torch.no_grad():
                for q, e in zip(params, self.ema):
                    q.copy_(e)
            try:
                yield
            finally:
                with torch.no_grad():
                    for q, s in zip(params, saved):
                        q.copy_(s)

        return swap()

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        with torch.no_grad():
            for e, q in zip(self.ema, self.policy.trainable_parameters()):
                e.mul_(d).add_(q.detach(), alpha=1 - d)

    def save(self) -> Path | None:
        extra = {f"ema.{i}": e for i, e in enumerate(self.ema or [])}
        extra.update(self.algorithm.state_tensors())
        if self.policy.sara is not None:
            extra.update(self.policy.sara.state_tensors())  # its step count (the sparse layout is in sara/)
        self.check_finite_before_save(self.policy.trainable_module(), self.optimizer, extra)
        acc = self.accelerator
        acc.wait_for_everyone()
        # FSDP2: every process joins the gathers; the main process writes whole tensors (any process count resumes)
        with whole_tensors(self.policy.trainable_module(), self.optimizer, keep=acc.is_main_process,
                           lora_only=self.policy.has_lora):
            if not acc.is_main_process:
                return None
            state = {"iteration": self.iteration, "samples_seen": self.samples_seen, "seed": self.cfg.seed,
                     "world_size": self.world, "tracker": self.tracker.state_dict(),
                     "trained_networks": list(self.policy.trained_networks()), "config": self.cfg.in_use()}
            return save_policy_checkpoint(self.out / "checkpoints" / f"iter_{self.iteration:06d}", self.policy,
                                          self.optimizer, state, extra, card=self.model_card(
                                              self.reward.describe(), "diffusers", self.export_usage(),
                                              family=self.policy.family))

    def export_usage(self) -> str:
        """The model card's usage lines: load the LoRA, or merge the SaRA values into the base model."""
        if self.policy.sara is not None:
            from diffrl.pipelines.sara import merge_usage

            return merge_usage(f"{self.out}/checkpoints/iter_{self.iteration:06d}")
        return self.policy.lora_usage()

    def _resume(self, path: str) -> None:
        # FSDP2: the checkpoint's whole tensors are loaded into whole copies, then each process keeps its shards
        if self.policy.sara is not None:  # its layout first (a re-mask changes it): the tensors below then fit
            self.policy.sara.load(latest_checkpoint(path), self.optimizer)
        with whole_tensors(self.policy.trainable_module(), lora_only=self.policy.has_lora, write_back=True):
            state, extra = load_checkpoint(path, self.policy, self.optimizer)
        shard_like_params(self.optimizer)
        trained, here = state.get("trained_networks"), list(self.policy.trained_networks())
        if trained is not None and trained != here:  # Wan2.2's experts hold tensors of the same names
            raise ValueError(f"the checkpoint in {path} trained {' and '.join(trained)}; this run trains {' and '.join(here)}: "
                             "resume with the run's policy.wan_experts")
        self.iteration, self.samples_seen = state["iteration"], state["samples_seen"]
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None:
            self.ema = [extra[f"ema.{i}"].to(e) for i, e in enumerate(self.ema)]
        if self.policy.sara is not None:
            self.policy.sara.load_state_tensors(extra)
        self.algorithm.load_state_tensors({k: v for k, v in extra.items() if not k.startswith(("ema.", "sara."))})
        self.finish_resume()

    # ---- the loop ----------------------------------------------------------------------------
    def train_iteration(self) -> dict:
        """One iteration; returns its metrics row."""
        cfg, acc = self.cfg, self.accelerator
        t0 = phase_clock(acc.device)
        batch = self.rollout(self.iteration)
        t1 = phase_clock(acc.device)
        in_update = self.algorithm.samples_in_update  # then update() samples and the scores come after it
        row = {} if in_update else self.advantages(batch)
        gen = derive_generator(cfg.seed, self.iteration, self.rank, 2)
        # the denoiser stays in eval mode: a model trained with dropout (MDM: 0.1) would otherwise compute another
        # function in the update than in the rollout (on-policy ratios != 1, noisy reward gradients)
        for group in self.optimizer.param_groups:  # train.lr_schedule: a function of the iteration (exact resume)
            group["lr"] = cfg.train.learning_rate_at(self.iteration, cfg.max_iterations)
        self.algorithm.step_guard.start_iteration(self.iteration + 1)
        with self.activation_offload():
            metrics = self.algorithm.update(batch, self.optimizer, gen)
        metrics["skipped_steps"] = self.algorithm.step_guard.skipped  # optimiser steps skipped on a NaN/inf gradient
        if self.policy.sara is not None:
            metrics.update(self.policy.sara.metrics())  # trainable entries, the last step's nuclear-norm penalty
        if in_update:
            started = phase_clock(acc.device)
            self.score(batch)
            batch.seconds["reward"] = phase_clock(acc.device) - started  # part of time_update here
            row = self.advantages(batch)  # the reward statistics of the log
        self._update_ema()
        t2 = phase_clock(acc.device)
        self.iteration += 1
        self.samples_seen += len(batch) * self.world
        row = {"iteration": self.iteration, "samples_seen": self.samples_seen, **row, **metrics,
               "seconds": t2 - t0, "time_rollout": t1 - t0, "time_update": t2 - t1,
               # parts of time_rollout (of time_update where update() samples: reward-backprop methods)
               "time_decode": batch.seconds.get("decode", 0.0), "time_reward": batch.seconds.get("reward", 0.0),
               "peak_memory_mb": peak_memory_mb(acc.device)}
        return row

    def eval_label(self) -> str:
        return f"eval {self.eval_reward_name}"
