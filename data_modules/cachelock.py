"""One builder per token cache: an exclusive ``fcntl.flock`` on ``<cache>.lock`` around its build.

The holder looks at the cache again and builds only if it is still missing or stale, so racing processes
(two runs, two nodes) end with one build; temporaries found inside the lock are a dead builder's. The lock
file stays (deleting it is racy). Where ``flock`` is unsupported (some Lustre mounts) the build goes on
unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[bool]:
    """Hold the build lock of ``cache``, waiting for another builder first; yields False where unsupported."""
    path = cache.parent / f"{cache.name}.lock"
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
