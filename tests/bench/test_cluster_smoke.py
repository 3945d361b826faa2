"""The fleet benchmark end to end at N=40 over 4 daemons (``bench/cluster.py --smoke``), so it
does not rot: localdc and every daemon in their own processes, one daemon SIGKILLed.  Asserts
on the shape and on what must hold at any size (everything connected once, the killed
daemon's accounts back on the others within the documented bound, no overlap), never on
speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster import KEPT

ROOT = Path(__file__).resolve().parents[2]
#: About 30 s of wall time alone (4 daemons and a localdc start as processes); generous for a
#: loaded machine.
SMOKE_TIMEOUT = 240
pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)


def test_cluster_bench_smoke(tmp_path: Path) -> None:
    out, data = tmp_path / "CLUSTER.md", tmp_path / "cluster.json"
    out.write_text(f"an older run\n{KEPT}\n## Written by hand\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster.py"), "--smoke", "--out", str(out),
         "--json", str(data), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(data.read_text())
    assert "error" not in results
    run = results["run"]
    n = run["n"]
    assert (n, run["daemons"]) == (40, 4)
    assert run["connect_s"] > 0
    assert sum(run["owned_at_connect"].values()) == n
    instances = run["instances"]
    assert sorted(instances) == ["d1", "d2", "d3", "d4"]
    for x in instances.values():
        assert x["owned"] > 0
        assert x["rss_kb"] > x["rss_base_kb"] > 0
        assert x["cpu_pct"] >= 0
    assert sum(run["requests_per_account_min"].values()) > 0  # heartbeats, at least
    takeover = run["takeover"]
    assert takeover["victim"] == "d4"
    assert takeover["accounts"] > 0
    assert 0 < takeover["seconds"] <= takeover["bound_s"]
    assert "d4" not in takeover["owned_after"]
    assert sum(takeover["owned_after"].values()) == n
    assert takeover["live_keys_at_end"] == n
    # the takeover's own measures are there (their values depend on the machine's load)
    assert takeover["deadline_closes"] >= 0
    assert "settled_s" in takeover
    assert set(takeover["errors"]) == {"d1", "d2", "d3"}
    assert run["deadline_closes_total"] >= takeover["deadline_closes"]
    assert run["overlaps"] == 0
    assert run["open_twice_at_end"] == 0
    report = out.read_text()
    assert "| all 4 | 40 |" in report
    assert "SIGKILL of d4" in report
    assert "an older run" not in report
    assert report.endswith(f"{KEPT}\n## Written by hand\n")
