"""Training metrics to a CSV file, and to TensorBoard when it is installed.

The CSV is long ("tidy"): one ``step,name,value`` row per metric, so a run may log
different metrics at different steps (loss every step, accuracy now and then) and a
resumed run simply appends. ``read_metrics`` turns it back into series for plots.

    with MetricsLogger("runs/bert6to3") as log:
        for step ...:
            log.log(step, loss=loss.item(), replacement_rate=th.replacement_rate)
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Dict, List, Optional, Tuple

from .errors import TheseusError

CSV_NAME = "metrics.csv"


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Appends metrics to ``DIRECTORY/metrics.csv`` and, when asked or available, to TensorBoard
    event files in ``DIRECTORY/tensorboard``.

    tensorboard: None = use it when the ``tensorboard`` package is installed; True = required
    (a clear error when it is missing); False = CSV only. Only the main process of a
    distributed run should log: pass ``enabled=False`` on the other ranks.
    """

    def __init__(self, directory: str, tensorboard: Optional[bool] = None, enabled: bool = True):
        self.directory = directory
        self.path = os.path.join(directory, CSV_NAME)
        self.enabled = enabled
        self._writer = None
        self._file = None
        if not enabled:
            return
        if tensorboard and not tensorboard_available():
            raise TheseusError("tensorboard=True but the tensorboard package is not installed; "
                               "`pip install tensorboard`, or pass tensorboard=None to log to CSV only.")
        os.makedirs(directory, exist_ok=True)
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if fresh:
            self._csv.writerow(["step", "name", "value"])
        if tensorboard is not False and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(directory, "tensorboard"))

    @property
    def tensorboard_dir(self) -> Optional[str]:
        return self._writer.log_dir if self._writer is not None else None

    def log(self, step: int, **values: float) -> None:
        """One row per named value at `step`; None values are skipped."""
        if not self.enabled:
            return
        for name, value in values.items():
            if value is None:
                continue
            value = float(value)
            self._csv.writerow([int(step), name, repr(value)])
            if self._writer is not None:
                self._writer.add_scalar(name, value, int(step))
        self._file.flush()  # a crash keeps every row logged so far

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def read_metrics(path: str) -> Dict[str, List[Tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` from a metrics.csv (or the directory holding one), sorted
    by step; a step logged twice (a resumed run) keeps its last value."""
    if os.path.isdir(path):
        path = os.path.join(path, CSV_NAME)
    if not os.path.isfile(path):
        raise TheseusError(f"No metrics file at {path!r}; MetricsLogger(directory) writes DIRECTORY/{CSV_NAME}.")
    series: Dict[str, Dict[int, float]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["step", "name", "value"]:
            raise TheseusError(f"{path} is not a metrics file: its header is {header}, expected step,name,value.")
        for row in reader:
            if len(row) != 3:
                warnings.warn(f"{path}: skipping a malformed row {row} (an interrupted write?)")
                continue
            series.setdefault(row[1], {})[int(row[0])] = float(row[2])
    return {name: sorted(points.items()) for name, points in series.items()}
