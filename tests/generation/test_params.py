"""The servicer passes a request's unset fields as unset: the defaults live in
``GenerationParams`` alone, and a field set to zero stays zero where zero is a value."""

from __future__ import annotations

from atelier.generation import servicer
from atelier.generation.engine import DEFAULT_ADAPTER_SCALE, GenerationParams
from atelier.generation.servicer import params_from_request
from atelier.v1 import common_pb2, generation_pb2


def test_an_empty_request_takes_the_engines_defaults():
    assert params_from_request(generation_pb2.GenerateRequest()) == GenerationParams()


def test_set_fields_come_through_and_an_explicit_zero_stays_zero():
    request = generation_pb2.GenerateRequest(
        model="models/m", prompt="a dog", num_images=3, num_inference_steps=12,
        guidance_scale=0.0, seed=0, strength=0.25, quality=70, num_candidates=5,
        output_format=common_pb2.IMAGE_FORMAT_JPEG,
        adapters=[generation_pb2.AdapterRef(model="models/a"),
                  generation_pb2.AdapterRef(model="models/b", scale=0.0)])
    p = params_from_request(request, preview_interval=4)
    assert (p.model, p.prompt, p.num_images, p.num_inference_steps) == ("models/m", "a dog", 3, 12)
    assert (p.guidance_scale, p.seed, p.strength) == (0.0, 0, 0.25)
    assert (p.quality, p.num_candidates, p.output_format) == (70, 5, "JPEG")
    assert p.preview_interval == 4
    assert p.adapters == [("models/a", DEFAULT_ADAPTER_SCALE), ("models/b", 0.0)]


def test_every_request_field_is_mapped():
    fields = {f.name for f in generation_pb2.GenerateRequest.DESCRIPTOR.fields}
    mapped = {*servicer._ZERO_IS_UNSET, *servicer._OPTIONAL, *servicer._AS_GIVEN,
              "output_format", "adapters", "reference_images"}
    assert fields == mapped
