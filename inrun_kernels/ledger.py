"""Values by sample id: float64 sums over steps, how often each id was seen, save/load.

`atomic_save(obj, path)` is the crash-safe torch.save used for ledgers and engine states;
`atomic_write(path, write)` the same for any content (results.Values.save, CSV exports)."""
from __future__ import annotations

import os
import stat
import tempfile
from typing import Any, BinaryIO, Callable

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:   # Windows: no advisory locks; an open temp cannot be removed there anyway
    fcntl = None


def check_ids(ids, n: int, num_samples: int | None) -> Tensor:
    """ids as a LongTensor [n] of dataset indices, or a clear error."""
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError) as e:
            raise TypeError(f"ids must be a LongTensor of dataset indices, got {type(ids).__name__}") from e
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integer dataset indices, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must have shape [{n}] (one per training sample), got {tuple(ids.shape)}")
    ids = ids.long().cpu()
    if n and int(ids.min()) < 0:
        raise ValueError(f"ids must be >= 0, got {ids[ids < 0].tolist()}")
    if num_samples is not None and n and int(ids.max()) >= num_samples:
        raise ValueError(f"ids must be < num_samples={num_samples}, got {ids[ids >= num_samples].tolist()}")
    return ids


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)   # elsewhere: the classic read (briefly sets it; restored at once)
    os.umask(mask)
    return mask


_TMP_TAG = ".inrun-tmp-"
_TMP_SUFFIX = ".partial"


def _temp_prefix(target: str) -> str:
    """Temp files of one target share this prefix: `.<name>.inrun-tmp-`."""
    return f".{os.path.basename(target)}{_TMP_TAG}"


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive advisory lock on an open temp file; the kernel drops it when the holder dies
    (kill -9 included), which is how a stale temp is told from one being written."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _remove_stale_temps(folder: str, target: str) -> list[str]:
    """Remove temp files of `target` left by writers that died (a killed process): those whose
    lock can be taken. A temp another live writer holds stays. Returns the removed paths."""
    prefix = _temp_prefix(target)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        tmp = os.path.join(folder, name)
        try:
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:          # gone already (its writer renamed it) or not ours to open
            continue
        try:
            if _lock(fd, blocking=False):
                try:
                    os.remove(tmp)
                    removed.append(tmp)
                except OSError:  # renamed by its writer meanwhile, or not removable (Windows)
                    pass
        finally:
            os.close(fd)
    return removed


def _fsync_dir(folder: str) -> None:
    """Make the rename durable: fsync the directory (POSIX; a no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _locked_temp(folder: str, target: str) -> tuple[int, str]:
    """A new temp file for `target`, locked (the lock is held until the fd is closed). A
    concurrent save's cleaner may remove a temp between its creation and its lock: then retry."""
    for _ in range(8):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(target), suffix=_TMP_SUFFIX)
        _lock(fd, blocking=True)
        try:
            st, fst = os.stat(tmp), os.fstat(fd)
            if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"could not create a temp file for {target!r} in {folder!r}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Crash-safe file write: `write(f)` writes the content to `f`, an open binary temp file;
    whenever the process dies (kill -9 at any moment; a power loss too, given the fsyncs) `path`
    holds its previous content or the new one, complete. An exception from `write` leaves
    `path` as it was and no temp file.

    Written to a temp file beside the target (`.<name>.inrun-tmp-XXXX.partial`, same folder so
    the rename is atomic), fsynced, renamed over `path`, then the folder is fsynced. Temps left
    by a writer that was killed are removed by the next save of the same target. The file gets
    the mode a plain open() would give it: that of the file it replaces, else 0o666 & ~umask.
    A symlink at `path` is followed (its target is replaced, the link kept)."""
    target = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(target)
    _remove_stale_temps(folder, target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = _locked_temp(folder, target)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:
                os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, target)  # under the lock: a cleaner never takes a temp mid-write
            tmp = None
        _fsync_dir(folder)
    finally:
        if fd != -1:
            os.close(fd)
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj, path), crash-safe: `path` holds its previous content or `obj`, complete,
    whenever the process dies (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class ValueLedger:
    """values[i]: sum of sample i's per-step values; counts[i]: steps in which it appeared.
    With num_samples=None the ledger grows to the largest id seen."""

    def __init__(self, num_samples: int | None = None):
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        n = num_samples or 0
        self.values = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.long)

    def _grow(self, size: int) -> None:
        if size > self.values.shape[0]:
            extra = size - self.values.shape[0]
            self.values = torch.cat([self.values, torch.zeros(extra, dtype=torch.float64)])
            self.counts = torch.cat([self.counts, torch.zeros(extra, dtype=torch.long)])

    def add(self, ids, values: Tensor) -> None:
        """Add one step's values [n] to the samples `ids` [n] (duplicates add twice)."""
        ids = check_ids(ids, values.shape[0], self.num_samples)
        values = values.detach().to("cpu", torch.float64)
        if not torch.isfinite(values).all():
            bad = ids[~torch.isfinite(values)].tolist()
            raise FloatingPointError(f"non-finite values for ids {bad}; nothing was added")
        if ids.numel():
            self._grow(int(ids.max()) + 1)
        self.values.index_add_(0, ids, values)   # duplicate ids both add
        self.counts.index_add_(0, ids, torch.ones_like(ids))

    def state_dict(self) -> dict:
        """values, counts and num_samples (copies)."""
        return {"values": self.values.clone(), "counts": self.counts.clone(),
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Replace values and counts by a saved state. The state must be for the same number of
        samples as this ledger (a ledger made with num_samples=None takes any); on error nothing
        changes."""
        values, counts = state["values"], state["counts"]
        if not isinstance(values, Tensor) or not isinstance(counts, Tensor):
            raise TypeError("ledger state: values and counts must be Tensors")
        if values.shape != counts.shape or values.dim() != 1:
            raise ValueError(f"ledger state has values {tuple(values.shape)} and counts {tuple(counts.shape)}")
        theirs = state.get("num_samples")
        if theirs is not None and values.shape[0] != theirs:
            raise ValueError(f"ledger state says num_samples={theirs} but holds {values.shape[0]} values")
        if self.num_samples is not None and theirs != self.num_samples:
            raise ValueError(
                f"ledger state was saved with num_samples={theirs} but this ledger has "
                f"num_samples={self.num_samples}; build it with num_samples={theirs} to load this "
                "state (or num_samples=None to take any)")
        self.num_samples = theirs
        self.values = values.to(torch.float64).clone()
        self.counts = counts.to(torch.long).clone()

    def save(self, path: str | os.PathLike) -> None:
        """Crash-safe save (see atomic_save): a kill at any moment leaves at `path` the previous
        file or this state, complete, and no temp file after the next save."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ValueLedger":
        led = cls()
        led.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return led
