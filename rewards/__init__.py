"""Rewards (docs/design.md, seam 3): the Reward interface, a registry by name, and built-in rewards.

    from diffrl.rewards import build_reward
    reward = build_reward("jpeg_compressibility")
    scores = reward(images, prompts)  # float32 [B]
"""

from . import color, jpeg  # noqa: F401  (importing registers the built-in rewards)
from . import aesthetic, clipscore, hpsv2, imagereward, ocr, pickscore, vlm_judge  # noqa: F401  (model rewards; weights load lazily)
from . import geneval  # noqa: F401  (GenEval rules over a pluggable detector)
from . import remote  # noqa: F401  (a reward served by `diffrl serve-reward`)
from . import toyworld  # noqa: F401  (SynthShapes: toyworld, toyworld_accuracy, toyclips, toyclips_accuracy)
from . import toy_proxy  # noqa: F401  (SynthShapes learned proxy: toy_proxy)
from . import video  # noqa: F401  (per_frame, temporal_flicker, motion_smoothness, dynamics, video_temporal)
from . import video_consistency, video_flow, videoalign  # noqa: F401  (feature_consistency, dynamic_degree, videoalign)
from . import motion_models  # noqa: F401  (tmr, t2m_evaluator: text-motion models, user weights)
from . import motion  # noqa: F401  (motion_skating, _penetration, _floating, _jerk, _bone_length, motion_physics)
from . import toymotion  # noqa: F401  (motion world: toymotion, toymotion_accuracy, toymotion_soft)
from .base import Reward
from .registry import build_reward, list_rewards, register_reward

__all__ = ["Reward", "build_reward", "list_rewards", "register_reward"]
