"""What a job does: every series in its files through the model (and, optionally, to the PACS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imaging.dicom_read import read_header

from ..inference import Segmenter, analyse, to_response
from ..outputs import StowTarget, build_seg, store_seg
from ..uploads import UploadedFile, check_dicom

__all__ = ["group_by_series", "run_job"]


def group_by_series(files: Sequence[UploadedFile]) -> dict[str, list[UploadedFile]]:
    """The files per SeriesInstanceUID, in upload order (headers only).

    Raises
    ------
    serving.errors.NotDicomError
        A file is not DICOM (the message names it).
    """
    check_dicom(files)
    groups: dict[str, list[UploadedFile]] = {}
    for upload in files:
        uid = str(getattr(read_header(upload.open(), name=upload.name), "SeriesInstanceUID", ""))
        groups.setdefault(uid, []).append(upload)
    return groups


def run_job(
    models: Segmenter,
    files: Sequence[UploadedFile],
    *,
    job_id: str,
    target: StowTarget | None = None,
) -> dict[str, Any]:
    """Segment and triage each series; with ``target``, store each SEG there.

    SEG UIDs derive from the job id and the series, so a re-run stores the same objects (a PACS
    then replaces, rather than duplicates, them).

    Returns
    -------
    dict
        ``{"series": [PredictResponse as JSON, ...]}`` in the order the series were uploaded.

    Raises
    ------
    serving.errors.ServingError, imaging.errors.ImagingError
        A series cannot be read or stored; the message names it.
    """
    results = []
    for series_uid, group in group_by_series(files).items():
        analysis = analyse(models, group)
        response = to_response(analysis)
        if target is not None:
            seg = build_seg(analysis, uid_seed=f"{job_id}/{series_uid}")
            response.stored = store_seg(seg, target)
        results.append(response.model_dump(mode="json", exclude_none=True))
    return {"series": results}
