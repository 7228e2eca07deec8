"""Options shared by several commands: ``--overwrite`` for writers, ``--verify/--no-verify`` for readers."""

from __future__ import annotations

from typing import Annotated

import typer

Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder even when it is "
                                                             "not an earlier output of this command")]
NoVerify = Annotated[bool, typer.Option("--verify/--no-verify", help="check the content digests of the deltas "
                                                                     "read (--no-verify: faster, unchecked)")]
