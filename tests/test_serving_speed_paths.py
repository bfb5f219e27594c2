"""The fast paths of the serving request: equal to what they replace.

- :func:`imaging.preprocess.preprocess_image` (vectorised numpy/torch) against the MONAI
  ``Compose`` that training and serving used before, within float tolerance;
- :func:`imaging.preprocess.stack_percentiles` against ``np.percentile``;
- :func:`imaging.preprocess.restore_probabilities` and ``preprocess_mask`` against MONAI ``Resize``;
- one parse per uploaded file: the checks of :func:`serving.uploads.check_dicom` keep the parsed
  data set, :func:`imaging.dicom_read.read_series` reads the same volume from it as from bytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles

from imaging.errors import DataError
from imaging.preprocess import (
    preprocess_image,
    preprocess_mask,
    restore_probabilities,
    stack_percentiles,
)
from imaging.spec import ModelSpec


def monai_preprocess_image(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The previous implementation of :func:`preprocess_image`, verbatim."""
    pixels = np.asarray(pixels, dtype=np.float32)
    transform = Compose([
        ScaleIntensityRangePercentiles(lower=spec.lower_percentile, upper=spec.upper_percentile,
                                       b_min=0.0, b_max=1.0, clip=True),
        Resize((spec.image_size, spec.image_size), mode="area"),
    ])
    return np.asarray(transform(torch.from_numpy(pixels)), dtype=np.float32)


def monai_preprocess_mask(mask: np.ndarray, spec: ModelSpec) -> np.ndarray:
    resize = Resize((spec.image_size, spec.image_size), mode="nearest")
    out = resize(torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)))
    return (np.asarray(out) > 0.5).astype(np.uint8)


def monai_restore(probs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    resize = Resize((rows, cols), mode="bilinear", align_corners=False)
    out = resize(torch.from_numpy(np.asarray(probs, dtype=np.float32)))
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _series(shape: tuple[int, int, int], seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ints":  # stored values, as most DICOM: many ties
        x = rng.integers(0, 1000, size=shape).astype(np.float32)
        x[:, shape[1] // 4 : shape[1] // 2, shape[2] // 4 : shape[2] // 2] += 2000
    elif kind == "rescaled":  # CT-like slope and intercept
        x = (rng.integers(-1024, 3000, size=shape) * 0.5 - 1024.0).astype(np.float32)
    else:  # continuous, heavy-tailed
        x = rng.lognormal(3.0, 1.0, size=shape).astype(np.float32)
    return x


CASES = [
    ((16, 256, 256), "ints"),  # > 1M voxels: MONAI took np.percentile
    ((5, 128, 128), "rescaled"),  # < 1M voxels: MONAI took torch.quantile
    ((3, 97, 61), "float"),  # odd, non-square, not a multiple of the output size
    ((1, 64, 64), "ints"),  # already the network's size: no resize
    ((2, 20, 30), "float"),  # smaller than the network's size: area "up-sampling"
]


@pytest.mark.parametrize(("shape", "kind"), CASES)
@pytest.mark.parametrize("spec", [ModelSpec(), ModelSpec(image_size=32, lower_percentile=2.0,
                                                         upper_percentile=98.0)])
def test_preprocess_image_equals_the_monai_pipeline(shape, kind, spec) -> None:
    pixels = _series(shape, seed=sum(shape), kind=kind)
    before = pixels.copy()
    fast = preprocess_image(pixels, spec)
    ref = monai_preprocess_image(pixels, spec)
    assert fast.dtype == np.float32 and fast.shape == ref.shape == (shape[0], spec.image_size,
                                                                     spec.image_size)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(pixels, before)  # the input is not modified


def test_preprocess_image_of_a_constant_series_matches_monai() -> None:
    spec = ModelSpec()
    for pixels in (np.full((2, 32, 32), 7.0, np.float32),
                   np.concatenate([np.full((1, 32, 32), 5.0), np.full((1, 32, 32), 9.0)])):
        with warnings.catch_warnings():  # MONAI warns when both percentiles are equal
            warnings.simplefilter("ignore")
            ref = monai_preprocess_image(pixels, spec)
        np.testing.assert_allclose(preprocess_image(pixels, spec), ref, atol=1e-6)


def test_preprocess_image_accepts_other_dtypes_and_layouts() -> None:
    spec = ModelSpec()
    ints = np.random.default_rng(1).integers(0, 4096, size=(4, 80, 96)).astype(np.int16)
    np.testing.assert_allclose(preprocess_image(ints, spec), monai_preprocess_image(ints, spec),
                               atol=2e-6)
    strided = _series((8, 64, 64), 2, "float")[::2, :, ::-1]  # non-contiguous view
    np.testing.assert_allclose(preprocess_image(strided, spec),
                               monai_preprocess_image(np.ascontiguousarray(strided), spec), atol=2e-6)


def test_preprocess_image_still_refuses_bad_input() -> None:
    spec = ModelSpec()
    with pytest.raises(DataError):
        preprocess_image(np.full((1, 8, 8), np.nan), spec)
    with pytest.raises(DataError):
        preprocess_image(np.zeros((0, 8, 8)), spec)
    with pytest.raises(DataError):
        preprocess_image(np.zeros((8, 8)), spec)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 201, 1000, 65_537])
@pytest.mark.parametrize("q", [(0.0, 100.0), (0.5, 99.5), (1.0, 99.0), (50.0, 50.0), (25.0, 75.0),
                               (0.0, 0.0), (100.0, 100.0)])
def test_stack_percentiles_equals_numpy(n: int, q: tuple[float, float]) -> None:
    rng = np.random.default_rng(n)
    for values in (rng.normal(size=n).astype(np.float32), rng.integers(0, 5, size=n).astype(np.float32)):
        got = stack_percentiles(values, *q)
        want = np.percentile(values.astype(np.float64), q)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((3, 64, 64), (256, 256)), ((2, 32, 32), (97, 61)),
                                             ((1, 64, 64), (64, 64))])
def test_restore_probabilities_equals_monai_resize(shape, size) -> None:
    probs = np.random.default_rng(3).random(shape, dtype=np.float32)
    fast = restore_probabilities(probs, *size)
    np.testing.assert_allclose(fast, monai_restore(probs, *size), atol=1e-6)
    assert fast.dtype == np.float32 and fast.shape == (shape[0], *size)
    assert not np.shares_memory(fast, probs)


@pytest.mark.parametrize("shape", [(3, 256, 256), (2, 97, 61), (1, 64, 64), (2, 20, 30)])
def test_preprocess_mask_equals_monai_resize(shape) -> None:
    mask = np.random.default_rng(4).random(shape) > 0.7
    spec = ModelSpec()
    np.testing.assert_array_equal(preprocess_mask(mask, spec), monai_preprocess_mask(mask, spec))


# ---------------------------------------------------------------- one parse per uploaded file


def _upload_series(tmp_path, shape=(4, 40, 48)):
    from imaging.dicom_write import write_series
    from serving.uploads import UploadedFile

    rng = np.random.default_rng(5)
    paths = write_series(tmp_path / "s", rng.integers(0, 3000, size=shape), patient_id="P", patient_name="Speed^Test",
                         uid_seed="speed", modality="MR", spacing=(2.0, 0.7, 0.7))
    return paths, [UploadedFile(p.name, p.read_bytes()) for p in reversed(paths)]


def test_check_dicom_keeps_the_parsed_data_set_and_read_series_uses_it(tmp_path, monkeypatch) -> None:
    import imaging.dicom_read as dicom_read
    from imaging.dicom_read import read_series
    from serving.uploads import check_dicom

    paths, files = _upload_series(tmp_path)
    checked = check_dicom(files)
    assert [f.name for f in checked] == [f.name for f in files]
    assert all(f.checked and f.dataset is not None and "PixelData" in f.dataset for f in checked)
    assert check_dicom(checked) == checked  # checked files are not parsed again

    parses = []
    real = dicom_read._dcmread
    monkeypatch.setattr(dicom_read, "_dcmread", lambda *a, **k: parses.append(a) or real(*a, **k))
    from_sets = read_series([f.dataset for f in checked], names=[f.name for f in checked])
    assert parses == []  # no second parse
    from_bytes = read_series(paths)
    np.testing.assert_array_equal(from_sets.pixels, from_bytes.pixels)
    assert from_sets.sop_instance_uids == from_bytes.sop_instance_uids
    assert from_sets.spacing == from_bytes.spacing
    assert from_sets.pixels.dtype == np.float32 and from_sets.pixels.flags.c_contiguous


def test_analyse_parses_each_file_once(tmp_path, monkeypatch) -> None:
    import imaging.dicom_read as dicom_read
    from serving.inference import analyse
    from serving.predictor import Predictor
    from serving.uploads import DicomLimits
    from imaging.model import build_unet
    from registry.load import LoadedModel

    spec = ModelSpec(channels=(4, 8), image_size=32)
    predictor = Predictor(LoadedModel(name="m", version=3, spec=spec,
                                      state_dict=build_unet(spec).state_dict()), device="cpu")

    class Models:
        def predict(self, volume):
            return predictor.predict(volume), predictor

    _, files = _upload_series(tmp_path)
    parses = []
    real = dicom_read.pydicom.dcmread
    monkeypatch.setattr(dicom_read.pydicom, "dcmread",
                        lambda *a, **k: parses.append(k) or real(*a, **k))
    analysis = analyse(Models(), files, limits=DicomLimits())
    assert len(parses) == len(files)  # one full parse per file, by the checks
    assert analysis.prediction.mask.shape == analysis.volume.shape == (4, 40, 48)
    assert len(analysis.headers) == len(files)


def test_the_pixel_budget_is_still_checked_before_decoding(tmp_path, monkeypatch) -> None:
    import imaging.dicom_read as dicom_read
    from serving.errors import PixelBudgetError
    from serving.inference import analyse
    from serving.uploads import DicomLimits

    _, files = _upload_series(tmp_path)
    monkeypatch.setattr(dicom_read, "pixel_array", lambda ds: pytest.fail("decoded"))
    with pytest.raises(PixelBudgetError):
        analyse(object(), files, limits=DicomLimits(max_pixel_bytes=40 * 48 * 2 * 2))
