"""HumanML3D's 263-d per-frame motion features: joint positions -> features and features -> joint positions.

Layout of one frame (T features describe T + 1 poses: velocities look one frame ahead):

    0        root yaw velocity: the HALF yaw increment of the root rotation per frame (HumanML3D's arcsin(q_y) of
             the rotation delta). The root rotation is the one that turns the body's facing onto +z, so a left turn
             (heading psi growing, +z towards +x) gives a NEGATIVE value: dim 0 = -(psi[t+1] - psi[t]) / 2.
    1:3      root xz velocity (x, z) in the root's heading frame at t + 1 (z forward, x left), metres per frame
    3        root height y, metres
    4:67     ric: joints 1..21 relative to the root's xz (y absolute), rotated so that the body faces +z
    67:193   6D rotations of joints 1..21 (first two COLUMNS of each local rotation matrix), from inverse kinematics
    193:259  local velocities of all 22 joints: the displacement t -> t+1, rotated into the root frame at t + 1
    259:263  foot contacts [l_ankle 7, l_foot 10, r_ankle 8, r_foot 11]: 1 where the squared displacement
             t -> t+1 is below 0.002 m^2 (speed only; the height test HumanML3D leaves commented out is not used)

Heading psi is the yaw of the facing direction forward = normalize(cross(up, (r_hip - l_hip) + (r_sho - l_sho))):
psi = atan2(forward_x, forward_z), 0 facing +z, growing to the left (counter-clockwise seen from above).

Where this differs from HumanML3D's `process_file`, on purpose:
- The floor is NOT re-normalised (HumanML3D subtracts the sequence's lowest joint height): the motions of our world
  already stand on y = 0, and a shift would break the exact joints -> features -> joints round trip.
- No retargeting (`uniform_skeleton`): the motion must already be on diffrl.motion.skeleton's bone lengths for the
  rotations to reproduce it (ric and the velocities do not care).
- Yaw increments are wrapped to (-pi, pi] before halving; HumanML3D's arcsin(q_y) gives the wrong sign when the
  delta quaternion lands on the w < 0 hemisphere (facing crossing -z); elsewhere the two agree.
- The rotations (dims 67:193) are measured from OUR rest pose (HumanML3D: from axis-aligned unit offsets), in the
  heading frame (HumanML3D: in the world frame with the canonicalising rotation as the root's, which makes its
  values depend on the heading), and every joint hangs off its true parent (HumanML3D restarts the arm chains at
  the root). Each bone's rotation is the shortest arc from its rest direction to its posed direction (no twist).
  So these 126 numbers are not interchangeable with HumanML3D's dataset; everything else is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .skeleton import FACE_JOINTS, FEET, NUM_JOINTS, PARENTS, rest_offsets

FEATURE_DIM = 263
"""HumanML3D's feature width (njoints=263 in MDM)."""
RIC_DIM = 67
"""Dims 0:67 (root + ric) are all recover_from_ric reads: the minimal representation."""

ROOT_YAW_VELOCITY = slice(0, 1)
ROOT_XZ_VELOCITY = slice(1, 3)
ROOT_HEIGHT = slice(3, 4)
RIC = slice(4, 67)
ROT6D = slice(67, 193)
LOCAL_VELOCITY = slice(193, 259)
FOOT_CONTACTS = slice(259, 263)

CONTACT_THRESHOLD = 0.002
"""HumanML3D's contact test: squared displacement per frame below this (m^2), i.e. speed < 0.0447 m/frame."""

LAYOUT = ("0 root yaw velocity, 1:3 root xz velocity, 3 root height, 4:67 ric (joints 1..21), "
          "67:193 rot6d (joints 1..21), 193:259 local velocities (22 joints), 259:263 foot contacts")

_UP = (0.0, 1.0, 0.0)


# --- small rotation helpers ----------------------------------------------------------------------------------------


def wrap_angle(angle: Tensor) -> Tensor:
    """The angle mapped to (-pi, pi] (differentiable)."""
    return torch.atan2(torch.sin(angle), torch.cos(angle))


def rotate_about_y(vectors: Tensor, angle: Tensor) -> Tensor:
    """R_y(angle) @ v, the right-handed rotation about +y (+z turns towards +x): vectors [..., 3], angle
    broadcastable to vectors[..., 0]."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    x, y, z = vectors.unbind(-1)
    return torch.stack([x * cos + z * sin, y.expand_as(x * cos), z * cos - x * sin], dim=-1)  # [..., 3]


def facing_angle(joints: Tensor) -> Tensor:
    """Heading psi [...] of poses [..., 22, 3]: the yaw of cross(up, (r_hip - l_hip) + (r_sho - l_sho)),
    atan2(forward_x, forward_z); 0 faces +z, positive turns left."""
    r_hip, l_hip, r_sho, l_sho = FACE_JOINTS
    across = joints[..., r_hip, :] - joints[..., l_hip, :] + joints[..., r_sho, :] - joints[..., l_sho, :]  # [..., 3]
    # cross((0, 1, 0), a) = (a_z, 0, -a_x)
    return torch.atan2(across[..., 2], -across[..., 0])  # [...]


def rotation_to_6d(matrix: Tensor) -> Tensor:
    """[..., 3, 3] -> [..., 6]: the first two columns, column 0 then column 1."""
    return torch.cat([matrix[..., :, 0], matrix[..., :, 1]], dim=-1)  # [..., 6]


def rotation_from_6d(sixd: Tensor) -> Tensor:
    """[..., 6] -> [..., 3, 3] by Gram-Schmidt on the two stored columns (the inverse of rotation_to_6d for a
    rotation; the nearest rotation in that sense otherwise)."""
    first = torch.nn.functional.normalize(sixd[..., 0:3], dim=-1)  # [..., 3]
    second = sixd[..., 3:6] - (first * sixd[..., 3:6]).sum(-1, keepdim=True) * first
    second = torch.nn.functional.normalize(second, dim=-1)  # [..., 3]
    third = torch.linalg.cross(first, second, dim=-1)  # [..., 3]
    return torch.stack([first, second, third], dim=-1)  # [..., 3, 3] (columns)


def _skew(k: Tensor) -> Tensor:
    """[..., 3] -> [..., 3, 3] with skew(k) @ v = k x v."""
    zero = torch.zeros_like(k[..., 0])
    kx, ky, kz = k.unbind(-1)
    return torch.stack([torch.stack([zero, -kz, ky], -1), torch.stack([kz, zero, -kx], -1),
                        torch.stack([-ky, kx, zero], -1)], dim=-2)  # [..., 3, 3]


def shortest_arc(source: Tensor, target: Tensor, antiparallel_eps: float = 1e-6) -> Tensor:
    """The rotation [..., 3, 3] of least angle taking unit vectors `source` onto `target` [..., 3] (Rodrigues:
    c I + [k]x + k k^T / (1 + c), k = s x t, c = s . t).

    Within `antiparallel_eps` of 1 + c = 0 the axis is undefined and the formula loses precision; there the result
    is a half turn about a fixed axis normal to `source` followed by the (then well-conditioned) shortest arc from
    -source to target: still exact, no longer the least angle."""
    cos = (source * target).sum(-1)[..., None, None]  # [..., 1, 1]
    k = torch.linalg.cross(source, target, dim=-1)  # [..., 3]
    outer = k[..., :, None] * k[..., None, :]  # [..., 3, 3]
    eye = torch.eye(3, dtype=source.dtype, device=source.device)
    near = cos < -1 + antiparallel_eps  # [..., 1, 1]
    one = torch.ones_like(cos)
    direct = cos * eye + _skew(k) + outer / torch.where(near, one, 1 + cos)  # [..., 3, 3]
    # -source -> target: cos' = -cos, k' = -k
    from_flipped = -cos * eye - _skew(k) + outer / torch.where(near, 1 - cos, one)  # [..., 3, 3]
    helper = torch.zeros_like(source)
    use_y = source[..., 0].abs() > 0.9
    helper[..., 0] = (~use_y).to(source.dtype)
    helper[..., 1] = use_y.to(source.dtype)
    normal = torch.nn.functional.normalize(torch.linalg.cross(source, helper, dim=-1), dim=-1)  # [..., 3]
    half_turn = 2 * normal[..., :, None] * normal[..., None, :] - eye  # [..., 3, 3]
    return torch.where(near, from_flipped @ half_turn, direct)  # [..., 3, 3]


# --- joints -> features --------------------------------------------------------------------------------------------


def _check_joints(joints: Tensor) -> None:
    if not isinstance(joints, Tensor) or joints.ndim < 3 or tuple(joints.shape[-2:]) != (NUM_JOINTS, 3):
        shape = list(joints.shape) if isinstance(joints, Tensor) else type(joints).__name__
        raise ValueError(f"joints must be a tensor [..., frames, {NUM_JOINTS}, 3] (metres, y up), got {shape}")
    if joints.shape[-3] < 2:
        raise ValueError(f"joints need at least 2 frames (T + 1 poses give T feature frames), got shape "
                         f"{list(joints.shape)}")
    if not joints.is_floating_point():
        raise ValueError(f"joints must be floating point (float32 or float64), got {joints.dtype}")


def canonicalize(joints: Tensor) -> Tensor:
    """The motion [..., N, 22, 3] moved so that frame 0's root is at x = z = 0 and rotated about y so that frame 0
    faces +z (HumanML3D's first two steps; heights untouched)."""
    start = joints[..., :1, :1, :] * joints.new_tensor([1.0, 0.0, 1.0])  # [..., 1, 1, 3]
    heading0 = facing_angle(joints[..., 0, :, :])  # [...]
    return rotate_about_y(joints - start, -heading0[..., None, None])  # [..., N, 22, 3]


def local_rotations(body_joints: Tensor) -> Tensor:
    """Inverse kinematics of poses [..., 22, 3] given in the body's heading frame: the local rotations [..., 21, 3, 3]
    of joints 1..21. Bone j's world rotation W_j is the shortest arc from its rest direction to its posed direction;
    its local rotation is W_parent^T W_j (the root's W is the identity in the heading frame)."""
    offsets = rest_offsets(body_joints.dtype, body_joints.device)[1:]  # [21, 3]
    rest_dirs = torch.nn.functional.normalize(offsets, dim=-1)  # [21, 3]
    bones = body_joints[..., 1:, :] - body_joints[..., list(PARENTS[1:]), :]  # [..., 21, 3]
    posed_dirs = bones / bones.norm(dim=-1, keepdim=True)  # [..., 21, 3]
    world = shortest_arc(rest_dirs.expand_as(posed_dirs), posed_dirs)  # [..., 21, 3, 3]
    eye = torch.eye(3, dtype=world.dtype, device=world.device).expand(*world.shape[:-3], 1, 3, 3)
    world_all = torch.cat([eye, world], dim=-3)  # [..., 22, 3, 3]
    parent_world = world_all[..., list(PARENTS[1:]), :, :]  # [..., 21, 3, 3]
    return parent_world.transpose(-1, -2) @ world  # [..., 21, 3, 3]


def forward_kinematics(local: Tensor, root: Tensor) -> Tensor:
    """Joint positions [..., 22, 3] from local rotations [..., 21, 3, 3] of joints 1..21 and the root position
    [..., 3], on the skeleton's rest offsets (the inverse of local_rotations for a motion on the skeleton)."""
    offsets = rest_offsets(local.dtype, local.device)  # [22, 3]
    world = [torch.eye(3, dtype=local.dtype, device=local.device).expand(*local.shape[:-3], 3, 3)]
    positions = [root]
    for joint in range(1, NUM_JOINTS):
        parent = PARENTS[joint]
        world.append(world[parent] @ local[..., joint - 1, :, :])  # [..., 3, 3]
        positions.append(positions[parent] + world[joint] @ offsets[joint])  # [..., 3]
    return torch.stack(positions, dim=-2)  # [..., 22, 3]


def joints_to_features(joints: Tensor, contact_threshold: float = CONTACT_THRESHOLD) -> Tensor:
    """HumanML3D features [..., T, 263] of joint positions [..., T + 1, 22, 3] (metres, y up, on our skeleton, the
    floor at y = 0). Differentiable, except the contact bits. See the module docstring for the layout."""
    _check_joints(joints)
    joints = canonicalize(joints)  # [..., N, 22, 3], N = T + 1
    heading = facing_angle(joints)  # [..., N]
    root = joints[..., 0, :]  # [..., N, 3]

    yaw_velocity = -0.5 * wrap_angle(heading[..., 1:] - heading[..., :-1])  # [..., T]
    displacement = joints[..., 1:, :, :] - joints[..., :-1, :, :]  # [..., T, 22, 3]
    local_velocity = rotate_about_y(displacement, -heading[..., 1:, None])  # [..., T, 22, 3]
    root_xz_velocity = local_velocity[..., 0, :][..., [0, 2]]  # [..., T, 2]
    root_height = root[..., :-1, 1:2]  # [..., T, 1]

    root_xz = root * root.new_tensor([1.0, 0.0, 1.0])  # [..., N, 3]
    body = rotate_about_y(joints - root_xz[..., None, :], -heading[..., None])  # [..., N, 22, 3]
    ric = body[..., :-1, 1:, :].flatten(-2)  # [..., T, 63]
    rot6d = rotation_to_6d(local_rotations(body[..., :-1, :, :])).flatten(-2)  # [..., T, 126]

    feet = list(FEET)
    contacts = (displacement[..., feet, :].detach().pow(2).sum(-1) < contact_threshold).to(joints.dtype)  # [..., T, 4]
    return torch.cat([yaw_velocity[..., None], root_xz_velocity, root_height, ric, rot6d,
                      local_velocity.flatten(-2), contacts], dim=-1)  # [..., T, 263]


# --- features -> joints --------------------------------------------------------------------------------------------


def _check_features(features: Tensor, need: int, exact: bool, what: str) -> None:
    ok = isinstance(features, Tensor) and features.ndim >= 2 and (
        features.shape[-1] == need if exact else features.shape[-1] >= need)
    if not ok:
        shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
        width = f"{need}" if exact else f"at least {need} (dims 0:{need})"
        raise ValueError(f"{what} takes HumanML3D features [..., T, {FEATURE_DIM}] ({LAYOUT}); it needs a last "
                         f"dimension of {width}, got shape {shape}")


def recover_root(features: Tensor) -> tuple[Tensor, Tensor]:
    """(half_angle [..., T], root positions [..., T, 3]) from features [..., T, >= 4] (HumanML3D's
    recover_root_rot_pos). half_angle a is the cumulated dim 0: the root rotation is the quaternion
    (cos a, 0, sin a, 0), which turns the facing onto +z, so the heading is psi = -2 a (recover_heading). The root
    xz integrates dims 1:3 rotated back to the world by the heading of the frame they lead to; the root y is dim 3."""
    _check_features(features, 4, exact=False, what="recover_root")
    yaw_velocity = features[..., 0]  # [..., T]
    half_angle = torch.cumsum(torch.cat([torch.zeros_like(yaw_velocity[..., :1]), yaw_velocity[..., :-1]], -1), -1)
    heading = -2 * half_angle  # [..., T]
    step = torch.stack([features[..., :-1, 1], torch.zeros_like(features[..., :-1, 1]), features[..., :-1, 2]], -1)
    step_world = rotate_about_y(step, heading[..., 1:])  # [..., T-1, 3]
    start = torch.zeros_like(step_world[..., :1, :])  # [..., 1, 3]
    root_xz = torch.cumsum(torch.cat([start, step_world], dim=-2), dim=-2)  # [..., T, 3], y = 0
    root = root_xz + features[..., 3:4] * features.new_tensor([0.0, 1.0, 0.0])  # [..., T, 3]
    return half_angle, root


def recover_heading(features: Tensor) -> Tensor:
    """Heading psi [..., T] (0 faces +z, positive turns left) of each frame, from features [..., T, >= 4]."""
    return -2 * recover_root(features)[0]


def recover_from_ric(features: Tensor) -> Tensor:
    """Joint positions [..., T, 22, 3] from features [..., T, >= 67] (dims 0:67 only; HumanML3D's recover_from_ric):
    ric rotated back by each frame's heading, plus the root's xz. Differentiable."""
    _check_features(features, RIC_DIM, exact=False, what="recover_from_ric")
    half_angle, root = recover_root(features)
    heading = -2 * half_angle  # [..., T]
    body = features[..., RIC].unflatten(-1, (NUM_JOINTS - 1, 3))  # [..., T, 21, 3]
    world = rotate_about_y(body, heading[..., None])  # [..., T, 21, 3]
    world = world + root[..., None, :] * root.new_tensor([1.0, 0.0, 1.0])  # [..., T, 21, 3]
    return torch.cat([root[..., None, :], world], dim=-2)  # [..., T, 22, 3]


def recover_from_rot(features: Tensor) -> Tensor:
    """Joint positions [..., T, 22, 3] by forward kinematics of the 6D rotations (dims 67:193) on the skeleton's
    rest offsets, placed by the root (dims 0:4). Equals recover_from_ric on features of a motion on the skeleton:
    comparing the two checks a generated sample's self-consistency."""
    _check_features(features, FEATURE_DIM, exact=True, what="recover_from_rot")
    half_angle, root = recover_root(features)
    local = rotation_from_6d(features[..., ROT6D].unflatten(-1, (NUM_JOINTS - 1, 6)))  # [..., T, 21, 3, 3]
    root_body = root * root.new_tensor([0.0, 1.0, 0.0])  # [..., T, 3]
    body = forward_kinematics(local, root_body)  # [..., T, 22, 3]
    world = rotate_about_y(body, -2 * half_angle[..., None])  # [..., T, 22, 3]
    return world + root[..., None, :] * root.new_tensor([1.0, 0.0, 1.0])  # [..., T, 22, 3]
