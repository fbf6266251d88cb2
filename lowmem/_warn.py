"""Warnings attributed to the caller's code: the first frame outside lowmem, torch and the training libraries.

A warning raised inside an optimizer step (a projection refresh that keeps the previous subspace, a
skipped non-finite step) passes through the engine's frames and torch's ``Optimizer.step`` wrappers
(``torch/optim/optimizer.py``'s hooks, ``torch/utils/_contextlib.py``'s ``no_grad``), so no fixed
``stacklevel`` names the line that called ``optimizer.step()``. :func:`warn_user` skips those frames:
``warnings.warn(..., skip_file_prefixes=...)`` on Python >= 3.12, the same ``stacklevel`` counted here
before.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch


def _package_dirs(names: tuple[str, ...]) -> tuple[str, ...]:
    """The directories of the installed packages among ``names`` (located, not imported)."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)) + os.sep)
    return tuple(dirs)


# lowmem (and lowmem.trainers, a directory of its own in a source checkout), torch, and the libraries whose
# frames sit between a user's call and lowmem's (``Trainer.train`` -> ``create_optimizer``; TRL's trainers;
# accelerate's wrappers; peft): a warning names the user's ``trainer.train()`` line, not theirs.
# (each directory with a trailing separator: "lowmem_extra/" is not inside "lowmem/")
SKIPPED_PREFIXES: tuple[str, ...] = tuple(dict.fromkeys(
    (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    + _package_dirs(("lowmem.trainers", "transformers", "trl", "accelerate", "peft"))
))


def user_stacklevel(frame=None) -> int:
    """``stacklevel`` of :func:`warnings.warn` called in ``frame`` (the caller's, by default) naming the
    first frame outside :data:`SKIPPED_PREFIXES` (the outermost frame when every one is inside)."""
    frame = sys._getframe(1) if frame is None else frame
    level = 1
    while frame.f_code.co_filename.startswith(SKIPPED_PREFIXES) and frame.f_back is not None:
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` ``message`` attributed to the first frame outside :data:`SKIPPED_PREFIXES`."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=SKIPPED_PREFIXES)
    else:
        warnings.warn(message, category, stacklevel=user_stacklevel(sys._getframe(0)))
