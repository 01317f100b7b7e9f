"""Checkpoint files on disk: written atomically, read without running code, checked for damage.

Writing (``atomic_torch_save``, ``atomic_write_text``): to ``<file>.tmp.<host>.<pid>``, flushed
to disk, renamed; a crash at any moment leaves either the old file or the complete new one. A
writer killed by SIGKILL (preemption, the OOM killer) leaves its temporary file behind, as large
as the checkpoint; ``remove_stale_temporaries`` removes those at the next save.

Reading (``read_checkpoint_file``): ``torch.load(weights_only=True)`` with an allowlist of what
Megatron-LM / Megatron-DeepSpeed checkpoints hold, so a crafted file cannot run code; anything
else is refused in one line naming the file, the type and ``--unsafe-load-checkpoint`` (the
trusted-file escape, off by default).

Integrity (``verify_checkpoint_file``): ``torch.save`` writes a zip archive whose directory
records the size and CRC-32 of every record (the pickle and each tensor's bytes), computed by
torch while it streams the file out. ``torch.load`` checks neither, so a flipped byte in tensor
data loads silently; we check them before unpickling (one sequential read at ~2 GB/s, then
``torch.load`` reads from the page cache). The record travels inside the file, so it needs no
coordination between the many ranks writing one checkpoint, has no window in which a file and
its record disagree, follows the file through copies and renames, stays right for a file that
a user rewrote with ``torch.save``, and covers checkpoints written by Megatron-LM (any torch
>= 1.6). Files in torch's legacy format, or written with CRCs turned off, hold no record and
load unverified. ``--no-verify-checkpoint`` skips the check.
"""

import argparse
import dataclasses
import errno
import fcntl
import os
import pickle
import re
import socket
import zipfile

import torch

from megatron.errors import UserError
from megatron.utils import print_rank_0

UNSAFE_FLAG = "--unsafe-load-checkpoint"
VERIFY_FLAG = "--no-verify-checkpoint"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How checkpoint files are read; every reader takes one (default: safe and verified)."""

    unsafe: bool = False
    """Unpickle without the allowlist (``--unsafe-load-checkpoint``): runs what the file holds."""
    verify: bool = True
    """Check each file's recorded sizes and CRC-32s first (off: ``--no-verify-checkpoint``)."""

    @classmethod
    def from_args(cls, args):
        """The options of a run's (or a tool's) parsed flags."""
        return cls(unsafe=bool(getattr(args, "unsafe_load_checkpoint", False)),
                   verify=getattr(args, "verify_checkpoint", True) is not False)


def add_read_flags(parser):
    """The two reading flags, for tools with their own argument parser (as ``arguments.py``)."""
    parser.add_argument(UNSAFE_FLAG, dest="unsafe_load_checkpoint", action="store_true",
                        help="Unpickle checkpoint files without the allowlist "
                             "(weights_only=False): runs whatever code the file holds; only "
                             "for files you trust.")
    parser.add_argument(VERIFY_FLAG, dest="verify_checkpoint", action="store_false",
                        help="Skip the size and checksum check of each checkpoint file.")


# -- writing ---------------------------------------------------------------------------------------

# A temporary file's name carries its writer's host and pid: a pid means something only on the
# host that wrote it (checkpoints of a multi-node job lie on a shared file system, and every
# node's pids overlap), so a file is judged stale only by a process on the same host, and only
# when that pid is gone there. Containers that share a host name but not a pid namespace would
# still misjudge a live writer as dead: the writer's flock on the file (kernel-wide, and
# cluster-wide on NFS) catches that. Files of other hosts are left to sweeps on those hosts.
_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "localhost"
_TEMPORARY = re.compile(r"^.+\.tmp\.(?P<host>[\w.-]+)\.(?P<pid>\d+)$")


def temporary_name(path):
    """``path.tmp.<host>.<pid>``: where a writer puts ``path`` until it is complete."""
    return f"{path}.tmp.{_HOST}.{os.getpid()}"


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path, err):
    reason = getattr(err, "strerror", None)
    if not reason:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
    return UserError(f"cannot write {path}: {reason}")


def _remove_quietly(path):
    try:
        if os.path.exists(path):
            os.remove(path)
    except OSError:
        pass


def _lock_for_writing(f):
    """Hold an exclusive flock on the open temporary file ``f`` until it is closed, so that a
    sweep (``_held``) sees its writer alive. File systems without flock: the pid rule alone."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    """torch.save to ``temporary_name(path)``, fsync, rename: ``path`` is absent or complete.

    A file system error (not writable, not a directory, disk full) is a one-line UserError
    naming the file; the temporary file is removed and an existing ``path`` is left as it was.
    The archive torch writes records every record's size and CRC-32 (``verify_checkpoint_file``).
    """
    tmp = temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            _lock_for_writing(f)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # A full disk surfaces from torch's zip writer as a RuntimeError ("enforce fail at
        # inline_container.cc") raised while handling the OSError: report the OSError.
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None and "inline_container" not in str(err) and "write" not in str(err):
            raise
        raise _write_error(path, cause or err) from None
    finally:
        _remove_quietly(tmp)
    _fsync_dir(os.path.dirname(path))


def atomic_write_text(path, text):
    """``text`` to ``path`` through a temporary file and a rename (the tracker file)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "w") as f:
            _lock_for_writing(f)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        _remove_quietly(tmp)
    _fsync_dir(os.path.dirname(path))


def check_save_dir(root):
    """Fail at start-up, not at the first save hours later, when ``--save`` cannot be written:
    create the directory and a probe file in it (removed again). One-line UserError."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--save {root}: cannot write checkpoints there: Not a directory")
    probe = os.path.join(root, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"--save {root}: cannot write checkpoints there: {reason}") from None
    finally:
        _remove_quietly(probe)


# -- stale temporary files -------------------------------------------------------------------------

def _checkpoint_dirs(root):
    """``root``, its ``iter_*``/``release`` directories and their ``mp_rank_*`` directories:
    where the checkpoint writers put files (never the rest of a --save that is a home
    directory; symbolic links are not followed)."""
    yield root
    for entry in _subdirs(root, r"^(iter_\d+|release)$"):
        yield entry
        yield from _subdirs(entry, r"^mp_rank_\d+(_\d+)?$")


def _subdirs(directory, pattern):
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return sorted(e.path for e in entries
                  if re.match(pattern, e.name) and e.is_dir(follow_symlinks=False))


def _pid_alive(pid):
    """Whether process ``pid`` exists on this host (a zombie or another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, owned by someone else
    return True


def _held(path):
    """Whether a live writer holds the flock of ``_lock_for_writing`` on ``path`` (a shared
    lock conflicts with it, and works on a read-only descriptor on NFS too)."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    except OSError:
        return True  # cannot open it: leave it alone
    return False


def stale_temporaries(root):
    """Temporary files under the checkpoint tree ``root`` whose writer -- a process of this
    host, by the name -- is gone and holds no lock on them."""
    stale = []
    for directory in _checkpoint_dirs(root):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            found = _TEMPORARY.match(name)
            path = os.path.join(directory, name)
            if found is None or found.group("host") != _HOST or not os.path.isfile(path):
                continue
            if not _pid_alive(int(found.group("pid"))) and not _held(path):
                stale.append(path)
    return stale


def remove_stale_temporaries(root, log=print):
    """Remove ``stale_temporaries(root)``; one log line says how many and how large."""
    removed, size = 0, 0
    for path in stale_temporaries(root):
        try:
            length = os.path.getsize(path)
            os.remove(path)
        except OSError:
            continue  # removed by a sweep on another rank, or not ours to remove
        removed, size = removed + 1, size + length
    if removed:
        log(f"  removed {removed} temporary file(s) ({size / 2**20:.1f} MiB) that writers "
            f"killed while saving left in {root}")
    return removed


# -- integrity -------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"


def verify_checkpoint_file(path):
    """Check ``path`` against the sizes and CRC-32s its zip directory records (see the module
    docstring); a mismatch is a one-line UserError naming the file and the damaged record."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return  # torch's legacy format (no record), or not a checkpoint: torch.load says
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # written with torch's compute_crc32 off: nothing recorded
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as err:
        text = str(err).strip()
        if text == "File is not a zip file":
            text = "truncated: the zip directory at its end is missing"
        raise UserError(f"cannot read checkpoint {path}: it does not match the sizes and "
                        f"CRC-32s recorded when it was written ({text or type(err).__name__}; "
                        f"{os.path.getsize(path) if os.path.exists(path) else 0} bytes): load "
                        f"another iteration, or pass {VERIFY_FLAG} to load it anyway") from None


# -- reading ---------------------------------------------------------------------------------------

class ForeignObject:
    """Stand-in for an object of another Megatron code base in a checkpoint -- an enum member
    in ``args`` (``megatron.core.enums.ModelType.encoder_or_decoder``), a config dataclass
    (``megatron.core.optimizer.OptimizerConfig``), a rerun-state record: it keeps what was saved
    (``value``: the enum's value; a dataclass's fields as attributes) and runs no code."""

    def __init__(self, *value):
        self.value = value[0] if len(value) == 1 else value

    def __repr__(self):
        return f"ForeignObject({vars(self)!r})"

    def __eq__(self, other):
        return isinstance(other, ForeignObject) and vars(other) == vars(self)

    def __hash__(self):
        return hash(repr(sorted(vars(self).items(), key=lambda kv: kv[0])))


_FOREIGN = re.compile(r"^megatron\.[A-Za-z_][\w.]*$")  # Megatron-LM / megatron-core classes


def _allowed_globals():
    """What a checkpoint may hold beyond tensors and plain containers: the args Namespace, the
    numpy arrays of the saved RNG states (numpy 1 and 2 module names), and the harmless
    standard types megatron-core's own allowlist names (SimpleNamespace, PosixPath, Signals,
    BytesIO)."""
    import io
    import pathlib
    import signal
    import types

    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") \
        else np.core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = {type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64,
                                          np.uint8, np.uint16, np.uint32, np.uint64,
                                          np.float16, np.float32, np.float64)}
    allowed = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals,
               io.BytesIO, np.ndarray, np.dtype, reconstruct, scalar, *dtypes]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    return allowed


def _refusal(path, name):
    return UserError(f"cannot read checkpoint {path}: it holds a {name} object, which is not on "
                     "the allowlist of checkpoint contents (files from disk never run code); "
                     f"pass {UNSAFE_FLAG} only if you trust this file")


def _checkpoint_globals(path):
    """The allowlist for ``path``: ``_allowed_globals`` plus a ``ForeignObject`` stand-in for
    each ``megatron.*`` class the file names (one torch does not already allow). Anything else
    is a one-line UserError."""
    allowed = _allowed_globals()
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not the zip format (or damaged): torch.load below reports it
        return allowed
    known = {f"{g.__module__}.{g.__qualname__}" for g in allowed if not isinstance(g, tuple)}
    known |= {name for g in allowed if isinstance(g, tuple) for name in g[1:]}
    for name in names:
        if name in known:
            continue
        if not _FOREIGN.match(name):
            raise _refusal(path, name)
        allowed.append((ForeignObject, name))
    return allowed


def _refused_type(text):
    """The object a weights-only unpickling error names (its message runs over many lines)."""
    for pattern in (r"GLOBAL (\S+)", r"got <class '([^']+)'>", r"function `?([\w.]+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return None


_warned_unsafe = []  # the first file read with --unsafe-load-checkpoint, once per process


def _load_unsafe(path):
    if not _warned_unsafe:
        _warned_unsafe.append(path)
        print_rank_0(f"WARNING: {UNSAFE_FLAG}: unpickling checkpoint files without the "
                     f"allowlist (weights_only=False), starting with {path}: a crafted file "
                     "runs code")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint_file(path, options=ReadOptions()):
    """One ``model_optim_rng.pt``, verified (``verify_checkpoint_file``) and unpickled with
    ``torch.load(weights_only=True)`` and the allowlist of ``_checkpoint_globals`` (unless
    ``options`` say otherwise); a damaged, truncated, foreign or unsafe file (torch raises
    anything from RuntimeError to UnpicklingError, some with several lines) becomes a one-line
    UserError naming the file."""
    if options.verify:
        verify_checkpoint_file(path)
    try:
        if options.unsafe:
            return _load_unsafe(path)
        with torch.serialization.safe_globals(_checkpoint_globals(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as err:
        text = str(err).strip()
        if isinstance(err, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
            refused = _refused_type(text)
            if refused:
                raise _refusal(path, refused) from None
            text = text.split("WeightsUnpickler error:", 1)[1].strip()  # garbage: the reason
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{text.splitlines()[0] if text else 'unreadable'}") from None
