"""The notebook example and the interrupt button, in a real Jupyter kernel."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path

import pytest
from helpers import gone

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).parent.parent / "examples" / "notebook.ipynb"


def kernel_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    # with PYTEST_CURRENT_TEST set, ipykernel stops capturing worker output
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
        folder = tmp_path / name.lower()
        folder.mkdir(exist_ok=True)
        env[name] = str(folder)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    return env


def outputs(cell) -> str:
    text = []
    for out in cell.get("outputs", []):
        if "text" in out:
            text.append(out["text"])
        for key in ("text/plain", "text/html"):
            if key in out.get("data", {}):
                text.append(out["data"][key])
    return "\n".join(text)


@pytest.mark.timeout(300)
def test_notebook_example_runs_in_a_real_kernel(tmp_path):
    """Every cell runs; the result table, worker traceback and Gantt chart are displayed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env(tmp_path), cleanup_kc=True)
    cells = nb.cells
    assert "Workflow notebook-analysis" in outputs(cells[2])
    shown = outputs(cells[3])
    assert "notebook-analysis" in shown and "partial" in shown and "<table>" in shown
    # the progress bar is a widget in a notebook
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {})
               for out in cells[3].outputs)
    assert "'draws': 1800000" in outputs(cells[4])
    tb = outputs(cells[5])
    assert tb.startswith("ZeroDivisionError") and "in fragile" in tb
    assert any("image/png" in out.get("data", {}) for out in cells[6].outputs)


INTERRUPT_CELLS = [
    # 0: definitions (functions defined in a cell, run in processes)
    textwrap.dedent("""
        import os, time
        import parexec as px
        from parexec import _pools

        def quick(k):
            return k * 10

        def long_running(marker):
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(120)
    """),
    # 1: the run to interrupt
    textwrap.dedent("""
        with px.Workflow("to-interrupt", max_workers=4, isolation="process") as wf:
            for k in range(2):
                wf.add(px.task(quick).options(id=f"quick-{k}"), k)
            for k in range(2):  # after the quick ones: once they run, those are done
                wf.add(px.task(long_running).options(id=f"long-{k}",
                                                     after=["quick-0", "quick-1"]), MARKER)
        px.run(wf, progress=False)
    """),
    # 2: the partial result survived
    "r = px.last_result(); print(r.status, sorted(r.results.items()))",
    # 3: a new workflow runs in the same kernel
    textwrap.dedent("""
        with px.Workflow("after") as wf2:
            wf2.add(px.task(quick).options(isolation="process"), 4)
        print("after:", px.run(wf2, progress=False)["quick"])
    """),
    # 4: shut parexec's workers down before the kernel goes
    "_pools.shutdown_process_pool(); print('shut down')",
]


@pytest.mark.timeout(300)
def test_interrupt_button_stops_the_run_and_keeps_the_kernel_usable(tmp_path):
    """Interrupting a cell mid-run: KeyboardInterrupt within seconds, process tasks stopped,
    the finished tasks in px.last_result(), and the next cell runs a new workflow."""
    marker = tmp_path / "long.pids"
    cells = [nbformat.v4.new_code_cell(src) for src in INTERRUPT_CELLS]
    cells.insert(1, nbformat.v4.new_code_cell(f"MARKER = {str(marker)!r}"))
    nb = nbformat.v4.new_notebook(cells=cells)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     shutdown_kernel="immediate",
                                     resources={"metadata": {"path": str(tmp_path)}})

    async def scenario():
        async with client.async_setup_kernel(env=kernel_env(tmp_path)):
            await client.async_execute_cell(nb.cells[0], 0)
            await client.async_execute_cell(nb.cells[1], 1)
            running = asyncio.ensure_future(client.async_execute_cell(nb.cells[2], 2))
            deadline = time.monotonic() + 60
            while not marker.exists() or len(marker.read_text().split()) < 2:
                assert time.monotonic() < deadline, "the long tasks did not start"
                assert not running.done(), running.exception()
                await asyncio.sleep(0.05)
            pids = [int(p) for p in marker.read_text().split()]
            t0 = time.monotonic()
            await client.km.interrupt_kernel()
            with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
                await running
            took = time.monotonic() - t0
            later = []
            for k in (3, 4, 5):
                later.append(await client.async_execute_cell(nb.cells[k], k))
            return pids, info.value, took, later

    pids, error, took, later = asyncio.run(scenario())
    assert "KeyboardInterrupt" in str(error) and took < 10
    assert all(gone(p, 5) for p in pids), "process tasks kept working after the interrupt"
    assert outputs(later[0]).strip() == "cancelled [('quick-0', 0), ('quick-1', 10)]"
    assert "after: 40" in outputs(later[1])
    assert "shut down" in outputs(later[2])

