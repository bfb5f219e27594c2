"""Reading a Flower ``Array`` as numpy quickly, and checking it holds what it declares.

``Array.numpy()`` runs ``np.load`` on the ``.npy`` bytes, whose header parser
(``ast.literal_eval``) costs about 20 µs per array: for a U-Net of a few dozen arrays and a few
hundred updates that, not the arithmetic, dominates aggregation. :func:`decode_array` reads the
headers ``np.save`` writes with a regular expression and returns a read-only view of the bytes;
anything else goes through ``Array.numpy()``. Either way the values, dtype and shape are those
``Array.numpy()`` gives, which are what Flower's strategies aggregate.
"""

from __future__ import annotations

import math
import re

import numpy as np
from flwr.app import Array

__all__ = ["decode_array", "declared_mismatch"]

_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z][0-9]*)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}"
)
_NUMPY_STYPE = "numpy.ndarray"


def decode_array(array: Array) -> np.ndarray:
    """``array.numpy()``, without numpy's header parser where the header is ``np.save``'s.

    The result may be a read-only view of ``array.data``: do not write to it.
    """
    data = array.data
    if array.stype == _NUMPY_STYPE and data[:6] == _MAGIC and len(data) > 10:
        major = data[6]
        if major == 1:
            start, length = 10, int.from_bytes(data[8:10], "little")
        elif major in (2, 3):
            start, length = 12, int.from_bytes(data[8:12], "little")
        else:
            return array.numpy()
        match = _HEADER.match(data, start, start + length)
        if match:
            dtype = np.dtype(match[1].decode())
            shape = tuple(int(x) for x in match[3].split(b",") if x.strip())
            count = math.prod(shape)
            offset = start + length
            if not dtype.hasobject and len(data) - offset == count * dtype.itemsize:
                flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
                return flat.reshape(shape, order="F" if match[2] == b"True" else "C")
    return array.numpy()


def declared_mismatch(array: Array, values: np.ndarray) -> str | None:
    """How the decoded ``values`` differ from the shape and dtype ``array`` declares, if they do.

    Schema checks read the declaration; strategies aggregate the decoded values. A reply whose
    bytes hold another shape (a scalar would broadcast into a whole layer) must not pass.
    """
    declared = (tuple(array.shape), str(array.dtype))
    actual = (tuple(values.shape), str(values.dtype))
    if declared != actual:
        return f"holds shape {actual[0]} {actual[1]} but declares {declared[0]} {declared[1]}"
    return None
