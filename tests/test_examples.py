"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_runs_and_reports():
    """examples/quickstart.py runs to the end and prints its report and summary."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1,598,402 kept" in proc.stdout
    assert "sensor-report: succeeded (17 succeeded)" in proc.stdout


PATTERNS = {
    "multi_source_aggregation.py": ["aggregate: {'rows': 125"],
    "redundant_sources.py": ["price=42.0 (from us-mirror)", "'query-2': 'cancelled'"],
    "best_effort_enrichment.py": ["'missing': ['enrich-2']", "run status: succeeded"],
    "fastest_answer.py": ["greedy found the answer", "'solve': 'cancelled'",
                          "'solve-3': 'cancelled'"],
    "rate_limited_batch.py": ["checksum 999000 over 1000 items", "at most 8 calls in flight"],
    "nested_groups.py": ["eu: data@eu-2 + us: data@us-1"],
}


import pytest  # noqa: E402


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_examples_run(name):
    """Each wait-strategy example runs in seconds and prints what it promises."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "patterns" / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for words in PATTERNS[name]:
        assert words in proc.stdout, (words, proc.stdout)


AGENT_PIPELINE = EXAMPLES / "pipelines" / "agent.yaml"
CSV_SUMMARY = ("Summary of data/weather.csv: 6 rows, columns city, month, temp_c, rain_mm; "
               "means: temp_c 14.88, rain_mm 39.67")


def test_agent_pipeline_summarizes_the_csv(monkeypatch):
    """examples/pipelines/agent.yaml: px.load + px.run give the agent's summary of the CSV."""
    import parexec as px
    monkeypatch.syspath_prepend(str(EXAMPLES / "agents"))
    result = px.run(px.load(AGENT_PIPELINE), progress=False)
    assert result["summarize"] == CSV_SUMMARY
    assert result["report"] == CSV_SUMMARY
    assert [result.tasks[s].level for s in ("read", "summarize", "report")] == [0, 1, 2]


def test_agent_pipeline_runs_from_the_command_line():
    """The same pipeline through `parexec run --verbose` prints the summary; without the agent
    module on the path it is refused before anything runs, naming the module and the step."""
    import os
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES / "agents")}
    proc = subprocess.run([sys.executable, "-m", "parexec", "run", str(AGENT_PIPELINE),
                           "--verbose"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"[report] {CSV_SUMMARY}" in proc.stdout
    assert "csv-report: succeeded (3 succeeded)" in proc.stdout
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-m", "parexec", "run", str(AGENT_PIPELINE)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert ("agent 'summarizer' of step 'summarize': cannot import module 'csv_agent'"
            in proc.stderr)
    assert "PYTHONPATH" in proc.stderr and "[report]" not in proc.stdout


FOREACH_PIPELINE = EXAMPLES / "pipelines" / "foreach.yaml"
SALES_SUMMARY = ("Summary of sales.csv: 4 rows, columns region, quarter, units, revenue; "
                 "means: units 107.50, revenue 2193.75")
WEATHER_SUMMARY = CSV_SUMMARY.replace("data/weather.csv", "weather.csv")


def test_foreach_pipeline_summarizes_each_file(monkeypatch):
    """examples/pipelines/foreach.yaml: one agent item per CSV file, at most two at once; the
    report joins the summaries in file order."""
    import parexec as px
    monkeypatch.syspath_prepend(str(EXAMPLES / "agents"))
    result = px.run(px.load(FOREACH_PIPELINE), progress=False)
    assert result["summarize"] == [SALES_SUMMARY, WEATHER_SUMMARY]
    assert result["report"] == f"{SALES_SUMMARY}\n{WEATHER_SUMMARY}"
    assert {"summarize[0]", "summarize[1]"} <= set(result.tasks)


def test_foreach_pipeline_runs_from_the_command_line():
    """Through `parexec run --verbose`: the report is printed and the items are in the
    summary."""
    import os
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES / "agents")}
    proc = subprocess.run([sys.executable, "-m", "parexec", "run", str(FOREACH_PIPELINE),
                           "--verbose"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"[print] {SALES_SUMMARY}\n[print] {WEATHER_SUMMARY}" in proc.stdout
    assert "\nsummarize[1] " in proc.stdout
    assert "csv-folder-report: succeeded (7 succeeded)" in proc.stdout
