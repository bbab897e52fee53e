"""The one writer of files outside the state folder (and of the state files too).

Every file epdctl writes goes through `write_atomic`:
- atomic: a temporary file in the same folder, then a rename, so a reader sees the old content or
  the new, never a torn mix;
- never through a symlink: a symlink (or anything but a regular file) at the final name is refused,
  and the temporary file is opened O_EXCL | O_NOFOLLOW;
- never over a file of another user;
- the mode of a file it replaces is kept; a new file gets the umask's mode (not mkstemp's 0600),
  unless the caller names one.

Commands that take an output path check it before they start work (`check_output`,
`check_output_folder`): a symlink, a non-regular file, a path under a regular file, or a file the
command must not replace (the topology's own file, another output of the same command) is a usage
error then, not a loss of results after the work is done.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from pathlib import Path
from typing import Mapping, Optional, Union

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError

PathLike = Union[str, Path]


class UnsafeOutput(EpdctlError):
    """The name to write is a symlink, not a regular file, or another user's file: nothing was written."""


def _refusal(path: PathLike, info: os.stat_result) -> Optional[str]:
    """Why the file at `path` (lstat'ed as `info`) must not be replaced, or None."""
    if stat.S_ISLNK(info.st_mode):
        return f"{path}: is a symbolic link; epdctl does not write through one"
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: exists and is not a regular file"
    if info.st_uid != os.geteuid():
        return f"{path}: belongs to another user (uid {info.st_uid}); not replacing it"
    return None


def _lstat(path: PathLike) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def write_atomic(path: PathLike, data: bytes, mode: Optional[int] = None) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX).

    Raises UnsafeOutput (nothing written) when `path` is a symlink, not a regular file, or not ours.
    """
    folder, name = os.path.split(os.fspath(path))
    existing = _lstat(path)
    if existing is not None:
        reason = _refusal(path, existing)
        if reason:
            raise UnsafeOutput(reason, EXIT_RUNTIME)
        mode = stat.S_IMODE(existing.st_mode) if mode is None else mode
    tmp = os.path.join(folder or ".", f".{name}.{secrets.token_hex(6)}.tmp")
    # 0600 while the data goes in when the final mode is known (it may be tighter than the umask's);
    # 0666 otherwise, so the kernel applies the umask as it does to any new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
        # Planted between the first look and now: the rename would replace the link, not follow it,
        # but the rule is to refuse one.
        existing = _lstat(path)
        reason = _refusal(path, existing) if existing is not None else None
        if reason:
            raise UnsafeOutput(reason, EXIT_RUNTIME)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_output(path: PathLike, data: Union[bytes, str], option: str) -> Path:
    """A user-visible output: write_atomic, with any failure as one line naming `option` and the path."""
    try:
        write_atomic(path, data.encode() if isinstance(data, str) else data)
    except UnsafeOutput as exc:
        raise UnsafeOutput(f"{option} {exc.message}", exc.exit_code) from None
    except OSError as exc:
        raise EpdctlError(f"{option} {path}: cannot write: {exc.strerror}", EXIT_RUNTIME) from None
    return Path(path)


def figure_bytes(fig, **savefig_args) -> bytes:
    """A matplotlib figure as PNG bytes: savefig(path) would open the path and follow a symlink there."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_args)
    return buffer.getvalue()


def _same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same place after resolving links, or one inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: PathLike, option: str, *, not_over: Optional[Mapping[str, Optional[PathLike]]] = None) -> Path:
    """Refuse, before any work, an output path that write_output would refuse or must not replace.

    `not_over`: files this output must not be, each with a description for the message
    (e.g. {"the file of the running topology 'x'": SOURCE, "also the --twin path": TWIN}).
    """
    path = Path(path)
    existing = _lstat(path)
    if existing is not None:
        reason = _refusal(path, existing)
        if reason:
            raise UnsafeOutput(f"{option} {reason}", EXIT_USAGE)
    for what, other in (not_over or {}).items():
        if other and _same_file(path, other):
            raise EpdctlError(f"{option} {path}: is {what}; choose another path", EXIT_USAGE)
    check_output_folder(path.parent, option, for_file=path)
    return path


def check_output_folder(folder: PathLike, option: str, *, for_file: Optional[PathLike] = None) -> Path:
    """Refuse, before any work, a folder that cannot be made or written: a regular file, or a path
    under one, or a folder we cannot write."""
    folder = Path(folder)
    shown = for_file if for_file is not None else folder
    nearest = folder
    while not os.path.lexists(nearest) and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise EpdctlError(_not_a_folder(option, shown, nearest), EXIT_USAGE)
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise EpdctlError(f"{option} {shown}: cannot write in {nearest}", EXIT_USAGE)
    return folder


def _not_a_folder(option: str, shown: PathLike, nearest: Path) -> str:
    what = "a regular file, not a folder" if nearest.is_file() else "not a folder"
    if nearest == Path(shown):
        return f"{option} {shown}: is {what}"
    return f"{option} {shown}: {nearest} is {what}"


def make_output_folder(folder: PathLike, option: str) -> Path:
    """Create the output folder (and its parents) the user named, as one line on failure."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EpdctlError(f"{option} {folder}: cannot create the folder: {exc.strerror}", EXIT_RUNTIME) from None
    return folder
