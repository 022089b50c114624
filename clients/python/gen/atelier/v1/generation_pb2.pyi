from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "num_images", "width", "height", "num_inference_steps", "guidance_scale", "guidance_rescale", "seed", "scheduler", "output_format", "quality", "init_image", "mask_image", "strength", "adapters", "num_candidates", "reference_images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    num_images: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    seed: int
    scheduler: str
    output_format: _common_pb2.ImageFormat
    quality: int
    init_image: bytes
    mask_image: bytes
    strength: float
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    num_candidates: int
    reference_images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., guidance_rescale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[str] = ..., output_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., init_image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ..., num_candidates: _Optional[int] = ..., reference_images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("model", "scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    model: str
    scale: float
    def __init__(self, model: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "seeds", "model", "timings", "denoise_seconds", "decode_seconds", "subject_similarity", "candidates")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.EncodedImage]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    model: str
    timings: _common_pb2.Timings
    denoise_seconds: float
    decode_seconds: float
    subject_similarity: _containers.RepeatedScalarFieldContainer[float]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.EncodedImage, _Mapping]]] = ..., seeds: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., subject_similarity: _Optional[_Iterable[float]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("seed", "subject_similarity")
    SEED_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    seed: int
    subject_similarity: float
    def __init__(self, seed: _Optional[int] = ..., subject_similarity: _Optional[float] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("request", "preview_interval_steps")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_INTERVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    preview_interval_steps: int
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., preview_interval_steps: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("progress", "preview", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GenerationProgress
    preview: GenerationPreview
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[GenerationProgress, _Mapping]] = ..., preview: _Optional[_Union[GenerationPreview, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GenerationProgress(_message.Message):
    __slots__ = ("step", "total_steps", "batch_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    batch_size: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class GenerationPreview(_message.Message):
    __slots__ = ("step", "images")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.EncodedImage]
    def __init__(self, step: _Optional[int] = ..., images: _Optional[_Iterable[_Union[_common_pb2.EncodedImage, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "kind")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    kind: _model_pb2.ModelKind
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[_model_pb2.ModelKind, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_model_pb2.Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[_model_pb2.Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _model_pb2.Model
    def __init__(self, model: _Optional[_Union[_model_pb2.Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted_objects",)
    DELETED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    deleted_objects: int
    def __init__(self, deleted_objects: _Optional[int] = ...) -> None: ...
