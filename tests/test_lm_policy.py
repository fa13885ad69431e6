"""LMPolicy on the shipped toy LM: sampled tokens' log-probs, masks, padding, seeding, reference policy."""

from __future__ import annotations

import pytest
import torch

from diffrl.lm.policy import LMPolicy, Rollout, SamplingSettings, builtin_lm_path, completion_mask

PROMPTS = ["3+4=", "57+68=", "90-7=", "12+7=", "8-8=", "99+99="]  # prompt lengths 5..7 tokens: left padding


@pytest.fixture(scope="module")
def policy():
    return LMPolicy.from_pretrained("toy-arith", torch_dtype=torch.float64)


def test_log_probs_equal_generates_own_sampling_distribution(policy):
    """token_log_probs (one padded forward, explicit positions) equals log softmax of the scores `generate`
    sampled from (KV cache, step by step), at temperature 0.7, on every real completion token."""
    settings = SamplingSettings(max_new_tokens=5, temperature=0.7)
    rollout = policy.generate(PROMPTS * 2, settings, seed=3)
    ids, mask = policy.encode_prompts(PROMPTS * 2)
    torch.manual_seed(3)
    config = settings.generation_config(policy.tokenizer)
    config.output_scores = config.return_dict_in_generate = True
    out = policy.unwrapped.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(out.sequences[:, ids.shape[1]:], rollout.completion_ids)  # same seed, same draw
    scores = torch.stack(out.scores, dim=1).double()  # [B, T, V]: logits / temperature
    expected = torch.log_softmax(scores, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ours = policy.token_log_probs(rollout, temperature=0.7)
    m = rollout.completion_mask.bool()
    assert m.sum() > len(PROMPTS)
    torch.testing.assert_close(ours[m], expected[m], rtol=0, atol=1e-6)  # generate keeps float32 scores


def test_padded_rows_score_as_if_alone(policy):
    rollout = policy.generate(PROMPTS, SamplingSettings(max_new_tokens=5), seed=0)
    batch = policy.token_log_probs(rollout)
    for i in range(len(PROMPTS)):
        alone = rollout.index(torch.tensor([i]))  # trimmed: no padding at all
        assert alone.prompt_mask.all() and alone.completion_mask.all()
        lp = policy.token_log_probs(alone)
        n = alone.completion_ids.shape[1]
        torch.testing.assert_close(lp[0], batch[i, :n], rtol=0, atol=1e-10)


def test_masks_and_text(policy):
    rollout = policy.generate(PROMPTS, SamplingSettings(max_new_tokens=6), seed=1)
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    for i, row in enumerate(rollout.completion_ids.tolist()):
        m = rollout.completion_mask[i].tolist()
        end = row.index(eos) + 1 if eos in row else len(row)
        assert m == [1] * end + [0] * (len(row) - end)
        assert all(t == pad for t in row[end:])
        assert rollout.completions[i] == policy.tokenizer.decode([t for t in row[:end] if t != eos])
    assert rollout.prompt_mask.sum(1).tolist() == [len(p) + 1 for p in PROMPTS]  # + <s>
    # hand-made: eos at 1 and never
    ids = torch.tensor([[7, eos, pad, 9], [5, 6, 7, 8]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(policy):
    state = torch.get_rng_state()
    a = policy.generate(PROMPTS * 4, SamplingSettings(max_new_tokens=5), seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    b = policy.generate(PROMPTS * 4, SamplingSettings(max_new_tokens=5), seed=11)
    c = policy.generate(PROMPTS * 4, SamplingSettings(max_new_tokens=5), seed=12)
    assert a.completions == b.completions and a.completions != c.completions


def test_reference_is_the_base_model_with_lora_disabled():
    from transformers import AutoModelForCausalLM

    pol = LMPolicy.from_pretrained("toy-arith", torch_dtype=torch.float64)
    pol.add_lora(4, 8)
    with torch.no_grad():
        for name, p in pol.unwrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    rollout = pol.generate(PROMPTS, SamplingSettings(max_new_tokens=5), seed=2)
    with torch.no_grad():
        current = pol.token_log_probs(rollout)
        ref = pol.token_log_probs(rollout, reference=True)
        base = LMPolicy(AutoModelForCausalLM.from_pretrained(builtin_lm_path("toy-arith"), dtype=torch.float64),
                        pol.tokenizer).token_log_probs(rollout)
    m = rollout.completion_mask.bool()
    torch.testing.assert_close(ref[m], base[m], rtol=0, atol=1e-12)
    assert (current[m] - base[m]).abs().max() > 1e-2
    assert all(not p.requires_grad for n, p in pol.unwrapped.named_parameters() if "lora" not in n)
    assert all(p.requires_grad for p in pol.trainable_parameters())


def test_rollout_cat_pads_both_blocks():
    a = Rollout(torch.tensor([[1, 5]]), torch.tensor([[1, 1]]), torch.tensor([[6, 2, 0]]), torch.tensor([[1, 1, 0]]), ["4"], ["x"])
    b = Rollout(torch.tensor([[1, 5, 6]]), torch.tensor([[1, 1, 1]]), torch.tensor([[2]]), torch.tensor([[1]]), [""], ["y"])
    c = Rollout.cat([a, b], pad_token_id=0)
    assert c.prompt_ids.tolist() == [[0, 1, 5], [1, 5, 6]] and c.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert c.completion_ids.tolist() == [[6, 2, 0], [2, 0, 0]] and c.completion_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
