"""Built-in instruction templates, one per task (documented in docs/analysis.md).

The template frames the request; the user's instruction refines it. The result
is the text of the user turn, after the images and video.
"""

from __future__ import annotations

from atelier.kit.errors import InvalidArgument

TEXT, MARKDOWN, JSON = "TEXT", "MARKDOWN", "JSON"
VQA, DOCUMENT, CHART, VIDEO, OCR, GENERAL = "VQA", "DOCUMENT", "CHART", "VIDEO", "OCR", "GENERAL"
GROUNDING = "GROUNDING"

#: The format each task answers in when the request names none.
NATURAL_FORMAT = {VQA: TEXT, DOCUMENT: MARKDOWN, CHART: JSON, VIDEO: TEXT, OCR: TEXT,
                  GENERAL: TEXT, GROUNDING: JSON}

_FRAMES = {
    VQA: "Answer the question about the image(s) accurately and concisely.",
    DOCUMENT: ("Convert the document page(s) into {format}: keep all text in reading order, "
               "reproduce tables as tables, and keep headings, lists and layout."),
    CHART: ("Extract the chart: its type, title, axis labels and units, legend, and every "
            "series with its values, as {format} table."),
    VIDEO: ("Describe what happens in the video, in order, citing the timestamps of the "
            "frames where things happen."),
    OCR: "Read all text in the image(s) exactly as written, in any script, line by line.",
    GENERAL: "",
    GROUNDING: ("Locate every object the request names in the image. Answer with a JSON "
                'list of {{"bbox_2d": [x1, y1, x2, y2], "label": name}} entries, one per '
                "object, {coordinates}."),
}
#: How each grounding coordinate frame (grounding.py) is put to the model.
_COORDINATES = {"relative_1000": "with coordinates relative to the image on a 0 to 1000 scale",
                "resized_pixels": "with coordinates in pixels of the image"}
_FORMAT_WORDS = {TEXT: "plain text", MARKDOWN: "Markdown", JSON: "a JSON"}


def build_prompt(task: str, instruction: str, output_format: str,
                 target_language: str = "", has_schema: bool = False,
                 coordinates: str = "relative_1000") -> str:
    """The user-turn text for a request; raises InvalidArgument when it would be empty.
    ``coordinates`` is the model's grounding frame (GROUNDING only)."""
    instruction = instruction.strip()
    if task in (VQA, GENERAL, GROUNDING) and not instruction:
        raise InvalidArgument.field("instruction", f"is required for task {task}")
    fmt = _FORMAT_WORDS[output_format]
    frame = _FRAMES[task].format(format=fmt if task != CHART else "a JSON",
                                 coordinates=_COORDINATES[coordinates])
    if task == DOCUMENT and output_format == JSON:
        frame = frame.replace("into a JSON", "into JSON")
    parts = [frame] if frame else []
    if task == OCR and target_language:
        parts.append(f"Then translate the text into {target_language}.")
    if instruction:
        parts.append(instruction)
    if output_format == JSON and task != GROUNDING:
        parts.append("Answer with JSON only" +
                     (", following the given JSON schema." if has_schema else "."))
    elif output_format == MARKDOWN and task != DOCUMENT:
        parts.append("Answer in Markdown.")
    return "\n".join(parts)
