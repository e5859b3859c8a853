"""A pytest plugin for the GPU session: each test's start and outcome appended to
``$GPU_CHECKS_FILE`` as a JSON line the moment it happens (``python -m pytest -p bench.gpu_pytest``).

A session stopped at its deadline so keeps every result before it, and the test that was
running shows as started but never finished. Under pytest-xdist only the controller writes
(the workers' reports reach it). Without ``GPU_CHECKS_FILE`` the plugin does nothing.
"""
from __future__ import annotations

import json
import os

_config = None


def pytest_configure(config):
    global _config
    _config = config


def _write(record: dict) -> None:
    path = os.environ.get("GPU_CHECKS_FILE")
    if not path or (_config is not None and hasattr(_config, "workerinput")):   # an xdist worker
        return
    record = {"kind": "pytest", "step": os.environ.get("GPU_CHECKS_STEP", "tests"), **record}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"name": nodeid, "status": "started"})


def outcome(report) -> str | None:
    """pass / fail / skipped / error for the report that settles a test, None for the others
    (a passed setup or teardown)."""
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xfail" if report.skipped else "fail"
        return "pass" if report.passed else "skipped" if report.skipped else "fail"
    if report.skipped:
        return "skipped"
    if report.failed:
        return "error"          # setup or teardown raised
    return None


def pytest_runtest_logreport(report):
    status = outcome(report)
    if status is None:
        return
    record = {"name": report.nodeid, "status": status, "when": report.when, "wall_s": round(report.duration, 2)}
    if report.skipped and isinstance(report.longrepr, tuple):
        record["detail"] = str(report.longrepr[2])[:300]
    elif status in ("fail", "error"):
        record["detail"] = report.longreprtext[-1500:]
    printed = (report.capstdout or "").strip()
    if printed:
        record["printed"] = printed[-400:]
    _write(record)
