"""Takes a Triton server down when the process that started it dies, however it died (SIGKILL too).

    python -I watchdog.py PGID SHM_PREFIX      (started by TritonServer.start; stdlib only)

It blocks reading its stdin, a pipe whose other end only the starter holds. A clean stop writes a byte
before closing it; end-of-file without one means the starter is gone, and then the watchdog kills
Triton's process group (the server and its python-backend stubs: a parent-death signal reaches Triton
alone, and the stubs outlive it) and removes the server's shared-memory regions.
"""

import glob
import os
import signal
import sys


def main() -> None:
    pgid, prefix = int(sys.argv[1]), sys.argv[2]
    if sys.stdin.buffer.read():  # the starter stopped the server itself
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for path in glob.glob(f"/dev/shm/{glob.escape(prefix)}*"):
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    main()
