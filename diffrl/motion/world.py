"""A procedural motion world: every caption's motion is built from its structured label, so the truth is exact.

    joints = generate({"tag": "walk", "direction": "backward", "speed": "fast"}, seed=3)  # float64 [61, 22, 3]

Every motion has POSES = 61 poses (60 feature frames, 3.0 s at 20 fps) in HumanML3D's axes (metres, y up, the floor
at y = 0, frame 0 faces +z with the body's left on +x, the root starting at x = z = 0). An action shorter than 3 s is
padded by holding its last pose; nothing is cut. A seed varies small things (speed +-10 %, start times, amplitudes)
that never change what the label says; the same (label, seed) gives the same motion.

Labels ({"tag": ..., fields}; extra keys such as "prompt" are ignored):

    walk    direction forward | backward | left | right (sidesteps), speed slow | normal | fast
    run     direction forward
    turn    direction left | right (in place; left = counter-clockwise seen from above), angle 90 | 180
    jump    count 1 | 2 (small hops in place)
    wave    side left | right (the hand above the head, the forearm swinging sideways)
    raise   side left | right | both (the arm straight up)
    sit     (sits down and stays seated: the pelvis ends near 0.5 m, knees bent)
    squat   count 1 | 2
    kick    side left | right (a forward kick; the other foot stays planted)
    stand   (stands still)

How a pose is built (exact by construction: diffrl.motion.physics' penalties read zero on this data; the GMD
skating ratio does not, as it also counts swing toes passing below 5 cm faster than 0.5 m/s):
- The body is a plan of per-frame quantities: pelvis position, heading (yaw), spine lean, the two foot-joint (toe)
  targets with their yaws, and the four arm-bone directions. `pose_body` turns a plan into joints.
- Spine, neck, head, collars and shoulders are the rest offsets rotated by yaw then lean; arm bones are the rest
  lengths along the planned directions; so every bone keeps its rest length.
- Legs: the ankle is the toe minus the yawed rest foot offset (flat foot), and the knee comes from two-bone
  analytic IK bending forward, so thigh and shank keep their lengths. A foot in stance keeps its toe at a
  planned footfall on the floor, y = 0, for its whole stance: no foot skating. Footfalls are planned from the root
  path (the root at the stance's middle frame plus a body-frame offset), swings interpolate between them with a
  smoothstep and lift the foot by a sine.
- When stepping (walks, runs, turns), the pelvis is lowered smoothly where needed (`keep_below` the highest pelvis
  the legs reach), so the IK never has to stretch a leg and a stance foot never moves.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .skeleton import FPS, J, NUM_JOINTS, PARENTS, REST_OFFSETS

POSES = 61
"""Poses of every world motion: 60 feature frames, 3.0 s at 20 fps."""
DURATION = (POSES - 1) / FPS
"""Seconds from the first pose to the last (3.0)."""

LABEL_FIELDS: dict[str, dict[str, tuple]] = {
    "walk": {"direction": ("forward", "backward", "left", "right"), "speed": ("slow", "normal", "fast")},
    "run": {"direction": ("forward",)},
    "turn": {"direction": ("left", "right"), "angle": (90, 180)},
    "jump": {"count": (1, 2)},
    "wave": {"side": ("left", "right")},
    "raise": {"side": ("left", "right", "both")},
    "sit": {},
    "squat": {"count": (1, 2)},
    "kick": {"side": ("left", "right")},
    "stand": {},
}
"""Each action's label fields and their values."""
TAGS: tuple[str, ...] = tuple(LABEL_FIELDS)

WALK_SPEEDS: dict[str, dict[str, float]] = {
    "forward": {"slow": 0.5, "normal": 0.9, "fast": 1.4},
    "backward": {"slow": 0.4, "normal": 0.7, "fast": 1.0},
    "left": {"slow": 0.25, "normal": 0.45, "fast": 0.75},
    "right": {"slow": 0.25, "normal": 0.45, "fast": 0.75},
}
"""Cruise speed (m/s) of each walking direction and speed class; a seed scales it by 0.9 to 1.1."""
RUN_SPEED = 2.5
"""Cruise running speed (m/s); a seed scales it by 0.9 to 1.1."""
TRAVEL_DIRECTIONS: dict[str, tuple[float, float]] = {
    "forward": (0.0, 1.0), "backward": (0.0, -1.0), "left": (1.0, 0.0), "right": (-1.0, 0.0)}
"""Unit travel direction (x, z) in the body frame (x left, z forward)."""

STAND_HEIGHT = 0.94
"""Pelvis height standing (the rest pose's 0.957 locks the knees; 0.94 leaves a little bend)."""
GRAVITY = 9.81
SIDES = ("left", "right")
_SIGN = {"left": 1.0, "right": -1.0}  # +x is the body's left


def all_labels() -> list[dict]:
    """Every structured label of the world ({"tag", fields...}), in a fixed order (30)."""
    labels = []
    for tag, fields in LABEL_FIELDS.items():
        for values in itertools.product(*fields.values()):
            labels.append({"tag": tag, **dict(zip(fields, values))})
    return labels


def check_label(label: dict) -> dict:
    """The structured label of `label` ({"tag", fields...}; other keys dropped). ValueError naming the bad field."""
    if not isinstance(label, dict) or label.get("tag") not in LABEL_FIELDS:
        got = label.get("tag") if isinstance(label, dict) else label
        raise ValueError(f"motion label needs a 'tag' in {list(TAGS)}, got {got!r}")
    tag = label["tag"]
    out = {"tag": tag}
    for name, values in LABEL_FIELDS[tag].items():
        if label.get(name) not in values:
            raise ValueError(f"motion label {tag!r} needs {name!r} in {list(values)}, got {label.get(name)!r}")
        out[name] = label[name]
    return out


# ---- small maths --------------------------------------------------------------------------------------------------
def smoothstep(u: Tensor) -> Tensor:
    """3u^2 - 2u^3 on u clipped to [0, 1]: 0 -> 1 with zero slope at both ends."""
    u = u.clamp(0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def ramp(t: Tensor, start: float, end: float) -> Tensor:
    """Smoothstep from 0 at time `start` to 1 at `end` (seconds)."""
    return smoothstep((t - start) / (end - start))


def _smoothstep_integral(u: Tensor) -> Tensor:
    """Integral of the smoothstep from 0 to u (u clipped to [0, 1]): u^3 - u^4 / 2."""
    u = u.clamp(0.0, 1.0)
    return u ** 3 - u ** 4 / 2


def travelled(t: Tensor, start: float, stop: float, ramp_s: float) -> Tensor:
    """Distance covered by time t at unit cruise speed under a smoothstep ramp up over [start, start + ramp_s] and
    down over [stop - ramp_s, stop] (the ramps must not overlap): in closed form, so footfalls match the root."""
    up = ramp_s * _smoothstep_integral((t - start) / ramp_s)
    cruise = t.clamp(start + ramp_s, stop - ramp_s) - (start + ramp_s)
    down = ramp_s * (0.5 - _smoothstep_integral((stop - t) / ramp_s))
    return up + cruise + down


def speed_envelope(t: Tensor, start: float, stop: float, ramp_s: float) -> Tensor:
    """The speed profile of `travelled` (0 at rest, 1 cruising)."""
    return ramp(t, start, start + ramp_s) * (1.0 - ramp(t, stop - ramp_s, stop))


def yaw_matrix(yaw: Tensor) -> Tensor:
    """R_y(yaw) [..., 3, 3]: x' = x cos + z sin, z' = -x sin + z cos (+z turns towards +x, the left)."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([-s, zero, c], -1)], -2)  # [..., 3, 3]


def pitch_matrix(lean: Tensor) -> Tensor:
    """R_x(lean) [..., 3, 3]: rotation about the left axis; positive pitches +y towards +z (leaning forward)."""
    c, s = torch.cos(lean), torch.sin(lean)
    zero, one = torch.zeros_like(lean), torch.ones_like(lean)
    return torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1),
                        torch.stack([zero, s, c], -1)], -2)  # [..., 3, 3]


def arm_direction(flex: Tensor, abduct: Tensor, side: str) -> Tensor:
    """Unit bone direction [..., 3] in the body's yaw frame: hanging (0, -1, 0) abducted by `abduct` outwards (about
    the forward axis), then flexed by `flex` forwards and up (about the left axis): R_x(-flex) R_z(+-abduct) (0,-1,0).
    flex pi/2 points forward, flex pi straight up; abduct pi/2 points sideways out, pi straight up."""
    s = _SIGN[side]
    x = s * torch.sin(abduct)
    down = torch.cos(abduct)
    return torch.stack([x, -down * torch.cos(flex), down * torch.sin(flex)], -1)  # [..., 3]


# ---- the body -----------------------------------------------------------------------------------------------------
@dataclass
class BodyPlan:
    """Per-frame quantities a pose is built from (P frames); see the module docstring."""

    root: Tensor  # [P, 3] pelvis position
    yaw: Tensor  # [P] heading (0 faces +z, positive turns left)
    lean: Tensor  # [P] forward pitch of the spine (rad)
    toes: Tensor  # [2, P, 3] foot-joint (toe) targets, left then right
    toe_yaw: Tensor  # [2, P] each foot's yaw
    upper_arm: Tensor  # [2, P, 3] unit shoulder -> elbow directions in the yaw frame, left then right
    forearm: Tensor  # [2, P, 3] unit elbow -> wrist directions in the yaw frame


_OFFSETS = torch.tensor(REST_OFFSETS, dtype=torch.float64)  # [22, 3]
_LENGTHS = _OFFSETS.norm(dim=-1)  # [22] (entry 0 unused)
_SPINE = (J["spine1"], J["spine2"], J["spine3"], J["neck"], J["head"], J["l_collar"], J["r_collar"],
          J["l_shoulder"], J["r_shoulder"])  # built from their parent with the leaned rotation, in this order
_LEGS = {"left": (J["l_hip"], J["l_knee"], J["l_ankle"], J["l_foot"]),
         "right": (J["r_hip"], J["r_knee"], J["r_ankle"], J["r_foot"])}
_ARMS = {"left": (J["l_shoulder"], J["l_elbow"], J["l_wrist"]), "right": (J["r_shoulder"], J["r_elbow"], J["r_wrist"])}
REACH = 0.99
"""The longest hip-to-ankle distance a plan asks for, as a fraction of thigh + shank."""


def rest_toe_offset(side: str) -> Tensor:
    """The toe (foot joint) relative to the pelvis in the rest pose, xz only (y = 0) [3]."""
    hip, knee, ankle, toe = _LEGS[side]
    offset = _OFFSETS[hip] + _OFFSETS[knee] + _OFFSETS[ankle] + _OFFSETS[toe]
    return offset * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)


def leg_lengths(side: str) -> tuple[float, float]:
    """(thigh, shank) lengths of one leg."""
    _, knee, ankle, _ = _LEGS[side]
    return float(_LENGTHS[knee]), float(_LENGTHS[ankle])


def ankle_targets(toes: Tensor, toe_yaw: Tensor, side: str) -> Tensor:
    """The ankle [..., 3] of a flat foot whose toe is at `toes` [..., 3] with yaw `toe_yaw` [...]."""
    foot = _OFFSETS[_LEGS[side][3]].to(toes.dtype)  # [3]
    return toes - (yaw_matrix(toe_yaw) @ foot)  # [..., 3]


def hip_positions(root: Tensor, yaw: Tensor, side: str) -> Tensor:
    """The hip joint [P, 3] of a pelvis at `root` [P, 3] with heading `yaw` [P] (the pelvis only yaws)."""
    return root + yaw_matrix(yaw) @ _OFFSETS[_LEGS[side][0]].to(root.dtype)  # [P, 3]


def reachable_height(root_xz: Tensor, yaw: Tensor, ankles: Tensor, side: str, reach: float = REACH) -> Tensor:
    """The highest pelvis y [P] at which the hip still reaches `ankles` [P, 3] with `reach` of the leg's length."""
    thigh, shank = leg_lengths(side)
    hip = hip_positions(root_xz, yaw, side)  # [P, 3], with the root at y = 0
    across = (hip - ankles)[:, [0, 2]].norm(dim=-1)  # [P]
    span = reach * (thigh + shank)
    if bool((across >= span).any()):
        raise RuntimeError(f"the {side} ankle is {float(across.max()):.3f} m across from its hip, beyond the leg's "
                         f"reach {span:.3f} m: the plan's stride is too long")
    return ankles[:, 1] + torch.sqrt(span ** 2 - across ** 2) - hip[:, 1]


def keep_below(height: Tensor, limit: Tensor, margin: float = 0.01) -> Tensor:
    """`height` [P] lowered smoothly (C1) to stay at least margin / 2 under `limit` [P]; untouched wherever it is
    already `margin` or more below it (so a standing pose is left exactly as planned)."""
    excess = height - (limit - margin)  # [P]
    cut = torch.where(excess < margin, excess.clamp(min=0) ** 2 / (2 * margin), excess - margin / 2)  # [P]
    return height - cut


def _two_bone_ik(hip: Tensor, ankle: Tensor, forward: Tensor, thigh: float, shank: float) -> tuple[Tensor, Tensor]:
    """Knee and ankle [P, 3] of a leg from `hip` to the `ankle` target, the knee bending towards `forward` [P, 3].
    Thigh and shank keep their lengths exactly. A reachable target is returned as given (so a planted foot stays
    exactly planted); one beyond 0.995 of the leg is pulled in along the hip-ankle line (a plan never asks that)."""
    span = ankle - hip  # [P, 3]
    dist = span.norm(dim=-1)  # [P]
    longest = 0.995 * (thigh + shank)
    reach = dist.clamp(max=longest)  # [P]
    axis = span / dist[:, None]  # [P, 3]
    cos_hip = ((thigh ** 2 + reach ** 2 - shank ** 2) / (2 * thigh * reach)).clamp(-1.0, 1.0)  # [P]
    bend = forward - (forward * axis).sum(-1, keepdim=True) * axis  # [P, 3]
    bend = bend / bend.norm(dim=-1, keepdim=True)
    knee = hip + thigh * (cos_hip[:, None] * axis + torch.sqrt(1 - cos_hip ** 2)[:, None] * bend)  # [P, 3]
    reached = torch.where((dist > longest)[:, None], hip + reach[:, None] * axis, ankle)  # [P, 3]
    return knee, reached


def pose_body(plan: BodyPlan) -> Tensor:
    """Joints [P, 22, 3] of a plan; every bone has its rest length in every frame."""
    frames = plan.root.shape[0]
    dtype = plan.root.dtype
    offsets = _OFFSETS.to(dtype)
    joints = torch.zeros(frames, NUM_JOINTS, 3, dtype=dtype)
    turn = yaw_matrix(plan.yaw)  # [P, 3, 3]
    body = turn @ pitch_matrix(plan.lean)  # [P, 3, 3]
    joints[:, 0] = plan.root
    for j in _SPINE:
        joints[:, j] = joints[:, PARENTS[j]] + body @ offsets[j]
    forward = turn[:, :, 2]  # [P, 3] heading h(yaw)
    for k, side in enumerate(SIDES):
        hip_j, knee_j, ankle_j, toe_j = _LEGS[side]
        hip = plan.root + turn @ offsets[hip_j]  # [P, 3]
        target = ankle_targets(plan.toes[k], plan.toe_yaw[k], side)  # [P, 3]
        knee, ankle = _two_bone_ik(hip, target, forward, float(_LENGTHS[knee_j]), float(_LENGTHS[ankle_j]))
        joints[:, hip_j], joints[:, knee_j], joints[:, ankle_j] = hip, knee, ankle
        planted = (ankle == target).all(-1, keepdim=True)  # [P, 1]: the IK kept the target (always, for a plan)
        joints[:, toe_j] = torch.where(planted, plan.toes[k], ankle + (plan.toes[k] - target))
        shoulder_j, elbow_j, wrist_j = _ARMS[side]
        elbow = joints[:, shoulder_j] + _LENGTHS[elbow_j] * (turn @ plan.upper_arm[k].unsqueeze(-1)).squeeze(-1)
        joints[:, elbow_j] = elbow
        joints[:, wrist_j] = elbow + _LENGTHS[wrist_j] * (turn @ plan.forearm[k].unsqueeze(-1)).squeeze(-1)
    return joints


# ---- plans --------------------------------------------------------------------------------------------------------
def _times(dtype=torch.float64) -> Tensor:
    return torch.arange(POSES, dtype=dtype) / FPS  # [P] seconds


def _hanging_arms(frames: int) -> tuple[Tensor, Tensor]:
    """Upper-arm and forearm directions [2, P, 3] of arms hanging relaxed (a little abduction, elbows a little bent)."""
    zero = torch.zeros(frames, dtype=torch.float64)
    upper = torch.stack([arm_direction(zero, zero + 0.1, side) for side in SIDES])
    fore = torch.stack([arm_direction(zero + 0.15, zero + 0.1, side) for side in SIDES])
    return upper, fore


def _standing_plan() -> BodyPlan:
    """Standing still on the rest footprint, facing +z, arms hanging: what every action starts from."""
    frames = POSES
    zero = torch.zeros(frames, dtype=torch.float64)
    root = torch.zeros(frames, 3, dtype=torch.float64)
    root[:, 1] = STAND_HEIGHT
    toes = torch.stack([rest_toe_offset(side).expand(frames, 3).clone() for side in SIDES])  # [2, P, 3]
    upper, fore = _hanging_arms(frames)
    return BodyPlan(root=root, yaw=zero.clone(), lean=zero.clone(), toes=toes,
                    toe_yaw=torch.zeros(2, frames, dtype=torch.float64), upper_arm=upper, forearm=fore)


def _to_frame(seconds: float) -> int:
    return int(round(seconds * FPS))


def foot_track(swings: list[tuple[int, int]], footfalls: Tensor, yaws: Tensor, lift: float,
               frames: int = POSES) -> tuple[Tensor, Tensor]:
    """Toe positions [P, 3] and foot yaws [P] of one foot that stands on footfalls[k] (y = 0) between swings and
    swings over frames (a, b) of each swing: the ground point moves by a smoothstep, the toe lifts by lift sin(pi w).
    Frame a is the last of a stance and frame b the first of the next, both exactly on their footfall."""
    index = torch.arange(frames, dtype=torch.float64)  # [P]
    toes = footfalls[0].expand(frames, 3).clone()
    yaw = yaws[0].expand(frames).clone()
    for k, (a, b) in enumerate(swings):
        w = (index - a) / (b - a)  # [P]
        s = smoothstep(w)[:, None]  # [P, 1]
        moving = footfalls[k] + s * (footfalls[k + 1] - footfalls[k])  # [P, 3]
        moving[:, 1] = lift * torch.sin(math.pi * w)
        inside = ((index > a) & (index < b))[:, None]
        toes = torch.where(inside, moving, toes)
        toes = torch.where((index >= b)[:, None], footfalls[k + 1], toes)
        yaw = torch.where(inside[:, 0], yaws[k] + s[:, 0] * (yaws[k + 1] - yaws[k]), yaw)
        yaw = torch.where(index >= b, yaws[k + 1], yaw)
    return toes, yaw


def plan_footfalls(swings: list[tuple[int, int]], root: Tensor, yaw: Tensor, offset: Tensor, side: str,
                   frames: int = POSES) -> tuple[Tensor, Tensor]:
    """Footfalls [n + 1, 3] and their yaws [n + 1] of one foot around n swings: stance k stands at the root of its
    middle frame plus `offset` [3] (body frame, xz) turned by that frame's yaw. The first stance uses frame 0 and the
    last the final frame, both with the rest offset, so a gait starts and ends on the rest footprint."""
    bounds = [0] + [b for _, b in swings]
    ends = [a for a, _ in swings] + [frames - 1]
    anchors = [0] + [(lo + hi) // 2 for lo, hi in zip(bounds[1:-1], ends[1:-1])] + [frames - 1]
    if not swings:
        anchors = [0]
    rest = rest_toe_offset(side)
    falls, yaws = [], []
    for k, frame in enumerate(anchors):
        body = rest if k in (0, len(anchors) - 1) else offset
        spot = root[frame] + yaw_matrix(yaw[frame]) @ body
        spot[1] = 0.0
        falls.append(spot)
        yaws.append(yaw[frame])
    return torch.stack(falls), torch.stack(yaws)


def _step_schedule(first: float, last_end: float, count: int, swing_fraction: float):
    """`count` alternating steps: swing k starts at first + k period / 2 and lasts swing_fraction period, with the
    period that makes the last swing end at `last_end`. Returns (starts, ends, period) in seconds."""
    period = (last_end - first) / ((count - 1) / 2 + swing_fraction)
    starts = first + np.arange(count) * period / 2
    return starts, starts + swing_fraction * period, period


@dataclass(frozen=True)
class GaitStyle:
    """How a gait looks; the footfalls and the root path follow from it and the cruise speed."""

    stance: float  # fraction of a cycle each foot is on the floor (below 0.5: both feet airborne between steps)
    cadence: float  # cycles (two steps) per second, before fitting a whole number of steps into the clip
    lift: float  # swing toe height at mid-swing (m)
    ramp: float  # seconds to speed up from rest to cruise (and to slow down to a stop)
    lean: float  # forward spine lean at cruise (rad)
    drop: float  # pelvis lowered at cruise (m)
    bob: float  # extra pelvis drop in double support (m)
    arm_swing: float  # amplitude of the arms' swing against the legs (rad)
    elbow: float  # elbow flexion (rad)


def gait_style(direction: str, cruise: float, run: bool) -> GaitStyle:
    """Walking forward / backward gets faster steps with speed, sidesteps short quick steps (the feet never cross:
    the stride stays under 0.45 m) without arm swing, running a flight phase, a forward lean and bent elbows."""
    if run:
        return GaitStyle(stance=0.35, cadence=1.45, lift=0.14, ramp=0.6, lean=0.15, drop=0.06, bob=0.0,
                         arm_swing=0.6, elbow=1.3)
    if direction in ("left", "right"):
        return GaitStyle(stance=0.6, cadence=1.0 + cruise, lift=0.06, ramp=0.5, lean=0.03, drop=0.03, bob=0.012,
                         arm_swing=0.0, elbow=0.15)
    return GaitStyle(stance=0.6, cadence=0.75 + 0.35 * cruise, lift=0.08, ramp=0.5, lean=0.03 + 0.03 * cruise,
                     drop=0.02 + 0.02 * cruise, bob=0.012, arm_swing=0.2 + 0.15 * cruise, elbow=0.25)


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _stepping_feet(steps: list[tuple[int, int]], lead: str, root: Tensor, yaw: Tensor, offsets: list[Tensor],
                   lift: float) -> tuple[Tensor, Tensor]:
    """Toes [2, P, 3] and foot yaws [2, P] of alternating steps (swing frame windows, `lead` foot first), each foot
    landing at the root plus its body-frame offset (plan_footfalls)."""
    toes, toe_yaw = [], []
    for k, side in enumerate(SIDES):
        swings = [window for i, window in enumerate(steps) if (lead if i % 2 == 0 else _other(lead)) == side]
        falls, yaws = plan_footfalls(swings, root, yaw, offsets[k], side)
        toe, foot_yaw = foot_track(swings, falls, yaws, lift)
        toes.append(toe)
        toe_yaw.append(foot_yaw)
    return torch.stack(toes), torch.stack(toe_yaw)


def _within_reach(height: Tensor, root: Tensor, yaw: Tensor, toes: Tensor, toe_yaw: Tensor) -> Tensor:
    """The pelvis heights [P] lowered (smoothly, only where needed) so both hips reach their ankles."""
    floor_root = root * torch.tensor([1.0, 0.0, 1.0], dtype=root.dtype)  # [P, 3]
    for k, side in enumerate(SIDES):
        ankles = ankle_targets(toes[k], toe_yaw[k], side)  # [P, 3]
        height = keep_below(height, reachable_height(floor_root, yaw, ankles, side))
    return height


def _gait_plan(plan: BodyPlan, t: Tensor, direction: str, cruise: float, run: bool, lead: str,
               rng: np.random.Generator) -> BodyPlan:
    """Walking (or running) along `direction` at `cruise` m/s for most of the clip, starting and ending still: a
    whole number of alternating steps (`lead` foot first) ends at 2.8 s, the root stops in the last swing."""
    dx, dz = TRAVEL_DIRECTIONS[direction]
    lateral = dx != 0.0
    style = gait_style(direction, cruise, run)
    start, last_end = float(rng.uniform(0.0, 0.1)), 2.8
    swing_fraction = 1.0 - style.stance
    period = 1.0 / style.cadence
    count = max(2, int(round((last_end - start - swing_fraction * period) / (period / 2))) + 1)
    starts, ends, period = _step_schedule(start, last_end, count, swing_fraction)
    stop = float(starts[-1] + swing_fraction * period / 2)
    ramp_s = min(style.ramp, (stop - start) / 2)
    distance = cruise * travelled(t, start, stop, ramp_s)  # [P]
    envelope = speed_envelope(t, start, stop, ramp_s)  # [P]
    root = plan.root.clone()
    root[:, 0], root[:, 2] = dx * distance, dz * distance
    stride = cruise * period
    # mid-gait footfalls: the ankle under the hip at mid-stance; sidesteps widen with the stride so feet never cross
    offsets = []
    for side in SIDES:
        hip, _, _, toe = _LEGS[side]
        offset = rest_toe_offset(side).clone()
        offset[2] += _OFFSETS[hip][2] - (offset[2] - _OFFSETS[toe][2])  # hip z - ankle z
        offset[0] += _SIGN[side] * stride / 4 if lateral else 0.0
        offsets.append(offset)
    steps = [(_to_frame(a), _to_frame(b)) for a, b in zip(starts, ends)]
    toes, toe_yaw = _stepping_feet(steps, lead, root, plan.yaw, offsets, style.lift)  # [2, P, 3], [2, P]
    # the pelvis: lower while moving, a bob that is lowest in double support, and never higher than the legs reach
    phase = torch.as_tensor(np.interp(t.numpy(), (starts + ends) / 2, np.arange(count) + 0.5))  # [P] steps
    height = STAND_HEIGHT - style.drop * envelope - style.bob * envelope * (1 + torch.cos(2 * math.pi * phase)) / 2
    root[:, 1] = _within_reach(height, root, plan.yaw, toes, toe_yaw)
    # arms swing against the legs: the left arm forward while the right foot is ahead
    heading = yaw_matrix(plan.yaw)[:, :, 2]  # [P, 3]
    ahead = ((toes[1] - toes[0]) * heading).sum(-1)  # [P]
    swing = style.arm_swing * (ahead / (0.5 * stride)).clamp(-1.0, 1.0)  # [P]
    abduct = torch.full_like(t, 0.15 if lateral else 0.1)
    upper = torch.stack([arm_direction(swing, abduct, "left"), arm_direction(-swing, abduct, "right")])
    fore = torch.stack([arm_direction(swing + style.elbow, abduct, "left"),
                        arm_direction(-swing + style.elbow, abduct, "right")])
    return BodyPlan(root=root, yaw=plan.yaw, lean=style.lean * envelope, toes=toes, toe_yaw=toe_yaw,
                    upper_arm=upper, forearm=fore)


def _walk(label: dict, rng: np.random.Generator) -> BodyPlan:
    direction = label["direction"]
    cruise = WALK_SPEEDS[direction][label["speed"]] * float(rng.uniform(0.9, 1.1))
    lead = {"left": "left", "right": "right"}.get(direction, SIDES[int(rng.integers(2))])
    return _gait_plan(_standing_plan(), _times(), direction, cruise, run=False, lead=lead, rng=rng)


def _run(label: dict, rng: np.random.Generator) -> BodyPlan:
    cruise = RUN_SPEED * float(rng.uniform(0.9, 1.1))
    return _gait_plan(_standing_plan(), _times(), "forward", cruise, run=True, lead=SIDES[int(rng.integers(2))],
                      rng=rng)


def _turn(label: dict, rng: np.random.Generator) -> BodyPlan:
    """Turning in place: the heading follows a smoothstep while the feet step around the pelvis (4 steps for a
    quarter turn, 6 for a half turn, the turning side's foot first)."""
    plan, t = _standing_plan(), _times()
    side = label["direction"]
    total = _SIGN[side] * math.radians(label["angle"])
    begin = float(rng.uniform(0.15, 0.35))
    duration = (1.2 if label["angle"] == 90 else 2.0) * float(rng.uniform(0.95, 1.05))
    plan.yaw = total * ramp(t, begin, begin + duration)
    count = 4 if label["angle"] == 90 else 6
    starts, ends, _ = _step_schedule(begin - 0.05, begin + duration + 0.1, count, swing_fraction=0.4)
    steps = [(_to_frame(a), _to_frame(b)) for a, b in zip(starts, ends)]
    rest = [rest_toe_offset(foot) for foot in SIDES]
    plan.toes, plan.toe_yaw = _stepping_feet(steps, side, plan.root, plan.yaw, rest, lift=0.06)
    stepping = ramp(t, begin - 0.2, begin) * (1 - ramp(t, float(ends[-1]), float(ends[-1]) + 0.2))  # [P]
    plan.root[:, 1] = _within_reach(STAND_HEIGHT - 0.015 * stepping, plan.root, plan.yaw, plan.toes, plan.toe_yaw)
    return plan


def _hermite(u: Tensor, y0: float, y1: float, slope0: float, slope1: float, span: float) -> Tensor:
    """Cubic from (y0, slope0) to (y1, slope1) over u in [0, 1] (slopes per second, span seconds long)."""
    u = u.clamp(0.0, 1.0)
    h00, h01 = 2 * u ** 3 - 3 * u ** 2 + 1, -2 * u ** 3 + 3 * u ** 2
    h10, h11 = u ** 3 - 2 * u ** 2 + u, u ** 3 - u ** 2
    return h00 * y0 + h01 * y1 + span * (h10 * slope0 + h11 * slope1)


def _jump(label: dict, rng: np.random.Generator) -> BodyPlan:
    """Small hops in place: crouch, push off, a ballistic flight with the feet tucked a little, land into a crouch
    (the next hop pushes off from it), stand up."""
    plan, t = _standing_plan(), _times()
    rise = 0.15 * float(rng.uniform(0.9, 1.1))  # apex of the pelvis above standing
    depth = 0.12 * float(rng.uniform(0.9, 1.1))
    speed = math.sqrt(2 * GRAVITY * rise)  # take-off speed
    flight = 2 * speed / GRAVITY
    push, land, recover = 0.2, 0.2, 0.3
    low = STAND_HEIGHT - depth
    clock = float(rng.uniform(0.1, 0.3))
    height = STAND_HEIGHT - depth * ramp(t, clock, clock + 0.25)  # the first crouch
    clock += 0.25
    lift = torch.zeros_like(t)  # the feet's rise during flights
    swing = torch.zeros_like(t)  # arm swing
    for _ in range(label["count"]):
        in_push = (t >= clock) & (t < clock + push)
        height = torch.where(in_push, _hermite((t - clock) / push, low, STAND_HEIGHT, 0.0, speed, push), height)
        swing = swing + 0.9 * torch.sin(math.pi * ((t - clock) / (push + flight)).clamp(0, 1)) ** 2
        clock += push
        air = t - clock
        in_air = (air >= 0) & (air < flight)
        ballistic = STAND_HEIGHT + speed * air - GRAVITY * air ** 2 / 2
        height = torch.where(in_air, ballistic, height)
        tuck = 0.05 * torch.sin(math.pi * (air / flight).clamp(0, 1))
        lift = torch.where(in_air, ballistic - STAND_HEIGHT + tuck, lift)
        clock += flight
        in_land = t >= clock
        height = torch.where(in_land, _hermite((t - clock) / land, STAND_HEIGHT, low, -speed, 0.0, land), height)
        clock += land
    height = torch.where(t >= clock, low + depth * ramp(t, clock, clock + recover), height)
    plan.root[:, 1] = height
    plan.toes[:, :, 1] = lift.clamp(min=0.0)
    plan.lean = 0.12 * (STAND_HEIGHT - height).clamp(min=0.0) / depth  # lean into the crouches
    zero = torch.zeros_like(t)
    plan.upper_arm = torch.stack([arm_direction(swing, zero + 0.1, side) for side in SIDES])
    plan.forearm = torch.stack([arm_direction(swing + 0.3, zero + 0.1, side) for side in SIDES])
    return plan


def _wave(label: dict, rng: np.random.Generator) -> BodyPlan:
    """One hand goes up beside the head (upper arm abducted, forearm up) and the forearm swings side to side."""
    plan, t = _standing_plan(), _times()
    side = label["side"]
    begin, rise, waving = float(rng.uniform(0.2, 0.4)), 0.5, 1.5 * float(rng.uniform(0.9, 1.1))
    amplitude = 0.6 * float(rng.uniform(0.9, 1.1))
    up = ramp(t, begin, begin + rise) * (1 - ramp(t, begin + rise + waving, begin + 2 * rise + waving))
    wave_on = ramp(t, begin + rise - 0.1, begin + rise + 0.1) * (1 - ramp(t, begin + rise + waving - 0.1,
                                                                         begin + rise + waving + 0.1))
    swing = amplitude * wave_on * torch.sin(2 * math.pi * 1.8 * (t - begin - rise))
    k = SIDES.index(side)
    plan.upper_arm[k] = arm_direction(0.2 * up, 0.1 + 2.3 * up, side)
    plan.forearm[k] = arm_direction(0.15 + 0.05 * up, 0.1 + (math.pi - 0.1) * up - swing, side)
    return plan


def _raise(label: dict, rng: np.random.Generator) -> BodyPlan:
    """The arm (or both) goes forward and up until straight above the shoulder, holds, and comes down."""
    plan, t = _standing_plan(), _times()
    begin, rise, hold = float(rng.uniform(0.2, 0.4)), 0.6, 1.1 * float(rng.uniform(0.9, 1.1))
    up = ramp(t, begin, begin + rise) * (1 - ramp(t, begin + rise + hold, begin + 2 * rise + hold))
    top = 2.9 * float(rng.uniform(0.97, 1.03))
    for k, side in enumerate(SIDES):
        if label["side"] in (side, "both"):
            flex = top * up
            plan.upper_arm[k] = arm_direction(flex, 0.1 + 0.05 * up, side)
            plan.forearm[k] = arm_direction(flex + 0.15 * (1 - up), 0.1 + 0.05 * up, side)
    return plan


def _sit(label: dict, rng: np.random.Generator) -> BodyPlan:
    """Sitting down on an unseen chair: the pelvis goes down and back, the trunk leans forward on the way and
    straightens, the hands come to the thighs; the feet stay planted and the knees end bent."""
    plan, t = _standing_plan(), _times()
    begin, duration = float(rng.uniform(0.2, 0.5)), 1.6 * float(rng.uniform(0.95, 1.05))
    seat = 0.5 * float(rng.uniform(0.97, 1.03))
    u = ramp(t, begin, begin + duration)
    plan.root[:, 1] = STAND_HEIGHT - (STAND_HEIGHT - seat) * u
    plan.root[:, 2] = -0.2 * u
    plan.lean = 0.45 * torch.sin(math.pi * u) + 0.1 * u
    zero = torch.zeros_like(t)
    plan.upper_arm = torch.stack([arm_direction(0.5 * u, zero + 0.1, side) for side in SIDES])
    plan.forearm = torch.stack([arm_direction(0.15 + 0.9 * u, zero + 0.1, side) for side in SIDES])
    return plan


def _squat(label: dict, rng: np.random.Generator) -> BodyPlan:
    """Squats: the pelvis goes down about 0.35 m and a little back, the trunk leans, the arms reach forward."""
    plan, t = _standing_plan(), _times()
    depth = 0.35 * float(rng.uniform(0.9, 1.1))
    clock = float(rng.uniform(0.1, 0.3))
    down = torch.zeros_like(t)
    for _ in range(label["count"]):
        down = down + ramp(t, clock, clock + 0.5) * (1 - ramp(t, clock + 0.6, clock + 1.1))
        clock += 1.25
    plan.root[:, 1] = STAND_HEIGHT - depth * down
    plan.root[:, 2] = -0.1 * down
    plan.lean = 0.4 * down
    zero = torch.zeros_like(t)
    plan.upper_arm = torch.stack([arm_direction(1.5 * down, zero + 0.1, side) for side in SIDES])
    plan.forearm = torch.stack([arm_direction(0.15 + 1.4 * down, zero + 0.1, side) for side in SIDES])
    return plan


def _kick(label: dict, rng: np.random.Generator) -> BodyPlan:
    """A forward kick: the kicking foot rises, swings forward and up, and comes back to where it stood (forward
    travel grows with the square of the rise, so a low foot barely slides over the floor); the other stays planted."""
    plan, t = _standing_plan(), _times()
    side = label["side"]
    begin, duration = float(rng.uniform(0.3, 0.6)), 0.9 * float(rng.uniform(0.95, 1.05))
    reach, up = 0.55 * float(rng.uniform(0.9, 1.1)), 0.45 * float(rng.uniform(0.9, 1.1))
    bump = torch.sin(math.pi * ((t - begin) / duration).clamp(0.0, 1.0))  # 0 -> 1 -> 0
    k = SIDES.index(side)
    plan.toes[k, :, 2] = plan.toes[k, :, 2] + reach * bump ** 2
    plan.toes[k, :, 1] = up * bump
    plan.lean = -0.12 * bump
    zero = torch.zeros_like(t)
    plan.upper_arm = torch.stack([arm_direction(zero, 0.1 + 0.4 * bump, s) for s in SIDES])
    plan.forearm = torch.stack([arm_direction(zero + 0.15, 0.1 + 0.4 * bump, s) for s in SIDES])
    return plan


def _stand(label: dict, rng: np.random.Generator) -> BodyPlan:
    """Standing still, breathing: the pelvis bobs by a few millimetres and the arms sway a little."""
    plan, t = _standing_plan(), _times()
    phase = float(rng.uniform(0, 2 * math.pi))
    plan.root[:, 1] = STAND_HEIGHT - 0.004 * (1 - torch.cos(2 * math.pi * t / 3.0 + phase)) / 2
    sway = 0.03 * torch.sin(2 * math.pi * t / 3.0 + phase)
    zero = torch.zeros_like(t)
    plan.upper_arm = torch.stack([arm_direction(sway, zero + 0.1, side) for side in SIDES])
    plan.forearm = torch.stack([arm_direction(sway + 0.15, zero + 0.1, side) for side in SIDES])
    return plan


_BUILDERS = {"walk": _walk, "run": _run, "turn": _turn, "jump": _jump, "wave": _wave, "raise": _raise, "sit": _sit,
             "squat": _squat, "kick": _kick, "stand": _stand}


def label_key(label: dict) -> int:
    """A stable 32-bit number of a structured label (seeds the label's own random stream)."""
    return zlib.crc32(json.dumps(check_label(label), sort_keys=True).encode())


def plan_motion(label: dict, seed: int = 0) -> BodyPlan:
    """The body plan of `label`'s motion for `seed` (what `generate` poses)."""
    label = check_label(label)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng([int(seed), label_key(label)])
    return _BUILDERS[label["tag"]](label, rng)


def generate(label: dict, seed: int = 0) -> Tensor:
    """Joints float64 [61, 22, 3] of a motion that does what `label` says (module docstring); deterministic."""
    return pose_body(plan_motion(label, seed))


def generate_batch(labels: list[dict], seeds: list[int] | int = 0) -> Tensor:
    """Joints float64 [N, 61, 22, 3] of several labels (one seed each, or seed + i for an int)."""
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + i for i in range(len(labels))]
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    return torch.stack([generate(label, seed) for label, seed in zip(labels, seeds)])
