"""An error raised while importing the user's module, shown as the user's own mistake.

Python's traceback of a failed import is mostly natflow's command line, importlib and the
event loop: a reader looks for their file among 30 lines of ours. This keeps the frames of
the user's own files and the exception (a SyntaxError's source line and caret too).
"""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path

import natflow_engine
from natflow_engine import InvalidInput

# Frames from these folders are not the user's: natflow's packages, Python's own library and
# installed packages (importlib's frames are "<frozen ...>" and leave by their name).
_NOT_THEIRS = tuple(
    {
        str(Path(__file__).resolve().parent),
        str(Path(natflow_engine.__file__).resolve().parent),
        *(
            str(Path(p).resolve())
            for key in ("stdlib", "platstdlib", "purelib", "platlib")
            if (p := sysconfig.get_paths().get(key))
        ),
    }
)


def import_failure(module_name: str, error: BaseException) -> InvalidInput:
    """The error that ``natflow worker`` reports when importing ``module_name`` raised."""
    shown = traceback.TracebackException.from_exception(error)
    theirs = [frame for frame in shown.stack if _theirs(frame.filename)]
    lines = traceback.StackSummary.from_list(theirs).format()
    lines += shown.format_exception_only()
    text = "".join(lines).rstrip("\n")
    return InvalidInput(f"importing {module_name!r} failed:\n{text}")


def _theirs(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = str(Path(filename).resolve())
    return not any(path == root or path.startswith(root + "/") for root in _NOT_THEIRS)
