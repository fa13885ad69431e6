"""Pretrain the toy arithmetic LM shipped in assets/lm/ (`diffrl pretrain-toy-lm`).

The model is an ordinary transformers LlamaForCausalLM (a few hundred thousand parameters) with a
character-level tokenizer saved in transformers format, so `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(folder)` load it with no special code. It is trained with plain
next-token cross-entropy on the answer tokens of a few thousand problems ("12+7=" -> "19</s>") and
stopped as soon as greedy exact-match accuracy on the held-out evaluation problems reaches
--stop-accuracy, so the shipped base is clearly imperfect and RL has headroom.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffrl.lm.tasks import ARITH_CHARS, LMDataset, split_arithmetic, write_jsonl

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def build_char_tokenizer(chars: str = ARITH_CHARS):
    """A character-level tokenizer (one token per character, <s> prepended) in transformers format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]  # ids 0..3
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(chars)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a word
    tok.decoder = decoders.Fuse()  # join characters without spaces
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"], pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"], padding_side="left", model_max_length=64,
    )


def toy_lm_config(tokenizer, hidden: int = 128, layers: int = 3, heads: int = 4, max_positions: int = 32):
    """A small LlamaConfig: tied embeddings, no dropout, vocabulary of the char tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, attention_dropout=0.0, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def encode_examples(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded "<s>prompt answer</s>" ids [N, L], attention mask [N, L] and labels [N, L]
    (-100 except on the answer and its eos: the loss trains the completion only)."""
    seqs, labels = [], []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)  # [N, L]
    lab = torch.full((len(rows), L), -100)  # [N, L]
    mask = torch.zeros((len(rows), L), dtype=torch.long)  # [N, L]
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(s)] = 1
    return ids, mask, lab


@torch.no_grad()
def greedy_accuracy(policy, data: LMDataset, max_new_tokens: int = 5, batch_size: int = 250) -> float:
    """Exact-match accuracy of greedy completions on `data` (the evaluation metric of the toy task)."""
    from diffrl.lm.policy import SamplingSettings
    from diffrl.lm.rewards import exact_match

    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False)
    hits = 0.0
    for start in range(0, len(data), batch_size):
        prompts, meta = data.prompts[start : start + batch_size], data.metadata[start : start + batch_size]
        hits += sum(exact_match(prompts, policy.generate(prompts, settings).completions, meta))
    return hits / len(data)


def pretrain(args: argparse.Namespace) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    from diffrl.lm.policy import LMPolicy

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    pool, rl, evaluation = split_arithmetic(seed=args.seed, n_eval=args.eval_problems, n_rl=args.rl_problems,
                                            max_operand=args.max_operand, ops=args.ops)
    train_rows = pool[: args.num_examples]
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(toy_lm_config(tokenizer, args.hidden, args.layers, args.heads))
    policy = LMPolicy(model, tokenizer)
    eval_set = LMDataset([r["prompt"] for r in evaluation], [{k: v for k, v in r.items() if k != "prompt"} for r in evaluation])
    ids, mask, labels = encode_examples(tokenizer, train_rows)  # [N, L]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))  # 100 warm-up steps
    gen = torch.Generator().manual_seed(args.seed)
    history, t0, step, acc, loss = [], time.time(), 0, 0.0, float("nan")
    bar = tqdm(total=args.max_steps, desc="pretrain toy LM", dynamic_ncols=True)
    while step < args.max_steps and (time.time() - t0) / 60 < args.max_minutes:
        model.train()
        rows = torch.randint(0, len(train_rows), (args.batch_size,), generator=gen)  # [b]
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % args.eval_every == 0:
            model.eval()
            acc = greedy_accuracy(policy, eval_set)
            history.append({"step": step, "loss": round(loss.item(), 4), "eval_accuracy": acc,
                            "minutes": round((time.time() - t0) / 60, 2)})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if step >= args.min_steps and acc >= args.stop_accuracy:
                break
    bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=5, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name; PreTrainedTokenizerFast loads the same tokenizer.json in 4.x too
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    summary = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": loss.item(), "eval_accuracy": acc,
               "parameters": sum(p.numel() for p in model.parameters()), "train_examples": len(train_rows),
               "eval_problems": len(evaluation), "history": history, "args": vars(args)}
    (out / "toy_pretrain.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.data_dir:
        write_jsonl(rl, Path(args.data_dir) / "arith_train.jsonl")
        write_jsonl(evaluation, Path(args.data_dir) / "arith_eval.jsonl")
    print(f"diffrl: toy LM saved to {out} after {step} steps: held-out greedy exact match {acc:.3f}")
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="diffrl pretrain-toy-lm")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--output-dir", default="assets/lm/toy_arith", help="model + tokenizer folder")
    parser.add_argument("--data-dir", default="assets/lm", help="where arith_train.jsonl / arith_eval.jsonl go ('' skips)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the problem split, the weights and the batches")
    parser.add_argument("--max-operand", type=int, default=99, help="operands are 0..max_operand")
    parser.add_argument("--ops", default="+-", help="operations ('+', '-' or both)")
    parser.add_argument("--num-examples", type=int, default=4000, help="pretraining problems (disjoint from RL and eval)")
    parser.add_argument("--rl-problems", type=int, default=2000, help="problems written to arith_train.jsonl for RL")
    parser.add_argument("--eval-problems", type=int, default=500, help="held-out problems (arith_eval.jsonl)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--min-steps", type=int, default=200, help="no early stop before this step")
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--stop-accuracy", type=float, default=0.35,
                        help="stop once held-out greedy exact match reaches this (keep the base imperfect)")
    parser.add_argument("--threads", type=int, default=1)
    return parser
