import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFamily(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FAMILY_UNSPECIFIED: _ClassVar[ModelFamily]
    MODEL_FAMILY_STABLE_DIFFUSION: _ClassVar[ModelFamily]
    MODEL_FAMILY_STABLE_DIFFUSION_XL: _ClassVar[ModelFamily]
    MODEL_FAMILY_FLUX2_KLEIN: _ClassVar[ModelFamily]

class GenerationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATION_MODE_UNSPECIFIED: _ClassVar[GenerationMode]
    GENERATION_MODE_TEXT_TO_IMAGE: _ClassVar[GenerationMode]
    GENERATION_MODE_IMAGE_TO_IMAGE: _ClassVar[GenerationMode]
    GENERATION_MODE_INPAINT: _ClassVar[GenerationMode]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_BASE: _ClassVar[ModelKind]
    MODEL_KIND_FINE_TUNED_FULL: _ClassVar[ModelKind]
    MODEL_KIND_FINE_TUNED_LORA: _ClassVar[ModelKind]

class ModelLoadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_LOAD_STATE_UNSPECIFIED: _ClassVar[ModelLoadState]
    MODEL_LOAD_STATE_NOT_LOADED: _ClassVar[ModelLoadState]
    MODEL_LOAD_STATE_LOADING: _ClassVar[ModelLoadState]
    MODEL_LOAD_STATE_LOADED: _ClassVar[ModelLoadState]
    MODEL_LOAD_STATE_FAILED: _ClassVar[ModelLoadState]
MODEL_FAMILY_UNSPECIFIED: ModelFamily
MODEL_FAMILY_STABLE_DIFFUSION: ModelFamily
MODEL_FAMILY_STABLE_DIFFUSION_XL: ModelFamily
MODEL_FAMILY_FLUX2_KLEIN: ModelFamily
GENERATION_MODE_UNSPECIFIED: GenerationMode
GENERATION_MODE_TEXT_TO_IMAGE: GenerationMode
GENERATION_MODE_IMAGE_TO_IMAGE: GenerationMode
GENERATION_MODE_INPAINT: GenerationMode
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_BASE: ModelKind
MODEL_KIND_FINE_TUNED_FULL: ModelKind
MODEL_KIND_FINE_TUNED_LORA: ModelKind
MODEL_LOAD_STATE_UNSPECIFIED: ModelLoadState
MODEL_LOAD_STATE_NOT_LOADED: ModelLoadState
MODEL_LOAD_STATE_LOADING: ModelLoadState
MODEL_LOAD_STATE_LOADED: ModelLoadState
MODEL_LOAD_STATE_FAILED: ModelLoadState

class Model(_message.Message):
    __slots__ = ("name", "display_name", "kind", "source", "base_model", "identifier_token", "class_prompt", "training_job", "load_state", "memory_bytes", "default_resolution", "create_time", "owner", "family", "modes", "scores", "default_steps", "default_guidance_scale", "takes_reference_images", "guided", "size_multiple")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TAKES_REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    kind: ModelKind
    source: str
    base_model: str
    identifier_token: str
    class_prompt: str
    training_job: str
    load_state: ModelLoadState
    memory_bytes: int
    default_resolution: int
    create_time: _timestamp_pb2.Timestamp
    owner: str
    family: ModelFamily
    modes: _containers.RepeatedScalarFieldContainer[GenerationMode]
    scores: SubjectScores
    default_steps: int
    default_guidance_scale: float
    takes_reference_images: bool
    guided: bool
    size_multiple: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., source: _Optional[str] = ..., base_model: _Optional[str] = ..., identifier_token: _Optional[str] = ..., class_prompt: _Optional[str] = ..., training_job: _Optional[str] = ..., load_state: _Optional[_Union[ModelLoadState, str]] = ..., memory_bytes: _Optional[int] = ..., default_resolution: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., family: _Optional[_Union[ModelFamily, str]] = ..., modes: _Optional[_Iterable[_Union[GenerationMode, str]]] = ..., scores: _Optional[_Union[SubjectScores, _Mapping]] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., takes_reference_images: _Optional[bool] = ..., guided: _Optional[bool] = ..., size_multiple: _Optional[int] = ...) -> None: ...

class SubjectScores(_message.Message):
    __slots__ = ("step", "dino", "clip_i", "clip_t", "drift", "images")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DINO_FIELD_NUMBER: _ClassVar[int]
    CLIP_I_FIELD_NUMBER: _ClassVar[int]
    CLIP_T_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    dino: float
    clip_i: float
    clip_t: float
    drift: float
    images: int
    def __init__(self, step: _Optional[int] = ..., dino: _Optional[float] = ..., clip_i: _Optional[float] = ..., clip_t: _Optional[float] = ..., drift: _Optional[float] = ..., images: _Optional[int] = ...) -> None: ...
