"""Reading an ``.npy`` header without trusting it: one rule for the bundle reader and the batch scorer.

Both check what a header declares (shape, dtype) before any array is allocated, and both refuse a
bad file with their own error from the same list of what a bad ``.npy``/``.npz`` raises.
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from typing import IO, NamedTuple

import numpy as np

# What a bad .npy/.npz raises: zlib and NotImplementedError for corrupt or unsupported compressed
# members; SyntaxError and TokenError because numpy tokenizes the header (a NUL byte in it is a
# TokenError on Python 3.12+).
NPY_ERRORS = (
    ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, SyntaxError, tokenize.TokenError,
)  # fmt: skip


class NpyHeader(NamedTuple):
    """What an ``.npy`` header declares; the file position is left at the first data byte."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype


def read_header(fh: IO[bytes]) -> NpyHeader | None:
    """The header at ``fh``'s position, for format versions 1.0 and 2.0; None for another version (3.0:
    UTF-8 field names), which numpy's public API cannot parse apart from the array."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        return NpyHeader(*fmt.read_array_header_1_0(fh))
    if version == (2, 0):
        return NpyHeader(*fmt.read_array_header_2_0(fh))
    return None
