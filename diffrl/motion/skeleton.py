"""The 22-joint SMPL body skeleton as HumanML3D uses it (every HumanML3D motion is retargeted to one skeleton, so
its bone lengths are constants), in HumanML3D's axes: x left, y up, z forward, metres.

The rest offsets are HumanML3D's reference frame canonicalised to face +z with the floor at 0, made left-right
symmetric (the right side is the left side mirrored, x -> -x; the spine is centred, x = 0), so a generated body
has equal left and right limbs.
"""

from __future__ import annotations

import torch

FPS = 20
"""HumanML3D's frame rate (AMASS downsampled)."""

JOINT_NAMES = (
    "pelvis", "l_hip", "r_hip", "spine1", "l_knee", "r_knee", "spine2", "l_ankle", "r_ankle", "spine3", "l_foot",
    "r_foot", "neck", "l_collar", "r_collar", "head", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist",
    "r_wrist",
)
NUM_JOINTS = len(JOINT_NAMES)  # 22
PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19)
KINEMATIC_CHAINS = ((0, 2, 5, 8, 11), (0, 1, 4, 7, 10), (0, 3, 6, 9, 12, 15), (9, 14, 17, 19, 21), (9, 13, 16, 18, 20))
"""HumanML3D's t2m_kinematic_chain: right leg, left leg, spine to head, right arm, left arm."""

J = {name: i for i, name in enumerate(JOINT_NAMES)}
FEET = (J["l_ankle"], J["l_foot"], J["r_ankle"], J["r_foot"])  # 7, 10, 8, 11: the contact channels' order
TOES = (J["l_foot"], J["r_foot"])  # 10, 11: the joints the foot-skating measures read
FACE_JOINTS = (J["r_hip"], J["l_hip"], J["r_shoulder"], J["l_shoulder"])  # 2, 1, 17, 16: facing direction

# rest offsets child - parent, left side and spine (x left, y up, z forward); the right side mirrors the left
_LEFT_AND_SPINE = {
    "pelvis": (0.0, 0.957, 0.0),
    "l_hip": (0.058, -0.085, -0.010),
    "spine1": (0.0, 0.122, -0.050),
    "l_knee": (0.043, -0.391, 0.010),
    "spine2": (0.0, 0.140, 0.027),
    "l_ankle": (-0.028, -0.424, -0.079),
    "spine3": (0.0, 0.057, 0.004),
    "l_foot": (0.037, -0.056, 0.127),
    "neck": (0.0, 0.219, -0.018),
    "l_collar": (0.077, 0.114, -0.008),
    "head": (0.0, 0.069, 0.072),
    "l_shoulder": (0.130, -0.016, -0.017),
    "l_elbow": (0.012, -0.255, -0.030),
    "l_wrist": (0.018, -0.252, 0.084),
}


def _rest_offsets() -> tuple[tuple[float, float, float], ...]:
    out = []
    for name in JOINT_NAMES:
        if name in _LEFT_AND_SPINE:
            out.append(_LEFT_AND_SPINE[name])
        else:  # r_* mirrors l_*
            x, y, z = _LEFT_AND_SPINE["l_" + name[2:]]
            out.append((-x, y, z))
    return tuple(out)


REST_OFFSETS = _rest_offsets()
"""[22] x (x, y, z): joint j's offset from its parent in the rest pose (the pelvis: its position), metres."""


def rest_offsets(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The rest offsets as a tensor [22, 3] (row 0: the pelvis position in the rest pose)."""
    return torch.tensor(REST_OFFSETS, dtype=dtype, device=device)


def bone_lengths(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """[21] the length of the bone ending at joint j = 1..21, metres (constant for every motion of the world)."""
    return rest_offsets(dtype, device)[1:].norm(dim=-1)


def rest_pose(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """[22, 3] joint positions of the standing rest pose (forward kinematics of the rest offsets)."""
    offsets = rest_offsets(dtype, device)
    joints = [offsets[0]]
    for j in range(1, NUM_JOINTS):
        joints.append(joints[PARENTS[j]] + offsets[j])
    return torch.stack(joints)
