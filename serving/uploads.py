"""Turning a multipart upload into in-memory DICOM files, within the service's limits.

Every instance is checked before any pixel is decoded (:func:`check_dicom`), each refusal naming
its rule. Each file is parsed once: the file meta alone first (transfer syntax), then, once the
syntax is allowed and a deflated data set has passed the bomb guard, the whole data set (pixel
data read, not decoded), which the checks use and keep (:attr:`UploadedFile.dataset`) for
:func:`imaging.dicom_read.read_series`:

- **file meta**: a DICOM Part 10 file (128-byte preamble, ``DICM``, group 0002 with a
  TransferSyntaxUID);
- **transfer syntax allow-list** (:data:`ALLOWED_TRANSFER_SYNTAXES`): native little endian,
  deflated, RLE, JPEG, JPEG-LS and JPEG 2000, all decodable by the installed plug-ins;
- **deflate bomb guard**: a deflated data set is inflated in bounded steps, counting the output,
  and refused as soon as it passes what the pixel budget allows;
- **pixel budget**: rows x columns x frames x samples x bits allocated, summed over the request,
  at most ``FEDSEG_SERVE_MAX_PIXEL_MB``;
- **instance cap**: at most ``FEDSEG_SERVE_MAX_INSTANCES`` files (checked while parsing).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pydicom.uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from imaging.dicom_read import read_dataset
from imaging.errors import DicomReadError

from .errors import (
    DeflateBombError,
    EmptyUploadError,
    MalformedUploadError,
    NotDicomError,
    NotMultipartError,
    PixelBudgetError,
    TooManyInstancesError,
    TransferSyntaxNotAllowedError,
    UploadTooLargeError,
)
from .security.audit import note_study

__all__ = [
    "ALLOWED_TRANSFER_SYNTAXES",
    "FILES_FIELD",
    "DicomLimits",
    "UploadedFile",
    "check_dicom",
    "declared_pixel_bytes",
    "limits_of",
    "read_uploads",
]

#: The multipart field that carries the instances.
FILES_FIELD = "files"
_CHUNK = 1024 * 1024
_MIB = 1024 * 1024
#: Room for the header of each deflated instance, on top of its share of the pixel budget.
HEADER_ALLOWANCE = _MIB

#: Transfer syntaxes accepted (UID -> name); everything else is refused before decoding.
ALLOWED_TRANSFER_SYNTAXES: dict[str, str] = {
    str(uid): uid.name
    for uid in (
        dcm_uid.ImplicitVRLittleEndian,
        dcm_uid.ExplicitVRLittleEndian,
        dcm_uid.DeflatedExplicitVRLittleEndian,
        dcm_uid.RLELossless,
        dcm_uid.JPEGBaseline8Bit,
        dcm_uid.JPEGExtended12Bit,
        dcm_uid.JPEGLossless,
        dcm_uid.JPEGLosslessSV1,
        dcm_uid.JPEGLSLossless,
        dcm_uid.JPEGLSNearLossless,
        dcm_uid.JPEG2000Lossless,
        dcm_uid.JPEG2000,
    )
}


@dataclass(frozen=True)
class DicomLimits:
    """What one request may hold (from :class:`~serving.settings.ServingSettings`)."""

    max_pixel_bytes: int = 1024 * _MIB

    @classmethod
    def from_settings(cls, settings: object) -> DicomLimits:
        return cls(max_pixel_bytes=int(getattr(settings, "max_pixel_bytes", cls.max_pixel_bytes)))


@dataclass(frozen=True)
class UploadedFile:
    """One uploaded file, held in memory."""

    name: str
    data: bytes
    checked: bool = False  # passed :func:`check_dicom` (read_uploads checks before returning)
    #: The data set parsed by :func:`check_dicom` (pixel data read, not decoded), so that reading
    #: the series does not parse the file again; None until checked.
    dataset: Dataset | None = field(default=None, compare=False, repr=False)

    def open(self) -> io.BytesIO:
        """A fresh file-like object over the data. It has no ``name``: pydicom would take the
        client's file name for a local path and stat it; readers get ``name=`` for messages."""
        return io.BytesIO(self.data)


async def read_uploads(
    request: Request,
    *,
    max_bytes: int,
    max_files: int,
    limits: DicomLimits | None = None,
    check: bool = True,
) -> list[UploadedFile]:
    """Read the ``files`` field of a multipart request into memory and check it as DICOM.

    The ``Content-Length`` is checked before parsing; the bytes actually read are counted too
    (for chunked requests). Starlette spools large parts to temporary files while parsing. The
    files are then checked with :func:`check_dicom` (in a worker thread) under ``limits``
    (default: from the app's settings).

    With ``check=False`` the DICOM checks are left to the caller, which must run
    :func:`check_dicom` (with :func:`limits_of` the request) before it reads a pixel: the
    prediction routes do so in the same worker thread as the prediction (one thread hop per
    request, not two); :func:`serving.inference.analyse` checks what was not checked.

    Raises
    ------
    NotMultipartError, MalformedUploadError, EmptyUploadError, TooManyInstancesError,
    UploadTooLargeError, NotDicomError, TransferSyntaxNotAllowedError, PixelBudgetError,
    DeflateBombError
    """
    uploads = await _read_form(request, max_bytes=max_bytes, max_files=max_files)
    if not check:
        return uploads
    return await run_in_threadpool(check_dicom, uploads, limits or limits_of(request))


def limits_of(request: Request) -> DicomLimits:
    """The DICOM limits of the app serving ``request`` (its settings)."""
    return DicomLimits.from_settings(getattr(request.app.state, "settings", None))


async def _read_form(request: Request, *, max_bytes: int, max_files: int) -> list[UploadedFile]:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise NotMultipartError(
            f"send the DICOM instances as multipart/form-data in the field {FILES_FIELD!r}, "
            f"not {content_type or 'a body without Content-Type'}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    try:
        form = await request.form(max_files=max_files)
    except StarletteHTTPException as exc:  # Starlette reports multipart problems as a 400
        detail = str(exc.detail)
        if "too many files" in detail.lower():
            raise TooManyInstancesError(
                f"more than {max_files} files in one request; the limit is {max_files} "
                "instances (FEDSEG_SERVE_MAX_INSTANCES)"
            ) from None
        raise MalformedUploadError(f"the multipart body cannot be parsed: {detail}") from None
    except (FormParserError, UnicodeError) as exc:  # python-multipart's own errors pass Starlette
        raise MalformedUploadError(f"the multipart body cannot be parsed: {exc}") from None
    try:
        values = form.getlist(FILES_FIELD)
        if not values:
            others = sorted(set(form.keys()))
            hint = f" (got fields {', '.join(map(repr, others))})" if others else ""
            raise EmptyUploadError(
                f"no files: send the DICOM instances of one series in the multipart field "
                f"{FILES_FIELD!r}{hint}"
            )
        if len(values) > max_files:
            raise TooManyInstancesError(
                f"{len(values)} files in one request; the limit is {max_files} instances "
                "(FEDSEG_SERVE_MAX_INSTANCES)"
            )
        uploads: list[UploadedFile] = []
        total = 0
        for index, value in enumerate(values):
            if not isinstance(value, UploadFile):
                raise MalformedUploadError(
                    f"field {FILES_FIELD!r} item #{index + 1} is text, not a file upload"
                )
            name = value.filename or f"<upload #{index + 1}>"
            chunks: list[bytes] = []
            while chunk := await value.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(total, max_bytes, at_least=True)
                chunks.append(chunk)
            uploads.append(UploadedFile(name, b"".join(chunks)))
        return uploads
    finally:
        await form.close()


def check_dicom(
    files: Sequence[UploadedFile], limits: DicomLimits | None = None
) -> list[UploadedFile]:
    """Check every file from its headers, before any pixel is decoded (see the module's rules).

    Files already checked (``checked``) are skipped. The first StudyInstanceUID goes to the
    request's audit line (hashed).

    Returns
    -------
    list of UploadedFile
        The files, in order, marked ``checked``, each with the data set parsed for the checks
        (``dataset``; already checked files as they were).

    Raises
    ------
    NotDicomError
        Empty, or not a DICOM Part 10 file (the message names the file).
    TransferSyntaxNotAllowedError
        A transfer syntax off the allow-list.
    DeflateBombError, PixelBudgetError
        Too much inflated data, or too many declared pixels, for ``limits``.
    MalformedUploadError
        A deflated data set that cannot be inflated, or unusable image attributes.
    """
    limits = limits or DicomLimits()
    budget = limits.max_pixel_bytes
    used = 0
    out: list[UploadedFile] = []
    for upload in files:
        if upload.checked:
            out.append(upload)
            continue
        syntax = _transfer_syntax(upload)
        if syntax == dcm_uid.DeflatedExplicitVRLittleEndian:
            _guard_deflate(upload, limit=budget - used + HEADER_ALLOWANCE)
        try:  # the one full parse: pixel data is read as bytes, not decoded
            header = read_dataset(upload.open(), name=upload.name)
        except DicomReadError as exc:
            raise NotDicomError(str(exc)) from None
        size = declared_pixel_bytes(header, upload.name)
        used += size
        if used > budget:
            raise PixelBudgetError(
                f"pixel budget: {upload.name} declares {_pixels_text(header)} = "
                f"{size / _MIB:.1f} MiB of pixel data, {used / _MIB:.1f} MiB in this request so "
                f"far; the limit is {budget / _MIB:.0f} MiB per request (FEDSEG_SERVE_MAX_PIXEL_MB)"
            )
        if study := str(header.get("StudyInstanceUID", "") or ""):
            note_study(study)
        out.append(replace(upload, checked=True, dataset=header))
    return out


def _transfer_syntax(upload: UploadedFile) -> str:
    """The file's TransferSyntaxUID from its file meta (nothing else is parsed)."""
    if not upload.data:
        raise NotDicomError(f"{upload.name} is empty, not a DICOM file")
    fp = upload.open()
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except InvalidDicomError:
        raise NotDicomError(
            f"{upload.name} is not a DICOM file: no DICOM file meta (128-byte preamble and 'DICM'); "
            "send DICOM Part 10 files"
        ) from None
    except Exception as exc:  # truncated or corrupt meta raise many types
        raise NotDicomError(f"{upload.name} is not a DICOM file: unreadable file meta ({exc})") from None
    syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    if not syntax:
        raise NotDicomError(f"{upload.name} is not a DICOM file: its file meta has no TransferSyntaxUID")
    if syntax not in ALLOWED_TRANSFER_SYNTAXES:
        name = dcm_uid.UID(syntax).name if dcm_uid.UID(syntax).is_valid else "not a valid UID"
        raise TransferSyntaxNotAllowedError(
            f"transfer syntax allow-list: {upload.name} uses {syntax} ({name}), which the service "
            f"does not accept; send one of: {', '.join(sorted(set(ALLOWED_TRANSFER_SYNTAXES.values())))}"
        )
    return syntax


def _guard_deflate(upload: UploadedFile, *, limit: int) -> None:
    """Inflate the data set after the file meta in bounded steps; refuse past ``limit`` bytes."""
    fp = upload.open()
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    data = upload.data[fp.tell():]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while data:
            total += len(inflater.decompress(data, _CHUNK))
            if total > limit:
                raise DeflateBombError(
                    f"deflate bomb guard: {upload.name} ({len(upload.data) / _MIB:.1f} MiB deflated) "
                    f"inflates to more than {limit / _MIB:.0f} MiB, what the request's pixel budget "
                    "allows (FEDSEG_SERVE_MAX_PIXEL_MB)"
                )
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as exc:
        raise MalformedUploadError(
            f"{upload.name}: the deflated data set cannot be inflated ({exc})"
        ) from None


def declared_pixel_bytes(header: Dataset, name: str = "<upload>") -> int:
    """Bytes of pixel data that ``header`` declares: rows x columns x frames x samples x bits / 8.

    Raises
    ------
    MalformedUploadError
        An image attribute that is not a non-negative integer.
    """
    if "Rows" not in header and "Columns" not in header:
        return 0  # no image (the reader says "no pixel data")
    values = []
    for key, default in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1),
                         ("SamplesPerPixel", 1), ("BitsAllocated", 16)):
        value: object = "unreadable"
        try:
            value = header.get(key)
            value = default if value in (None, "") else value
            number = int(value)
        except Exception:  # a value pydicom cannot convert, or not a number
            raise MalformedUploadError(f"{name}: {key} is {value!r}, not an integer") from None
        if number < 0:
            raise MalformedUploadError(f"{name}: {key} is negative ({number})")
        values.append(number)
    rows, cols, frames, samples, bits = values
    return rows * cols * frames * samples * max(bits, 1) // 8


def _pixels_text(header: Dataset) -> str:
    def value(key: str, default: object = "?") -> object:
        found = header.get(key)
        return default if found in (None, "") else found

    return (f"{value('Rows')} x {value('Columns')} x {value('NumberOfFrames', 1)} frames x "
            f"{value('SamplesPerPixel', 1)} samples x {value('BitsAllocated')} bits")


def _too_large(size: int, limit: int, *, at_least: bool = False) -> UploadTooLargeError:
    amount = f"{'more than ' if at_least else ''}{size / _MIB:.1f} MiB"
    return UploadTooLargeError(
        f"upload of {amount} exceeds the limit of {limit / _MIB:.0f} MiB (FEDSEG_SERVE_MAX_UPLOAD_MB)"
    )
