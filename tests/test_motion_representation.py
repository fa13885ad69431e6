"""HumanML3D 263-d features: exact float64 round trips on motions built here by forward kinematics, parity of the root,
ric and velocity channels with HumanML3D's quaternion recipe written out independently, closed-form sums (a 1 m walk,
a 90 degree left turn), contact bits against the displacement test, gradients."""

import math

import pytest
import torch

from diffrl.motion import skeleton
from diffrl.motion.representation import (FEATURE_DIM, FOOT_CONTACTS, LOCAL_VELOCITY, RIC, ROOT_HEIGHT,
                                          ROOT_XZ_VELOCITY, ROOT_YAW_VELOCITY, ROT6D, joints_to_features,
                                          recover_from_ric, recover_from_rot, recover_heading, recover_root)

F64 = torch.float64
FPS = 20


# --- motions of the skeleton, by forward kinematics written here ---------------------------------------------------


def axis_angle(axis, angle):
    """Rotation matrices [N, 3, 3] about a fixed axis by angles [N] (Rodrigues)."""
    k = torch.nn.functional.normalize(torch.tensor(axis, dtype=F64), dim=0)
    skew = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=F64)
    angle = angle[:, None, None]
    return torch.eye(3, dtype=F64) + torch.sin(angle) * skew + (1 - torch.cos(angle)) * (skew @ skew)


def yaw_matrix(psi):
    """R_y(psi) [N, 3, 3]: +z turns towards +x (left) for psi > 0."""
    return axis_angle((0.0, 1.0, 0.0), psi)


def pose_motion(root, heading, bends=None):
    """Joints [N, 22, 3]: the rest skeleton with local rotations `bends` {joint: [N, 3, 3]} (rotating the bone that
    ends at the joint and everything below it), turned by the heading psi [N] and placed at root [N, 3]."""
    frames = root.shape[0]
    offsets = torch.tensor(skeleton.REST_OFFSETS, dtype=F64)
    eye = torch.eye(3, dtype=F64).expand(frames, 3, 3)
    world = {0: yaw_matrix(heading)}
    positions = {0: root}
    for joint in range(1, 22):
        parent = skeleton.PARENTS[joint]
        world[joint] = world[parent] @ (bends or {}).get(joint, eye)
        positions[joint] = positions[parent] + world[joint] @ offsets[joint]
    return torch.stack([positions[j] for j in range(22)], dim=1)


def smoothstep(u):
    u = u.clamp(0, 1)
    return 3 * u**2 - 2 * u**3


def curved_walk(frames=41):
    """The rest pose carried along a curve at 1 m/s while the heading turns left by 1.2 rad, bobbing."""
    t = torch.arange(frames, dtype=F64) / FPS
    heading = 1.2 * smoothstep(t / t[-1])
    step = torch.stack([torch.sin(heading), torch.zeros_like(t), torch.cos(heading)], -1) / FPS
    root = torch.cumsum(torch.cat([torch.zeros(1, 3, dtype=F64), step[:-1]]), 0)
    root[:, 1] = 0.957 - 0.02 * torch.sin(2 * math.pi * t) ** 2
    return pose_motion(root, heading)


def bending(frames=41):
    """Knees, elbows, spine, shoulders and collars bending (with twists) while the body turns right and drifts;
    every bend is 0 at frame 0, so frame 0 already faces +z at the origin."""
    t = torch.arange(frames, dtype=F64) / FPS
    ramp = torch.sin(math.pi * t / t[-1]) ** 2  # 0 at both ends
    heading = -0.7 * ramp + 0.3 * (t / t[-1]) ** 2
    root = torch.stack([0.3 * t**2, 0.957 - 0.15 * ramp, 0.5 * t], -1)
    bends = {
        4: axis_angle((1.0, 0.0, 0.0), 0.9 * ramp),            # left thigh forward
        5: axis_angle((1.0, 0.2, 0.1), -0.4 * ramp),           # right thigh back, with a little twist
        7: axis_angle((1.0, 0.0, 0.0), -1.1 * ramp),           # left knee bends
        6: axis_angle((1.0, 0.0, 0.3), 0.35 * ramp),           # spine leans
        12: axis_angle((0.0, 1.0, 0.0), 0.5 * ramp),           # neck turns
        13: axis_angle((0.0, 0.0, 1.0), 0.2 * ramp),           # left collar up
        16: axis_angle((0.3, 0.1, 1.0), 1.8 * ramp),           # left arm raised sideways
        17: axis_angle((1.0, 0.0, 0.0), -1.2 * ramp),          # right arm forward
        18: axis_angle((1.0, 0.5, 0.0), -1.4 * ramp),          # left elbow
        21: axis_angle((0.0, 1.0, 0.0), 2.0 * ramp),           # right wrist twist (the hand bone turns about y)
    }
    return pose_motion(root, heading, bends)


def hop(frames=41, height=0.1):
    """Standing still, then one vertical ballistic hop of `height` metres from frame 10, landing, standing."""
    t = torch.arange(frames, dtype=F64) / FPS
    v0 = math.sqrt(2 * 9.81 * height)
    tau = t - 10 / FPS
    lift = (v0 * tau - 9.81 / 2 * tau**2).clamp(min=0) * (tau > 0)
    root = torch.stack([torch.zeros_like(t), 0.957 + lift, torch.zeros_like(t)], -1)
    return pose_motion(root, torch.zeros_like(t))


MOTIONS = {"curved_walk": curved_walk, "bending": bending, "hop": hop}


# --- HumanML3D's recipe with quaternions (w, x, y, z), written out independently -----------------------------------


def qmul(a, b):
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def qinv(q):
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype)


def qrot(q, v):
    qv = torch.cat([torch.zeros_like(v[..., :1]), v], -1)
    return qmul(qmul(q, qv), qinv(q))[..., 1:]


def qbetween(v0, v1):
    w = v0.norm(dim=-1) * v1.norm(dim=-1) + (v0 * v1).sum(-1)
    q = torch.cat([w[..., None], torch.linalg.cross(v0, v1, dim=-1)], -1)
    return q / q.norm(dim=-1, keepdim=True)


def humanml3d_root_rotation(joints):
    """Per frame, the quaternion turning the facing onto +z (inverse_kinematics_np's root_quat)."""
    across = joints[:, 2] - joints[:, 1] + joints[:, 17] - joints[:, 16]
    forward = torch.linalg.cross(torch.tensor([[0.0, 1.0, 0.0]], dtype=F64).expand_as(across), across, dim=-1)
    forward = forward / forward.norm(dim=-1, keepdim=True)
    return qbetween(forward, torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand_as(forward))


def humanml3d_features(joints):
    """Dims 0:67 and 193:263 as process_file computes them, for a motion already at the origin facing +z."""
    r_rot = humanml3d_root_rotation(joints)  # [N, 4]
    r_velocity = qmul(r_rot[1:], qinv(r_rot[:-1]))
    velocity = qrot(r_rot[1:], joints[1:, 0] - joints[:-1, 0])
    root_data = torch.cat([torch.arcsin(r_velocity[:, 2:3]), velocity[:, [0, 2]], joints[:-1, 0, 1:2]], -1)
    centred = joints.clone()
    centred[..., 0] -= joints[:, 0:1, 0]
    centred[..., 2] -= joints[:, 0:1, 2]
    ric = qrot(r_rot[:, None].expand(-1, 22, -1), centred)[:-1, 1:].flatten(1)
    local_vel = qrot(r_rot[1:, None].expand(-1, 22, -1), joints[1:] - joints[:-1]).flatten(1)
    feet = (joints[1:, [7, 10, 8, 11]] - joints[:-1, [7, 10, 8, 11]]).pow(2).sum(-1) < 0.002
    return root_data, ric, local_vel, feet.to(F64)


def humanml3d_recover_from_ric(data):
    """recover_root_rot_pos + recover_from_ric as HumanML3D writes them."""
    rot_vel = data[..., 0]
    r_rot_ang = torch.zeros_like(rot_vel)
    r_rot_ang[..., 1:] = rot_vel[..., :-1]
    r_rot_ang = torch.cumsum(r_rot_ang, -1)
    r_rot_quat = torch.zeros(*data.shape[:-1], 4, dtype=data.dtype)
    r_rot_quat[..., 0] = torch.cos(r_rot_ang)
    r_rot_quat[..., 2] = torch.sin(r_rot_ang)
    r_pos = torch.zeros(*data.shape[:-1], 3, dtype=data.dtype)
    r_pos[..., 1:, [0, 2]] = data[..., :-1, 1:3]
    r_pos = torch.cumsum(qrot(qinv(r_rot_quat), r_pos), -2)
    r_pos[..., 1] = data[..., 3]
    pos = data[..., 4:67].reshape(*data.shape[:-1], 21, 3)
    pos = qrot(qinv(r_rot_quat[..., None, :]).expand(*pos.shape[:-1], 4), pos)
    pos[..., 0] += r_pos[..., 0:1]
    pos[..., 2] += r_pos[..., 2:3]
    return torch.cat([r_pos[..., None, :], pos], -2)


def facing_of(joints):
    """Yaw atan2(f_x, f_z) of forward = cross(up, (r_hip - l_hip) + (r_sho - l_sho))."""
    across = joints[..., 2, :] - joints[..., 1, :] + joints[..., 17, :] - joints[..., 16, :]
    return torch.atan2(across[..., 2], -across[..., 0])


# --- tests ---------------------------------------------------------------------------------------------------------


def test_layout_slices_tile_the_263_dims():
    slices = [ROOT_YAW_VELOCITY, ROOT_XZ_VELOCITY, ROOT_HEIGHT, RIC, ROT6D, LOCAL_VELOCITY, FOOT_CONTACTS]
    assert [(s.start, s.stop) for s in slices] == [(0, 1), (1, 3), (3, 4), (4, 67), (67, 193), (193, 259), (259, 263)]
    assert FEATURE_DIM == 263


def test_test_motions_are_on_the_skeleton():
    for build in MOTIONS.values():
        joints = build()
        lengths = (joints[:, 1:] - joints[:, list(skeleton.PARENTS[1:])]).norm(dim=-1)
        torch.testing.assert_close(lengths, skeleton.bone_lengths().expand_as(lengths), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(MOTIONS))
def test_joints_features_joints_round_trip(name):
    joints = MOTIONS[name]()  # [N, 22, 3], frame 0 at the origin facing +z
    features = joints_to_features(joints)
    assert features.shape == (joints.shape[0] - 1, 263) and features.dtype == F64
    torch.testing.assert_close(recover_from_ric(features), joints[:-1], rtol=0, atol=1e-9)
    torch.testing.assert_close(recover_from_rot(features), joints[:-1], rtol=0, atol=1e-9)
    # features -> joints -> features: the same features, one frame fewer
    again = joints_to_features(recover_from_ric(features))
    torch.testing.assert_close(again, features[:-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(MOTIONS))
def test_parity_with_humanml3d_quaternion_recipe(name):
    joints = MOTIONS[name]()
    features = joints_to_features(joints)
    root_data, ric, local_vel, feet = humanml3d_features(joints)
    torch.testing.assert_close(features[:, 0:4], root_data, rtol=0, atol=1e-12)
    torch.testing.assert_close(features[:, RIC], ric, rtol=0, atol=1e-12)
    torch.testing.assert_close(features[:, LOCAL_VELOCITY], local_vel, rtol=0, atol=1e-12)
    assert torch.equal(features[:, FOOT_CONTACTS], feet)
    torch.testing.assert_close(recover_from_ric(features), humanml3d_recover_from_ric(features), rtol=0, atol=1e-12)


def test_features_do_not_depend_on_where_the_motion_starts_or_faces():
    joints = bending()
    turned = joints @ yaw_matrix(torch.tensor([2.5], dtype=F64))[0].T + torch.tensor([3.0, 0.0, -1.5], dtype=F64)
    torch.testing.assert_close(joints_to_features(turned), joints_to_features(joints), rtol=0, atol=1e-12)


def test_batch_dimensions_are_independent_motions():
    stacked = torch.stack([curved_walk(), bending(), hop()])  # [3, N, 22, 3]
    batched = joints_to_features(stacked)
    for i, build in enumerate(MOTIONS.values()):
        torch.testing.assert_close(batched[i], joints_to_features(build()), rtol=0, atol=1e-14)
    torch.testing.assert_close(recover_from_ric(batched), stacked[:, :-1], rtol=0, atol=1e-9)


def test_walking_one_metre_forward_sums_to_zero_one():
    t = torch.linspace(0, 1, 31, dtype=F64)
    root = torch.stack([torch.zeros_like(t), torch.full_like(t, 0.957), smoothstep(t)], -1)  # 0 -> 1 m along +z
    features = joints_to_features(pose_motion(root, torch.zeros_like(t)))
    torch.testing.assert_close(features[:, ROOT_XZ_VELOCITY].sum(0), torch.tensor([0.0, 1.0], dtype=F64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(features[:, ROOT_HEIGHT], torch.full((30, 1), 0.957, dtype=F64), rtol=0, atol=1e-12)


def test_turning_left_90_degrees():
    frames = 31
    t = torch.arange(frames, dtype=F64)
    heading = math.pi / 2 * smoothstep(t / 25)  # turns left, holds +pi/2 over the last frames
    joints = pose_motion(torch.tensor([0.0, 0.957, 0.0], dtype=F64).expand(frames, 3), heading)
    features = joints_to_features(joints)
    # dim 0 is the half increment of the rotation that turns the facing onto +z: minus half the heading's
    torch.testing.assert_close(features[:, 0], -(heading[1:] - heading[:-1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(features[:, 0].sum(), torch.tensor(-math.pi / 4, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(recover_heading(features), heading[:-1], rtol=0, atol=1e-12)
    recovered = recover_from_ric(features)
    torch.testing.assert_close(facing_of(recovered[-1]), torch.tensor(math.pi / 2, dtype=F64), rtol=0, atol=1e-12)
    # left = counter-clockwise seen from above: the body ends facing +x, its left hip on the -z side
    pelvis, l_hip, neck, head = recovered[-1, 0], recovered[-1, 1], recovered[-1, 12], recovered[-1, 15]
    assert l_hip[2] < pelvis[2] - 0.05 and head[0] > neck[0] + 0.05


def test_constant_turn_rate_gives_constant_yaw_velocity_even_across_facing_minus_z():
    frames = 41
    rate = 0.2  # rad per frame, 8 rad in all: passes -z (where HumanML3D's arcsin flips sign) twice
    heading = rate * torch.arange(frames, dtype=F64)
    joints = pose_motion(torch.tensor([0.0, 0.957, 0.0], dtype=F64).expand(frames, 3), heading)
    features = joints_to_features(joints)
    torch.testing.assert_close(features[:, 0], torch.full((frames - 1,), -rate / 2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(recover_from_ric(features), joints[:-1], rtol=0, atol=1e-9)


def test_root_half_angle_and_positions():
    joints = curved_walk()
    features = joints_to_features(joints)
    half_angle, root = recover_root(features)
    torch.testing.assert_close(root, joints[:-1, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(half_angle, -facing_of(joints[:-1]) / 2, rtol=0, atol=1e-12)


def test_foot_contacts_are_one_exactly_where_the_foot_is_still():
    frames = 31
    t = torch.arange(frames, dtype=F64)
    swing = torch.where((t >= 10) & (t <= 18), torch.sin(math.pi * (t - 10) / 8) ** 2 * 0.9, torch.zeros_like(t))
    root = torch.tensor([0.0, 0.957, 0.0], dtype=F64).expand(frames, 3)
    joints = pose_motion(root, torch.zeros_like(t), {4: axis_angle((1.0, 0.0, 0.0), -swing)})  # left leg kicks
    contacts = joints_to_features(joints)[:, FOOT_CONTACTS]  # [T, 4]: l_ankle, l_foot, r_ankle, r_foot
    left_still = (joints[1:, 10] == joints[:-1, 10]).all(-1)
    assert torch.equal(contacts[:, 1] == 1, left_still)
    assert torch.equal(contacts[:, 0] == 1, (joints[1:, 7] == joints[:-1, 7]).all(-1))
    assert not left_still[10:17].any() and left_still[:9].all() and left_still[18:].all()
    assert (contacts[:, 2:] == 1).all()


def test_float32_stays_float32():
    features = joints_to_features(hop().float())
    assert features.dtype == torch.float32
    assert recover_from_ric(features).dtype == torch.float32 and recover_from_rot(features).dtype == torch.float32


def test_gradients_reach_the_features_and_the_joints():
    torch.manual_seed(0)
    features = joints_to_features(bending(frames=4))[None] + 0.01 * torch.randn(1, 3, 263, dtype=F64)
    ric = features[..., :67].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(recover_from_ric, (ric,))
    assert torch.autograd.gradcheck(recover_from_rot, (features.requires_grad_(True),), fast_mode=True)
    joints = (bending(frames=3) + 0.01 * torch.randn(3, 22, 3, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda j: joints_to_features(j)[..., :259], (joints,), fast_mode=True)


def test_wrong_widths_fail_clearly():
    with pytest.raises(ValueError, match=r"at least 67.*\[10, 66\]"):
        recover_from_ric(torch.zeros(10, 66))
    with pytest.raises(ValueError, match=r"263.*\[2, 10, 67\]"):
        recover_from_rot(torch.zeros(2, 10, 67))
    with pytest.raises(ValueError, match=r"\[\.\.\., frames, 22, 3\].*\[10, 21, 3\]"):
        joints_to_features(torch.zeros(10, 21, 3))
    with pytest.raises(ValueError, match="at least 2 frames"):
        joints_to_features(torch.zeros(1, 22, 3))


def test_a_bone_turned_exactly_against_its_rest_direction_is_still_reproduced():
    frames = 5
    rest_dir = torch.nn.functional.normalize(torch.tensor(skeleton.REST_OFFSETS[18], dtype=F64), dim=0)
    normal = torch.nn.functional.normalize(torch.linalg.cross(rest_dir, torch.tensor([1.0, 0, 0], dtype=F64)), dim=0)
    half_turns = axis_angle(tuple(normal.tolist()), torch.linspace(math.pi - 1e-4, math.pi, frames, dtype=F64))
    joints = pose_motion(torch.tensor([0.0, 0.957, 0.0], dtype=F64).expand(frames, 3), torch.zeros(frames, dtype=F64),
                         {18: half_turns})  # the left upper arm swings round to point against its rest direction
    features = joints_to_features(joints)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(recover_from_rot(features), joints[:-1], rtol=0, atol=1e-9)
