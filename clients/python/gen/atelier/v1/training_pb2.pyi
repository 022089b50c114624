import datetime

from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import model_pb2 as _model_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_STATE_UNSPECIFIED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_QUEUED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_PREPARING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_TRAINING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_EXPORTING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_SUCCEEDED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_FAILED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_CANCELLED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_CANCELLING: _ClassVar[TrainingJobState]

class FineTuneMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINE_TUNE_METHOD_UNSPECIFIED: _ClassVar[FineTuneMethod]
    FINE_TUNE_METHOD_FULL: _ClassVar[FineTuneMethod]
    FINE_TUNE_METHOD_LORA: _ClassVar[FineTuneMethod]

class MixedPrecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXED_PRECISION_UNSPECIFIED: _ClassVar[MixedPrecision]
    MIXED_PRECISION_NO: _ClassVar[MixedPrecision]
    MIXED_PRECISION_FP16: _ClassVar[MixedPrecision]
    MIXED_PRECISION_BF16: _ClassVar[MixedPrecision]

class LearningRateSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNING_RATE_SCHEDULE_UNSPECIFIED: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_CONSTANT: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_LINEAR: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_COSINE: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_POLYNOMIAL: _ClassVar[LearningRateSchedule]

class PriorSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIOR_SOURCE_UNSPECIFIED: _ClassVar[PriorSource]
    PRIOR_SOURCE_CLASS_IMAGES: _ClassVar[PriorSource]
    PRIOR_SOURCE_BASE_MODEL: _ClassVar[PriorSource]

class ExportWeights(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_WEIGHTS_UNSPECIFIED: _ClassVar[ExportWeights]
    EXPORT_WEIGHTS_EMA: _ClassVar[ExportWeights]
    EXPORT_WEIGHTS_RAW: _ClassVar[ExportWeights]

class LoraTargets(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LORA_TARGETS_UNSPECIFIED: _ClassVar[LoraTargets]
    LORA_TARGETS_ATTENTION: _ClassVar[LoraTargets]
    LORA_TARGETS_ATTENTION_MLP: _ClassVar[LoraTargets]

class SigmaSampling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGMA_SAMPLING_UNSPECIFIED: _ClassVar[SigmaSampling]
    SIGMA_SAMPLING_LOGIT_NORMAL: _ClassVar[SigmaSampling]
    SIGMA_SAMPLING_MODE: _ClassVar[SigmaSampling]
    SIGMA_SAMPLING_UNIFORM: _ClassVar[SigmaSampling]

class LossWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_WEIGHTING_UNSPECIFIED: _ClassVar[LossWeighting]
    LOSS_WEIGHTING_NONE: _ClassVar[LossWeighting]
    LOSS_WEIGHTING_SIGMA_SQRT: _ClassVar[LossWeighting]
    LOSS_WEIGHTING_COSMAP: _ClassVar[LossWeighting]

class SubjectScore(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBJECT_SCORE_UNSPECIFIED: _ClassVar[SubjectScore]
    SUBJECT_SCORE_DINO: _ClassVar[SubjectScore]
    SUBJECT_SCORE_CLIP_I: _ClassVar[SubjectScore]
    SUBJECT_SCORE_CLIP_T: _ClassVar[SubjectScore]
    SUBJECT_SCORE_DRIFT: _ClassVar[SubjectScore]

class WebhookEvent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_EVENT_UNSPECIFIED: _ClassVar[WebhookEvent]
    WEBHOOK_EVENT_STATE_CHANGED: _ClassVar[WebhookEvent]
    WEBHOOK_EVENT_CHECKPOINT_SAVED: _ClassVar[WebhookEvent]
    WEBHOOK_EVENT_VALIDATION_IMAGE: _ClassVar[WebhookEvent]
    WEBHOOK_EVENT_SCORES: _ClassVar[WebhookEvent]
TRAINING_JOB_STATE_UNSPECIFIED: TrainingJobState
TRAINING_JOB_STATE_QUEUED: TrainingJobState
TRAINING_JOB_STATE_PREPARING: TrainingJobState
TRAINING_JOB_STATE_TRAINING: TrainingJobState
TRAINING_JOB_STATE_EXPORTING: TrainingJobState
TRAINING_JOB_STATE_SUCCEEDED: TrainingJobState
TRAINING_JOB_STATE_FAILED: TrainingJobState
TRAINING_JOB_STATE_CANCELLED: TrainingJobState
TRAINING_JOB_STATE_CANCELLING: TrainingJobState
FINE_TUNE_METHOD_UNSPECIFIED: FineTuneMethod
FINE_TUNE_METHOD_FULL: FineTuneMethod
FINE_TUNE_METHOD_LORA: FineTuneMethod
MIXED_PRECISION_UNSPECIFIED: MixedPrecision
MIXED_PRECISION_NO: MixedPrecision
MIXED_PRECISION_FP16: MixedPrecision
MIXED_PRECISION_BF16: MixedPrecision
LEARNING_RATE_SCHEDULE_UNSPECIFIED: LearningRateSchedule
LEARNING_RATE_SCHEDULE_CONSTANT: LearningRateSchedule
LEARNING_RATE_SCHEDULE_LINEAR: LearningRateSchedule
LEARNING_RATE_SCHEDULE_COSINE: LearningRateSchedule
LEARNING_RATE_SCHEDULE_POLYNOMIAL: LearningRateSchedule
PRIOR_SOURCE_UNSPECIFIED: PriorSource
PRIOR_SOURCE_CLASS_IMAGES: PriorSource
PRIOR_SOURCE_BASE_MODEL: PriorSource
EXPORT_WEIGHTS_UNSPECIFIED: ExportWeights
EXPORT_WEIGHTS_EMA: ExportWeights
EXPORT_WEIGHTS_RAW: ExportWeights
LORA_TARGETS_UNSPECIFIED: LoraTargets
LORA_TARGETS_ATTENTION: LoraTargets
LORA_TARGETS_ATTENTION_MLP: LoraTargets
SIGMA_SAMPLING_UNSPECIFIED: SigmaSampling
SIGMA_SAMPLING_LOGIT_NORMAL: SigmaSampling
SIGMA_SAMPLING_MODE: SigmaSampling
SIGMA_SAMPLING_UNIFORM: SigmaSampling
LOSS_WEIGHTING_UNSPECIFIED: LossWeighting
LOSS_WEIGHTING_NONE: LossWeighting
LOSS_WEIGHTING_SIGMA_SQRT: LossWeighting
LOSS_WEIGHTING_COSMAP: LossWeighting
SUBJECT_SCORE_UNSPECIFIED: SubjectScore
SUBJECT_SCORE_DINO: SubjectScore
SUBJECT_SCORE_CLIP_I: SubjectScore
SUBJECT_SCORE_CLIP_T: SubjectScore
SUBJECT_SCORE_DRIFT: SubjectScore
WEBHOOK_EVENT_UNSPECIFIED: WebhookEvent
WEBHOOK_EVENT_STATE_CHANGED: WebhookEvent
WEBHOOK_EVENT_CHECKPOINT_SAVED: WebhookEvent
WEBHOOK_EVENT_VALIDATION_IMAGE: WebhookEvent
WEBHOOK_EVENT_SCORES: WebhookEvent

class PriorPreservation(_message.Message):
    __slots__ = ("enabled", "loss_weight", "num_class_images", "class_image_steps", "class_image_guidance_scale", "source")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    loss_weight: float
    num_class_images: int
    class_image_steps: int
    class_image_guidance_scale: float
    source: PriorSource
    def __init__(self, enabled: _Optional[bool] = ..., loss_weight: _Optional[float] = ..., num_class_images: _Optional[int] = ..., class_image_steps: _Optional[int] = ..., class_image_guidance_scale: _Optional[float] = ..., source: _Optional[_Union[PriorSource, str]] = ...) -> None: ...

class InstanceImage(_message.Message):
    __slots__ = ("image", "caption", "mask", "mask_from_alpha")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FROM_ALPHA_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    caption: str
    mask: _common_pb2.ImageInput
    mask_from_alpha: bool
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., caption: _Optional[str] = ..., mask: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., mask_from_alpha: _Optional[bool] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("identifier_token", "images", "instance_prompt", "class_prompt", "prior_preservation")
    IDENTIFIER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PRESERVATION_FIELD_NUMBER: _ClassVar[int]
    identifier_token: str
    images: _containers.RepeatedCompositeFieldContainer[InstanceImage]
    instance_prompt: str
    class_prompt: str
    prior_preservation: PriorPreservation
    def __init__(self, identifier_token: _Optional[str] = ..., images: _Optional[_Iterable[_Union[InstanceImage, _Mapping]]] = ..., instance_prompt: _Optional[str] = ..., class_prompt: _Optional[str] = ..., prior_preservation: _Optional[_Union[PriorPreservation, _Mapping]] = ...) -> None: ...

class EmaConfig(_message.Message):
    __slots__ = ("enabled", "decay", "start_step", "export_weights")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    EXPORT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    decay: float
    start_step: int
    export_weights: ExportWeights
    def __init__(self, enabled: _Optional[bool] = ..., decay: _Optional[float] = ..., start_step: _Optional[int] = ..., export_weights: _Optional[_Union[ExportWeights, str]] = ...) -> None: ...

class TextEncoderTraining(_message.Message):
    __slots__ = ("enabled", "learning_rate", "stop_at_step")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    learning_rate: float
    stop_at_step: int
    def __init__(self, enabled: _Optional[bool] = ..., learning_rate: _Optional[float] = ..., stop_at_step: _Optional[int] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("rank", "alpha", "targets")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    targets: LoraTargets
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., targets: _Optional[_Union[LoraTargets, str]] = ...) -> None: ...

class TrainingResources(_message.Message):
    __slots__ = ("num_workers", "gpus_per_worker", "cpus_per_worker")
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    num_workers: int
    gpus_per_worker: int
    cpus_per_worker: int
    def __init__(self, num_workers: _Optional[int] = ..., gpus_per_worker: _Optional[int] = ..., cpus_per_worker: _Optional[int] = ...) -> None: ...

class CheckpointPolicy(_message.Message):
    __slots__ = ("every_n_steps", "keep_last")
    EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    every_n_steps: int
    keep_last: int
    def __init__(self, every_n_steps: _Optional[int] = ..., keep_last: _Optional[int] = ...) -> None: ...

class TrainingOptions(_message.Message):
    __slots__ = ("snr_gamma", "noise_offset", "random_flip", "center_crop", "gradient_checkpointing", "use_8bit_adam", "max_grad_norm", "aspect_ratio_bucketing", "cache_latents", "masked_loss_outside_weight", "flow_matching")
    SNR_GAMMA_FIELD_NUMBER: _ClassVar[int]
    NOISE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FLIP_FIELD_NUMBER: _ClassVar[int]
    CENTER_CROP_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    USE_8BIT_ADAM_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_BUCKETING_FIELD_NUMBER: _ClassVar[int]
    CACHE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    MASKED_LOSS_OUTSIDE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FLOW_MATCHING_FIELD_NUMBER: _ClassVar[int]
    snr_gamma: float
    noise_offset: float
    random_flip: bool
    center_crop: bool
    gradient_checkpointing: bool
    use_8bit_adam: bool
    max_grad_norm: float
    aspect_ratio_bucketing: bool
    cache_latents: bool
    masked_loss_outside_weight: float
    flow_matching: FlowMatching
    def __init__(self, snr_gamma: _Optional[float] = ..., noise_offset: _Optional[float] = ..., random_flip: _Optional[bool] = ..., center_crop: _Optional[bool] = ..., gradient_checkpointing: _Optional[bool] = ..., use_8bit_adam: _Optional[bool] = ..., max_grad_norm: _Optional[float] = ..., aspect_ratio_bucketing: _Optional[bool] = ..., cache_latents: _Optional[bool] = ..., masked_loss_outside_weight: _Optional[float] = ..., flow_matching: _Optional[_Union[FlowMatching, _Mapping]] = ...) -> None: ...

class FlowMatching(_message.Message):
    __slots__ = ("sigma_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting", "min_sigma", "max_sigma", "resolution_shift")
    SIGMA_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGIT_MEAN_FIELD_NUMBER: _ClassVar[int]
    LOGIT_STD_FIELD_NUMBER: _ClassVar[int]
    MODE_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    MIN_SIGMA_FIELD_NUMBER: _ClassVar[int]
    MAX_SIGMA_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_SHIFT_FIELD_NUMBER: _ClassVar[int]
    sigma_sampling: SigmaSampling
    logit_mean: float
    logit_std: float
    mode_scale: float
    loss_weighting: LossWeighting
    min_sigma: float
    max_sigma: float
    resolution_shift: bool
    def __init__(self, sigma_sampling: _Optional[_Union[SigmaSampling, str]] = ..., logit_mean: _Optional[float] = ..., logit_std: _Optional[float] = ..., mode_scale: _Optional[float] = ..., loss_weighting: _Optional[_Union[LossWeighting, str]] = ..., min_sigma: _Optional[float] = ..., max_sigma: _Optional[float] = ..., resolution_shift: _Optional[bool] = ...) -> None: ...

class QualityGate(_message.Message):
    __slots__ = ("min_dino", "min_clip_i", "min_clip_t", "max_drift")
    MIN_DINO_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIP_I_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIP_T_FIELD_NUMBER: _ClassVar[int]
    MAX_DRIFT_FIELD_NUMBER: _ClassVar[int]
    min_dino: float
    min_clip_i: float
    min_clip_t: float
    max_drift: float
    def __init__(self, min_dino: _Optional[float] = ..., min_clip_i: _Optional[float] = ..., min_clip_t: _Optional[float] = ..., max_drift: _Optional[float] = ...) -> None: ...

class SubjectEvaluation(_message.Message):
    __slots__ = ("enabled", "prompts", "images_per_prompt", "num_inference_steps", "guidance_scale", "class_noun", "quality_gate", "export_best_by")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NOUN_FIELD_NUMBER: _ClassVar[int]
    QUALITY_GATE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_BEST_BY_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    prompts: _containers.RepeatedScalarFieldContainer[str]
    images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    class_noun: str
    quality_gate: QualityGate
    export_best_by: SubjectScore
    def __init__(self, enabled: _Optional[bool] = ..., prompts: _Optional[_Iterable[str]] = ..., images_per_prompt: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., class_noun: _Optional[str] = ..., quality_gate: _Optional[_Union[QualityGate, _Mapping]] = ..., export_best_by: _Optional[_Union[SubjectScore, str]] = ...) -> None: ...

class TrainingJobSpec(_message.Message):
    __slots__ = ("base_model", "instance_images", "identifier_token", "instance_prompt", "class_prompt", "prior_preservation", "text_encoder", "method", "lora", "resolution", "max_train_steps", "learning_rate", "lr_schedule", "lr_warmup_steps", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "seed", "resources", "checkpointing", "validation_prompts", "model_id", "options", "concepts", "text_encoder_2", "ema", "evaluation", "webhook")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PRESERVATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_2_FIELD_NUMBER: _ClassVar[int]
    EMA_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    instance_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    identifier_token: str
    instance_prompt: str
    class_prompt: str
    prior_preservation: PriorPreservation
    text_encoder: TextEncoderTraining
    method: FineTuneMethod
    lora: LoraConfig
    resolution: int
    max_train_steps: int
    learning_rate: float
    lr_schedule: LearningRateSchedule
    lr_warmup_steps: int
    train_batch_size: int
    gradient_accumulation_steps: int
    mixed_precision: MixedPrecision
    seed: int
    resources: TrainingResources
    checkpointing: CheckpointPolicy
    validation_prompts: _containers.RepeatedScalarFieldContainer[str]
    model_id: str
    options: TrainingOptions
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    text_encoder_2: TextEncoderTraining
    ema: EmaConfig
    evaluation: SubjectEvaluation
    webhook: Webhook
    def __init__(self, base_model: _Optional[str] = ..., instance_images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ..., identifier_token: _Optional[str] = ..., instance_prompt: _Optional[str] = ..., class_prompt: _Optional[str] = ..., prior_preservation: _Optional[_Union[PriorPreservation, _Mapping]] = ..., text_encoder: _Optional[_Union[TextEncoderTraining, _Mapping]] = ..., method: _Optional[_Union[FineTuneMethod, str]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., resolution: _Optional[int] = ..., max_train_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_schedule: _Optional[_Union[LearningRateSchedule, str]] = ..., lr_warmup_steps: _Optional[int] = ..., train_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., mixed_precision: _Optional[_Union[MixedPrecision, str]] = ..., seed: _Optional[int] = ..., resources: _Optional[_Union[TrainingResources, _Mapping]] = ..., checkpointing: _Optional[_Union[CheckpointPolicy, _Mapping]] = ..., validation_prompts: _Optional[_Iterable[str]] = ..., model_id: _Optional[str] = ..., options: _Optional[_Union[TrainingOptions, _Mapping]] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., text_encoder_2: _Optional[_Union[TextEncoderTraining, _Mapping]] = ..., ema: _Optional[_Union[EmaConfig, _Mapping]] = ..., evaluation: _Optional[_Union[SubjectEvaluation, _Mapping]] = ..., webhook: _Optional[_Union[Webhook, _Mapping]] = ...) -> None: ...

class Webhook(_message.Message):
    __slots__ = ("url", "events")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    url: str
    events: _containers.RepeatedScalarFieldContainer[WebhookEvent]
    def __init__(self, url: _Optional[str] = ..., events: _Optional[_Iterable[_Union[WebhookEvent, str]]] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("event_id", "event", "attempts", "status_code", "delivered", "error", "time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event: WebhookEvent
    attempts: int
    status_code: int
    delivered: bool
    error: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., event: _Optional[_Union[WebhookEvent, str]] = ..., attempts: _Optional[int] = ..., status_code: _Optional[int] = ..., delivered: _Optional[bool] = ..., error: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("name", "spec", "state", "failure_reason", "progress", "model", "latest_checkpoint", "request_id", "create_time", "start_time", "end_time", "update_time", "owner", "scores", "exported_step", "webhook_deliveries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_STEP_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: TrainingJobSpec
    state: TrainingJobState
    failure_reason: str
    progress: TrainingProgress
    model: str
    latest_checkpoint: str
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    owner: str
    scores: _containers.RepeatedCompositeFieldContainer[_model_pb2.SubjectScores]
    exported_step: int
    webhook_deliveries: _containers.RepeatedCompositeFieldContainer[WebhookDelivery]
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., state: _Optional[_Union[TrainingJobState, str]] = ..., failure_reason: _Optional[str] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., model: _Optional[str] = ..., latest_checkpoint: _Optional[str] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[_model_pb2.SubjectScores, _Mapping]]] = ..., exported_step: _Optional[int] = ..., webhook_deliveries: _Optional[_Iterable[_Union[WebhookDelivery, _Mapping]]] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "max_steps", "loss", "instance_loss", "prior_loss", "learning_rate", "steps_per_second", "samples_per_second")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    step: int
    max_steps: int
    loss: float
    instance_loss: float
    prior_loss: float
    learning_rate: float
    steps_per_second: float
    samples_per_second: float
    def __init__(self, step: _Optional[int] = ..., max_steps: _Optional[int] = ..., loss: _Optional[float] = ..., instance_loss: _Optional[float] = ..., prior_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., steps_per_second: _Optional[float] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class CreateTrainingJobRequest(_message.Message):
    __slots__ = ("request_id", "training_job_id", "spec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    training_job_id: str
    spec: TrainingJobSpec
    def __init__(self, request_id: _Optional[str] = ..., training_job_id: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ...) -> None: ...

class CreateTrainingJobResponse(_message.Message):
    __slots__ = ("training_job", "webhook_secret")
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_SECRET_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    webhook_secret: str
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ..., webhook_secret: _Optional[str] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[TrainingJobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[TrainingJobState, str]]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("training_jobs", "next_page_token")
    TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    training_jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, training_jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class DeleteTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTrainingJobResponse(_message.Message):
    __slots__ = ("deleted_objects",)
    DELETED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    deleted_objects: int
    def __init__(self, deleted_objects: _Optional[int] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchTrainingJobResponse(_message.Message):
    __slots__ = ("event_time", "snapshot", "state_changed", "progress", "checkpoint_saved", "validation_image", "scores", "checkpoint_skipped")
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SAVED_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    event_time: _timestamp_pb2.Timestamp
    snapshot: TrainingJob
    state_changed: TrainingStateChanged
    progress: TrainingProgress
    checkpoint_saved: CheckpointSaved
    validation_image: ValidationImageReady
    scores: _model_pb2.SubjectScores
    checkpoint_skipped: CheckpointSkipped
    def __init__(self, event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., snapshot: _Optional[_Union[TrainingJob, _Mapping]] = ..., state_changed: _Optional[_Union[TrainingStateChanged, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., checkpoint_saved: _Optional[_Union[CheckpointSaved, _Mapping]] = ..., validation_image: _Optional[_Union[ValidationImageReady, _Mapping]] = ..., scores: _Optional[_Union[_model_pb2.SubjectScores, _Mapping]] = ..., checkpoint_skipped: _Optional[_Union[CheckpointSkipped, _Mapping]] = ...) -> None: ...

class TrainingStateChanged(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: TrainingJobState
    reason: str
    def __init__(self, state: _Optional[_Union[TrainingJobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("step", "location", "save_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SAVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    location: str
    save_seconds: float
    def __init__(self, step: _Optional[int] = ..., location: _Optional[str] = ..., save_seconds: _Optional[float] = ...) -> None: ...

class CheckpointSkipped(_message.Message):
    __slots__ = ("step", "location", "reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    location: str
    reason: str
    def __init__(self, step: _Optional[int] = ..., location: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ValidationImageReady(_message.Message):
    __slots__ = ("step", "prompt", "image")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    prompt: str
    image: _common_pb2.ObjectRef
    def __init__(self, step: _Optional[int] = ..., prompt: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ...) -> None: ...
