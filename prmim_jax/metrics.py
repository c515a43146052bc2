"""What a user sees: a console progress line and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np


class MetricWriter:
    """Scalars and images to ``WORKDIR/tensorboard`` (tensorboardX, no TensorFlow needed), scalars also
    to ``WORKDIR/metrics.jsonl`` (one ``{"step": ..., name: value}`` object a line), lines to stdout."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())

    def scalars(self, step: int, values: dict) -> None:
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(name, float(value), step)
            self._jsonl.write(json.dumps({"step": step} | {k: float(v) for k, v in values.items()}) + "\n")
            self._jsonl.flush()

    def image(self, step: int, name: str, image: np.ndarray, png_path: str | None = None) -> None:
        """``image [H, W, 3] uint8`` to TensorBoard, and to ``png_path`` when given (written atomically)."""
        if not self.enabled:
            return
        self._writer.add_image(name, image, step, dataformats="HWC")
        if png_path:
            from PIL import Image

            partial = f"{png_path}.partial.png"
            Image.fromarray(image).save(partial)
            os.replace(partial, png_path)

    def log(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._jsonl.close()
