"""The language-model RL loop: sample -> score -> advantages (or NFT targets) -> update -> log ->
evaluate -> checkpoint, under accelerate, with the diffusion loop's conventions: every random draw is
seeded by (seed, iteration, process, purpose) so a resumed run continues exactly; metrics.jsonl,
curves.png and a tqdm bar; atomic safetensors checkpoints through diffrl.checkpoint.

One iteration, per process: P prompts x K completions sampled with `model.generate`; rewards; groups
whose rewards are all equal dropped and refilled from fresh prompts when dynamic sampling is on
(DAPO); old log-probs (only needed when the weights move within the iteration) and reference
log-probs (KL) without gradient; then, per inner epoch, the kept completions in
P*K / train_batch_size mini-batches, each one optimiser step over micro-batches with accumulated
gradients scaled so the step sees exactly the mini-batch's aggregated loss.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from diffrl.runloop import TrainLoop
from diffrl.checkpoint import load_checkpoint, save_policy_checkpoint
from diffrl.core import nonconstant_groups, zero_std_fraction
from diffrl.data import draw_prompt_indices
from diffrl.lm.losses import lm_loss, make_objective, micro_batch_share
from diffrl.lm.policy import LMPolicy, Rollout, SamplingSettings
from diffrl.lm.rewards import WeightedRewards, resolve_lm_reward
from diffrl.lm.tasks import load_lm_dataset
from diffrl.optim import GuardedStep
from diffrl.runtime import DTYPES, DeviceMetrics, derive_generator, peak_memory_mb, to_device, wide

__all__ = ["LMBatch", "LMTrainer"]


@dataclass
class LMBatch:
    """This process's scored completions of one iteration (the groups kept for training)."""

    rollout: Rollout  # B rows
    metadata: list[dict]
    group_ids: torch.Tensor  # [B] long, whole groups
    rewards: dict[str, torch.Tensor]  # name -> [B]
    total: torch.Tensor  # [B] weighted reward
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # advantages, or NFT's correct / rhat: [B]
    stats: dict[str, float] = field(default_factory=dict)
    trainable: bool = True  # False: dynamic sampling kept nothing; the rows only feed a zero-loss pass

    def __len__(self) -> int:
        return len(self.rollout)


def _seed(*keys: int) -> int:
    return derive_generator(*keys).initial_seed()


class LMTrainer(TrainLoop):
    """Builds the policy, rewards and optimiser from a validated diffrl.config.RunConfig (an lm_* algorithm) and trains."""

    def __init__(self, cfg, accelerator: Accelerator | None = None):
        self.setup_run(cfg, accelerator)
        acc = self.accelerator

        p, lm, t = cfg.policy, cfg.lm, cfg.train
        self.policy = LMPolicy.from_pretrained(cfg.model, torch_dtype=DTYPES[p.dtype], device=acc.device)
        if p.resolved_adapter() == "lora":  # policy.adapter full (or lora_rank 0): the whole model trains
            self.policy.add_lora(p.lora_rank, p.lora_alpha, p.lora_targets)
        else:
            if lm.kl_beta > 0:
                self.policy.keep_reference_copy()  # before training touches the weights
            self.policy.train_full()
        if p.gradient_checkpointing == "full":
            self.policy.unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rewards = WeightedRewards(lm.rewards)
        self.eval_reward = resolve_lm_reward(lm.eval_reward)
        self.data = load_lm_dataset(lm.train_data)
        self.eval_data = load_lm_dataset(lm.eval_data)
        self.objective = make_objective(cfg.algorithm, lm)
        self.sampling = SamplingSettings(max_new_tokens=lm.max_new_tokens, temperature=lm.temperature,
                                         top_p=lm.top_p, top_k=lm.top_k)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )
        self.policy.model, self.optimizer = acc.prepare(self.policy.model, self.optimizer)
        self.step_guard = GuardedStep.from_config(acc, t)  # clip; skip (and count) a step whose gradient norm is NaN/inf
        self.iteration = 0
        self.samples_seen = 0
        self.prompt_draws = 0  # prompt batches drawn so far (dynamic sampling draws several per iteration)
        if self.resume_from is not None:  # verified before the model loaded (TrainLoop.setup_run)
            self._resume(self.resume_from)

    # ---- rollout --------------------------------------------------------------------------------
    def sample_groups(self, iteration: int, round_: int) -> LMBatch:
        """One round: P fresh prompts x K completions, sampled and scored (no gradient)."""
        cfg = self.cfg
        P, K = cfg.train.prompts_per_iteration, cfg.train.group_size
        idx = draw_prompt_indices(len(self.data), P * self.world, self.prompt_draws, cfg.seed)  # [P * world]
        self.prompt_draws += 1
        local = idx[self.rank * P : (self.rank + 1) * P].tolist()  # whole groups on this process
        prompts = [self.data.prompts[i] for i in local for _ in range(K)]
        metadata = [self.data.metadata[i] for i in local for _ in range(K)]
        group_ids = (torch.arange(P) + (round_ * self.world + self.rank) * P).repeat_interleave(K)  # [B]
        parts = []
        for c, start in enumerate(range(0, P * K, cfg.train.rollout_batch_size)):
            chunk = prompts[start : start + cfg.train.rollout_batch_size]
            parts.append(self.policy.generate(chunk, self.sampling, seed=_seed(cfg.seed, iteration, self.rank, round_, c, 1)))
        rollout = Rollout.cat(parts, self.policy.tokenizer.pad_token_id)
        per_reward, total = self.rewards.scores(prompts, rollout.completions, metadata)
        return LMBatch(rollout, metadata, group_ids, per_reward, total)

    def rollout(self, iteration: int) -> LMBatch:
        """This iteration's training groups: one round, or (dynamic sampling) rounds until P groups with
        unequal rewards are found or lm.dynamic_sampling_rounds is spent."""
        cfg, lm = self.cfg, self.cfg.lm
        P, K = cfg.train.prompts_per_iteration, cfg.train.group_size
        rounds = lm.dynamic_sampling_rounds if lm.dynamic_sampling else 1
        kept, sampled = [], []
        n_groups = 0
        for r in range(rounds):
            batch = self.sample_groups(iteration, r)
            sampled.append(batch)
            if not lm.dynamic_sampling:
                kept.append(batch)
                break
            keep = nonconstant_groups(batch.total, batch.group_ids)  # [B]
            rows = keep.nonzero().squeeze(1)[: (P - n_groups) * K]  # whole groups: K consecutive rows each
            if len(rows):
                kept.append(self._select(batch, rows))
                n_groups += len(rows) // K
            if n_groups >= P:
                break
        all_total = torch.cat([b.total for b in sampled])  # [rounds * P * K]
        all_ids = torch.cat([b.group_ids for b in sampled])
        stats = {
            "reward_mean": all_total.mean().item(), "reward_std": all_total.std(unbiased=False).item(),
            **{f"reward_{n}": torch.cat([b.rewards[n] for b in sampled]).mean().item() for n in self.rewards.weights},
            "zero_std_frac": zero_std_fraction(all_total, all_ids),
            "completion_length": torch.cat([b.rollout.completion_mask.sum(1) for b in sampled]).float().mean().item(),
            "sampling_rounds": len(sampled), "kept_groups": n_groups if lm.dynamic_sampling else P,
        }
        if not kept:  # nothing to learn from; other processes may still step (see update)
            kept, trainable = [sampled[0]], False
        else:
            trainable = True
        batch = kept[0] if len(kept) == 1 else LMBatch(
            Rollout.cat([b.rollout for b in kept], self.policy.tokenizer.pad_token_id),
            [m for b in kept for m in b.metadata], torch.cat([b.group_ids for b in kept]),
            {n: torch.cat([b.rewards[n] for b in kept]) for n in self.rewards.weights}, torch.cat([b.total for b in kept]),
        )
        targets = self.objective.targets(batch.rewards, self.rewards.weights, batch.group_ids)
        batch.targets = {k: v.to(self.accelerator.device) for k, v in targets.items()}
        batch.stats, batch.trainable = stats, trainable
        return batch

    @staticmethod
    def _select(batch: LMBatch, rows: torch.Tensor) -> LMBatch:
        return LMBatch(batch.rollout.index(rows), [batch.metadata[i] for i in rows.tolist()], batch.group_ids[rows],
                       {n: r[rows] for n, r in batch.rewards.items()}, batch.total[rows])

    # ---- update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, rollout: Rollout, reference: bool) -> torch.Tensor:
        """Log-probs of every completion token without gradient, in micro-batches. -> [B, T]"""
        mb = self.cfg.train.micro_batch_size or self.cfg.train.train_batch_size
        parts = []
        for start in range(0, len(rollout), mb):
            part = rollout.index(list(range(start, min(start + mb, len(rollout)))))
            parts.append(self.policy.token_log_probs(part, temperature=self.cfg.lm.temperature, reference=reference))
        T = rollout.completion_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) for x in parts])  # [B, T]

    def update(self, batch: LMBatch, generator: torch.Generator) -> dict[str, float]:
        acc, lm, t = self.accelerator, self.cfg.lm, self.cfg.train
        B = len(batch) if batch.trainable else 0
        n_mini = t.prompts_per_iteration * t.group_size // t.train_batch_size  # optimiser steps per epoch
        mb = t.micro_batch_size or t.train_batch_size
        # the weights move within the iteration only with several steps: otherwise old = current, detached
        need_old = t.num_inner_epochs > 1 or n_mini > 1
        logp_old = self._score(batch.rollout, reference=False) if need_old and B else None  # [B, T]
        logp_ref = self._score(batch.rollout, reference=True) if lm.kl_beta > 0 and B else None  # [B, T]
        metrics = DeviceMetrics()  # per-micro-batch values stay on the device until the end of the update
        completion_len = batch.rollout.host_lengths()[1]  # [B] host token counts: micro-batches weighed without syncs

        for _ in range(t.num_inner_epochs):
            order = torch.randperm(B, generator=generator)  # [B]
            # mini-batches, nearly equal (some empty when few kept); row bookkeeping in host lists
            for rows in (part.tolist() for part in torch.tensor_split(order, n_mini)):
                if len(rows) == 0 and self.world == 1:
                    continue
                dummy = len(rows) == 0  # other processes step: join their gradient all-reduce with a zero loss
                rows = [0] if dummy else rows
                rows_total = len(rows)
                tokens_total = float(sum(completion_len[i] for i in rows))
                micro = [rows[start : start + mb] for start in range(0, len(rows), mb)]
                for j, mrows in enumerate(micro):
                    part = batch.rollout.index(mrows)
                    T = part.completion_ids.shape[1]
                    mask = part.completion_mask.float()  # [b, T]
                    logp, entropy = self.policy.token_log_probs(part, temperature=lm.temperature, with_entropy=True)  # [b, T]
                    mrows_d = to_device(torch.tensor(mrows), acc.device)  # [b]
                    old = logp.detach() if logp_old is None else logp_old[mrows_d, :T]
                    ref = logp.detach() if logp_ref is None else logp_ref[mrows_d, :T]  # unused unless kl_beta > 0
                    targets = {k: v[to_device(torch.tensor(mrows), v.device)] for k, v in batch.targets.items()}
                    loss, m = lm_loss(self.objective, logp, old, mask, targets, ref)
                    tokens = float(sum(part.host_lengths()[1]))
                    share = 0.0 if dummy else micro_batch_share(lm.loss_aggregation, tokens, len(mrows), rows_total,
                                                                tokens_total)
                    sync = acc.no_sync(self.policy.model) if j < len(micro) - 1 else contextlib.nullcontext()
                    with sync:
                        acc.backward(loss * share)
                    if not dummy:
                        metrics.add("loss", loss)
                        metrics.add("entropy", wide((entropy * mask).sum()) / max(tokens, 1.0))
                        for k, v in m.items():
                            metrics.add(k, v)
                        # extremes over the iteration (they replace the means of per-micro-batch extremes)
                        metrics.maximum("ratio_max", m["ratio_max"])
                        metrics.minimum("ratio_min", m["ratio_min"])
                metrics.add("grad_norm", self.step_guard(self.optimizer))
        out = metrics.means()  # the update's one read of the device
        out.setdefault("loss", 0.0)
        out["trained_completions"] = B
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy completions of the first lm.num_eval held-out prompts, scored by lm.eval_reward; the first
        32 are written to eval/<tag>.jsonl for a person to read."""
        cfg = self.cfg
        n = min(cfg.lm.num_eval, len(self.eval_data))
        greedy = SamplingSettings(max_new_tokens=cfg.lm.max_new_tokens, do_sample=False)
        prompts, meta = self.eval_data.prompts[:n], self.eval_data.metadata[:n]
        completions = []
        bs = max(cfg.train.rollout_batch_size, 64)
        for start in range(0, n, bs):
            completions += self.policy.generate(prompts[start : start + bs], greedy).completions
        scores = torch.as_tensor(self.eval_reward(prompts, completions, meta), dtype=torch.float32)  # [n]
        if self.accelerator.is_main_process:
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            rows = [{"prompt": p, "completion": c, "reward": s, **m} for p, c, s, m in
                    zip(prompts[:32], completions[:32], scores.tolist(), meta[:32])]
            (self.out / "eval" / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"eval_reward_mean": scores.mean().item()}

    # ---- state ----------------------------------------------------------------------------------
    def save(self) -> Path | None:
        self.check_finite_before_save(self.policy.trainable_module(), self.optimizer)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = {"iteration": self.iteration, "samples_seen": self.samples_seen, "prompt_draws": self.prompt_draws,
                 "seed": self.cfg.seed, "world_size": self.world, "algorithm": self.cfg.algorithm,
                 "config": self.cfg.in_use()}
        return save_policy_checkpoint(self.out / "checkpoints" / f"iter_{self.iteration:06d}", self.policy, self.optimizer, state,
                               card=self.model_card(", ".join(f"{k} ({w})" for k, w in self.cfg.lm.rewards.items()), "peft",
                                                    'PeftModel.from_pretrained(base_model, "path/to/this/folder")'))

    def _resume(self, path: str) -> None:
        state, _ = load_checkpoint(path, self.policy, self.optimizer)
        self.iteration, self.samples_seen = state["iteration"], state["samples_seen"]
        self.prompt_draws = state["prompt_draws"]
        self.finish_resume()

    # ---- the loop -------------------------------------------------------------------------------
    def train_iteration(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        batch = self.rollout(self.iteration)
        t1 = time.perf_counter()
        self.policy.model.train()
        for group in self.optimizer.param_groups:  # train.lr_schedule: a function of the iteration (exact resume)
            group["lr"] = cfg.train.learning_rate_at(self.iteration, cfg.max_iterations)
        self.step_guard.start_iteration(self.iteration + 1)
        metrics = self.update(batch, derive_generator(cfg.seed, self.iteration, self.rank, 2))
        metrics["skipped_steps"] = self.step_guard.skipped  # optimiser steps skipped on a NaN/inf gradient
        self.policy.model.eval()
        t2 = time.perf_counter()
        self.iteration += 1
        sampled = batch.stats["sampling_rounds"] * cfg.train.prompts_per_iteration * cfg.train.group_size
        self.samples_seen += sampled * self.world
        return {"iteration": self.iteration, "samples_seen": self.samples_seen, **batch.stats, **metrics,
                "seconds": t2 - t0, "time_rollout": t1 - t0, "time_update": t2 - t1,
                "peak_memory_mb": peak_memory_mb(acc.device)}

    def eval_label(self) -> str:
        return f"eval {self.cfg.lm.eval_reward} (greedy, {min(self.cfg.lm.num_eval, len(self.eval_data))} held-out prompts)"

