"""`warn`: a warning that points at the user's line, not at Keras internals.

A callback's warning raised with ``stacklevel=2`` points at the Keras frame
that called the hook (``callback_list.py:237``), which tells the user nothing.
`warn` walks up the stack past every frame of keras_parallel, Keras, tf-keras
and TensorFlow and gives Python's `warnings.warn` the stack level of the first
frame outside them: the user's ``model.fit(...)`` line, or the user's own code
that called into keras_parallel. (Python 3.12's ``skip_file_prefixes`` does
this by file path; this works on 3.10 and 3.11 too, by module name.)

In a worker thread (Keras 3 runs some batch hooks in a thread pool on the JAX
and torch backends) there is no user line on the stack: the warning points at
the thread pool's frame, or at the outermost frame when every frame is a
library's. Word messages to stand alone either way.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn"]

# Top-level packages whose frames are never the user's line.
_INTERNAL_PACKAGES = ("keras_parallel", "keras", "tf_keras", "tensorflow")


def _is_internal(frame) -> bool:
    module = frame.f_globals.get("__name__") or ""
    return module.split(".", 1)[0] in _INTERNAL_PACKAGES


def _is_import_machinery(frame) -> bool:
    # warnings.warn does not count these frames in `stacklevel` (see its
    # `_is_internal_frame`), so neither may we.
    filename = frame.f_code.co_filename
    return "importlib" in filename and "_bootstrap" in filename


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issues `message` as a warning attributed to the first frame outside the libraries.

    Args:
        message: str. The warning's text; it should make sense on its own.
        category: a `Warning` subclass. Defaults to `UserWarning`.

    Example:

    ```python
    from keras_parallel._warnings import warn

    warn("GPUMemoryLogger: no GPU with memory figures was found.")
    ```
    """
    frame = sys._getframe(1)  # the caller of `warn`: stack level 2 for warnings.warn
    level = 2
    while frame.f_back is not None and (_is_internal(frame) or _is_import_machinery(frame)):
        frame = frame.f_back
        if not _is_import_machinery(frame):
            level += 1
    warnings.warn(message, category, stacklevel=level)
