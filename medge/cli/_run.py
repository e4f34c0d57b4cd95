"""The one error path of medge's command lines (DESIGN.md "One error path").

A MedgeError is a user error: one line on stderr, no traceback, exit status 2.
Anything else is a bug and keeps its traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import MedgeError


def run_command(prog: str, command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run ``command`` and turn medge's errors into the command-line contract."""
    try:
        return command()
    except MedgeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
