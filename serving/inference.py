"""One series through the model: the blocking part that every route and the job workers share."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from imaging.dicom_read import read_dataset, read_series
from imaging.volume import Volume

from .drift import observe_input
from .metrics import observe_stage
from .predictor import Prediction, Predictor
from .rle import rle_encode
from .schemas import PredictResponse, RleMask
from .uploads import DicomLimits, UploadedFile, check_dicom

__all__ = ["Analysis", "Segmenter", "analyse", "to_response"]


class Segmenter(Protocol):
    """What routes a series to a model version: :class:`serving.models.ModelManager`."""

    def predict(self, volume: Volume) -> tuple[Prediction, Predictor]: ...


@dataclass(frozen=True)
class Analysis:
    """A series, its headers (for a SEG) and what the model said about it.

    Attributes
    ----------
    volume : Volume
        The series as read by :func:`imaging.dicom_read.read_series`.
    headers : list of Dataset
        One data set per uploaded instance, in upload order: the one parsed for the checks and
        the read (pixel data read but not needed; a SEG takes only the headers).
    prediction : Prediction
        Mask, score and triage status, in ``volume``'s slice order.
    model_name, model_version : str, int
        The version that produced ``prediction``.
    triage_threshold : float
        That version's threshold for ``suspect`` (its spec's ``triage_threshold``).
    read_seconds : float
        Checking and reading the files.
    """

    volume: Volume
    headers: list[Dataset]
    prediction: Prediction
    model_name: str
    model_version: int
    triage_threshold: float
    read_seconds: float = 0.0

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of each stage: read, preprocess, forward, postprocess."""
        return {"read": self.read_seconds, **self.prediction.timings}


def analyse(
    models: Segmenter, files: Sequence[UploadedFile], *, limits: DicomLimits | None = None
) -> Analysis:
    """Check, read and segment the instances of one series (blocking: run it in a thread).

    ``models`` picks the version (champion, or the challenger for a canary study). Files not yet
    checked are checked first under ``limits`` (:func:`serving.uploads.check_dicom`; pass the
    app's, :func:`serving.uploads.limits_of`); each file is parsed once, by that check.

    Raises
    ------
    serving.errors.NotDicomError, imaging.errors.ImagingError
        A file is not DICOM, or the files are not one readable series.
    """
    start = time.perf_counter()
    files = check_dicom(files, limits)
    names = [f.name for f in files]
    headers = [f.dataset if f.dataset is not None else read_dataset(f.open(), name=f.name)
               for f in files]  # parsed by the check: no second parse
    volume = read_series(headers, names=names)
    read_s = time.perf_counter() - start
    prediction, predictor = models.predict(volume)
    observe_stage("read", read_s, predictor.version)
    observe_input(volume, predictor.version)  # input drift window (serving.drift)
    return Analysis(volume, headers, prediction, predictor.name, predictor.version,
                    float(predictor.spec.triage_threshold), read_s)


def to_response(analysis: Analysis) -> PredictResponse:
    """The JSON answer of ``/v1/predict`` for one analysed series."""
    mask = analysis.prediction.mask
    return PredictResponse(
        model_name=analysis.model_name,
        model_version=analysis.model_version,
        series_instance_uid=analysis.volume.series_uid,
        score=analysis.prediction.score,
        status=analysis.prediction.status,
        mask=RleMask(shape=list(mask.shape), rle=rle_encode(_as_bool(mask))),
    )


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """A 0/1 uint8 mask as a bool view (no copy, no value check), other masks as they are."""
    if mask.dtype == np.uint8 and mask.flags.c_contiguous and mask.size and mask.max() <= 1:
        return mask.view(np.bool_)
    return mask
