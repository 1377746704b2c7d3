from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "ten_crop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEN_CROP_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    ten_crop: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ..., ten_crop: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "model_version", "results", "ten_crop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TEN_CROP_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    ten_crop: bool
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., ten_crop: _Optional[bool] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model", "images", "score_threshold", "max_detections", "tta")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    score_threshold: float
    max_detections: int
    tta: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., score_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., tta: _Optional[bool] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "score", "index", "label")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    index: int
    label: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., index: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class ImageDetections(_message.Message):
    __slots__ = ("width", "height", "detections")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("model", "model_version", "results", "tta")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[ImageDetections]
    tta: bool
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageDetections, _Mapping]]] = ..., tta: _Optional[bool] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "images", "tta", "rle")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    tta: bool
    rle: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., tta: _Optional[bool] = ..., rle: _Optional[bool] = ...) -> None: ...

class ClassFraction(_message.Message):
    __slots__ = ("index", "label", "fraction")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    fraction: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., fraction: _Optional[float] = ...) -> None: ...

class ClassRle(_message.Message):
    __slots__ = ("index", "label", "size", "counts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: str
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., size: _Optional[_Iterable[int]] = ..., counts: _Optional[str] = ...) -> None: ...

class ImageSegmentation(_message.Message):
    __slots__ = ("width", "height", "mask_png", "classes", "rle")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    mask_png: bytes
    classes: _containers.RepeatedCompositeFieldContainer[ClassFraction]
    rle: _containers.RepeatedCompositeFieldContainer[ClassRle]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., mask_png: _Optional[bytes] = ..., classes: _Optional[_Iterable[_Union[ClassFraction, _Mapping]]] = ..., rle: _Optional[_Iterable[_Union[ClassRle, _Mapping]]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("model", "model_version", "results", "tta")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[ImageSegmentation]
    tta: bool
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageSegmentation, _Mapping]]] = ..., tta: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "task", "num_classes", "resize", "crop", "channels", "ten_crop_default", "max_batch_size", "ready", "description", "labels", "geometry")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    TEN_CROP_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    task: str
    num_classes: int
    resize: int
    crop: int
    channels: int
    ten_crop_default: bool
    max_batch_size: int
    ready: bool
    description: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    geometry: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., task: _Optional[str] = ..., num_classes: _Optional[int] = ..., resize: _Optional[int] = ..., crop: _Optional[int] = ..., channels: _Optional[int] = ..., ten_crop_default: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., ready: _Optional[bool] = ..., description: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., geometry: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
