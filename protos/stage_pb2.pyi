from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    BATCH: _ClassVar[FrameKind]
    CHUNK: _ClassVar[FrameKind]
    END: _ClassVar[FrameKind]
    ACK: _ClassVar[FrameKind]

class BatchKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_KIND_UNSPECIFIED: _ClassVar[BatchKind]
    TRAIN: _ClassVar[BatchKind]
    EVAL: _ClassVar[BatchKind]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
FRAME_KIND_UNSPECIFIED: FrameKind
BATCH: FrameKind
CHUNK: FrameKind
END: FrameKind
ACK: FrameKind
BATCH_KIND_UNSPECIFIED: BatchKind
TRAIN: BatchKind
EVAL: BatchKind

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "wire_dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    wire_dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("meta", "offset", "data")
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    meta: TensorMeta
    offset: int
    data: bytes
    def __init__(self, meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("run_id", "seq", "kind", "epoch", "tensors", "total_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    kind: BatchKind
    epoch: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    total_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., kind: _Optional[_Union[BatchKind, str]] = ..., epoch: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("seq", "offset")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    seq: int
    offset: int
    def __init__(self, seq: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class EndOfEpoch(_message.Message):
    __slots__ = ("run_id", "epoch", "batches")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    batches: int
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("run_id", "layers", "config_json", "device", "downstream", "stage", "num_stages", "session")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    config_json: str
    device: str
    downstream: str
    stage: int
    num_stages: int
    session: str
    def __init__(self, run_id: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., config_json: _Optional[str] = ..., device: _Optional[str] = ..., downstream: _Optional[str] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class ConfigureReply(_message.Message):
    __slots__ = ("device", "parameters")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    device: str
    parameters: int
    def __init__(self, device: _Optional[str] = ..., parameters: _Optional[int] = ...) -> None: ...

class WeightsReply(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: int
    def __init__(self, tensors: _Optional[int] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("with_optimizer",)
    WITH_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    with_optimizer: bool
    def __init__(self, with_optimizer: _Optional[bool] = ...) -> None: ...

class ProximalRequest(_message.Message):
    __slots__ = ("mu",)
    MU_FIELD_NUMBER: _ClassVar[int]
    mu: float
    def __init__(self, mu: _Optional[float] = ...) -> None: ...

class EpochRequest(_message.Message):
    __slots__ = ("run_id", "epoch", "total_epochs", "timeout")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    total_epochs: int
    timeout: float
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., timeout: _Optional[float] = ...) -> None: ...

class EpochReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("address", "layers", "epoch", "train_batches", "eval_batches", "busy_seconds", "idle_seconds", "blocked_seconds", "bytes_in", "bytes_out", "layer_metrics_json", "error", "rss_mb", "timeline", "configures")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCHES_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RSS_MB_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURES_FIELD_NUMBER: _ClassVar[int]
    address: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    train_batches: int
    eval_batches: int
    busy_seconds: float
    idle_seconds: float
    blocked_seconds: float
    bytes_in: int
    bytes_out: int
    layer_metrics_json: str
    error: str
    rss_mb: float
    timeline: _containers.RepeatedScalarFieldContainer[float]
    configures: int
    def __init__(self, address: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., train_batches: _Optional[int] = ..., eval_batches: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., idle_seconds: _Optional[float] = ..., blocked_seconds: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., layer_metrics_json: _Optional[str] = ..., error: _Optional[str] = ..., rss_mb: _Optional[float] = ..., timeline: _Optional[_Iterable[float]] = ..., configures: _Optional[int] = ...) -> None: ...

class EndTaskRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class EndTaskReply(_message.Message):
    __slots__ = ("layers", "penalties")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PENALTIES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    penalties: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., penalties: _Optional[_Iterable[float]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "host", "pid", "device", "layers", "run_id", "protocol_version", "data_port", "session", "setup")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    status: str
    host: str
    pid: int
    device: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    run_id: str
    protocol_version: int
    data_port: int
    session: str
    setup: str
    def __init__(self, status: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., data_port: _Optional[int] = ..., session: _Optional[str] = ..., setup: _Optional[str] = ...) -> None: ...
