"""One builder per token cache: an exclusive ``fcntl.flock`` on ``<cache>.lock`` around its build.

Whoever holds the lock checks the cache again and builds it only if it is still missing or stale, so
two processes that reach a missing cache at once (two trainings in different run directories, or two
nodes) end with one build and one valid cache; the other waits and then uses it. Inside the lock, the
temporary files a build finds are a dead builder's, never a live one's. The lock file stays (deleting
lock files is itself racy); the kernel releases the lock when its holder ends, however it ends. Where
``flock`` is not supported (some Lustre mounts) the build goes on unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path


def lock_path(cache: Path) -> Path:
    return cache.parent / f"{cache.name}.lock"


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[bool]:
    """Hold the build lock of ``cache`` (waiting for another builder to finish first); yields whether
    the lock is held (False where ``flock`` is unsupported: other builders may then be at work)."""
    path = lock_path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        locked = True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[glauber.data] waiting for another process building {cache}", file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            locked = False
            print(
                f"[glauber.data] warning: cannot lock {path} ({e.strerror}); building {cache} unlocked: "
                "do not build the same cache from two processes at once",
                file=sys.stderr,
                flush=True,
            )
        yield locked
