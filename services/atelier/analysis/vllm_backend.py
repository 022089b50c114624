"""Optional vLLM backend for GPU hosts where vllm is installed (it is not a dependency).

``request_to_vllm`` maps a prepared atelier request onto vLLM's inputs: the
prompt text with the model's vision placeholders, ``multi_modal_data`` with the
decoded images and the sampled video frames (with their timestamps as
metadata), and sampling settings, including structured-output JSON (schema or
any JSON object). The mapping is plain data so it is unit-tested without vLLM;
``VllmGenerator`` turns it into vLLM objects and runs them on ``vllm.LLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atelier.analysis.batching import Sampling


@dataclass
class VllmRequest:
    """What vLLM needs for one request."""

    prompt: dict[str, Any]
    sampling: dict[str, Any]


def request_to_vllm(*, prompt: str, images: list, video=None, sampling: Sampling,
                    max_new_tokens: int, json_output: bool = False,
                    json_schema: dict | None = None) -> VllmRequest:
    """Map one request; ``video`` is a DecodedVideo (frames and timestamps) or None."""
    multi_modal: dict[str, Any] = {}
    if images:
        multi_modal["image"] = images if len(images) > 1 else images[0]
    if video is not None:
        duration = video.timestamps[-1] if video.timestamps else 0.0
        fps = (len(video.timestamps) - 1) / duration if duration > 0 else 1.0
        multi_modal["video"] = (video.frames, {
            "fps": fps,
            "frames_indices": list(range(len(video.timestamps))),
            "total_num_frames": len(video.timestamps),
            "duration": duration,
            "do_sample_frames": False,
        })
    params: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if json_output:
        params["structured_outputs"] = ({"json": json_schema} if json_schema is not None
                                        else {"json_object": True})
    prompt_input: dict[str, Any] = {"prompt": prompt}
    if multi_modal:
        prompt_input["multi_modal_data"] = multi_modal
    return VllmRequest(prompt=prompt_input, sampling=params)


class VllmGenerator:
    """Runs mapped requests on ``vllm.LLM`` (continuous batching is vLLM's own)."""

    def __init__(self, model_path: str, **engine_args: Any) -> None:
        from vllm import LLM  # imported here: vllm is optional

        self.llm = LLM(model=model_path, **engine_args)

    def generate(self, requests: list[VllmRequest]) -> list[str]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = []
        for r in requests:
            kwargs = dict(r.sampling)
            structured = kwargs.pop("structured_outputs", None)
            if structured is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
            params.append(SamplingParams(**kwargs))
        outputs = self.llm.generate([r.prompt for r in requests], params)
        return [o.outputs[0].text for o in outputs]
