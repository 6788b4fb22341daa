"""The interface every metrics destination implements (TensorBoard, metrics.jsonl, null,
background)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class MetricsSink(Protocol):
    """A destination for metrics. Steps are optimizer steps; tags are TensorBoard tags."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None: ...

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None: ...

    def text(self, tag: str, text: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
