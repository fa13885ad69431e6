"""Exact rule scores of a motion against a motion-world label, from joint positions alone (e.g. recover_from_ric).

    result = score_motion(joints, {"tag": "jump", "count": 2})   # joints [T, 22, 3] -> MotionScore
    result.correct, result.partial                              # bool, float in [0, 1] (1.0 exactly when correct)
    soft = soft_score(joints_batch, labels)                     # [B] in (0, 1], smooth in the joints

A label is judged by a list of rules: what its action asks for (travel direction and speed class, turn angle, jump
count, which arm is up, ...) AND that nothing else happens (no travel, no turn, no jump, arms down, ... for the
actions that do not ask for them), so a motion of one label fails every other label. The measures (20 fps, y up,
the floor at y = 0, the body's facing from hips and shoulders as HumanML3D's):

    travel        root xz displacement first -> last frame, in the first frame's body axes (forward, left)
    mean speed    mean root xz speed over the clip (m/s); walking speed classes are bands of it
    turn          summed frame-to-frame change of the facing, wrapped to (-pi, pi] per frame (left = +)
    jumps         runs of >= 2 frames with BOTH foot joints above 0.06 m
    dips          runs of >= 2 frames with the pelvis below 0.72 m (squats; a sit dips once and stays)
    end height    the pelvis height in the last frame (standing >= 0.8 m, seated <= 0.65 m)
    knee cosine   cos of the hip-knee-ankle angle in the last frame (seated: angle < 120 deg)
    raised        frames with the wrist above the head by > 0.05 m, per arm
    waving        lateral path (m) of the wrist around the elbow, in the body's left axis, while raised
    toe peak      the highest foot-joint height, per foot (kicks)

`partial` is the mean over rules of 1 for a kept rule and 0.5 exp(-miss / scale) for a broken one. The soft score
is the geometric mean of smooth versions of the same rules (sigmoids of the margins, exp(-|error|) for counts and
angles) computed from smooth measures (soft minimum, soft counts of rising edges), so its gradient reaches the
joints; it is 1 only in the limit and ranks the right motion above mismatched ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .skeleton import FACE_JOINTS, FPS, J, NUM_JOINTS
from .world import LABEL_FIELDS, RUN_SPEED, TRAVEL_DIRECTIONS, WALK_SPEEDS, check_label

AIRBORNE_HEIGHT = 0.06
"""Both foot joints above this (m) means airborne."""
DIP_HEIGHT = 0.72
"""A pelvis below this (m) is down in a squat (standing is 0.94; a jump's crouch stays above 0.8)."""
STANDING_HEIGHT = 0.8
"""The last frame's pelvis at least this high (m): the body ends standing."""
SEATED_HEIGHT = 0.65
"""The last frame's pelvis at most this high (m): seated."""
SEATED_KNEE_COS = -0.5
"""Seated knees bend to less than 120 degrees: cos(hip-knee-ankle angle) above cos 120 deg."""
RAISED_MARGIN = 0.05
"""A wrist this far (m) above the head counts as raised in that frame."""
RAISED_FRAMES = 5
"""An arm is up when raised in at least this many frames (0.25 s), down otherwise."""
WAVE_PATH = 0.3
"""A waving arm's wrist travels at least this far (m) sideways around its elbow while raised."""
KICK_HEIGHT = 0.25
"""A kicking foot joint rises above this (m)."""
PLANTED_HEIGHT = 0.05
"""The supporting foot joint of a kick stays below this (m)."""
QUIET_FEET = 0.12
"""Standing still: both foot joints stay below this (m)."""
STILL_DISTANCE = 0.3
"""Staying in place: the root ends less than this (m) from where it started (sitting: SIT_DISTANCE)."""
SIT_DISTANCE = 0.45
MIN_TRAVEL = 0.3
"""Walking or running: the root ends at least this far (m) away."""
DIRECTION_TOLERANCE = math.radians(30)
"""Travel within this angle of the asked direction."""
NO_TURN = math.radians(25)
"""Keeping the facing: |turn| below this."""
TURN_TOLERANCE = math.radians(40)
"""A turn of the asked angle within this (90 and 180 degrees stay apart)."""
SPEED_FACTOR = 0.68
"""The clip's mean root speed per cruise speed (the world ramps up and down and ends still within 3 s); walking
speed classes are bands of the mean speed around SPEED_FACTOR x the world's cruise speeds."""


def speed_bands(direction: str) -> dict[str, tuple[float, float]]:
    """Mean-speed band [low, high) (m/s) of each walking speed class of `direction`, and of running ("run",
    forward only): boundaries at SPEED_FACTOR x the geometric mean of neighbouring cruise speeds; the slow band
    starts at 0.6 x its own; the fast band ends where running starts (forward) or never (other directions)."""
    cruise = WALK_SPEEDS[direction]
    edges = [0.6 * cruise["slow"] * SPEED_FACTOR,
             SPEED_FACTOR * math.sqrt(cruise["slow"] * cruise["normal"]),
             SPEED_FACTOR * math.sqrt(cruise["normal"] * cruise["fast"]),
             SPEED_FACTOR * math.sqrt(cruise["fast"] * RUN_SPEED) if direction == "forward" else math.inf]
    bands = {"slow": (edges[0], edges[1]), "normal": (edges[1], edges[2]), "fast": (edges[2], edges[3])}
    if direction == "forward":
        bands["run"] = (edges[3], math.inf)
    return bands


# ---- measures -----------------------------------------------------------------------------------------------------
def _check_joints(joints: Tensor) -> Tensor:
    if not isinstance(joints, Tensor) or joints.ndim not in (3, 4) or tuple(joints.shape[-2:]) != (NUM_JOINTS, 3):
        shape = list(joints.shape) if isinstance(joints, Tensor) else type(joints).__name__
        raise ValueError(f"joints must be a tensor [T, {NUM_JOINTS}, 3] or [B, T, {NUM_JOINTS}, 3] (metres, y up, "
                         f"20 fps; e.g. recover_from_ric(features)), got {shape}")
    if joints.shape[-3] < 3:
        raise ValueError(f"a motion needs at least 3 frames to be scored, got {joints.shape[-3]}")
    return joints if joints.ndim == 4 else joints[None]


def _facing(joints: Tensor) -> Tensor:
    """Facing direction in the floor plane (x, z) [B, T, 2], unnormalised: cross(up, across shoulders + hips)."""
    r_hip, l_hip, r_sho, l_sho = FACE_JOINTS
    across = joints[..., r_hip, :] - joints[..., l_hip, :] + joints[..., r_sho, :] - joints[..., l_sho, :]  # [B, T, 3]
    return torch.stack([across[..., 2], -across[..., 0]], dim=-1)  # [B, T, 2]


def _smooth_abs(x: Tensor, eps: float = 1e-3) -> Tensor:
    return torch.sqrt(x * x + eps * eps)


def _runs(mask: Tensor, min_length: int) -> Tensor:
    """Number of runs of True lasting >= min_length frames in each row of mask [B, T] -> [B] (int64)."""
    count = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    length = torch.zeros_like(count)
    for t in range(mask.shape[1]):
        length = torch.where(mask[:, t], length + 1, torch.zeros_like(length))
        count = count + (length == min_length).long()
    return count


def _rising_edges(soft_mask: Tensor, width: float = 0.01) -> Tensor:
    """Soft count [B] of 0 -> 1 transitions of soft_mask [B, T] in [0, 1] (the first frame follows a 0): the summed
    rises, each through a smooth ReLU (x + sqrt(x^2 + width^2) - width) / 2, so a flat background adds nothing."""
    rise = soft_mask - F.pad(soft_mask[:, :-1], (1, 0))  # [B, T]
    return ((rise + torch.sqrt(rise * rise + width * width) - width) / 2).sum(-1)


def measure(joints: Tensor, soft: bool = False) -> dict[str, Tensor]:
    """The measures (module docstring) of motions [B, T, 22, 3] as tensors [B]. soft=True: smooth versions (soft
    minimum and maximum, sigmoid indicators, soft counts of rising edges) that gradients pass through."""
    joints = _check_joints(joints)
    root = joints[..., 0, :]  # [B, T, 3]
    facing = _facing(joints)  # [B, T, 2] (x, z)
    forward_axes = facing / facing.norm(dim=-1, keepdim=True).clamp(min=1e-9)  # [B, T, 2] h = (sin psi, cos psi)
    left_axes = torch.stack([forward_axes[..., 1], -forward_axes[..., 0]], dim=-1)  # [B, T, 2] l = (cos psi, -sin psi)
    travel = root[:, -1, [0, 2]] - root[:, 0, [0, 2]]  # [B, 2]
    steps = (root[:, 1:, [0, 2]] - root[:, :-1, [0, 2]]).pow(2).sum(-1)  # [B, T-1]
    # turn: atan2 of the sine and cosine of each frame-to-frame change of the facing
    f0, f1 = facing[:, :-1], facing[:, 1:]  # [B, T-1, 2]
    sin_turn = f1[..., 0] * f0[..., 1] - f1[..., 1] * f0[..., 0]
    cos_turn = (f0 * f1).sum(-1)
    turn = torch.atan2(sin_turn, cos_turn).sum(-1)  # [B]

    toe_l, toe_r = joints[..., J["l_foot"], 1], joints[..., J["r_foot"], 1]  # [B, T]
    pelvis = root[..., 1]  # [B, T]
    head = joints[..., J["head"], 1]  # [B, T]
    out = {
        "forward": (travel * forward_axes[:, 0]).sum(-1),  # in frame 0's body axes
        "left": (travel * left_axes[:, 0]).sum(-1),
        "turn": turn,
        "end_height": pelvis[:, -1],
    }
    hip_knee_ankle = {"left": (J["l_hip"], J["l_knee"], J["l_ankle"]), "right": (J["r_hip"], J["r_knee"], J["r_ankle"])}
    for side, (hip, knee, ankle) in hip_knee_ankle.items():
        thigh = joints[:, -1, hip] - joints[:, -1, knee]  # [B, 3]
        shank = joints[:, -1, ankle] - joints[:, -1, knee]  # [B, 3]
        out[f"knee_cos_{side}"] = (thigh * shank).sum(-1) / (thigh.norm(dim=-1) * shank.norm(dim=-1)).clamp(min=1e-9)
    arms = {"left": (J["l_elbow"], J["l_wrist"], 1.0), "right": (J["r_elbow"], J["r_wrist"], -1.0)}
    if soft:
        out["distance"] = torch.sqrt(travel.pow(2).sum(-1) + 1e-6)
        out["mean_speed"] = torch.sqrt(steps + 1e-8).mean(-1) * FPS
        lowest = -0.01 * torch.logsumexp(torch.stack([-toe_l, -toe_r]) / 0.01, dim=0)  # [B, T] soft min
        out["jumps"] = _rising_edges(torch.sigmoid((lowest - AIRBORNE_HEIGHT) / 0.015))
        out["dips"] = _rising_edges(torch.sigmoid((DIP_HEIGHT - pelvis) / 0.015))
        for side, toe in (("left", toe_l), ("right", toe_r)):
            out[f"toe_peak_{side}"] = (torch.softmax(toe / 0.01, dim=-1) * toe).sum(-1)
    else:
        out["distance"] = travel.norm(dim=-1)
        out["mean_speed"] = steps.sqrt().mean(-1) * FPS
        lowest = torch.minimum(toe_l, toe_r)
        out["jumps"] = _runs(lowest > AIRBORNE_HEIGHT, 2).to(joints.dtype)
        out["dips"] = _runs(pelvis < DIP_HEIGHT, 2).to(joints.dtype)
        out["toe_peak_left"], out["toe_peak_right"] = toe_l.amax(-1), toe_r.amax(-1)
    for side, (elbow, wrist, sign) in arms.items():
        above = joints[..., wrist, 1] - head - RAISED_MARGIN  # [B, T]
        raised = torch.sigmoid(above / 0.03) if soft else (above > 0).to(joints.dtype)  # [B, T]
        forearm = joints[..., wrist, :][..., [0, 2]] - joints[..., elbow, :][..., [0, 2]]  # [B, T, 2]
        outward = sign * (forearm * left_axes).sum(-1)  # [B, T]
        step = outward[:, 1:] - outward[:, :-1]  # [B, T-1]
        both = raised[:, 1:] * raised[:, :-1]  # [B, T-1]
        out[f"raised_{side}"] = raised.sum(-1)
        out[f"waving_{side}"] = ((_smooth_abs(step) if soft else step.abs()) * both).sum(-1)
    return out


# ---- rules --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One condition: measure `op` target, with `scale` setting how fast partial and soft credit fall off.
    op "<" / ">": below / above target; "==": equal counts; "~": within `tolerance` of target."""

    name: str
    value: Callable[[dict[str, Tensor]], Tensor]
    op: str
    target: float
    scale: float
    tolerance: float = 0.0

    def holds(self, v: Tensor) -> Tensor:
        if self.op == "<":
            return v < self.target
        if self.op == ">":
            return v > self.target
        if self.op == "==":
            return v == self.target
        return (v - self.target).abs() < self.tolerance

    def miss(self, v: Tensor) -> Tensor:
        """How far past its limit a value is (0 when the rule holds)."""
        if self.op == "<":
            return (v - self.target).clamp(min=0)
        if self.op == ">":
            return (self.target - v).clamp(min=0)
        if self.op == "==":
            return (v - self.target).abs()
        return ((v - self.target).abs() - self.tolerance).clamp(min=0)

    def log_soft(self, v: Tensor) -> Tensor:
        """log of the smooth credit in (0, 1]: log sigmoid of the margin, or -|error| / scale."""
        if self.op == "<":
            return F.logsigmoid((self.target - v) / self.scale)
        if self.op == ">":
            return F.logsigmoid((v - self.target) / self.scale)
        return -_smooth_abs(v - self.target) / self.scale


def _measure(key: str) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda m: m[key]


def _off_direction(direction: str) -> Callable[[dict[str, Tensor]], Tensor]:
    """Angle (rad) between the travel and the asked direction, in the first frame's body axes."""
    left, forward = TRAVEL_DIRECTIONS[direction]

    def angle(m: dict[str, Tensor]) -> Tensor:
        along = m["left"] * left + m["forward"] * forward
        across = m["left"] * forward - m["forward"] * left
        return torch.atan2(_smooth_abs(across), along)

    return angle


def _quiet(*skip: str) -> list[Rule]:
    """The rules that say nothing else happens, less those named in `skip`."""
    rules = {
        "still": Rule("stays in place", _measure("distance"), "<", STILL_DISTANCE, 0.05),
        "no_turn": Rule("keeps its facing", _measure("turn"), "~", 0.0, math.pi / 8, NO_TURN),
        "no_jump": Rule("never airborne", _measure("jumps"), "==", 0.0, 1.0),
        "left_down": Rule("left arm down", _measure("raised_left"), "<", RAISED_FRAMES - 0.5, 1.0),
        "right_down": Rule("right arm down", _measure("raised_right"), "<", RAISED_FRAMES - 0.5, 1.0),
        "no_dip": Rule("no squat", _measure("dips"), "==", 0.0, 1.0),
        "standing": Rule("ends standing", _measure("end_height"), ">", STANDING_HEIGHT, 0.02),
    }
    return [rule for key, rule in rules.items() if key not in skip]


def rules_for(label: dict) -> list[Rule]:
    """The rules a motion must keep to be correct for `label` (module docstring)."""
    label = check_label(label)
    tag = label["tag"]
    if tag in ("walk", "run"):
        direction = label["direction"]
        band = speed_bands(direction)[label["speed"] if tag == "walk" else "run"]
        rules = [Rule(f"travels {direction}", _off_direction(direction), "<", DIRECTION_TOLERANCE, 0.1),
                 Rule("moves away", _measure("distance"), ">", MIN_TRAVEL, 0.05),
                 Rule(f"mean speed above {band[0]:.2f} m/s", _measure("mean_speed"), ">", band[0], 0.03)]
        if math.isfinite(band[1]):
            rules.append(Rule(f"mean speed below {band[1]:.2f} m/s", _measure("mean_speed"), "<", band[1], 0.03))
        return rules + _quiet("still", "no_jump" if tag == "run" else "")
    if tag == "turn":
        target = math.radians(label["angle"]) * (1 if label["direction"] == "left" else -1)
        return [Rule(f"turns {label['angle']} degrees {label['direction']}", _measure("turn"), "~", target,
                     math.pi / 8, TURN_TOLERANCE)] + _quiet("no_turn")
    if tag == "jump":
        return [Rule(f"jumps {label['count']} times", _measure("jumps"), "==", float(label["count"]), 1.0)] + \
            _quiet("no_jump")
    if tag in ("wave", "raise"):
        up = ("left", "right") if label["side"] == "both" else (label["side"],)
        rules = []
        for side in ("left", "right"):
            if side in up:
                rules.append(Rule(f"{side} arm up", _measure(f"raised_{side}"), ">", RAISED_FRAMES - 0.5, 1.0))
                if tag == "wave":
                    rules.append(Rule(f"{side} hand waves", _measure(f"waving_{side}"), ">", WAVE_PATH, 0.05))
                else:
                    rules.append(Rule(f"{side} hand still", _measure(f"waving_{side}"), "<", WAVE_PATH, 0.05))
        return rules + _quiet(*(f"{side}_down" for side in up))
    if tag == "sit":
        return [Rule("ends seated", _measure("end_height"), "<", SEATED_HEIGHT, 0.02),
                Rule("left knee bent", _measure("knee_cos_left"), ">", SEATED_KNEE_COS, 0.05),
                Rule("right knee bent", _measure("knee_cos_right"), ">", SEATED_KNEE_COS, 0.05),
                Rule("stays in place", _measure("distance"), "<", SIT_DISTANCE, 0.05)] + \
            _quiet("still", "no_dip", "standing")
    if tag == "squat":
        return [Rule(f"squats {label['count']} times", _measure("dips"), "==", float(label["count"]), 1.0)] + \
            _quiet("no_dip")
    if tag == "kick":
        other = "right" if label["side"] == "left" else "left"
        return [Rule(f"{label['side']} foot kicks up", _measure(f"toe_peak_{label['side']}"), ">", KICK_HEIGHT, 0.03),
                Rule(f"{other} foot stays planted", _measure(f"toe_peak_{other}"), "<", PLANTED_HEIGHT, 0.02)] + \
            _quiet()
    if tag == "stand":
        return [Rule("left foot down", _measure("toe_peak_left"), "<", QUIET_FEET, 0.02),
                Rule("right foot down", _measure("toe_peak_right"), "<", QUIET_FEET, 0.02)] + _quiet()
    raise AssertionError(f"no rules for tag {tag!r}; tags are {list(LABEL_FIELDS)}")


# ---- scores -------------------------------------------------------------------------------------------------------
@dataclass
class MotionScore:
    """Verdict (`correct`: every rule kept), partial credit in [0, 1] (1.0 exactly when correct), and the rules."""

    correct: bool
    partial: float
    details: dict = field(default_factory=dict)


def _groups(labels: list[dict]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(tuple(sorted(check_label(label).items())), []).append(i)
    return groups


def _check_batch(joints: Tensor, labels: list[dict]) -> Tensor:
    joints = _check_joints(joints)
    if isinstance(labels, dict):
        labels = [labels]
    if len(labels) != joints.shape[0]:
        raise ValueError(f"got {joints.shape[0]} motions but {len(labels)} labels")
    return joints


def score_motions(joints: Tensor, labels: list[dict]) -> list[MotionScore]:
    """Exact verdicts of motions [B, T, 22, 3] against one label each (dicts with "tag" and the label fields)."""
    joints = _check_batch(joints, labels)
    with torch.no_grad():
        measures = measure(joints.detach())
    results: list[MotionScore | None] = [None] * joints.shape[0]
    for key, index in _groups(labels).items():
        rules = rules_for(dict(key))
        sub = {name: value[index] for name, value in measures.items()}
        values = torch.stack([rule.value(sub) for rule in rules], dim=-1)  # [b, R]
        held = torch.stack([rule.holds(values[:, r]) for r, rule in enumerate(rules)], dim=-1)  # [b, R]
        misses = torch.stack([rule.miss(values[:, r]) / rule.scale for r, rule in enumerate(rules)], dim=-1)  # [b, R]
        credit = torch.where(held, torch.ones_like(values), 0.5 * torch.exp(-misses))  # [b, R]
        for row, i in enumerate(index):
            correct = bool(held[row].all())
            details = {rule.name: (bool(held[row, r]), float(values[row, r])) for r, rule in enumerate(rules)}
            results[i] = MotionScore(correct, 1.0 if correct else float(credit[row].mean()), details)
    return results  # type: ignore[return-value]


def score_motion(joints: Tensor, label: dict) -> MotionScore:
    """Exact verdict of one motion [T, 22, 3] against `label`."""
    if joints.ndim != 3:
        raise ValueError(f"score_motion takes one motion [T, 22, 3], got {list(joints.shape)}; use score_motions")
    return score_motions(joints[None], [label])[0]


def soft_score(joints: Tensor, labels: list[dict]) -> Tensor:
    """Differentiable score [B] in (0, 1] of motions [B, T, 22, 3] against their labels: the geometric mean over the
    label's rules of smooth credits (module docstring). Keeps the joints' dtype; finite gradients."""
    joints = _check_batch(joints, labels)
    measures = measure(joints, soft=True)
    log_score = joints.new_zeros(joints.shape[0])
    for key, index in _groups(labels).items():
        rules = rules_for(dict(key))
        sub = {name: value[index] for name, value in measures.items()}
        log_credit = torch.stack([rule.log_soft(rule.value(sub)) for rule in rules], dim=-1).mean(-1)  # [b]
        log_score = log_score.index_put((torch.tensor(index),), log_credit)
    return torch.exp(log_score)
