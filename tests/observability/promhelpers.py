"""Helpers for the observability tests: a real Prometheus server, the shipped rule and
dashboard files, and the small text transformations the live test needs.

No YAML parser is a dependency of the project, so rule files are read with two anchored
regular expressions; the authoritative parse is Prometheus' own (``/api/v1/rules``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
ALERTS = CONFIG_DIR / "prometheus-alerts.yml"
ALERT_TESTS = CONFIG_DIR / "prometheus-alerts.test.yml"
SCRAPE = CONFIG_DIR / "prometheus-scrape.yml"
DASHBOARD = CONFIG_DIR / "grafana-dashboard.json"

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

_FOR = re.compile(r"^(\s+)for: \S+$", re.MULTILINE)
_ALERT = re.compile(r"^\s+- alert: (\w+)$", re.MULTILINE)
_TESTED = re.compile(r"^\s+alertname: (\w+)$", re.MULTILINE)
# A metric name that is ours (or ``up``) with an optional matcher block; ``by (...)``,
# functions and durations never start with these names.
_SELECTOR = re.compile(r"\b((?:tgdaemon_\w+)|up)\b(\{[^}]*\})?")


def free_port() -> int:
    """A currently free loopback port (the usual small race is acceptable in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def alert_names(rules_text: str) -> list[str]:
    return _ALERT.findall(rules_text)


def unit_tested_alerts(tests_text: str) -> set[str]:
    return set(_TESTED.findall(tests_text))


def with_short_for(rules_text: str, duration: str = "1s") -> str:
    """The rules with every ``for:`` shortened. Prometheus cannot override ``for:`` at load
    time, so the live test loads this copy; the shipped file keeps production durations."""
    text, n = _FOR.subn(rf"\g<1>for: {duration}", rules_text)
    assert n == len(alert_names(rules_text)), "every alert rule must state its for:"
    return text


def selectors(expr: str) -> list[str]:
    """The vector selectors of our metrics in a PromQL expression, e.g. ``up{job="x"}``."""
    return [name + (matchers or "") for name, matchers in _SELECTOR.findall(expr)]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def dashboard_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    return [PanelQuery(p["title"], t["refId"], t["expr"])
            for p in walk(dashboard["panels"]) for t in p.get("targets", [])]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables (``$account``, ``${account}``, ``$__rate_interval``)."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"no test value for Grafana variable ${name}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def prometheus_config(targets: list[str], rule_file: Path, interval: str = "1s") -> str:
    quoted = ", ".join(f'"{t}"' for t in targets)
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  scrape_timeout: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        f"rule_files:\n  - {json.dumps(str(rule_file))}\n"
        "scrape_configs:\n"
        "  - job_name: tgdaemon\n"
        f"    static_configs:\n      - targets: [{quoted}]\n"
    )


class Prometheus:
    """A real Prometheus on 127.0.0.1 (own process group) and a tiny HTTP API client."""

    def __init__(self, config: Path, data_dir: Path, log_file: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log_file = log_file
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 20.0) -> None:
        with self.log_file.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                PROMETHEUS, f"--config.file={self.config}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                raise AssertionError(f"prometheus exited: {self.log_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.get(f"{self.url}/-/ready") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready in {timeout}s: {self.log_text()}")
            await asyncio.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            if proc is not None:
                await proc.wait()
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def api(self, path: str, **params: str) -> Any:
        assert self._http is not None
        async with self._http.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> dict[str, Any]:
        """Instant query; raises with Prometheus' error text when the expression is bad."""
        assert self._http is not None
        async with self._http.get(f"{self.url}/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body.get('error')}")
        return body["data"]

    async def targets(self) -> list[dict[str, Any]]:
        return list((await self.api("targets"))["activeTargets"])

    async def alerting_rules(self) -> list[dict[str, Any]]:
        groups = (await self.api("rules", type="alert"))["groups"]
        return [r for g in groups for r in g["rules"]]

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self.api("alerts"))["alerts"])


@contextlib.asynccontextmanager
async def running_prometheus(config: Path, data_dir: Path,
                             log_file: Path) -> AsyncIterator[Prometheus]:
    prom = Prometheus(config, data_dir, log_file)
    try:
        await prom.start()
        yield prom
    finally:
        await prom.stop()


def finite_values(data: dict[str, Any]) -> list[float]:
    """The finite sample values of an instant-query result (vector or scalar)."""
    if data["resultType"] == "scalar":
        values = [data["result"][1]]
    else:
        values = [s["value"][1] for s in data["result"]]
    out = []
    for v in values:
        f = float(v)
        if f == f and f not in (float("inf"), float("-inf")):
            out.append(f)
    return out
