"""GROUNDING: boxes of the objects an instruction names, in original-image pixels.

The model answers in its own grounding format, constrained by ``model_schema``:
``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]``. What the coordinates mean
depends on the family, and converting them is where grounding usually goes
wrong, so it is done here, once, for both backends:

- Qwen3-VL: relative to the image, on a 0..1000 scale in both axes;
- Qwen2-VL / Qwen2.5-VL: pixels of the image as the processor resized it
  (to multiples of patch x merge, within the pixel budget), not of the original.

``to_original_pixels`` maps a box into the pixels of the image as sent, orders its
corners and clamps it to the image; ``answer`` builds the returned JSON, which
validates against ``ANSWER_SCHEMA``.
"""

from __future__ import annotations

from dataclasses import dataclass

RELATIVE_1000 = "relative_1000"
RESIZED_PIXELS = "resized_pixels"

#: Coordinate frame by transformers model_type.
FRAMES = {
    "qwen3_vl": RELATIVE_1000,
    "qwen3_vl_moe": RELATIVE_1000,
    "qwen2_5_vl": RESIZED_PIXELS,
    "qwen2_vl": RESIZED_PIXELS,
}

#: Most objects one answer lists.
MAX_OBJECTS = 32
#: Longest label, characters.
MAX_LABEL = 64

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "box": {
                        "type": "object",
                        "properties": {k: {"type": "integer", "minimum": 0}
                                       for k in ("x_min", "y_min", "x_max", "y_max")},
                        "required": ["x_min", "y_min", "x_max", "y_max"],
                        "additionalProperties": False,
                    },
                },
                "required": ["label", "box"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["objects"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class ImageGeometry:
    """An image as sent (``width`` x ``height``) and as the processor resized it."""

    width: int
    height: int
    resized_width: int
    resized_height: int


def frame_of(model_type: str) -> str:
    """The coordinate frame of a model family (Qwen3-VL's for unknown families)."""
    return FRAMES.get(model_type, RELATIVE_1000)


def model_schema(frame: str, geometry: ImageGeometry) -> dict:
    """The JSON Schema of the model's own grounding answer, coordinates bounded by the
    frame (so even a random model's boxes are numbers in range)."""
    top = 1000 if frame == RELATIVE_1000 else max(geometry.resized_width,
                                                  geometry.resized_height)
    return {
        "type": "array",
        "maxItems": MAX_OBJECTS,
        "items": {
            "type": "object",
            "properties": {
                "bbox_2d": {"type": "array", "minItems": 4, "maxItems": 4,
                            "items": {"type": "integer", "minimum": 0, "maximum": top}},
                "label": {"type": "string", "maxLength": MAX_LABEL},
            },
            "required": ["bbox_2d", "label"],
        },
    }


def to_original_pixels(box, frame: str, geometry: ImageGeometry) -> dict[str, int]:
    """``[x1, y1, x2, y2]`` in the model's frame -> a box in the original image's pixels,
    corners ordered and clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if frame == RELATIVE_1000:
        sx, sy = geometry.width / 1000, geometry.height / 1000
    else:
        sx = geometry.width / geometry.resized_width
        sy = geometry.height / geometry.resized_height
    xs = sorted(min(max(v * sx, 0.0), geometry.width) for v in (x1, x2))
    ys = sorted(min(max(v * sy, 0.0), geometry.height) for v in (y1, y2))
    return {"x_min": round(xs[0]), "y_min": round(ys[0]),
            "x_max": round(xs[1]), "y_max": round(ys[1])}


def answer(model_answer, frame: str, geometry: ImageGeometry) -> dict:
    """The GROUNDING answer from the model's parsed JSON; entries that are not a
    labelled four-number box (an answer closed early may end with one) are left out."""
    objects = []
    for item in model_answer if isinstance(model_answer, list) else []:
        if not isinstance(item, dict):
            continue
        box, label = item.get("bbox_2d"), item.get("label")
        if not (isinstance(box, list) and len(box) == 4 and isinstance(label, str)
                and all(isinstance(v, int | float) for v in box)):
            continue
        objects.append({"label": label, "box": to_original_pixels(box, frame, geometry)})
    return {"objects": objects}
