"""The admin token: a secret the node writes at start, readable only by the node's user, that
changing admin commands (deploy, rollback, shutdown) must carry; reading status needs none.

The file's place follows from the admin endpoint alone, so ``ddpg deploy`` and ``ddpg status
--shutdown`` run as the node's user on its machine find it on their own: ``tcp-PORT.token``
(any host: one node listens on a port) or ``ipc-HASH.token`` in ``$DDPG_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/ddpg``, else ``~/.cache/ddpg/run``, a directory only the user can enter.
Another user's process (or one in another container) cannot read it, so cannot change the
node. Elsewhere, copy the file and pass ``--token-file``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path

TOKEN_BYTES = 32
_MAX_FILE = 256


class TokenError(RuntimeError):
    """The token file is missing, unsafe or unreadable; the message says which and what to do."""


def runtime_dir() -> Path:
    """Where token files live (see the module docstring)."""
    if env := os.environ.get("DDPG_RUNTIME_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "ddpg"
    return Path.home() / ".cache" / "ddpg" / "run"


def token_path(address: str) -> Path:
    """The token file of the node whose admin endpoint is ``address``."""
    m = re.fullmatch(r"tcp://.*:(\d+)", address)
    name = f"tcp-{m.group(1)}" if m else "ipc-" + hashlib.sha256(address.encode()).hexdigest()[:16]
    return runtime_dir() / f"{name}.token"


def create_token(address: str) -> tuple[str, Path]:
    """A fresh token for the node bound at ``address``, written (mode 0600, in a 0700
    directory) where clients look for it; replaces a dead node's file."""
    path = token_path(address)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.parent.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise TokenError(
            f"{path.parent}: the admin token directory must belong to this user and be closed "
            f"to others (it is mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
        )
    token = secrets.token_hex(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, path


def read_token(address: str, path: Path | None = None) -> str:
    """The token of the node at ``address`` (from ``path`` if given); refuses a file others can
    read or that is not this user's, as ssh does with a private key."""
    path = path or token_path(address)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise TokenError(
            f"no admin token for {address} ({path}: {e.strerror}): run this as the node's user "
            "on its machine, or pass --token-file"
        ) from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE:
            raise TokenError(f"{path}: not an admin token file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise TokenError(
                f"{path}: an admin token must be this user's and readable by it alone "
                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        return f.read(_MAX_FILE).strip()


def remove_token(path: Path, token: str) -> None:
    """Remove the node's token file at exit, unless another node has replaced it since."""
    with contextlib.suppress(OSError, TokenError):
        if read_token("", path) == token:
            path.unlink()
