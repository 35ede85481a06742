"""Large buffers through shared memory: segment files mapped copy-on-write (API section 9).

A value pickled with protocol 5 hands its large buffers (numpy arrays, pandas and pyarrow
data, ``bytes`` and ``bytearray`` given or returned at the top level) to a callback instead
of copying them into the pickle. Each buffer of at least ``THRESHOLD`` bytes is written once
into a file of the segment directory (``/dev/shm``, or ``PAREXEC_SHM_DIR``, or the module
attribute ``directory``) named ``parexec-<driver pid>-<writer pid>-<pid namespace>-<random>``;
the pipe carries the small pickle and the segments' names. The reader maps each segment
``MAP_PRIVATE`` with ``PROT_READ | PROT_WRITE`` and unpickles with ``buffers=``: the value is
writable, a write copies the page for that process alone (copy-on-write), so values behave
exactly like copies, and pages nobody touches cost no memory in the reader.

Lifetimes (driver side). Every segment the driver knows is one ``Segment`` object, held by
the mappings that back its values (``Mapping.segment``) and by the process workers whose
payload names it, until their reply came (``ProcessPool``). When the last of those goes,
a finalizer unlinks the file: a segment exists only while a value or a pending consumer
needs it. Workers never unlink: a worker's result segments belong to the driver as soon as
they are written; those of a worker that died before its result was read are removed when
the driver reaps it (``sweep_writer``), and ``sweep_dead_drivers`` (each pool start) removes
those of drivers that died.

Reuse. A buffer that lies in a segment this process mapped, in pages nobody wrote
(``/proc/self/pagemap``: a written private page is anonymous), is sent as that segment's
name and offset, not copied: a value a process task returned goes to the next process task
without a copy through the driver. A worker reuses only the segments of its current payload
(those the driver pins for it).

Fallback. Before writing, ``os.statvfs`` must show room for the buffer and a reserve; when
it does not, or the directory is missing, or the write fails, the buffer goes through the
pipe (debug log line).
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import pickle
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("parexec")

__all__ = ["THRESHOLD", "directory", "live_bytes", "segment_dir"]

THRESHOLD = 1 << 20  # buffers from 1 MiB go through shared memory
PREFIX = "parexec-"
# Never take the last part of the segment filesystem: other programs use it too.
RESERVE_FRACTION = 0.05

directory: str | None = None  # tests point this at a small or missing place


def _pid_namespace() -> str:
    """The pid namespace of this process, in segment names: sweeps judge only its pids.

    Containers that share /dev/shm (``--ipc=host``) but not pids would otherwise take a live
    driver elsewhere for a dead one.
    """
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        return "0"


_NS = _pid_namespace()


_ENV_DIR = os.environ.get("PAREXEC_SHM_DIR") or "/dev/shm"  # read once: every submit asks


def segment_dir() -> str:
    """Where segments go: ``directory``, else ``$PAREXEC_SHM_DIR`` (at import), else /dev/shm."""
    return directory or _ENV_DIR


class Segment:
    """One segment file known to this process; in the driver, unlinked when it is dropped."""

    __slots__ = ("name", "path", "size", "__weakref__")

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.size = size


class Mapping(mmap.mmap):
    """A private, writable mapping of a segment; holds the segment while it lives."""

    segment: Segment | None
    start: int


_lock = threading.Lock()
_live: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
_maps: dict[int, tuple[int, weakref.ref[Mapping], str]] = {}  # start -> (end, map, path)
_counter = itertools.count()


def _unlink(path: str, pid: int | None = None) -> None:
    if pid is not None and pid != os.getpid():
        return  # a forked child's copy of the driver's segment: the driver unlinks it
    try:
        os.unlink(path)
    except OSError:
        pass


def own(seg: Segment) -> Segment:
    """Register ``seg`` in the driver: its file is unlinked once nothing holds it."""
    with _lock:
        known = _live.get(seg.name)
        if known is not None:
            return known
        _live[seg.name] = seg
    weakref.finalize(seg, _unlink, seg.path, os.getpid())
    return seg


def live(name: str) -> Segment | None:
    """The driver's segment of that name, if a value or a consumer still holds it."""
    with _lock:
        return _live.get(name)


def live_bytes() -> int:
    """Bytes of the segments the driver holds (values and pending consumers).

    Pages of a segment are memory whether or not a process touched them; the memory
    monitor counts only what processes touched (their RSS).
    """
    with _lock:
        return sum(s.size for s in _live.values())


# Writing -------------------------------------------------------------------------------

def _room(path: str, size: int) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return free - size >= st.f_blocks * st.f_frsize * RESERVE_FRACTION


def write(buf: memoryview, driver_pid: int, where: str) -> str | None:
    """Write ``buf`` into a new segment of ``where``; its path, or None to use the pipe."""
    size = buf.nbytes
    if not _room(where, size):
        logger.debug("parexec: no room for %d bytes in %s; sending them through the pipe",
                     size, where)
        return None
    path = os.path.join(where, f"{PREFIX}{driver_pid}-{os.getpid()}-{_NS}-"
                               f"{os.urandom(6).hex()}{next(_counter)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        logger.debug("parexec: cannot create a segment in %s (%s); using the pipe", where, exc)
        return None
    try:
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS later
        except (AttributeError, OSError) as exc:
            if getattr(exc, "errno", None) not in (None, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        view = buf.cast("B")
        done = 0
        while done < size:
            done += os.write(fd, view[done:done + (1 << 30)])
    except OSError as exc:
        os.close(fd)
        _unlink(path)
        logger.debug("parexec: writing %d bytes to %s failed (%s); using the pipe",
                     size, where, exc)
        return None
    os.close(fd)
    return path


# Mapping -------------------------------------------------------------------------------

def open_map(path: str, seg: Segment | None) -> Mapping:
    """Map the segment at ``path`` private and writable; ``seg`` stays alive with the map."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = Mapping(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    m.segment = seg
    start = m.start = _address(m)
    with _lock:
        _maps[start] = (start + len(m), weakref.ref(m), path)
    weakref.finalize(m, _forget_map, start)
    return m


def _forget_map(start: int) -> None:
    with _lock:
        _maps.pop(start, None)


_buffer_api: Any = None


def _address(obj: Any) -> int:
    """The address of the first byte of a buffer object (read-only ones too)."""
    global _buffer_api
    import ctypes
    if _buffer_api is None:  # ctypes is loaded on first use: workers start without it
        class PyBuffer(ctypes.Structure):
            _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                        ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                        ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                        ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                        ("internal", ctypes.c_void_p)]
        get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
        get.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
        release.argtypes = [ctypes.POINTER(PyBuffer)]
        _buffer_api = PyBuffer, get, release
    struct_type, get, release = _buffer_api
    view = struct_type()
    get(obj, ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        release(ctypes.byref(view))


_PAGE = mmap.PAGESIZE
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61


def _unwritten(start: int, nbytes: int) -> bool:
    """Whether no page of ``[start, start + nbytes)`` was written in this process.

    A written page of a private file mapping is an anonymous copy: present (or swapped)
    without the file flag. Unknown (no pagemap) counts as written.
    """
    first, last = start // _PAGE, (start + nbytes - 1) // _PAGE
    n = last - first + 1
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            data = os.pread(fd, 8 * n, 8 * first)
        finally:
            os.close(fd)
    except OSError:
        return False
    if len(data) != 8 * n:
        return False
    for entry in struct.unpack(f"<{n}Q", data):
        if entry & _PM_SWAPPED or (entry & _PM_PRESENT and not entry & _PM_FILE):
            return False
    return True


def find(buf: memoryview) -> tuple[str, int, Mapping] | None:
    """``(segment path, offset, mapping)`` of an unwritten buffer in a mapped segment."""
    if not _maps:
        return None
    addr = _address(buf)
    with _lock:
        hit = next(((s, e, ref, path) for s, (e, ref, path) in _maps.items()
                    if s <= addr and addr + buf.nbytes <= e), None)
    if hit is None:
        return None
    m = hit[2]()
    if m is None or not _unwritten(addr, buf.nbytes):
        return None
    return hit[3], addr - hit[0], m


# Messages ------------------------------------------------------------------------------
#
# A message without large buffers is one pickle (it starts with the PROTO opcode b"\x80").
# Otherwise it is b"S" + 8-byte length + pickled descriptors + the pickle, followed by one
# pipe message per buffer that could not go through shared memory. A descriptor is
# ``(path, offset, nbytes)`` for a segment, ``(None, 0, nbytes)`` for the pipe.

Desc = tuple[str | None, int, int]


class BigBytes:
    """``bytes`` or ``bytearray`` sent out of band (they pickle in band otherwise)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def wrap(value: Any) -> Any:
    """``value``, wrapped to go out of band when it is large ``bytes`` or ``bytearray``."""
    t = type(value)
    if (t is bytes or t is bytearray) and len(value) >= THRESHOLD:
        return BigBytes(value)
    return value


class Encoded:
    """A message ready to send: ``parts`` (the first, then pipe buffers) and what it moved."""

    __slots__ = ("parts", "segments", "pickled", "shm_bytes", "pipe_bytes", "written")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.segments: list[Segment] = []  # driver: segments the receiver maps (pins)
        self.written: list[str] = []  # paths this message created
        self.pickled = 0  # the pickle plus its out-of-band buffers
        self.shm_bytes = 0
        self.pipe_bytes = 0


class Collector(list[memoryview]):
    """A ``buffer_callback``: buffers of ``THRESHOLD`` bytes or more out of band, kept here."""

    __slots__ = ()

    def __call__(self, pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < THRESHOLD:
            return True
        self.append(raw)
        return False


def place(data: bytes, big: list[memoryview], *, where: str, driver_pid: int, owner: bool,
          reusable: set[str] | None = None) -> Encoded:
    """The message of pickle ``data`` whose large buffers ``big`` were kept out of band.

    Each buffer goes to a new segment of ``where`` (or the pipe, short of room), unless it
    lies unwritten in a segment already mapped here. The driver is the ``owner``: the
    segments it writes are its own at once, and ``Encoded.segments`` pins those the
    receiver maps. ``reusable`` lists the mapped segments a worker may name again (those of
    its current payload, pinned by the driver); the driver may name any segment it holds.
    """
    out = Encoded()
    out.pickled = len(data) + sum(b.nbytes for b in big)
    descs: list[Desc] = []
    try:
        for buf in big:
            n = buf.nbytes
            hit = find(buf)
            if hit is not None and (owner or (reusable is not None and hit[0] in reusable)):
                seg = hit[2].segment
                if not owner or seg is not None:
                    descs.append((hit[0], hit[1], n))
                    if seg is not None:
                        out.segments.append(seg)
                    out.shm_bytes += n
                    continue
            path = write(buf, driver_pid, where)
            if path is None:
                descs.append((None, 0, n))
                out.parts.append(buf)
                out.pipe_bytes += n
                continue
            out.written.append(path)
            if owner:
                out.segments.append(own(Segment(path, n)))
            descs.append((path, 0, n))
            out.shm_bytes += n
    except BaseException:
        if not owner:
            for path in out.written:
                _unlink(path)
        raise
    head = pickle.dumps(descs, protocol=pickle.HIGHEST_PROTOCOL)
    first = b"".join((b"S", struct.pack("<Q", len(head)), head, data))
    out.parts.insert(0, first)
    out.pipe_bytes += len(first)
    return out


def split(data: bytes) -> tuple[list[Desc], memoryview | bytes]:
    """The descriptors and the pickle of a received first message."""
    if data[:1] != b"S":
        return [], data
    (n,) = struct.unpack_from("<Q", data, 1)
    descs: list[Desc] = pickle.loads(memoryview(data)[9:9 + n])
    return descs, memoryview(data)[9 + n:]


def receive_parts(descs: list[Desc], recv_into: Callable[[bytearray], Any]) -> list[bytearray]:
    """Read the pipe buffers that follow a first message, into writable buffers."""
    bufs = []
    for path, _, n in descs:
        if path is None:
            b = bytearray(n)
            recv_into(b)
            bufs.append(b)
    return bufs


def buffers(descs: list[Desc], piped: list[bytearray], owner: bool) -> list[Any]:
    """The out-of-band buffers of a message: segments mapped, pipe buffers as received.

    In the driver (``owner``) every segment becomes (or already is) one of its own.
    """
    out: list[Any] = []
    maps: dict[str, Mapping] = {}
    it = iter(piped)
    for path, offset, n in descs:
        if path is None:
            out.append(next(it))
            continue
        m = maps.get(path)
        if m is None:
            seg = None
            if owner:
                seg = live(os.path.basename(path)) or own(Segment(path, os.path.getsize(path)))
            m = maps[path] = open_map(path, seg)
        out.append(memoryview(m)[offset:offset + n])
    return out


def discard(descs: list[Desc]) -> None:
    """Driver: a message that will not be read; unlink its segments that nothing holds."""
    for path, _, _ in descs:
        if path is not None and live(os.path.basename(path)) is None:
            _unlink(path)


# Sweeps --------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_drivers(where: str | None = None) -> int:
    """Remove the segments of drivers that are no longer running; how many were removed."""
    where = where or segment_dir()
    try:
        names = os.listdir(where)
    except OSError:
        return 0
    removed = 0
    alive: dict[int, bool] = {}
    for name in names:
        if not name.startswith(PREFIX):
            continue
        fields = name[len(PREFIX):].split("-")
        if len(fields) < 4 or fields[2] != _NS or not fields[0].isdigit():
            continue  # not ours, or another pid namespace's: its pids mean nothing here
        pid = int(fields[0])
        if pid not in alive:
            alive[pid] = _pid_alive(pid)
        if not alive[pid]:
            _unlink(os.path.join(where, name))
            removed += 1
    return removed


def sweep_writer(writer_pid: int, where: str | None = None) -> None:
    """Driver: remove what a dead worker wrote for us and nobody holds (a partial write)."""
    where = where or segment_dir()
    prefix = f"{PREFIX}{os.getpid()}-{writer_pid}-"
    try:
        names = os.listdir(where)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and live(name) is None:
            _unlink(os.path.join(where, name))


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at the fork
    _live.clear()  # the parent's segments: a child never unlinks them (see _unlink)


os.register_at_fork(after_in_child=_after_fork)
