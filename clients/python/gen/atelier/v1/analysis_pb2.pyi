from atelier.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnalysisTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANALYSIS_TASK_UNSPECIFIED: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_VQA: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_DOCUMENT: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_CHART: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_VIDEO: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_OCR: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_GENERAL: _ClassVar[AnalysisTask]
    ANALYSIS_TASK_GROUNDING: _ClassVar[AnalysisTask]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_TEXT: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MARKDOWN: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JSON: _ClassVar[OutputFormat]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
ANALYSIS_TASK_UNSPECIFIED: AnalysisTask
ANALYSIS_TASK_VQA: AnalysisTask
ANALYSIS_TASK_DOCUMENT: AnalysisTask
ANALYSIS_TASK_CHART: AnalysisTask
ANALYSIS_TASK_VIDEO: AnalysisTask
ANALYSIS_TASK_OCR: AnalysisTask
ANALYSIS_TASK_GENERAL: AnalysisTask
ANALYSIS_TASK_GROUNDING: AnalysisTask
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_TEXT: OutputFormat
OUTPUT_FORMAT_MARKDOWN: OutputFormat
OUTPUT_FORMAT_JSON: OutputFormat
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class VideoInput(_message.Message):
    __slots__ = ("data", "object", "frames", "fps", "max_frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    object: _common_pb2.ObjectRef
    frames: VideoFrames
    fps: float
    max_frames: int
    def __init__(self, data: _Optional[bytes] = ..., object: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., frames: _Optional[_Union[VideoFrames, _Mapping]] = ..., fps: _Optional[float] = ..., max_frames: _Optional[int] = ...) -> None: ...

class VideoFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[VideoFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[VideoFrame, _Mapping]]] = ...) -> None: ...

class VideoFrame(_message.Message):
    __slots__ = ("image", "timestamp_seconds")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    timestamp_seconds: float
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., timestamp_seconds: _Optional[float] = ...) -> None: ...

class DecodingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("images", "video", "instruction", "task", "target_language", "output_format", "json_schema", "decoding", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    video: VideoInput
    instruction: str
    task: AnalysisTask
    target_language: str
    output_format: OutputFormat
    json_schema: str
    decoding: DecodingParams
    priority: int
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ..., video: _Optional[_Union[VideoInput, _Mapping]] = ..., instruction: _Optional[str] = ..., task: _Optional[_Union[AnalysisTask, str]] = ..., target_language: _Optional[str] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., json_schema: _Optional[str] = ..., decoding: _Optional[_Union[DecodingParams, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "image_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., image_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("text", "output_format", "finish_reason", "usage", "timings", "time_to_first_token_seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    output_format: OutputFormat
    finish_reason: FinishReason
    usage: Usage
    timings: _common_pb2.Timings
    time_to_first_token_seconds: float
    def __init__(self, text: _Optional[str] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., time_to_first_token_seconds: _Optional[float] = ...) -> None: ...

class AnalyzeStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: AnalyzeRequest
    def __init__(self, request: _Optional[_Union[AnalyzeRequest, _Mapping]] = ...) -> None: ...

class AnalyzeStreamResponse(_message.Message):
    __slots__ = ("delta", "result")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    delta: str
    result: AnalyzeResponse
    def __init__(self, delta: _Optional[str] = ..., result: _Optional[_Union[AnalyzeResponse, _Mapping]] = ...) -> None: ...

class BatchAnalyzeRequest(_message.Message):
    __slots__ = ("images", "instruction", "task", "target_language", "output_format", "json_schema", "decoding", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    instruction: str
    task: AnalysisTask
    target_language: str
    output_format: OutputFormat
    json_schema: str
    decoding: DecodingParams
    priority: int
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ..., instruction: _Optional[str] = ..., task: _Optional[_Union[AnalysisTask, str]] = ..., target_language: _Optional[str] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., json_schema: _Optional[str] = ..., decoding: _Optional[_Union[DecodingParams, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class BatchAnalyzeResponse(_message.Message):
    __slots__ = ("index", "result", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    result: AnalyzeResponse
    error: ItemError
    def __init__(self, index: _Optional[int] = ..., result: _Optional[_Union[AnalyzeResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
