"""OpenMP teams: which threads of a process run torch in parallel.

GNU OpenMP (which torch's CPU wheels bring) stops spinning at its barriers once the teams of a
process hold more threads than there are CPUs: from then on each product's worker goes to sleep
after every product and must be woken for the next one, dozens of times a step. So a process
keeps one thread for its parallel compute, and every other thread that touches torch calls
`serial_torch` first.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)


def serial_torch() -> None:
    """Makes torch run on the calling thread alone from now on, with no OpenMP team of its own.
    Where torch does not bring GNU OpenMP (other builds), nothing changes."""
    import torch

    torch.get_num_threads()  # torch sets a thread's OpenMP thread count on its first use: before this
    library = _torch_libgomp()
    if library is not None:
        library.omp_set_num_threads(1)


@functools.cache
def _torch_libgomp() -> Optional[ctypes.CDLL]:
    """The GNU OpenMP that torch loaded (its wheels bring their own), not another copy."""
    import torch

    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))):
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            logger.debug("cannot load %s: %s", path, e)
    return None
