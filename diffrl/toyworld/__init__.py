"""SynthShapes: a closed-world text-to-image benchmark shaped like GenEval, with exact ground truth.

    from diffrl.toyworld import make_prompt_set, render
    rows = make_prompt_set(120, seed=0)            # GenEval-format metadata dicts
    image = render(rows[0], np.random.default_rng(0))  # uint8 [32, 32, 3] satisfying the prompt
    result = score(rows[0], parse_image(image))        # ScoreResult(correct=True, partial=1.0, ...)
"""

from .prompts import (
    COUNT_RANGE,
    compositional_split,
    enumerate_metadata,
    make_prompt_set,
    read_jsonl,
    sample_metadata,
    vocabulary,
    write_jsonl,
)
from .scorer import DetectedObject, ScoreResult, parse_image, parse_images, score, score_images
from .world import (
    BACKGROUND,
    COLORS,
    NUMBER_WORDS,
    POSITION_MARGIN,
    RELATIONS,
    SHAPES,
    TAGS,
    SceneObject,
    object_relations,
    relations,
    render,
    render_scene,
)

__all__ = [
    "BACKGROUND", "COLORS", "COUNT_RANGE", "NUMBER_WORDS", "POSITION_MARGIN", "RELATIONS",
    "SHAPES", "TAGS", "DetectedObject", "SceneObject", "ScoreResult", "compositional_split",
    "enumerate_metadata", "make_prompt_set", "object_relations", "parse_image", "parse_images",
    "read_jsonl", "relations", "render", "render_scene", "sample_metadata", "score",
    "score_images", "vocabulary", "write_jsonl",
]
