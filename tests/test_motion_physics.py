"""Physics penalties: exactly 0 on clean motions built here (standing with gestures, a walk with planted feet by
two-bone IK, a ballistic hop), positive on each damage they target, closed-form values on hand-made cases."""

import math

import pytest
import torch
from test_motion_representation import axis_angle, pose_motion

from diffrl.motion import skeleton
from diffrl.motion.physics import (bone_length_error, floating, foot_skating, foot_skating_ratio, ground_penetration,
                                   jerk)

F64 = torch.float64
FPS = 20
FRAMES = 61
PENALTIES = {"foot_skating": foot_skating, "foot_skating_ratio": foot_skating_ratio,
             "ground_penetration": ground_penetration, "floating": floating, "jerk": jerk,
             "bone_length_error": bone_length_error}


def times():
    return torch.arange(FRAMES, dtype=F64) / FPS


def stand_and_gesture():
    """Feet planted, pelvis still; the spine leans, the head turns, the left arm waves, the right arm swings."""
    t = times()
    root = torch.tensor([0.0, 0.957, 0.0], dtype=F64).expand(FRAMES, 3)
    bends = {
        6: axis_angle((1.0, 0.0, 0.0), 0.2 * torch.sin(math.pi * t / 3) ** 2),
        12: axis_angle((0.0, 1.0, 0.0), 0.4 * torch.sin(2 * math.pi * 0.5 * t)),
        18: axis_angle((0.0, 0.0, 1.0), 2.2 * torch.ones_like(t)),  # left upper arm held up sideways
        20: axis_angle((0.0, 0.0, 1.0), 0.6 * torch.sin(2 * math.pi * 1.2 * t)),  # left forearm waves
        19: axis_angle((1.0, 0.0, 0.0), -0.5 * torch.sin(2 * math.pi * 0.8 * t)),  # right arm swings
    }
    return pose_motion(root, torch.zeros_like(t), bends)


def smootherstep(u):
    u = u.clamp(0, 1)
    return u**3 * (10 - 15 * u + 6 * u**2)


def walk(speed=0.4, frequency=0.7, duty=0.62, lift=0.12):
    """Walking along +z at constant speed: each toe is planted (exactly still on the floor) while in stance; in swing
    it first rises (sin^2 lift), moves to the next footfall (smootherstep, only while above 2.5 cm) and comes down.
    Legs by two-bone IK with the knee bending forward; the upper body is the rest pose. Bone lengths are exact."""
    t = times()
    offsets = torch.tensor(skeleton.REST_OFFSETS, dtype=F64)
    rest = skeleton.rest_pose(F64)
    stride = speed / frequency
    height = 0.92
    root = torch.stack([torch.zeros_like(t), torch.full_like(t, height), speed * t], -1)
    joints = rest.expand(FRAMES, 22, 3) - rest[0] + root[:, None]  # the rest pose carried by the root
    for hip, knee, ankle, toe, phase0 in ((1, 4, 7, 10, 0.0), (2, 5, 8, 11, 0.5)):
        cycle = frequency * t + phase0
        k, u = torch.floor(cycle), cycle - torch.floor(cycle)
        footfall = speed * (k + duty / 2 - phase0) / frequency + 0.127  # toe z while in stance k
        w = ((u - duty) / (1 - duty)).clamp(min=0)
        toe_z = footfall + stride * smootherstep((w - 0.15) / 0.7)
        toe_y = lift * torch.sin(math.pi * w) ** 2
        toe_x = torch.full_like(t, rest[toe, 0].item())
        toe_position = torch.stack([toe_x, toe_y, toe_z], -1)
        ankle_position = toe_position - offsets[toe]
        hip_position = joints[:, hip]
        thigh, shank = offsets[knee].norm(), offsets[ankle].norm()
        reach = ankle_position - hip_position
        d = reach.norm(dim=-1, keepdim=True)
        assert (d < thigh + shank).all(), "the test walk over-reaches"
        along = reach / d
        forward = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
        bend = torch.nn.functional.normalize(forward - (along @ forward)[:, None] * along, dim=-1)
        alpha = torch.arccos((thigh**2 + d**2 - shank**2) / (2 * thigh * d))
        joints[:, knee] = hip_position + thigh * (torch.cos(alpha) * along + torch.sin(alpha) * bend)
        joints[:, ankle] = ankle_position
        joints[:, toe] = toe_position
    return joints


def hop(height=0.1):
    """Standing, one ballistic hop from frame 10, landing, standing (the whole body rigid)."""
    t = times()
    tau = t - 10 / FPS
    v0 = math.sqrt(2 * 9.81 * height)
    up = (v0 * tau - 9.81 / 2 * tau**2).clamp(min=0) * (tau > 0)
    root = torch.stack([torch.zeros_like(t), 0.957 + up, torch.zeros_like(t)], -1)
    return pose_motion(root, torch.zeros_like(t))


def clean_batch():
    return torch.stack([stand_and_gesture(), walk(), hop()])  # [3, T, 22, 3]


# --- damage ---------------------------------------------------------------------------------------------------------


def skate(joints):
    """The planted left foot (ankle and toe) slides sideways at 0.6 m/s from frame 10 to 30."""
    out = joints.clone()
    slide = 0.6 / FPS * (torch.arange(FRAMES, dtype=F64) - 10).clamp(0, 20)
    out[:, :, [7, 10], 0] += slide[:, None]
    return out


def sink(joints):
    return joints - torch.tensor([0.0, 0.05, 0.0], dtype=F64)


def lift(joints):
    return joints + torch.tensor([0.0, 0.10, 0.0], dtype=F64)


def jitter(joints):
    generator = torch.Generator().manual_seed(0)
    return joints + 0.01 * torch.randn(joints.shape, generator=generator, dtype=F64)


def stretch(joints):
    """The left forearm (elbow 18 -> wrist 20) 10 % longer."""
    out = joints.clone()
    out[:, :, 20] = joints[:, :, 18] + 1.1 * (joints[:, :, 20] - joints[:, :, 18])
    return out


DAMAGE = [(skate, "foot_skating"), (skate, "foot_skating_ratio"), (sink, "ground_penetration"),
          (lift, "floating"), (jitter, "jerk"), (stretch, "bone_length_error")]


# --- tests ----------------------------------------------------------------------------------------------------------


def test_clean_motions_are_on_the_skeleton_and_the_floor():
    joints = clean_batch()
    lengths = (joints[:, :, 1:] - joints[:, :, list(skeleton.PARENTS[1:])]).norm(dim=-1)
    torch.testing.assert_close(lengths, skeleton.bone_lengths().expand_as(lengths), rtol=0, atol=1e-12)
    lowest = joints[..., 1].amin(-1)  # [3, T]
    assert lowest.min() >= 0 and (lowest[1] < 1e-12).all()  # the walk always has a toe on the floor
    toes = joints[1, :, [10, 11]]
    planted = toes[..., 1] == 0
    assert (planted[1:] & planted[:-1]).any(-1).all()  # ... and it is planted: still from frame to frame
    assert torch.equal(toes[1:][planted[1:] & planted[:-1]], toes[:-1][planted[1:] & planted[:-1]])
    assert hop()[:, 0, 1].max() > 0.957 + 0.09  # the hop leaves the floor


@pytest.mark.parametrize("name", list(PENALTIES))
def test_every_penalty_is_zero_on_clean_motion(name):
    values = PENALTIES[name](clean_batch())
    assert values.shape == (3,) and values.dtype == F64
    assert (values.abs() < 1e-9).all(), values


@pytest.mark.parametrize("damage,name", DAMAGE, ids=[f"{d.__name__}-{n}" for d, n in DAMAGE])
def test_each_damage_raises_its_penalty(damage, name):
    values = PENALTIES[name](damage(clean_batch()))
    assert (values > 0).all(), values


def test_skating_ratio_by_hand_with_zero_padded_window():
    joints = skeleton.rest_pose(F64).expand(11, 22, 3).clone()[None]  # [1, 11, 22, 3]: 10 frame pairs
    joints[0, :, 10, 2] += 0.6 / FPS * torch.arange(11, dtype=F64)  # the left toe slides forward at 0.6 m/s
    # the 5-frame mean of 0.6 is 0.36 and 0.48 at the first two and last two pairs (zeros beyond the ends)
    torch.testing.assert_close(foot_skating_ratio(joints), torch.tensor([0.6], dtype=F64))
    joints[0, :, 10, 1] = 0.06  # lifted above 5 cm: no contact
    assert foot_skating_ratio(joints).item() == 0


def test_foot_skating_closed_form():
    joints = skeleton.rest_pose(F64).expand(11, 22, 3).clone()[None]
    joints[0, :, 10, 1] = 0.0
    joints[0, :, 10, 0] += 0.9 / FPS * torch.arange(11, dtype=F64)  # 0.9 m/s on the floor throughout
    contact = torch.sigmoid(torch.tensor(0.03 / 0.01, dtype=F64)) ** 2
    torch.testing.assert_close(foot_skating(joints), (contact * 0.9 - 0.15)[None], rtol=1e-12, atol=0)
    torch.testing.assert_close(foot_skating(joints, height=0.05, tolerance=0.2),
                               (torch.sigmoid(torch.tensor(5.0, dtype=F64)) ** 2 * 0.9 - 0.2)[None], rtol=1e-12, atol=0)


def test_penetration_and_floating_closed_form():
    standing = skeleton.rest_pose(F64).expand(1, 11, 22, 3)  # toes at +1 mm
    toe = standing[0, 0, 10, 1].item()
    torch.testing.assert_close(ground_penetration(standing - torch.tensor([0.0, 0.05, 0.0], dtype=F64)),
                               torch.tensor([0.05 - toe - 0.005], dtype=F64))
    torch.testing.assert_close(floating(standing + torch.tensor([0.0, 0.1, 0.0], dtype=F64)),
                               torch.tensor([0.1 + toe - 0.03], dtype=F64))
    # the hop lifted: its standing frames hover (all but the take-off frame, whose lowest point already rises at
    # 0.58 m/s by the central difference), its flight frames fall
    counted = floating(lift(hop()[None])) / (0.1 + toe - 0.03) * (FRAMES - 2)
    standing_frames = (hop()[1:-1, 0, 1] == 0.957).sum()
    torch.testing.assert_close(counted, (standing_frames - 1).to(F64)[None])


def test_jerk_closed_form_and_limits():
    t = times()
    rigid = pose_motion(torch.stack([4000 / 6 * t**3, torch.full_like(t, 0.957), torch.zeros_like(t)], -1),
                        torch.zeros_like(t))[None]  # the root's jerk is exactly 4000 m/s^3, the limbs' 0
    torch.testing.assert_close(jerk(rigid), torch.tensor([(4000 - 1000) / 22], dtype=F64), rtol=1e-9, atol=0)
    assert jerk(rigid, limit=4001).item() == 0
    spike = torch.zeros(1, 12, 22, 3, dtype=F64)
    spike[0, 6:, :, 0] = 0.1  # the body steps 10 cm at once: root jerk 800, 1600, 800 m/s^3 on three frames
    # 7 windows of 3 jerk frames; only the one holding all three keeps a minimum above 0 (800), on the root's track
    torch.testing.assert_close(jerk(spike, limit=0.0), torch.tensor([800 / 7 / 22], dtype=F64))
    torch.testing.assert_close(jerk(spike, limit=0.0, window=1), torch.tensor([3200 / 9 / 22], dtype=F64))


def test_zero_on_every_world_motion_except_the_gmd_ratio():
    from diffrl.motion import world

    joints = world.generate_batch(world.all_labels(), 0)  # [30, 61, 22, 3]
    for name, penalty in PENALTIES.items():
        if name != "foot_skating_ratio":
            assert (penalty(joints).abs() < 1e-9).all(), name


def test_bone_length_error_closed_form():
    torch.testing.assert_close(bone_length_error(stretch(clean_batch())), torch.full((3,), 0.1 / 21, dtype=F64))


def test_gradients_reach_the_joints_and_are_finite():
    joints = clean_batch()
    for damage, name in DAMAGE:
        if name == "foot_skating_ratio":
            continue
        damaged = damage(joints).requires_grad_(True)
        PENALTIES[name](damaged).sum().backward()
        assert torch.isfinite(damaged.grad).all() and damaged.grad.abs().sum() > 0, name
    clean = joints.clone().requires_grad_(True)
    sum(PENALTIES[n](clean).sum() for n in PENALTIES if n != "foot_skating_ratio").backward()
    assert torch.isfinite(clean.grad).all()


def test_float32_and_shape_errors():
    assert foot_skating(clean_batch().float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, T, 22, 3\].*\[61, 22, 3\]"):
        jerk(walk())
    with pytest.raises(ValueError, match="at least 6 frames"):
        jerk(clean_batch()[:, :5])


# --- rewards on features --------------------------------------------------------------------------------------------

REWARDS = {"motion_skating": "foot_skating", "motion_penetration": "ground_penetration",
           "motion_floating": "floating", "motion_jerk": "jerk", "motion_bone_length": "bone_length_error"}


def features_of(joints):
    from diffrl.motion.representation import joints_to_features

    return joints_to_features(joints)  # [B, T-1, 263]


def test_motion_rewards_are_registered_differentiable_motion_rewards():
    from diffrl.rewards import build_reward, list_rewards
    from diffrl.rewards.registry import reward_accepts

    for name in [*REWARDS, "motion_physics"]:
        assert name in list_rewards()
        reward = build_reward(name)
        assert reward.differentiable and reward_accepts(name) == ("motion",)


@pytest.mark.parametrize("name", [*REWARDS, "motion_physics"])
def test_motion_rewards_are_zero_on_clean_features(name):
    from diffrl.rewards import build_reward

    scores = build_reward(name)(features_of(clean_batch()), ["a person moves"] * 3)
    assert scores.dtype == F64 and (scores.abs() < 1e-9).all(), scores


@pytest.mark.parametrize("damage,name", [(d, n) for d, n in DAMAGE if n != "foot_skating_ratio"],
                         ids=[d.__name__ for d, n in DAMAGE if n != "foot_skating_ratio"])
def test_motion_rewards_fall_below_zero_on_their_damage(damage, name):
    from diffrl.rewards import build_reward

    reward_name = {v: k for k, v in REWARDS.items()}[name]
    features = features_of(damage(clean_batch()))
    assert (build_reward(reward_name)(features, ["x"] * 3) < 0).all()
    assert (build_reward("motion_physics")(features, ["x"] * 3) < 0).all()


def test_motion_physics_is_the_weighted_sum_of_the_terms_on_recovered_joints():
    from diffrl.motion.representation import recover_from_ric
    from diffrl.rewards import build_reward

    features = features_of(jitter(sink(skate(clean_batch()))))
    joints = recover_from_ric(features)
    weights = {"skating": 2.0, "penetration": 3.0, "floating": 0.5, "jerk": 0.01, "bone_length": 7.0}
    expected = -(2.0 * foot_skating(joints) + 3.0 * ground_penetration(joints) + 0.5 * floating(joints)
                 + 0.01 * jerk(joints) + 7.0 * bone_length_error(joints))
    torch.testing.assert_close(build_reward("motion_physics", **weights)(features, ["x"] * 3), expected,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(build_reward("motion_jerk", limit=500.0)(features, ["x"] * 3),
                               -jerk(joints, limit=500.0), rtol=1e-12, atol=0)


def test_metadata_length_keeps_only_the_first_frames():
    from diffrl.rewards import build_reward

    features = features_of(clean_batch())  # [3, 60, 263]
    damaged = features.clone()
    damaged[:, 40:, 3] -= 0.2  # the root (and with it the pelvis) sinks 20 cm after frame 40: stretched hips
    reward = build_reward("motion_bone_length")
    assert (reward(damaged, ["x"] * 3) < 0).all()
    scores = reward(damaged, ["x"] * 3, [{"length": 40}, {"length": 60}, {}])
    assert scores[0].abs() < 1e-9 and scores[1] < 0 and scores[2] < 0
    torch.testing.assert_close(scores[1:], reward(damaged[1:], ["x"] * 2))
    with pytest.raises(ValueError, match=r"metadata\[1\]\['length'\] must be a whole number of frames in 1..60"):
        reward(damaged, ["x"] * 3, [{}, {"length": 61}, {}])


def test_motion_rewards_reject_images_and_other_widths():
    from diffrl.rewards import build_reward

    with pytest.raises(ValueError, match=r"expects motion \[B, T, D\], got samples of shape \[2, 3, 8, 8\]"):
        build_reward("motion_skating")(torch.rand(2, 3, 8, 8), ["x"] * 2)
    with pytest.raises(ValueError, match=r"\[B, T, 263\].*feature width 135"):
        build_reward("motion_physics")(torch.zeros(2, 10, 135), ["x"] * 2)
    ric_only = features_of(clean_batch())[..., :67]  # the 67-d prefix is enough
    assert (build_reward("motion_physics")(ric_only, ["x"] * 3).abs() < 1e-9).all()


def test_reward_gradients_reach_the_features():
    from diffrl.rewards import build_reward

    features = features_of(jitter(skate(lift(clean_batch())))).requires_grad_(True)
    build_reward("motion_physics")(features, ["x"] * 3).sum().backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad[..., :67].abs().sum(dim=(1, 2)).gt(0).all()  # every sample's root + ric get a gradient
    assert (features.grad[..., 67:] == 0).all()  # recover_from_ric reads dims 0:67 only
