"""The procedural motion world: exact skeletons, planted feet, the floor, the exact scorer (100 % on the world's
motions, 0 % on every other label), the soft score, the shipped prompt sets and the rewards."""

import json
import math

import pytest
import torch

from diffrl.data import load_prompts
from diffrl.motion.captions import HELD_OUT_LABELS, builtin_motion_prompt_sets, caption_split, write_motion_prompt_sets
from diffrl.motion.representation import joints_to_features, recover_from_ric
from diffrl.motion.scorer import measure, score_motion, score_motions, soft_score
from diffrl.motion.skeleton import PARENTS, REST_OFFSETS
from diffrl.motion.world import LABEL_FIELDS, POSES, all_labels, check_label, generate

LABELS = all_labels()
SEEDS = (0, 1, 2)


def _label(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("prompt", "split")}


@pytest.fixture(scope="module")
def world():
    """Every label's motion for SEEDS: (labels, joints float64 [N, 61, 22, 3])."""
    labels = [label for _ in SEEDS for label in LABELS]
    seeds = [seed for seed in SEEDS for _ in LABELS]
    return labels, torch.stack([generate(label, seed) for label, seed in zip(labels, seeds)])


@pytest.fixture(scope="module")
def shipped():
    """Both shipped sets' records and their motions (seed = the record's index), joints [400, 61, 22, 3]."""
    records = load_prompts("builtin:toy_motion_train").metadata + load_prompts("builtin:toy_motion_eval").metadata
    return records, torch.stack([generate(r, seed=i) for i, r in enumerate(records)])


def _facing(joints):
    """Unit facing (x, z) [..., 2] by HumanML3D's formula, written out: cross(up, (r_hip - l_hip) + (r_sho - l_sho))."""
    across = joints[..., 2, :] - joints[..., 1, :] + joints[..., 17, :] - joints[..., 16, :]
    facing = torch.stack([across[..., 2], -across[..., 0]], -1)
    return facing / facing.norm(dim=-1, keepdim=True)


# ---- the generator ------------------------------------------------------------------------------------------------
def test_every_label_has_a_motion_of_61_poses_that_starts_at_the_origin_facing_plus_z(world):
    labels, joints = world
    assert len(LABELS) == sum(math.prod(len(v) for v in f.values()) for f in LABEL_FIELDS.values()) == 30
    assert joints.shape == (len(labels), POSES, 22, 3) and joints.dtype == torch.float64
    assert joints[:, 0, 0, [0, 2]].abs().max() == 0
    plus_z = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(len(labels), 2)
    torch.testing.assert_close(_facing(joints[:, 0]), plus_z, atol=1e-12, rtol=0)


def test_bone_lengths_are_the_skeletons_in_every_frame(world):
    _, joints = world
    lengths = torch.tensor([math.sqrt(sum(c * c for c in REST_OFFSETS[j])) for j in range(1, 22)], dtype=torch.float64)
    bones = (joints[:, :, 1:] - joints[:, :, list(PARENTS[1:])]).norm(dim=-1)  # [N, 61, 21]
    assert (bones - lengths).abs().max() < 1e-9


def test_planted_feet_do_not_slide(world):
    """While a foot joint stays on the floor (y = 0) from one frame to the next, it and its ankle do not move at all."""
    labels, joints = world
    planted_frames = 0
    for toe, ankle in ((10, 7), (11, 8)):
        on_floor = joints[:, :, toe, 1].abs() < 1e-12  # [N, 61]
        both = on_floor[:, 1:] & on_floor[:, :-1]  # [N, 60]
        for joint in (toe, ankle):
            step = (joints[:, 1:, joint] - joints[:, :-1, joint]).norm(dim=-1)  # [N, 60]
            assert step[both].max() < 1e-12
        planted_frames += int(both.sum())
    # and the feet do stand: every motion has a foot planted in most frame pairs
    assert planted_frames > 0.8 * len(labels) * (POSES - 1)


def test_feet_never_go_below_the_floor_and_touch_it_first_and_last(world):
    labels, joints = world
    assert joints[..., 1].min() >= -1e-9
    assert joints[:, 0, :, 1].amin(-1).abs().max() < 1e-12  # the lowest joint of frame 0 is on the floor
    # both foot joints stand on the floor in the first and the last pose (seated too)
    assert joints[:, [0, -1]][..., [10, 11], 1].abs().max() < 1e-12


def test_walks_travel_straight_along_their_direction_and_turns_end_facing_their_angle(world):
    labels, joints = world
    expected = {"forward": (0.0, 1.0), "backward": (0.0, -1.0), "left": (1.0, 0.0), "right": (-1.0, 0.0)}
    for label, motion in zip(labels, joints):
        travel = motion[-1, 0, [0, 2]] - motion[0, 0, [0, 2]]
        if label["tag"] in ("walk", "run"):
            torch.testing.assert_close(travel / travel.norm(), torch.tensor(expected[label["direction"]],
                                       dtype=torch.float64), atol=1e-12, rtol=0)
        if label["tag"] == "turn":
            angle = math.radians(label["angle"]) * (1 if label["direction"] == "left" else -1)
            # heading psi faces (sin psi, cos psi) in (x, z): a left (+) quarter turn faces +x
            want = torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float64)
            torch.testing.assert_close(_facing(motion[-1]), want, atol=1e-12, rtol=0)


def test_generation_is_deterministic_and_the_seed_varies_the_motion():
    label = {"tag": "walk", "direction": "backward", "speed": "fast", "prompt": "ignored", "split": "train"}
    assert torch.equal(generate(label, seed=7), generate(_label(label), seed=7))
    assert (generate(label, seed=7) - generate(label, seed=8)).abs().max() > 0.01


def test_bad_labels_fail_with_the_field_named():
    with pytest.raises(ValueError, match="'tag' in"):
        generate({"tag": "fly"})
    with pytest.raises(ValueError, match="'speed' in"):
        generate({"tag": "walk", "direction": "forward"})
    with pytest.raises(ValueError, match="'count' in"):
        check_label({"tag": "jump", "count": 3})


# ---- the exact scorer ---------------------------------------------------------------------------------------------
def test_scorer_accepts_every_shipped_motion_from_joints_and_from_features(shipped):
    records, joints = shipped
    for motions in (joints, recover_from_ric(joints_to_features(joints))):  # 61 poses; 60 recovered frames
        results = score_motions(motions, records)
        assert [r.correct for r in results] == [True] * len(records)
        assert all(r.partial == 1.0 for r in results)


def test_scorer_accepts_every_label_over_seeds(world):
    labels, joints = world
    assert all(r.correct and r.partial == 1.0 for r in score_motions(joints, labels))


def test_scorer_rejects_every_other_label(world):
    """Another action, or the same action with another direction, side, count, angle or speed: never correct."""
    labels, joints = world
    for wrong in LABELS:
        others = [i for i, label in enumerate(labels) if label != wrong]
        results = score_motions(joints[others], [wrong] * len(others))
        assert not any(r.correct for r in results), wrong
        assert all(0.0 < r.partial < 1.0 for r in results)


def test_scorer_is_invariant_to_where_the_motion_starts_and_faces(world):
    """A rigid turn about y by 130 degrees and a shift on the floor change no verdict (frame 0's body axes)."""
    labels, joints = world
    c, s = math.cos(2.27), math.sin(2.27)
    rotation = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
    moved = joints @ rotation.T + torch.tensor([3.0, 0.0, -1.5], dtype=torch.float64)
    assert all(r.correct for r in score_motions(moved, labels))


def test_turn_measure_sums_past_half_a_turn():
    """A standing body spun in place at a steady rate to 200 degrees left measures +200 degrees (no wrap at 180)."""
    stand = generate({"tag": "stand"})
    total = math.radians(200)
    angles = torch.linspace(0, total, POSES, dtype=torch.float64)
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    spin = torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([-s, zero, c], -1)], -2)  # [61, 3, 3], +z turns towards +x (left)
    spun = (spin[:, None] @ stand[..., None]).squeeze(-1)
    for soft in (False, True):
        torch.testing.assert_close(measure(spun, soft=soft)["turn"], torch.tensor([total], dtype=torch.float64),
                                   atol=1e-12, rtol=0)
    assert not score_motion(spun, {"tag": "stand"}).correct


# ---- the soft score -----------------------------------------------------------------------------------------------
def test_soft_score_ranks_the_right_motion_above_every_mismatched_one(world):
    labels, joints = world
    for label in LABELS:
        scores = soft_score(joints, [label] * len(labels))  # [N]
        right = torch.tensor([lab == label for lab in labels])
        assert scores[right].min() > scores[~right].max(), label
        assert scores.max() <= 1.0 and scores.min() > 0.0


def test_soft_score_has_finite_informative_gradients_in_float64(world):
    labels, joints = world
    motions = joints[::7].clone().requires_grad_(True)
    picked = labels[::7]
    # the right labels and a shifted (wrong) label each
    for batch_labels in (picked, picked[1:] + picked[:1]):
        scores = soft_score(motions, batch_labels)
        assert scores.dtype == torch.float64
        (grad,) = torch.autograd.grad(scores.sum(), motions)
        assert torch.isfinite(grad).all()
        assert (grad.flatten(1).abs().sum(-1) > 0).all()  # every motion's score moves with its joints
    # far from the world (noise, a collapsed body): still finite
    noise = torch.randn(len(LABELS), 60, 22, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for junk in (noise, torch.zeros_like(noise)):
        junk.requires_grad_(True)
        scores = soft_score(junk, LABELS)
        (grad,) = torch.autograd.grad(scores.sum(), junk)
        assert torch.isfinite(scores).all() and (scores > 0).all() and torch.isfinite(grad).all()


# ---- prompt sets --------------------------------------------------------------------------------------------------
def test_shipped_prompt_files_are_the_builder_output(tmp_path):
    built = builtin_motion_prompt_sets()
    for path in write_motion_prompt_sets(tmp_path):
        shipped = load_prompts(f"builtin:{path.stem}")
        assert shipped.metadata == json.loads(json.dumps(built[path.stem]))
        assert [json.loads(line) for line in path.read_text().splitlines()] == shipped.metadata


def test_evaluation_captions_are_never_trained_on_and_use_only_training_words():
    train = load_prompts("builtin:toy_motion_train").metadata
    held = load_prompts("builtin:toy_motion_eval").metadata
    for rows, split in ((train, "train"), (held, "unseen")):
        assert len(rows) == 200 and all(r["split"] == split for r in rows)
        assert all(sum(r["tag"] == tag for r in rows) == 20 for tag in LABEL_FIELDS)
        assert all(check_label(r) == _label(r) for r in rows)  # records carry exactly the label fields
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert not {r["prompt"] for r in caption_split()["train"]} & {r["prompt"] for r in caption_split()["unseen"]}
    train_words = {w for r in caption_split()["train"] for w in r["prompt"].split()}
    assert {w for r in caption_split()["unseen"] for w in r["prompt"].split()} <= train_words
    for label in HELD_OUT_LABELS:  # held-out combinations: in evaluation, never in training
        assert any(_label(r) == label for r in held) and not any(_label(r) == label for r in train)


# ---- rewards ------------------------------------------------------------------------------------------------------
def test_rewards_score_features_and_need_world_metadata(shipped):
    from diffrl.rewards import build_reward

    records, joints = shipped
    rows = records[:: 20]  # 20 records, every tag
    features = joints_to_features(joints[:: 20])  # [20, 60, 263]
    prompts = [r["prompt"] for r in rows]
    accuracy, partial, soft = (build_reward(n) for n in ("toymotion_accuracy", "toymotion", "toymotion_soft"))
    assert accuracy(features, prompts, rows).tolist() == [1.0] * len(rows)
    assert partial(features, prompts, rows).tolist() == [1.0] * len(rows)
    wrong = rows[1:] + rows[:1]
    mismatched = [_label(a) != _label(b) for a, b in zip(rows, wrong)]
    assert accuracy(features, prompts, wrong).tolist() == [0.0 if m else 1.0 for m in mismatched]
    assert all(p < 1.0 for p, m in zip(partial(features, prompts, wrong).tolist(), mismatched) if m)
    assert soft.differentiable and not accuracy.differentiable
    grads = features.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft(grads, prompts, rows).sum(), grads)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="builtin:toy_motion"):
        accuracy(features, prompts, None)
    with pytest.raises(ValueError, match=r"metadata\[0\].*'tag' in"):
        partial(features[:1], prompts[:1], [{"include": []}])
    with pytest.raises(ValueError, match="263"):
        accuracy(features[..., :100], prompts, rows)
