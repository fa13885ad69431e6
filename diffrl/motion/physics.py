"""Physics penalties on joint positions that need no learned weights.

Every function takes joints [B, T, 22, 3] (metres, y up, the floor at y = 0, FPS frames a second) and returns a
non-negative penalty [B]: exactly 0 on clean motion of our world (planted feet do not move, bones keep their lengths,
airborne bodies fall ballistically) and positive on the failure it targets. All are torch functions that let
gradients reach the joints, except `foot_skating_ratio` (a metric: counts of thresholded events), whose
differentiable counterpart is `foot_skating`. Hinges and minima are differentiable almost everywhere (torch takes the
usual subgradient at the kinks); the masks in `floating` select frames and carry no gradient.

    foot_skating_ratio  GMD / OmniControl: fraction of frames where a toe near the floor slides (metric)
    foot_skating        soft contact x toe speed, sustained over a few frames, above a tolerance (m/s)
    ground_penetration  mean_t max(0, -min_j y_j(t) - tolerance) (m)
    floating            mean over hovering frames of max(0, min_j y_j(t) - tolerance) (m)
    jerk                mean_t,j max(0, |third derivative| - limit) of each joint relative to its parent (m/s^3)
    bone_length_error   mean_b,t |L_b(t) - L_b*| / L_b* against the skeleton's lengths
"""

from __future__ import annotations

import torch
from torch import Tensor

from .skeleton import FPS, NUM_JOINTS, PARENTS, TOES, bone_lengths

GRAVITY = 9.81
"""m/s^2: a body in free fall has vertical acceleration -GRAVITY (what tells a jump from hovering)."""


def _check_joints(joints: Tensor, min_frames: int, what: str) -> None:
    if not isinstance(joints, Tensor) or joints.ndim != 4 or tuple(joints.shape[-2:]) != (NUM_JOINTS, 3):
        shape = list(joints.shape) if isinstance(joints, Tensor) else type(joints).__name__
        raise ValueError(f"{what} takes joints [B, T, {NUM_JOINTS}, 3] (metres, y up); got {shape}")
    if joints.shape[1] < min_frames:
        raise ValueError(f"{what} needs at least {min_frames} frames, got joints of shape {list(joints.shape)}")
    if not joints.is_floating_point():
        raise ValueError(f"{what} takes floating-point joints, got {joints.dtype}")


def _toe_speeds(joints: Tensor, fps: float) -> tuple[Tensor, Tensor]:
    """Horizontal toe speed from frame t to t+1 (m/s) [B, T-1, 2] and toe heights [B, T, 2]."""
    toes = joints[:, :, list(TOES), :]  # [B, T, 2, 3]
    step = toes[:, 1:] - toes[:, :-1]  # [B, T-1, 2, 3]
    speed = torch.linalg.vector_norm(step[..., [0, 2]], dim=-1) * fps  # [B, T-1, 2]
    return speed, toes[..., 1]


def foot_skating_ratio(joints: Tensor, fps: float = FPS, height: float = 0.05, speed: float = 0.5,
                       window: int = 5) -> Tensor:
    """GMD / OmniControl's foot-skating ratio [B] (calculate_skating_ratio), a metric without gradients.

    For each toe (joints 10, 11) and frame pair t -> t+1: contact = both heights below `height`; it skates when in
    contact with horizontal speed above `speed` m/s and the `window`-frame centred mean of that speed (zeros beyond
    the ends, scipy's uniform_filter1d mode 'constant') above `speed` too. A frame pair skates if either toe does;
    the ratio is the skating fraction of the T - 1 pairs.

    It is not 0 on every clean gait: a swing toe that moves while still below 5 cm (lift-off and landing of a
    smoothstep swing) counts, so compare it against the data's own ratio rather than driving it to 0."""
    _check_joints(joints, 2, "foot_skating_ratio")
    with torch.no_grad():
        toe_speed, toe_height = _toe_speeds(joints, fps)  # [B, T-1, 2], [B, T, 2]
        padded = torch.nn.functional.pad(toe_speed.transpose(1, 2), (window // 2, (window - 1) // 2))  # [B, 2, T-1+w-1]
        mean_speed = padded.unfold(-1, window, 1).mean(-1).transpose(1, 2)  # [B, T-1, 2]
        contact = (toe_height[:, :-1] < height) & (toe_height[:, 1:] < height)  # [B, T-1, 2]
        skating = contact & (toe_speed > speed) & (mean_speed > speed)  # [B, T-1, 2]
        return skating.any(-1).to(joints.dtype).mean(-1)  # [B]


def foot_skating(joints: Tensor, fps: float = FPS, height: float = 0.05, temperature: float = 0.01,
                 tolerance: float = 0.2, window: int = 3) -> Tensor:
    """Differentiable foot skating [B] (m/s): mean over frame pairs of sum over toes of
    max(0, min over `window` consecutive pairs of c * v - tolerance), with v the toe's horizontal speed t -> t+1 and
    c = sigmoid((height - y_t) / temperature) * sigmoid((height - y_t+1) / temperature) its soft contact.

    Why the window and the tolerance: a planted foot of our world has exactly zero speed, but a swing toe passes
    below 5 cm at lift-off and landing while already moving (up to c * v = 1.1 m/s for one frame pair at 1.6 m/s
    walking with a smoothstep swing). Sustained over 3 pairs the clean maximum is 0.11 m/s (slow walks; runs
    < 0.01), so the 0.2 m/s tolerance makes clean motion score exactly 0 while a foot that slides at more than
    0.2 m/s for 4 frames (0.15 s) is penalised."""
    _check_joints(joints, window + 1, "foot_skating")
    toe_speed, toe_height = _toe_speeds(joints, fps)  # [B, T-1, 2], [B, T, 2]
    soft_contact = torch.sigmoid((height - toe_height) / temperature)  # [B, T, 2]
    contact_speed = soft_contact[:, :-1] * soft_contact[:, 1:] * toe_speed  # [B, T-1, 2]
    sustained = contact_speed.unfold(1, window, 1).amin(-1)  # [B, T-window, 2]
    return torch.relu(sustained - tolerance).sum(-1).mean(-1)  # [B]


def _lowest_height(joints: Tensor) -> Tensor:
    return joints[..., 1].amin(-1)  # [B, T]


def ground_penetration(joints: Tensor, tolerance: float = 0.005) -> Tensor:
    """mean_t max(0, -min_j y_j(t) - tolerance) [B] (m). The tolerance (5 mm) forgives rounding of a foot that
    stands on the floor (the rest pose's toes are at +1 mm)."""
    _check_joints(joints, 1, "ground_penetration")
    return torch.relu(-_lowest_height(joints) - tolerance).mean(-1)  # [B]


def floating(joints: Tensor, fps: float = FPS, tolerance: float = 0.03, hover_speed: float = 0.5) -> Tensor:
    """Hovering above the floor [B] (m): mean over frames 1..T-2 of max(0, m(t) - tolerance) on the frames that
    hover, m(t) = min_j y_j(t) the lowest joint's height.

    A frame hovers when the lowest point neither moves vertically (|m'(t)| < `hover_speed` m/s) nor falls
    (m''(t) > -GRAVITY / 2), central differences. So a body lifted off the floor and held there counts, a jump
    does not: in flight m'' = -g (and at the apex too), and the frames next to take-off and landing move fast.
    Clean gaits keep one foot down (m ~ 0); a run's flight phase stays under 2 cm while it hovers by this test,
    below the 3 cm tolerance. The masks are hard (no gradient); the height carries the gradient."""
    _check_joints(joints, 3, "floating")
    lowest = _lowest_height(joints)  # [B, T]
    with torch.no_grad():
        vertical_speed = (lowest[:, 2:] - lowest[:, :-2]) * fps / 2  # [B, T-2]
        vertical_acceleration = (lowest[:, 2:] - 2 * lowest[:, 1:-1] + lowest[:, :-2]) * fps**2  # [B, T-2]
        hovering = (vertical_speed.abs() < hover_speed) & (vertical_acceleration > -GRAVITY / 2)  # [B, T-2]
    return (torch.relu(lowest[:, 1:-1] - tolerance) * hovering).mean(-1)  # [B]


def jerk(joints: Tensor, fps: float = FPS, limit: float = 1500.0, root_limit: float = 3000.0) -> Tensor:
    """Jerk above a limit [B] (m/s^3): mean over t and the 22 joints of max(0, |d^3 p / dt^3| - limit), p the
    position of each joint relative to its parent (the root: its own position, against `root_limit`), third
    differences (p[t+3] - 3 p[t+2] + 3 p[t+1] - p[t]) * fps^3.

    How the limits are set: a velocity kink dv (take-off, landing, a foot leaving the floor) shows up as about
    dv * fps^2. Relative to the parent the whole body's kinks cancel, and the sharpest limb changes of the
    generator (a swing foot lifting at up to 1.3 m/s, arms thrown up at take-off) stay below ~1000 m/s^3, so 1500
    leaves a margin; the root's take-off of a 0.3 m jump (2.4 m/s) gives ~1200, hence 3000. Per-frame noise of
    1 cm gives a relative jerk of ~810 m/s^3 on average (3 % of the samples above 1500), noise of 2 cm ~1600."""
    _check_joints(joints, 4, "jerk")
    relative = joints[:, :, 1:] - joints[:, :, list(PARENTS[1:])]  # [B, T, 21, 3]
    tracks = torch.cat([joints[:, :, :1], relative], dim=2)  # [B, T, 22, 3]
    third = tracks[:, 3:] - 3 * tracks[:, 2:-1] + 3 * tracks[:, 1:-2] - tracks[:, :-3]  # [B, T-3, 22, 3]
    magnitude = torch.linalg.vector_norm(third, dim=-1) * fps**3  # [B, T-3, 22]
    limits = torch.full((NUM_JOINTS,), limit, dtype=magnitude.dtype, device=magnitude.device)
    limits[0] = root_limit
    return torch.relu(magnitude - limits).mean(dim=(1, 2))  # [B]


def bone_length_error(joints: Tensor) -> Tensor:
    """mean over bones and frames of |L_b(t) - L_b*| / L_b* [B], L* = skeleton.bone_lengths() (our world's
    lengths are constant; ric features do not enforce them, so generated motion can stretch)."""
    _check_joints(joints, 1, "bone_length_error")
    reference = bone_lengths(joints.dtype, joints.device)  # [21]
    lengths = torch.linalg.vector_norm(joints[:, :, 1:] - joints[:, :, list(PARENTS[1:])], dim=-1)  # [B, T, 21]
    return ((lengths - reference).abs() / reference).mean(dim=(1, 2))  # [B]
