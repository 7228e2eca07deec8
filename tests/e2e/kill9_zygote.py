"""A pre-warmed process that runs ``deltatune`` CLI commands in forked children (for the kill -9 test).

Importing torch, transformers and deltatune takes seconds; a kill -9 test that runs a hundred commands
pays it once here.  Each child is a real separate process running ``deltatune.cli.main()`` with its own
``sys.argv``; it can be killed with SIGKILL at any moment.  The zygote itself never computes, so forking
it is safe.

Protocol (JSON lines on stdin/stdout): ``{"argv": [...], "cwd": DIR, "log": FILE}`` → ``{"pid": N}`` as
soon as the child runs, then ``{"pid": N, "code": C}`` when it ended (``-9``: killed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def _preload() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import deltatune.algebra.compress  # noqa: F401
    import deltatune.algebra.engine  # noqa: F401
    import deltatune.api  # noqa: F401
    import deltatune.cli  # noqa: F401
    import deltatune.io.peft_format  # noqa: F401
    import deltatune.train.loop  # noqa: F401


def _child(argv: list[str], cwd: str, log: str) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.chdir(cwd)
        sys.argv = ["deltatune", *argv]
        from deltatune.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the log gets the traceback, the zygote the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    proto.write(json.dumps({"ready": True}) + "\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req["argv"], req["cwd"], req["log"])
        proto.write(json.dumps({"pid": pid}) + "\n")
        proto.flush()
        _, status = os.waitpid(pid, 0)
        proto.write(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()
