"""Task functions used by the tests; importable by process workers."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import parexec as px


def noop(*args, **kwargs):
    return None


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return args, kwargs


def pid():
    return os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def boom(message="boom"):
    raise ValueError(message)


class CustomError(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def inner_raise():
    raise CustomError("deep failure", 42)


def raise_custom():
    inner_raise()


def crash_exit():
    os._exit(3)


def crash_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def crash_segfault():
    ctypes.string_at(0)


def raise_memory_error():
    raise MemoryError("simulated allocation failure")


def return_unpicklable():
    return threading.Lock()


def spawn_child_and_hang(pidfile):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
    time.sleep(120)


def flaky(counter_path, failures, value="ok"):
    """Fail ``failures`` times (counted in a file, so it works across processes), then return."""
    n = 0
    if os.path.exists(counter_path):
        with open(counter_path) as f:
            n = int(f.read() or 0)
    with open(counter_path, "w") as f:
        f.write(str(n + 1))
    if n < failures:
        raise OSError(f"transient failure {n + 1}")
    return value


def cooperative(started, seconds=30):
    """Loop until cancelled; ``started`` is a threading.Event set once running."""
    started.set()
    ctx = px.current()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check()
        time.sleep(0.005)
    return "finished"


def ignore_cancel(release, started=None):
    """Block on ``release`` (a threading.Event), ignoring any cancel flag."""
    if started is not None:
        started.set()
    release.wait(30)
    return "late"


def context_info():
    ctx = px.current()
    return ctx.task_id, ctx.attempt, ctx.cancelled()


def unpicklable_error_class():
    """Raise an error whose class lives in a module only this worker can import."""
    import importlib
    import tempfile
    folder = tempfile.mkdtemp(prefix="parexec-worker-only-")
    with open(os.path.join(folder, "worker_only_module.py"), "w") as f:
        f.write("class LocalOnlyError(Exception):\n    pass\n")
    sys.path.insert(0, folder)
    module = importlib.import_module("worker_only_module")
    raise module.LocalOnlyError("only in the worker")


def hold_memory(mib, seconds=0.3):
    """Hold ``mib`` MiB (touched) for ``seconds``; return the number of bytes held."""
    block = bytearray(mib * 2**20)
    for k in range(0, len(block), 4096):
        block[k] = 1
    time.sleep(seconds)
    return len(block)


def leak_memory(step_mib=50, limit_mib=4000):
    """Grow by ``step_mib`` MiB every 20 ms until ``limit_mib``: a runaway task."""
    blocks = []
    while len(blocks) * step_mib < limit_mib:
        block = bytearray(step_mib * 2**20)
        for k in range(0, len(block), 4096):
            block[k] = 1
        blocks.append(block)
        time.sleep(0.02)
    return len(blocks)


def blas_threads():
    """How many threads the BLAS library of numpy would use in this task."""
    import numpy  # noqa: F401 - loads the BLAS library
    from threadpoolctl import threadpool_info
    return max(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")


def die_once(counter_path):
    """Kill the process running this task the first time; succeed the next time."""
    if not os.path.exists(counter_path):
        with open(counter_path, "w") as f:
            f.write("died")
        os._exit(1)
    return "survived"


# Grandchildren (issue 12 item 2) -----------------------------------------------------------
# Each writes the pid of a `sleep` it started to ``pidfile`` (the path travels as "$0", never
# pasted into the shell text). Output goes to /dev/null so a survivor cannot hold a test's pipe.

def run_sleep(pidfile, seconds=123):
    """subprocess.run a `sleep` (exec'd by sh, so the recorded pid is the sleep's)."""
    subprocess.run(["sh", "-c", f'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep {seconds}',
                    pidfile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_background_sleep(pidfile, seconds=123):
    """Start a `sleep` with Popen and return at once, leaving it running."""
    subprocess.Popen(["sh", "-c", f'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep {seconds}',
                      pidfile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "started"


def start_detached_sleep(pidfile, seconds=123):
    """Double-fork a `sleep`: the shell that started it exits, so it is orphaned at once."""
    subprocess.run(["sh", "-c", f'sleep {seconds} & echo $! > "$0.tmp"; mv "$0.tmp" "$0"',
                    pidfile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "detached"


def nested_process_run(n=2):
    """Run a workflow of ``n`` process tasks from inside a task; return (own pid, their pids)."""
    with px.Workflow("inner", isolation="process", max_workers=n) as wf:
        for i in range(n):
            wf.add(px.task(pid).options(id=f"inner-{i}"))
    result = px.run(wf, progress=False)
    return os.getpid(), sorted(result.results.values())


# async def tasks (issue 12 item 21) ---------------------------------------------------------

async def async_add(a, b):
    """Add after yielding to the event loop once."""
    import asyncio
    await asyncio.sleep(0.01)
    return a + b


async def async_sleep_then(seconds, value=None, cancelled=None, started=None):
    """Await asyncio.sleep; set ``started`` once awaiting and ``cancelled`` if the sleep is
    cancelled (both threading.Event)."""
    import asyncio
    if started is not None:
        started.set()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.set()
        raise
    return value


async def async_echo(payload: bytes):
    """Send ``payload`` through a local asyncio TCP echo server and return what came back."""
    import asyncio

    async def serve(reader, writer):
        writer.write(await reader.read(1 << 16))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data


def cpu_work(n):
    """Pure-Python CPU work: the sum of squares below ``n``."""
    return sum(i * i for i in range(n))


def recurse_forever(n=0):
    """Recurse until RecursionError: its traceback is too deep to pickle frame by frame."""
    return recurse_forever(n + 1) + 1


def exit_three():
    sys.exit(3)


async def async_raise_custom():
    """Raise CustomError from a coroutine, one await deep."""
    import asyncio
    await asyncio.sleep(0)
    inner_raise()


def send_blas_env(conn):
    """Send this process's OMP_NUM_THREADS and OPENBLAS_NUM_THREADS through ``conn``."""
    conn.send({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")})


def orphan_quick_child():
    """Double-fork a `true` that exits at once, so the worker adopts an orphan that dies."""
    subprocess.run(["sh", "-c", "true &"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return os.getpid()


def zombie_children():
    """This process's pid, and its children that have exited and were never reaped."""
    import psutil
    zombies = [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    return os.getpid(), zombies


# Property-based fault injection (tests/test_properties.py) ----------------------------------
# One task body for every generated task: it logs its start and end (with the attempt, wall
# time and the units it holds) to a file opened with O_APPEND, so gates and dependencies can
# be checked across processes, then behaves as planned.

def prop_log(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def prop_norm(x):
    """A comparable, repr-stable form of a task input (dicts sorted, Outcomes as tuples)."""
    if isinstance(x, px.Outcome):
        return ("outcome", x.ok, prop_norm(x.value) if x.ok else type(x.error).__name__)
    if isinstance(x, dict):
        return tuple(sorted((k, prop_norm(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(prop_norm(v) for v in x)
    return x


def prop_value(tid, inputs):
    import zlib
    return zlib.crc32(repr((tid, prop_norm(inputs))).encode()) % 1_000_000


def prop_task(log, tid, behaviour, pause, counter, *inputs):
    """Log, then behave: ok, raise, flaky, timeout, coop, exit, sigkill, memory, items:K."""
    ctx = px.current()
    prop_log(log, f"S {tid} {ctx.attempt} {time.time():.6f}\n")
    try:
        value = prop_value(tid, inputs)
        if behaviour == "raise":
            raise ValueError(f"planned failure of {tid}")
        if behaviour == "flaky":
            if not os.path.exists(counter):
                prop_log(counter, "failed once\n")
                raise OSError(f"planned transient failure of {tid}")
        elif behaviour == "timeout":
            time.sleep(pause)  # longer than the task's timeout
        elif behaviour == "coop":
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                ctx.check()
                time.sleep(0.005)
        elif behaviour == "exit":
            os._exit(3)
        elif behaviour == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif behaviour == "memory":
            blocks = []
            for _ in range(40):  # up to 800 MiB, far above the task's memory=
                block = bytearray(20 * 2**20)
                for k in range(0, len(block), 4096):
                    block[k] = 1
                blocks.append(block)
                time.sleep(0.01)
            time.sleep(2)
        elif behaviour.startswith("items:"):
            value = [value % 97 + k for k in range(int(behaviour[6:]))]
        elif pause:
            time.sleep(pause)
        return value
    finally:
        prop_log(log, f"E {tid} {ctx.attempt} {time.time():.6f}\n")


def prop_item(item, log, tid_prefix):
    """A map item: logs like prop_task, returns a value derived from the item."""
    ctx = px.current()
    tid = ctx.task_id
    prop_log(log, f"S {tid} {ctx.attempt} {time.time():.6f}\n")
    try:
        return prop_value(tid_prefix, (item,))
    finally:
        prop_log(log, f"E {tid} {ctx.attempt} {time.time():.6f}\n")


_kept_popen = []


def start_kept_child(code):
    """Start `sh -c 'exit code'` and keep its Popen for a later task on this worker."""
    _kept_popen.append(subprocess.Popen(["sh", "-c", f"exit {int(code)}"]))
    _kept_popen[-1].pid  # noqa: B018
    return os.getpid()


def wait_kept_child():
    """Wait for the child start_kept_child started here; return (pid, its exit status)."""
    return os.getpid(), _kept_popen.pop().wait(10)


# Shared-memory transport (tests/test_shm.py) --------------------------------------------

def make_array(n, value=0.0):
    """A float64 numpy array of n items, all equal to value."""
    import numpy as np
    return np.full(n, value, dtype=np.float64)


def array_sum(a):
    """The sum of an array, as a float."""
    return float(a.sum())


def first_item(a, *after):
    """a[0] (the extra arguments only order the task after others)."""
    return float(a[0])


def bump_first(a):
    """Add 1 to a[0] in place and return a[0]."""
    a[0] += 1
    return float(a[0])


def identity(x):
    """x itself."""
    return x


def make_bytes(n, kind="bytes"):
    """n bytes of 0x07, as bytes or bytearray."""
    data = b"\x07" * n
    return bytearray(data) if kind == "bytearray" else data


def die_while_writing(n):
    """Return an n-item array, SIGKILLing this worker half way through writing its segment."""
    import numpy as np

    from parexec import _shm

    def write(buf, driver_pid, where):
        path = os.path.join(where, f"{_shm.PREFIX}{driver_pid}-{os.getpid()}-{_shm._NS}-part")
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, buf.cast("B")[:buf.nbytes // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    _shm.write = write
    return np.zeros(n)


# Stress: nested runs (tests/test_stress.py) -----------------------------------------------

def nested_run(isolation, n=3):
    """Run, from inside a task, a workflow of ``n`` tasks of ``isolation`` and a map over
    the result of one of them; return the values and the pids that ran them."""
    with px.Workflow(f"inner-{isolation}") as wf:
        parts = [px.task(add).options(id=f"part{k}", isolation=isolation)(k, 10)
                 for k in range(n)]
        items = px.task(lambda *xs: list(xs)).options(id="items")(*parts)
        squares = px.task(square_pid).options(isolation=isolation).map(items, id="sq")
    result = px.run(wf, progress=False)
    return [v for v, _ in result[squares]], sorted({p for _, p in result[squares]}), os.getpid()


def square_pid(x):
    return x * x, os.getpid()


def finally_writes(path, started, seconds=30):
    """Sleep; a ``finally`` block writes ``"<pid> <exception type>"`` to ``path`` (grace)."""
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    kind = "none"
    try:
        time.sleep(seconds)
    except BaseException as exc:
        kind = type(exc).__name__
        raise
    finally:
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {kind}")


def swallow_interrupt(started, seconds=30):
    """Catch whatever interrupts the sleep, then sleep again (ignores a grace period)."""
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    try:
        time.sleep(seconds)
    except BaseException:
        time.sleep(seconds)
    return "late"


def spin(stopped, seconds=30):
    """A pure-Python loop with no ``check()`` calls; sets ``stopped`` (an Event) on leaving."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            pass
    finally:
        stopped.set()
    return "finished"


def signal_self(signum, seconds=5):
    """Send ``signum`` to this process, then sleep (a grace interrupt ends the sleep)."""
    os.kill(os.getpid(), signum)
    time.sleep(seconds)
    return "not interrupted"


def spin_until_interrupted(started, seconds=30):
    """Set ``started`` (an Event), then loop in Python with no ``check()`` calls."""
    started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"


def fail_once_written(path, seconds=20):
    """Wait until ``path`` holds something (another task started), then raise."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (os.path.exists(path) and os.path.getsize(path)):
        time.sleep(0.01)
    raise RuntimeError(f"failing once {path} was written")


def gone(pid, timeout=10.0):
    """Wait until process ``pid`` (one the test recorded) is gone; True if it is."""
    import psutil
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def overlap_by_events(spans):
    """Most intervals open at once, by sweeping start and end events (an end first at a tie)."""
    points = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
    cur = peak = 0
    for _, d in points:
        cur += d
        peak = max(peak, cur)
    return peak


def hold_until(release, started):
    """Write ``started``, then wait (30 s at most) for the file ``release``; return the pid."""
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def stamp(path):
    """Write this process's pid to ``path``; return it (proves the task ran, and where)."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def append_pid(path):
    """Append this process's pid to ``path`` (a line per run: proves how often it ran)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def wait_file(path, timeout=30.0):
    """Wait until ``path`` exists (written by a task in a worker process)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def wait_then_crash_on(x, bad, started):
    """Item 0 writes ``started`` and waits 0.5 s; item ``bad`` exits its worker hard."""
    if x == 0:
        with open(started, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(0.5)
    if x == bad:
        os._exit(3)
    return x
