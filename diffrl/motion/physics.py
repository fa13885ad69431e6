"""Physics penalties on joint positions that need no learned weights.

Every function takes joints [B, T, 22, 3] (metres, y up, the floor at y = 0, FPS frames a second) and returns a
non-negative penalty [B]: exactly 0 on clean motion of our world (planted feet do not move, bones keep their lengths,
airborne bodies fall ballistically; the GMD ratio excepted, see there) and positive on the failure it targets. All
are torch functions that let gradients reach the joints, except `foot_skating_ratio` (a metric: counts of
thresholded events), whose differentiable counterpart is `foot_skating`. Hinges and minima are differentiable almost
everywhere (torch takes the usual subgradient at the kinks); the masks in `floating` select frames and carry no
gradient.

    foot_skating_ratio  GMD / OmniControl: fraction of frames where a toe near the floor slides (metric)
    foot_skating        soft contact x toe speed, sustained over 4 frames, above a tolerance (m/s)
    ground_penetration  mean_t max(0, -min_j y_j(t) - tolerance) (m)
    floating            mean over hovering frames of max(0, min_j y_j(t) - tolerance) (m)
    jerk                mean_t,j max(0, sustained |third derivative| - limit), joints relative to parents (m/s^3)
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
    smoothstep swing, a quick low sidestep) counts. On diffrl.motion.world it reads 3-33 % on walks (fast sidesteps
    highest), ~13 % on runs, ~3 % on kicks and 0 on the other actions; compare it against the data's own ratio
    rather than driving it to 0."""
    _check_joints(joints, 2, "foot_skating_ratio")
    with torch.no_grad():
        toe_speed, toe_height = _toe_speeds(joints, fps)  # [B, T-1, 2], [B, T, 2]
        padded = torch.nn.functional.pad(toe_speed.transpose(1, 2), (window // 2, (window - 1) // 2))  # [B, 2, T-1+w-1]
        mean_speed = padded.unfold(-1, window, 1).mean(-1).transpose(1, 2)  # [B, T-1, 2]
        contact = (toe_height[:, :-1] < height) & (toe_height[:, 1:] < height)  # [B, T-1, 2]
        skating = contact & (toe_speed > speed) & (mean_speed > speed)  # [B, T-1, 2]
        return skating.any(-1).to(joints.dtype).mean(-1)  # [B]


def foot_skating(joints: Tensor, fps: float = FPS, height: float = 0.03, temperature: float = 0.01,
                 tolerance: float = 0.15, window: int = 3) -> Tensor:
    """Differentiable foot skating [B] (m/s): mean over frame pairs of sum over toes of
    max(0, min over `window` consecutive pairs of c * v - tolerance), with v the toe's horizontal speed t -> t+1 and
    c = sigmoid((height - y_t) / temperature) * sigmoid((height - y_t+1) / temperature) its soft contact.

    Why these choices: a planted toe of our world stands exactly still at y = 0, but a swing toe moves fast while
    still low (lift-off, landing, and the whole of a quick 6 cm sidestep). A penalty that is 0 on clean motion must
    not count those: the minimum over 3 consecutive pairs (4 frames, 0.15 s) keeps only sustained sliding, and the
    contact height is 3 cm rather than the ratio's 5 cm. Measured on diffrl.motion.world (all labels, 12 seeds) the
    largest sustained c * v is then 0.033 m/s (fast sidesteps), under the 0.15 m/s tolerance; with the 5 cm height it
    is 0.56 m/s. A toe on the floor that slides faster than 0.17 m/s for 4 frames is penalised."""
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


def jerk(joints: Tensor, fps: float = FPS, limit: float = 1000.0, window: int = 3) -> Tensor:
    """Sustained jerk above a limit [B] (m/s^3): mean over t and the 22 tracks of max(0, min over `window`
    consecutive frames of |d^3 p / dt^3| - limit). The tracks p are the root's position and each other joint's
    position relative to its parent; the jerk is the third difference (p[t+3] - 3 p[t+2] + 3 p[t+1] - p[t]) * fps^3.

    Why relative and sustained: clean motion has short legitimate spikes (a take-off, a kick, the ends of a
    smoothstep swing: one or two frames up to 1700 m/s^3 on diffrl.motion.world), while per-frame noise raises the
    jerk at every frame. Relative to the parent the whole body's take-off and landing cancel; the minimum over 3
    frames drops the spikes. Measured on the world (all labels, 30 seeds) the largest sustained jerk is 711 m/s^3
    (a fast walk's swing foot), so the limit is 1000; 1 cm of per-frame noise then scores about 10 on every sample
    and 2 cm about 290 (0.5 cm: about 0)."""
    _check_joints(joints, window + 3, "jerk")
    relative = joints[:, :, 1:] - joints[:, :, list(PARENTS[1:])]  # [B, T, 21, 3]
    tracks = torch.cat([joints[:, :, :1], relative], dim=2)  # [B, T, 22, 3]
    third = tracks[:, 3:] - 3 * tracks[:, 2:-1] + 3 * tracks[:, 1:-2] - tracks[:, :-3]  # [B, T-3, 22, 3]
    magnitude = torch.linalg.vector_norm(third, dim=-1) * fps**3  # [B, T-3, 22]
    sustained = magnitude.unfold(1, window, 1).amin(-1)  # [B, T-2-window, 22]
    return torch.relu(sustained - limit).mean(dim=(1, 2))  # [B]


def bone_length_error(joints: Tensor) -> Tensor:
    """mean over bones and frames of |L_b(t) - L_b*| / L_b* [B], L* = skeleton.bone_lengths() (our world's
    lengths are constant; ric features do not enforce them, so generated motion can stretch)."""
    _check_joints(joints, 1, "bone_length_error")
    reference = bone_lengths(joints.dtype, joints.device)  # [21]
    lengths = torch.linalg.vector_norm(joints[:, :, 1:] - joints[:, :, list(PARENTS[1:])], dim=-1)  # [B, T, 21]
    return ((lengths - reference).abs() / reference).mean(dim=(1, 2))  # [B]
