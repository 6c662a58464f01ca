"""The JSON bodies of the service's responses, as pydantic models (they make the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "Aggregate",
    "ClassPeak",
    "DetectResponse",
    "DetectionItem",
    "EncodedArray",
    "ErrorResponse",
    "Geometry",
    "Health",
    "MapGeometry",
    "ModelDetail",
    "ModelList",
    "ModelSummary",
    "PredictResponse",
    "Ranked",
    "Ready",
    "Reloaded",
    "ScoreMapResponse",
]


class ErrorBody(BaseModel):
    code: str = Field(description="A stable snake_case code, e.g. `invalid_image`.")
    message: str = Field(description="What went wrong, for people.")


class ErrorResponse(BaseModel):
    """Every error: 400, 404, 405, 413, 415, 422, 503."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str] = Field(description="The models served.")
    failed: dict[str, str] = Field(
        default_factory=dict, description="Model files that could not be loaded, and why."
    )


class Geometry(BaseModel):
    """How a converted network's map cells sit on the image."""

    stride: int = Field(description="S: pixels between neighbouring cells.")
    window: list[int] = Field(description="[Th, Tw]: the training size; each cell scores one.")
    receptive_field: list[int] = Field(description="[Rh, Rw]: pixels that affect one cell.")
    offset: list[int] = Field(description="[y, x] of the receptive field's corner.")
    exact: bool = Field(
        description="True: every cell equals the trained network on its window's crop. "
        "False (zero padding inside the trunk): cells near crop borders differ slightly."
    )


class ModelSummary(BaseModel):
    name: str
    version: str = Field(description="The version served (flat files are version 1).")
    input_shape: list[int] = Field(description="[C, H, W] of a training input.")
    num_classes: int
    classes: list[str]
    dtype: str
    geometry: Geometry


class ModelDetail(ModelSummary):
    file: str = Field(description="The model file's name in the model directory.")
    parameters: int
    architecture: dict[str, Any] = Field(description="The trained network's layer specs.")
    summary: str = Field(description="The trained network's layer table.")
    converted_summary: str = Field(description="The converted (fully convolutional) layers.")
    converted_layers: list[dict[str, Any]]
    per_window_from: int | None = Field(
        description="Index of the first converted layer that runs window by window (group "
        "norm), or null."
    )
    geometry_text: str
    normalization: dict[str, Any] | None = Field(
        description="Per-channel mean and std the inputs are normalised with, in [0, 1] pixels."
    )
    training: dict[str, Any] = Field(description="The training record (data, accuracy, ...).")
    self_check: dict[str, Any] = Field(description="The conversion's self-check.")
    load_seconds: float


class Reloaded(BaseModel):
    name: str
    version: str = Field(description="The version now served.")
    previous: str | None = Field(description="The version served before, or null.")
    load_seconds: float


class ModelList(BaseModel):
    models: list[ModelSummary]


class Ranked(BaseModel):
    label: str
    index: int
    probability: float


class PredictResponse(BaseModel):
    model: str
    version: str = Field(description="The model version that answered.")
    predictions: list[Ranked] = Field(description="The top-k classes, most likely first.")
    image_size: list[int] = Field(description="[H, W] of the image as sent.")
    resized_to: list[int] | None = Field(
        description="[Th, Tw] when the image was resized to the training size, else null."
    )
    converted: str | None = Field(
        description="How the image's channels were converted for the model (e.g. `RGB to "
        "grey (ITU-R 601 luma)`, `grey to RGB (repeated)`), or null when they were its own.",
    )
    time_ms: float = Field(description="Decoding and inference time, in milliseconds.")


class EncodedArray(BaseModel):
    """An array as base64 of its little-endian bytes, row-major."""

    dtype: Literal["float32", "int32"]
    shape: list[int]
    order: Literal["C"] = "C"
    data: str = Field(description="base64 of the raw bytes.")


class MapGeometry(Geometry):
    stride_divisor: int
    scale: float
    image_size: list[int]
    resized_size: list[int]
    map_shape: list[int] = Field(description="[H', W'].")
    covered: list[int] = Field(description="[H, W] of the image part that windows cover.")
    margins: list[int] = Field(description="Rows and columns at the bottom and right no "
                               "window covers.")  # fmt: skip
    cell_stride: list[float] = Field(description="Pixels between cells, per axis.")


class Aggregate(BaseModel):
    max: dict[str, float] = Field(description="Per class, the largest probability of a cell.")
    mean: dict[str, float] = Field(description="Per class, the mean probability of the cells.")
    top_k_by_mean: list[Ranked]
    top_k_by_max: list[Ranked]


class Peak(BaseModel):
    row: int
    col: int
    box: list[float] = Field(description="[x0, y0, x1, y1] in the image (x1, y1 exclusive).")
    probability: float


class ClassPeak(BaseModel):
    label: str
    index: int
    peak: Peak = Field(description="The cell where this class is most likely.")


class CellTopK(BaseModel):
    indices: EncodedArray = Field(description="(k, H', W') int32 class indices, best first.")
    probabilities: EncodedArray = Field(description="(k, H', W') float32.")


class DetectionItem(BaseModel):
    """One detection: a peak of the class's probability and its window in the image."""

    class_: str = Field(alias="class", description="The class's label.")
    class_index: int
    score: float = Field(description="The class's probability at the peak cell.")
    box: list[float] = Field(
        description="[x0, y0, x1, y1] in the image's own pixels (x1, y1 exclusive)."
    )
    scale: float = Field(description="The scale of the map the peak is on.")

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class ImageSize(BaseModel):
    height: int
    width: int


class ChosenClass(BaseModel):
    label: str
    index: int


class DetectResponse(BaseModel):
    model: str
    version: str = Field(description="The model version that answered.")
    image: ImageSize
    converted: str | None = Field(
        description="How the image's channels were converted for the model, or null."
    )
    class_: ChosenClass = Field(
        alias="class", description="The class detected (`class=`, else the top class by max)."
    )
    scales: list[float] = Field(description="The scales mapped.")
    threshold: float
    nms_iou: float
    detections: list[DetectionItem] = Field(description="Best score first; may be empty.")
    time_ms: float = Field(description="Decoding, maps and detection time, in milliseconds.")

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class ScoreMapResponse(BaseModel):
    model: str
    map_shape: list[int] = Field(description="[H', W'].")
    classes: list[str]
    geometry: MapGeometry
    aggregate: Aggregate = Field(description="Over every scale's cells.")
    converted: str | None = Field(
        description="How the image's channels were converted for the model (e.g. `RGB to "
        "grey (ITU-R 601 luma)`, `grey to RGB (repeated)`), or null when they were its own.",
    )
    class_: ClassPeak = Field(
        alias="class", description="The chosen class (`class=`, else the top class by max)."
    )
    boxes: EncodedArray | None = Field(
        None,
        description="(H', W', 4) int32: each cell's [x0, y0, x1, y1] in the image (absent "
        "with arrays=false, like the three arrays below).",
    )
    cell_top_k: CellTopK | None = None
    logits: EncodedArray | None = Field(None, description="(K, H', W') float32 class scores.")
    probabilities: EncodedArray | None = Field(
        None, description="(K, H', W') float32 per-cell softmax."
    )
    scale: float = Field(
        description="The scale whose map the map fields describe: where the class is most "
        "likely (the only one without `scales`)."
    )
    scales: list[float] = Field(description="The scales mapped (`scales=`, default [1]).")
    threshold: float | None = Field(None, description="With detections=true.")
    nms_iou: float | None = Field(None, description="With detections=true.")
    detections: list[DetectionItem] | None = Field(
        None, description="With detections=true: as `/detect` gives them, over every scale."
    )
    time_ms: float = Field(description="Decoding and inference time, in milliseconds.")

    model_config = {"populate_by_name": True, "serialize_by_alias": True}
