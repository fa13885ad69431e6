"""Text-motion evaluation: the T2M metrics against closed forms and hand-computed cases, and the learned text-motion
rewards (TMR, the T2M evaluator) on tiny random weights: the published formulas recomputed by hand from the
modules, gradients to the features, exact save -> load round trips, and clear failures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffrl.motion.metrics import diversity, fid, frechet_distance, gaussian_fit, mm_dist, r_precision
from diffrl.rewards import build_reward
from diffrl.rewards.motion_models import POS_TAGS, convert_t2m, convert_tmr, sinusoidal_positions, tiny_word_table
from diffrl.rewards.registry import declares_differentiable, reward_accepts

F64 = torch.float64


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_r_precision_hand_computed_4x4():
    # 1-d embeddings; distances |t_i - m_j|. Ranks of the matches (motions strictly closer than the match):
    # t0=0: match 0.1, none closer -> 0; t1=1: match 1.2, m0 (0.9) and m2 (0.0) closer -> 2;
    # t2=2: match 1.0, m1 (0.2) closer -> 1; t3=3: match 0.5, none closer -> 0.
    text = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=F64)
    motion = torch.tensor([[0.1], [2.2], [1.0], [3.5]], dtype=F64)
    got = r_precision(text, motion, batch=4, top_k=3)
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor([2 / 4, 3 / 4, 4 / 4], dtype=F64), rtol=0, atol=1e-15)
    # a second batch of perfect pairs averages in; an incomplete last batch is dropped, as the protocol's loader does
    shifted = torch.cat([text, text + 100, torch.tensor([[500.0]], dtype=F64)])
    motions = torch.cat([motion, text + 100, torch.tensor([[-500.0]], dtype=F64)])
    torch.testing.assert_close(r_precision(shifted, motions, batch=4, top_k=3),
                               torch.tensor([6 / 8, 7 / 8, 8 / 8], dtype=F64), rtol=0, atol=1e-15)


def test_r_precision_is_one_for_identical_well_separated_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = 10 * torch.randn(96, 16, generator=g, dtype=F64)
    torch.testing.assert_close(r_precision(emb, emb.clone()), torch.ones(3, dtype=F64), rtol=0, atol=0)


def test_r_precision_rejects_too_few_pairs_and_mismatched_shapes():
    emb = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="at least one full batch of 32 pairs, got 10"):
        r_precision(emb, emb)
    with pytest.raises(ValueError, match=r"same shape.*\[10, 4\] and \[10, 5\]"):
        r_precision(emb, torch.zeros(10, 5), batch=4)


def test_mm_dist_is_the_mean_pair_distance():
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]], dtype=F64)
    motion = torch.tensor([[3.0, 4.0], [1.0, 2.0], [2.0, -1.0]], dtype=F64)
    got = mm_dist(text, motion)  # distances 5, 1, 0
    assert got.dtype == F64
    assert got.item() == pytest.approx(2.0, abs=1e-15)


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([0.5, -1.0, 0.0], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    expected = (0.25 + 4 + 4) + (4 + 1 + 0)  # sum (mu1 - mu2)^2 + sum (sqrt s1 - sqrt s2)^2
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # non-commuting 2 x 2 covariances: tr sqrt(A B) = sqrt(tr(AB) + 2 sqrt(det(AB))) (eigenvalues l1, l2 of AB:
    # (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2))
    a = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=F64)
    b = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=F64)
    ab = a @ b
    trace_root = math.sqrt(ab.trace().item() + 2 * math.sqrt(torch.linalg.det(ab).item()))
    m1, m2 = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)
    expected = (4 + 2.25) + a.trace().item() + b.trace().item() - 2 * trace_root
    assert frechet_distance(m1, a, m2, b).item() == pytest.approx(expected, abs=1e-12)


def _with_moments(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Samples whose sample mean and (N - 1) covariance are exactly `mean` and `cov`: whiten, then colour."""
    z = z - z.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (z.shape[0] - 1)))
    return z @ whiten.T @ torch.linalg.cholesky(cov).T + mean


def test_fid_zero_for_identical_sets_and_closed_form_for_known_gaussians():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 6, generator=g, dtype=F64) @ torch.randn(6, 6, generator=g, dtype=F64)
    assert abs(fid(emb, emb.clone()).item()) < 1e-10
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 2.0], dtype=F64), torch.tensor([0.25, 1.0, 8.0], dtype=F64)
    a = _with_moments(torch.randn(300, 3, generator=g, dtype=F64), mu1, torch.diag(s1))
    b = _with_moments(torch.randn(250, 3, generator=g, dtype=F64), mu2, torch.diag(s2))
    mean_a, cov_a = gaussian_fit(a)
    torch.testing.assert_close(cov_a, torch.diag(s1), rtol=0, atol=1e-12)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()  # 10 + (0.25 + 1 + 2)
    assert fid(a, b).item() == pytest.approx(expected.item(), abs=1e-10)


def test_diversity_follows_the_protocol_draws():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 5, generator=g, dtype=F64)
    got = diversity(emb, pairs=25, generator=torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)  # the documented draws: randperm(N)[:pairs], first then second
    first, second = torch.randperm(40, generator=draws)[:25], torch.randperm(40, generator=draws)[:25]
    expected = sum(math.sqrt(sum((emb[i, d].item() - emb[j, d].item()) ** 2 for d in range(5)))
                   for i, j in zip(first.tolist(), second.tolist())) / 25
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert diversity(torch.ones(30, 4, dtype=F64), pairs=30).item() == 0.0  # one point: no spread
    with pytest.raises(ValueError, match=r"pairs must be in \[1, N=40\]"):
        diversity(emb)  # 300 pairs of distinct rows need N >= 300


# ---- learned text-motion rewards (tiny random weights) ----------------------------------------------------------
PROMPTS = ["a person walks forward quickly", "someone jumps twice", "a man waves his left hand then turns around"]


def _features(batch=3, frames=24, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 263, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def tmr64():
    return build_reward("tmr", model="tiny", dtype="float64").load()


@pytest.fixture(scope="module")
def t2m64():
    return build_reward("t2m_evaluator", model="tiny", dtype="float64").load()


def test_registered_as_differentiable_motion_rewards():
    for name in ("tmr", "t2m_evaluator"):
        assert reward_accepts(name) == ("motion",)
        assert declares_differentiable(name)


def test_sinusoidal_positions_formula():
    table = sinusoidal_positions(7, 6, F64, torch.device("cpu"))
    for p in range(7):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-15)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-15)


def _actor_by_hand(encoder, inputs, mask):
    """Mean-token output of an ACTOR-style encoder, wired by hand: projection, tokens first, positions, padding."""
    batch = inputs.shape[0]
    steps = inputs @ encoder.projection.weight.T + encoder.projection.bias
    sequence = torch.cat([encoder.tokens.expand(batch, -1, -1), steps], dim=1)
    length, dim = sequence.shape[1:]
    angle = [[p / 10000 ** (2 * (i // 2) / dim) for i in range(dim)] for p in range(length)]
    positions = torch.tensor([[math.sin(a) if i % 2 == 0 else math.cos(a) for i, a in enumerate(row)] for row in angle],
                             dtype=F64)
    keep = torch.cat([torch.ones(batch, 2, dtype=torch.bool), mask], dim=1)
    return encoder.seqTransEncoder(sequence + positions, src_key_padding_mask=~keep)[:, 0]


def test_tmr_is_the_cosine_of_the_mean_token_embeddings(tmr64):
    x = _features()
    enc = tmr64.encoders
    with torch.no_grad():
        scores = tmr64(x, PROMPTS)
        motion = _actor_by_hand(enc.motion_encoder, (x - enc.motion_mean) / (enc.motion_std + 1e-12),
                                torch.ones(3, 24, dtype=torch.bool))
        tokens = tmr64.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        words = tmr64.text_model(input_ids=tokens["input_ids"],
                                 attention_mask=tokens["attention_mask"]).last_hidden_state
        text = _actor_by_hand(enc.text_encoder, words, tokens["attention_mask"].bool())
    expected = (text * motion).sum(-1) / (text.norm(dim=-1) * motion.norm(dim=-1))
    assert scores.dtype == F64 and scores.shape == (3,)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
    assert scores.abs().max() <= 1 and scores.std() > 1e-4  # a cosine, and the tiny model tells the pairs apart
    # the text padding is masked: a prompt scores the same alone as beside a longer one
    alone = tmr64(x[1:2], PROMPTS[1:2])
    torch.testing.assert_close(alone, scores[1:2], rtol=0, atol=1e-12)


def test_t2m_word_table_tokens():
    table = tiny_word_table(8)
    got = [(table.words[row], tag) for row, tag in table.tokens("A person walks forward, quickly! Zebra-like 3 x", 20)]
    assert got == [("sos", "OTHER"), ("a", "DET"), ("person", "NOUN"), ("walk", "Act_VIP"), ("forward", "Loc_VIP"),
                   ("quickly", "Desc_VIP"), ("unk", "OTHER"), ("unk", "OTHER"), ("eos", "OTHER")]  # zebralike, x
    assert len(table.tokens(" ".join(["walk"] * 30), 20)) == 22  # at most 20 words, plus sos and eos


def _gru_by_hand(steps, h, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's GRU cell equations, one step at a time (gates r, z, n)."""
    size = h.shape[0]
    for x in steps:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:size] + gh[:size])
        z = torch.sigmoid(gi[size:2 * size] + gh[size:2 * size])
        n = torch.tanh(gi[2 * size:] + r * gh[2 * size:])
        h = (1 - z) * n + z * h
    return h


def _bigru_by_hand(enc, inputs):
    """One sequence [L, input] (real steps only) through a BiGruEncoder's maths: embed, both directions, MLP."""
    steps = inputs @ enc.input_emb.weight.T + enc.input_emb.bias
    g = enc.gru
    forward = _gru_by_hand(steps, enc.hidden[0, 0], g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
    backward = _gru_by_hand(steps.flip(0), enc.hidden[1, 0], g.weight_ih_l0_reverse, g.weight_hh_l0_reverse,
                            g.bias_ih_l0_reverse, g.bias_hh_l0_reverse)
    lin1, norm, _, lin2 = enc.output_net
    h = torch.cat([forward, backward]) @ lin1.weight.T + lin1.bias
    h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + norm.eps) * norm.weight + norm.bias
    h = torch.where(h > 0, h, 0.2 * h)
    return h @ lin2.weight.T + lin2.bias


def test_t2m_evaluator_is_minus_the_text_motion_distance(t2m64):
    x = _features()
    ev, table = t2m64.evaluator, t2m64.table
    with torch.no_grad():
        scores = t2m64(x, PROMPTS)
        normalised = ((x - ev.motion_mean) / ev.motion_std)[..., :259]  # the 4 foot contacts are not read
        conv1, _, _, conv2, _, _ = ev.movement_encoder.main
        h = F.leaky_relu(F.conv1d(normalised.transpose(1, 2), conv1.weight, conv1.bias, stride=2, padding=1), 0.2)
        h = F.leaky_relu(F.conv1d(h, conv2.weight, conv2.bias, stride=2, padding=1), 0.2).transpose(1, 2)
        movements = h @ ev.movement_encoder.out_net.weight.T + ev.movement_encoder.out_net.bias
        assert movements.shape == (3, 24 // 4, 16)
        expected = []
        for b, prompt in enumerate(PROMPTS):
            motion = _bigru_by_hand(ev.motion_encoder, movements[b])
            tokens = table.tokens(prompt, 20)  # every real token, no padding
            words = torch.stack([table.vectors[row] for row, _ in tokens])
            onehot = torch.stack([torch.eye(15, dtype=F64)[POS_TAGS.index(tag)] for _, tag in tokens])
            pos = ev.text_encoder.pos_emb
            text = _bigru_by_hand(ev.text_encoder, words + onehot @ pos.weight.T + pos.bias)
            expected.append(-(text - motion).norm())
    assert scores.dtype == F64 and scores.shape == (3,)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=0, atol=1e-12)
    assert (scores < 0).all() and scores.std() > 1e-4


@pytest.mark.parametrize("name", ["tmr", "t2m_evaluator"])
def test_gradients_reach_the_features(name, tmr64, t2m64):
    reward = tmr64 if name == "tmr" else t2m64
    x = _features(batch=2, frames=16).requires_grad_()
    reward(x, PROMPTS[:2]).sum().backward()
    grad = x.grad
    assert torch.isfinite(grad).all()
    reads = grad.abs().sum(dim=(0, 1))  # [263]: how much each channel moves the score
    if name == "t2m_evaluator":
        assert (reads[:259] > 0).all() and (reads[259:] == 0).all()  # the evaluator drops the foot contacts
    else:
        assert (reads > 0).all()
    # the gradient is the score's derivative: a central difference along a random direction agrees
    direction = _features(batch=2, frames=16, seed=5)
    eps = 1e-5
    with torch.no_grad():
        plus = reward(x.detach() + eps * direction, PROMPTS[:2]).sum()
        minus = reward(x.detach() - eps * direction, PROMPTS[:2]).sum()
    assert ((plus - minus) / (2 * eps)).item() == pytest.approx((grad * direction).sum().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["tmr", "t2m_evaluator"])
def test_float32_scores_and_saved_tiny_weights_reload_exactly(name, tmp_path):
    reward = build_reward(name, model="tiny")
    x = _features(dtype=torch.float32)
    scores = reward(x, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and torch.isfinite(scores).all()
    folder = reward.save(tmp_path / name)
    reloaded = build_reward(name, model=str(folder))
    assert torch.equal(reloaded(x, PROMPTS), scores)
    assert torch.equal(build_reward(name, model=str(folder), dtype="float64")(x.double(), PROMPTS),
                       build_reward(name, model="tiny", dtype="float64")(x.double(), PROMPTS))


def test_conversion_from_reference_state_dicts_reproduces_the_scores(tmp_path, tmr64, t2m64):
    x = _features()
    # TMR: one state dict per encoder as the reference names them, with a stored positional table to drop
    tiny_folder = tmr64.save(tmp_path / "tmr_tiny")
    stored_positions = {"sequence_pos_encoding.pe": torch.zeros(5000, 1, 16)}
    folder = convert_tmr(tmp_path / "tmr", distilbert=str(tiny_folder / "distilbert"),
                         motion_encoder={**tmr64.encoders.motion_encoder.state_dict(), **stored_positions},
                         text_encoder=tmr64.encoders.text_encoder.state_dict(),
                         mean=tmr64.encoders.motion_mean, std=tmr64.encoders.motion_std,
                         text_dim=16, latent_dim=16, ff_size=32, num_layers=1, num_heads=2)
    converted = build_reward("tmr", model=str(folder), dtype="float64")
    torch.testing.assert_close(converted(x, PROMPTS), tmr64(x, PROMPTS), rtol=0, atol=1e-6)  # stored in float32
    # T2M: finest.tar's three state dicts, the statistics, GloVe-style words and vectors
    ev, table = t2m64.evaluator, t2m64.table
    checkpoint = {part: getattr(ev, part).state_dict() for part in ("movement_encoder", "motion_encoder",
                                                                   "text_encoder")}
    folder = convert_t2m(tmp_path / "t2m", checkpoint=checkpoint, mean=ev.motion_mean, std=ev.motion_std,
                         words=table.words, vectors=table.vectors, pos=table.pos, lemmas=table.lemmas,
                         movement_hidden=16, movement_latent=16, motion_hidden=16, text_hidden=16, embedding_dim=12,
                         word_dim=8)
    converted = build_reward("t2m_evaluator", model=str(folder), dtype="float64")
    torch.testing.assert_close(converted(x, PROMPTS), t2m64(x, PROMPTS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="Missing key"):
        convert_t2m(tmp_path / "bad", checkpoint={**checkpoint, "text_encoder": {}}, mean=ev.motion_mean,
                    std=ev.motion_std, words=table.words, vectors=table.vectors, word_dim=8)


@pytest.mark.parametrize("name, layout", [("tmr", "encoders.safetensors"), ("t2m_evaluator", "evaluator.safetensors")])
def test_missing_weights_fail_naming_the_path_and_the_fix(name, layout, tmp_path):
    absent = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError) as err:
        build_reward(name, model=str(absent)).load()
    message = str(err.value)
    assert str(absent) in message and layout in message and "model='tiny'" in message
    with pytest.raises(FileNotFoundError, match=f"has no default weights.*{layout}"):
        build_reward(name).load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} lacks config.json, {layout}"):
        build_reward(name, model=str(empty)).load()


@pytest.mark.parametrize("name", ["tmr", "t2m_evaluator"])
def test_wrong_feature_width_fails_naming_263(name, tmr64, t2m64):
    reward = tmr64 if name == "tmr" else t2m64
    with pytest.raises(ValueError, match=r"\[B, T, 263\], got width 67"):
        reward(_features()[..., :67], PROMPTS)


def test_t2m_needs_one_movement_step(t2m64):
    with pytest.raises(ValueError, match="at least 4 frames, got 3"):
        t2m64(_features(frames=3), PROMPTS)
