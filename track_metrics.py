#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["botocore>=1.36"]
# ///
# SPDX-License-Identifier: MIT
"""track_metrics: track a codebase's metrics across CI runs in a SQLite database on S3.

One tracking run downloads the metrics database (from S3-compatible storage, a local file or
GitHub Actions artifacts), checks it, runs the metric commands of ``unentropy.json`` (shell
commands or Unentropy's built-in ``@collect`` collectors), records their values with the
build's context, uploads the database back with a compare-and-swap (concurrent runs never lose
a build), and writes a self-contained HTML report. Other verbs: ``report``, ``check``,
``verify``, ``test``, ``collect``, ``gate`` (the pull-request quality gate), ``import``,
``export``, ``backfill`` and ``prune``; ``track_metrics.py VERB --help`` describes each.

Three ways to run it, all from this one file:

    python3 track_metrics.py --config unentropy.json          # any CI, after curl -fsSLO
    uses: <owner>/track_metrics@v0                             # GitHub Action (action.yml)
    import track_metrics; track_metrics.main(["--local-db", "m.db"])   # vendored

Library API: ``main(argv=None, environ=None) -> int`` is the command line;
``run(params, config, console=None, environ=None, change=None) -> ActionResult`` is one
tracking run (or, with ``change=ImportChange(...)``/``PruneChange(...)``, that change through
the same update path), with ``ActionParameters.from_sources`` and ``load_config`` building its
inputs. The
dataclasses (``ActionResult``, ``WorkflowPhase``, ``WorkflowError``, ``DatabaseFile``, ...)
are plain values; ``TrackMetricsError`` is the one exception the library raises on purpose.
Nothing but ``main`` prints to stdout or exits.

Exit codes: 0 success; 1 the run failed; 2 usage, configuration or parameter error (nothing
was touched); 75 retryable failure (network, unavailable, conflict): re-running may succeed.

Error codes (``WorkflowError.code``):
    CONFIG_NOT_FOUND        the configuration file does not exist
    CONFIG_INVALID_JSON     the configuration file is not valid JSON
    CONFIG_INVALID          one or more fields are invalid (all are listed)
    CONFIG_STORAGE_MISSING  no "storage" block and no --local-db
    CONFIG_SECRET_IN_FILE   a credential was found in the configuration file
    PARAM_MISSING           a required parameter (bucket, credentials) was not given
    PARAM_INVALID           a parameter has a bad value
    S3_AUTH_FAILED          the credentials were rejected (which way: bad secret, unknown key, expired token)
    S3_WRONG_REGION         the bucket is in another region (pass --region)
    S3_CLOCK_SKEWED         this machine's clock is too far from the storage's
    S3_ACCESS_DENIED        the credentials lack a permission (s3:GetObject, s3:PutObject)
    S3_BUCKET_NOT_FOUND     the bucket does not exist
    S3_NETWORK              connection refused or reset, DNS, TLS, timeouts (retryable, but for TLS
                            failures a retry cannot change: a certificate, plain HTTP on https://)
    S3_UNAVAILABLE          5xx, SlowDown, throttling after retries (retryable)
    S3_CONFLICT             concurrent writers kept winning the compare-and-swap (retryable)
    S3_CONDITIONAL_WRITES_UNSUPPORTED  the provider ignores If-Match / If-None-Match
    S3_UPLOAD_UNVERIFIED    the object read back after upload does not hold this run's build
    S3_NO_ETAG              the download came without an ETag (a conditional write needs one)
    S3_ERROR                any other S3 error
    GITHUB_AUTH_FAILED, GITHUB_ACCESS_DENIED, GITHUB_API_ERROR, GITHUB_NETWORK
                            the GitHub API refused or failed (sqlite-artifact storage)
    DEPENDENCY_MISSING      botocore is not installed (S3 storage needs it)
    DB_TOO_LARGE            the database exceeds the 5 GiB single-PUT limit
    CHECKSUM_MISMATCH       the downloaded bytes do not match their size, SHA-256 or MD5 ETag
    DB_NOT_FOUND            `report` found no database to report on
    DB_MISSING              the database key is missing beside its backups or other databases (restore it,
                            fix --database-key, or --new-history)
    DB_NOT_SQLITE           the object is not a SQLite database
    DB_CORRUPT              SQLite's integrity check failed (on two downloads), or a damaged page was met
                            while reading
    DB_SCHEMA_UNKNOWN       a SQLite database this tool cannot write (tables, UNIQUE keys, triggers)
    DB_SCHEMA_NEWER         the database has a newer schema version: upgrade track_metrics
    DB_WRITE_FAILED         SQLite refused to record the build
    LOCAL_IO_FAILED         a local database file or its folder could not be read or written
    COLLECT_NOTHING         no metric command produced a value that could be recorded
    IMPORT_INVALID          `import`: an unreadable file, no valid record, or a bad line with --strict
    METRICS_MISSING         --fail-on-missing: some metrics recorded no value
    REPORT_FAILED           the report could not be written (the database is safe)
    RUN_TIMEOUT             the run's --timeout passed (retryable)
    CANCELLED               the run was cancelled by SIGTERM/SIGINT (retryable)
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import html
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

__version__ = "0.1.0"

__all__ = [
    "main", "run", "load_config", "ActionParameters", "ActionResult", "BuildContext",
    "Config", "DatabaseFile", "MetricConfig", "S3Configuration", "S3Credentials", "S3Storage",
    "StorageConfiguration", "TrackMetricsError", "UploadResult", "WorkflowError",
    "WorkflowPhase", "Change", "RunChange", "ImportChange", "ImportRequest", "PruneChange", "PruneRequest",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRYABLE = 0, 1, 2, 75

CHUNK_SIZE = 1024 * 1024
SINGLE_PUT_LIMIT = 5 * 1024**3
DOWNLOAD_ATTEMPTS = 3
SQLITE_HEADER = b"SQLite format 3\x00"
CONTENT_TYPE = "application/vnd.sqlite3"
DEFAULT_DATABASE_KEY = "unentropy-metrics.db"  # Unentropy's track-metrics default
DEFAULT_REPORT_DIR = "unentropy-report"
DEFAULT_COMMAND_TIMEOUT = 60.0
UNITS = ("percent", "integer", "bytes", "duration", "decimal")
PHASES = ("download", "validate", "collect", "upload", "report")


# ============================================================================================
# Errors
# ============================================================================================

class TrackMetricsError(Exception):
    """A failure the user can act on. Only `main` turns it into a message and an exit code."""

    def __init__(self, code: str, message: str, *, type: str = "storage",
                 retryable: bool = False, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.type = type
        self.retryable = retryable
        self.details = dict(details or {})
        self.secrets: Sequence[str] = ()  # values to redact that came with the error


class Cancelled(BaseException):
    """Raised from a signal handler. A BaseException, so that no broad `except Exception`
    anywhere below can swallow a cancellation."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def config_error(problems: Sequence[tuple[str, str]], code: str = "CONFIG_INVALID",
                 kind: str = "configuration") -> TrackMetricsError:
    lines = [f"  {path}: {message}" if path else f"  {message}" for path, message in problems]
    noun = "problem" if len(problems) == 1 else "problems"
    return TrackMetricsError(
        code, f"{len(problems)} {kind} {noun}:\n" + "\n".join(lines), type="validation",
        details={"problems": [{"path": p, "message": m} for p, m in problems]})


MIN_SECRET_LENGTH = 8  # shorter values would redact ordinary text (a one-letter secret: every "b")


def redact(text: str, secrets: Sequence[str]) -> str:
    """The one redaction function every text that leaves the process goes through."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, "***")
    return text


class Console:
    """Logs to stderr (stdout is kept for --json), redacted, with GitHub workflow commands."""

    def __init__(self, stream=None, *, github: bool = False, verbose: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.secrets: list[str] = []
        self.github = github
        self.verbose = verbose
        self._lock = threading.Lock()

    def add_secret(self, value: str) -> None:
        """Redact the value, and each of its lines (the runner's ::add-mask:: masks one line)."""
        for part in dict.fromkeys([value, *value.splitlines()]):
            if len(part) >= MIN_SECRET_LENGTH and part not in self.secrets:
                self.secrets.append(part)
                if self.github and "\n" not in part and "\r" not in part:  # its next line would show
                    self._write(f"::add-mask::{part}", raw=True)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def _write(self, line: str, raw: bool = False) -> None:
        with self._lock:
            self.stream.write((line if raw else self.redact(line)) + "\n")
            self.stream.flush()

    def info(self, message: str) -> None:
        self._write(message)

    def debug(self, message: str) -> None:
        if self.verbose:
            self._write(message)

    def warning(self, message: str) -> None:
        self._annotate("warning", message)

    def error(self, message: str) -> None:
        self._annotate("error", message)

    def _annotate(self, level: str, message: str) -> None:
        if self.github:
            escaped = self.redact(message).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
            self._write(f"::{level}::{escaped}")
        else:
            self._write(f"{level}: {message}")

    @contextlib.contextmanager
    def group(self, title: str) -> Iterator[None]:
        self._write(f"::group::{title}" if self.github else f"== {title}")
        try:
            yield
        finally:
            if self.github:
                self._write("::endgroup::")


# ============================================================================================
# Configuration and parameters
# ============================================================================================

@dataclass(frozen=True)
class S3Configuration:
    endpoint: str | None = None
    bucket: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class StorageConfiguration:
    type: str = "s3"
    s3: S3Configuration = field(default_factory=S3Configuration)


@dataclass(frozen=True)
class MetricConfig:
    id: str
    type: str
    command: str
    unit: str | None = None
    name: str | None = None
    description: str | None = None
    timeout: float | None = None
    direction: str = "neutral"
    repeat: int = 1  # runs of the command; the median is recorded, every sample kept


@dataclass(frozen=True)
class Config:
    storage: StorageConfiguration | None = None
    database_key: str | None = None
    report_dir: str | None = None
    metrics: tuple[MetricConfig, ...] = ()
    warnings: tuple[str, ...] = ()
    sources: tuple[str, ...] | None = None  # Unentropy's `sources` patterns, as written
    report_mode: str = "auto"  # auto | light | dark
    report_sections: tuple = ()  # ((name, description, ((title, (metric ids…)), …)), …)
    quality_gate: dict | None = None
    base_path: Path = Path(".")  # the configuration file's folder


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = "the parameters"  # where they came from: the environment (AWS_ACCESS_KEY_ID), flags,
    # action inputs, or the botocore provider that supplied them (shared-credentials-file, …)
    provider: Any = field(default=None, repr=False)  # botocore's own object: refreshes temporary ones


STORAGE_TYPES = ("s3", "sqlite-s3", "sqlite-local", "sqlite-artifact")
SECRET_FIELDS = {"accesskeyid", "secretaccesskey", "sessiontoken", "access_key_id",
                 "secret_access_key", "session_token", "access-key-id", "secret-access-key",
                 "session-token"}
METRIC_ID = re.compile(r"[a-z0-9-]{1,64}")  # always fullmatch: `$` would let "id\n" through
REGION = re.compile(r"[a-z0-9-]+")
KNOWN_KEYS = {
    "": {"storage", "database", "report", "metrics", "sources", "qualityGate", "$schema"},
    "storage": {"type", "s3"},
    "storage.s3": {"endpoint", "bucket", "region"},
    "database": {"key"},
    "report": {"dir", "mode", "theme", "sections"},
    "metric": {"$ref", "type", "command", "unit", "name", "description", "timeout", "direction", "repeat"},
    "qualityGate": {"mode", "enablePullRequestComment", "maxCommentMetrics", "maxCommentCharacters",
                    "baseline", "thresholds", "acceptLabel"},
    "qualityGate.baseline": {"referenceBranch", "maxAgeDays"},
    "threshold": {"metric", "mode", "target", "tolerance", "tolerancePercent", "maxDropPercent", "severity",
                  "noise"},
}
# Which way is better for a template's metric (the gate reads "neutral" as up, as Unentropy).
TEMPLATE_DIRECTIONS = {"coverage": "up", "function-coverage": "up", "size": "down", "build-time": "down",
                       "test-time": "down", "dependencies-count": "down"}
# Unentropy's metric templates ($ref): type, unit, default command, description.
TEMPLATES = {
    "coverage": ("numeric", "percent", None, "Overall test coverage percentage across the codebase"),
    "function-coverage": ("numeric", "percent", None, "Percentage of functions covered by tests"),
    "loc": ("numeric", "integer", "@collect loc .", "Total lines of code in the codebase"),
    "size": ("numeric", "bytes", "@collect size dist", "Size of files or directories"),
    "build-time": ("numeric", "duration", None, "Time taken to complete the build"),
    "test-time": ("numeric", "duration", None, "Time taken to run all tests"),
    "dependencies-count": ("numeric", "integer", None, "Total number of dependencies"),
}


def load_config(path: Path, named_by: str = "") -> Config:
    """Read and validate a configuration file (every problem is reported at once); `named_by`
    says who named the path (the action's config-file input, --config) for the error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        where = f"{path} (relative to {Path.cwd()})" if not Path(path).is_absolute() else str(path)
        advice = (f"{named_by} names it: check that value" if named_by
                  else "pass --config PATH (input config-file) or create unentropy.json")
        raise TrackMetricsError("CONFIG_NOT_FOUND", f"configuration file {where} does not exist; {advice}",
                                type="validation")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrackMetricsError("CONFIG_NOT_FOUND", f"cannot read configuration file {path}: {exc}",
                                type="validation")
    return dataclasses.replace(parse_config(text, str(path)), base_path=Path(path).parent)


def parse_config(text: str, source: str = "unentropy.json") -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrackMetricsError("CONFIG_INVALID_JSON", f"{source} is not valid JSON: {exc.msg} "
                                f"at line {exc.lineno}, column {exc.colno}", type="validation")
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    secrets: list[str] = []
    if not isinstance(data, dict):
        raise config_error([("", f"the top level must be an object, got {type_name(data)}")])
    _find_secrets(data, "", problems, secrets)
    _warn_unknown(data, "", KNOWN_KEYS[""], warnings)
    storage = _parse_storage(data, problems, warnings)
    database_key = _string(_section(data, "database", problems, warnings), "database.key", problems)
    report = _section(data, "report", problems, warnings)
    report_dir = _string(report, "report.dir", problems)
    mode = (report or {}).get("mode", "auto")
    if mode not in ("auto", "light", "dark"):
        problems.append(("report.mode", f"got {show(mode)}; accepted: \"auto\", \"light\" or \"dark\""))
    sections = _parse_sections((report or {}).get("sections"), problems)
    _check_theme((report or {}).get("theme"), problems)
    metrics = _parse_metrics(data.get("metrics"), problems, warnings)
    sources = _parse_sources(data.get("sources"), problems)
    gate = _parse_quality_gate(data, {m.id for m in metrics}, problems, warnings)
    if problems:
        secret_problem = any(message.startswith("credentials must not") for _, message in problems)
        error = config_error(problems, "CONFIG_SECRET_IN_FILE" if secret_problem else "CONFIG_INVALID")
        if warnings:  # an unknown key is often the cause ("metircs"): say so beside the errors
            error.message += "\nalso:\n" + "\n".join(f"  {warning}" for warning in warnings)
        error.secrets = secrets  # for redaction; never part of the error's details
        raise error
    return Config(storage, database_key, report_dir, tuple(metrics), tuple(warnings), sources,
                  mode, sections, gate)


THEMES = ("lattice", "flux", "halftone", "specimen")  # Unentropy 0.3.16's built-in report themes
THEME_VARIABLES = ("--bg", "--surface", "--surface-card", "--border", "--border-soft", "--text", "--text-dim",
                   "--text-muted", "--accent", "--up", "--down", "--warn")


def _check_theme(theme: Any, problems: list) -> None:
    """report.theme as Unentropy accepts it (this report draws its own colours either way)."""
    if theme is None or theme in THEMES:
        return
    if isinstance(theme, dict) and set(theme) <= {"dark", "light"} and all(
            isinstance(variant, dict) and set(variant) <= set(THEME_VARIABLES) and all(
                isinstance(v, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", v) for v in variant.values())
            for variant in theme.values()):
        return
    problems.append(("report.theme", f"got {show(theme)}; accepted: {', '.join(THEMES)}, or "
                     "{\"dark\": {...}, \"light\": {...}} of 7-character hex colours (#1c2230)"))


def _parse_sources(raw: Any, problems: list) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not 1 <= len(raw) <= 50 \
            or not all(isinstance(item, str) and item for item in raw):
        problems.append(("sources", f"got {show(raw)}; accepted: an array of 1 to 50 non-empty "
                         "patterns (\"src\", \"lib/**/*.ts\", \"!**/*.test.ts\")"))
        return None
    return tuple(raw)


def _parse_sections(raw: Any, problems: list) -> tuple:
    """report.sections: named groups of charts, each chart one or several metric ids."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        problems.append(("report.sections", f"got {show(raw)}; accepted: a non-empty array of "
                         "{\"name\", \"charts\": [{\"metrics\": \"id\" or [ids], \"title\"}]}"))
        return ()
    sections = []
    for index, section in enumerate(raw):
        path = f"report.sections[{index}]"
        charts = section.get("charts") if isinstance(section, dict) else None
        if not isinstance(section, dict) or not isinstance(section.get("name"), str) \
                or not isinstance(charts, list) or not charts:
            problems.append((path, f"got {show(section)}; accepted: {{\"name\": text, \"charts\": "
                             "[at least one chart]}"))
            continue
        parsed = []
        for number, chart in enumerate(charts):
            ids = chart.get("metrics") if isinstance(chart, dict) else None
            ids = [ids] if isinstance(ids, str) else ids
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
                problems.append((f"{path}.charts[{number}].metrics", f"got {show(ids)}; accepted: a "
                                 "metric id or a non-empty array of them"))
                continue
            parsed.append((chart.get("title") if isinstance(chart.get("title"), str) else None, tuple(ids)))
        sections.append((section["name"], section.get("description"), tuple(parsed)))
    return tuple(sections)


def _parse_quality_gate(data: dict, metric_ids: set, problems: list, warnings: list) -> dict | None:
    """qualityGate, validated as Unentropy validates it (the gate itself runs in `gate`)."""
    gate = _section(data, "qualityGate", problems, warnings)
    if gate is None:
        return None
    checks = (("mode", lambda v: v in ("off", "soft", "hard"), '"off", "soft" or "hard"'),
              ("enablePullRequestComment", lambda v: isinstance(v, bool), "true or false"),
              ("maxCommentMetrics", lambda v: _whole(v) and 1 <= v <= 100, "a whole number from 1 to 100"),
              ("maxCommentCharacters", lambda v: _whole(v) and 1 <= v <= 20000,
               "a whole number from 1 to 20000"),
              ("acceptLabel", lambda v: isinstance(v, str) and 0 < len(v) <= 50, "a label name of 1-50 characters"))
    for name, valid, accepted in checks:
        if name in gate and not valid(gate[name]):
            problems.append((f"qualityGate.{name}", f"got {show(gate[name])}; accepted: {accepted}"))
    baseline = _section(gate, "qualityGate.baseline", problems, warnings) or {}
    if "referenceBranch" in baseline and not isinstance(baseline["referenceBranch"], str):
        problems.append(("qualityGate.baseline.referenceBranch", f"got {show(baseline['referenceBranch'])}; "
                         "accepted: a branch name"))
    if "maxAgeDays" in baseline and not (_whole(baseline["maxAgeDays"]) and baseline["maxAgeDays"] > 0):
        problems.append(("qualityGate.baseline.maxAgeDays", f"got {show(baseline['maxAgeDays'])}; "
                         "accepted: a whole number of days above 0"))
    thresholds = gate.get("thresholds", [])
    if not isinstance(thresholds, list):
        problems.append(("qualityGate.thresholds", f"must be an array, got {type_name(thresholds)}"))
        thresholds = []
    for index, rule in enumerate(thresholds):
        _check_threshold(f"qualityGate.thresholds[{index}]", rule, metric_ids, problems, warnings)
    return gate


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A finite number a float can hold (JSON's integers have no limit; 1e400 is refused)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_threshold(path: str, rule: Any, metric_ids: set, problems: list, warnings: list) -> None:
    if not isinstance(rule, dict):
        problems.append((path, f"must be an object, got {type_name(rule)}"))
        return
    _warn_unknown(rule, path, KNOWN_KEYS["threshold"], warnings)
    metric, mode = rule.get("metric"), rule.get("mode")
    if not isinstance(metric, str) or not metric:
        problems.append((f"{path}.metric", f"got {show(metric)}; accepted: a metric id"))
    elif metric not in metric_ids:
        problems.append((f"{path}.metric", f"{show(metric)} is not a metric of this configuration "
                         f"(metrics: {', '.join(sorted(metric_ids))[:200]})"))
    if mode not in ("no-regression", "min", "max", "delta-max-drop"):
        problems.append((f"{path}.mode", f"got {show(mode)}; accepted: \"no-regression\", \"min\", "
                         "\"max\" or \"delta-max-drop\""))
    for name in ("target", "tolerance", "tolerancePercent", "maxDropPercent"):
        if name in rule and not _number(rule[name]):
            problems.append((f"{path}.{name}", f"got {show(rule[name])}; accepted: a number"))
    if _number(rule.get("tolerance")) and rule["tolerance"] < 0:
        problems.append((f"{path}.tolerance", f"got {show(rule['tolerance'])}; accepted: 0 or more"))
    if _number(rule.get("maxDropPercent")) and rule["maxDropPercent"] <= 0:
        problems.append((f"{path}.maxDropPercent", f"got {show(rule['maxDropPercent'])}; accepted: above 0"))
    if mode in ("min", "max") and "target" not in rule:
        problems.append((f"{path}.target", f"is required when mode is {show(mode)}"))
    if mode == "delta-max-drop" and "maxDropPercent" not in rule:
        problems.append((f"{path}.maxDropPercent", "is required when mode is \"delta-max-drop\""))
    noise = rule.get("noise")
    if noise is not None and (not isinstance(noise, dict) or noise.get("model") not in ("iqr", "t")
                              or not (_whole(noise.get("sampleSize", 30)) and 3 <= noise.get("sampleSize", 30) <= 1000)
                              or not (_number(noise.get("multiplier", 1.5)) and noise.get("multiplier", 1.5) > 0)
                              or not (_number(noise.get("confidence", 0.99)) and 0.5 < noise.get("confidence", 0.99) < 1)):
        problems.append((f"{path}.noise", f"got {show(noise)}; accepted: {{\"model\": \"iqr\" or \"t\", "
                         "\"sampleSize\": 3-1000 (30), \"multiplier\": above 0 (iqr, 1.5), \"confidence\": "
                         "0.5-1 (t, 0.99)}"))
    if _number(rule.get("tolerancePercent")) and rule["tolerancePercent"] < 0:
        problems.append((f"{path}.tolerancePercent", f"got {show(rule['tolerancePercent'])}; accepted: 0 or more"))
    if "severity" in rule and rule["severity"] not in ("warning", "blocker"):
        problems.append((f"{path}.severity", f"got {show(rule['severity'])}; accepted: \"warning\" or \"blocker\""))


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _find_secrets(node: Any, path: str, problems: list, secrets: list) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if isinstance(key, str) and key.lower() in SECRET_FIELDS:
                problems.append((child, "credentials must not be in the configuration file (a "
                                 "committed secret is a leak); pass them as action inputs or the "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables"))
                if isinstance(value, str) and value:
                    secrets.append(value)
            else:
                _find_secrets(value, child, problems, secrets)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _find_secrets(value, f"{path}[{index}]", problems, secrets)


def _warn_unknown(node: dict, path: str, known: set, warnings: list) -> None:
    import difflib
    for key in node:
        if key not in known and key.lower() not in SECRET_FIELDS:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            warnings.append(f"{where}: unknown key ignored ({hint}known keys: {', '.join(sorted(known))})")


def _section(parent: dict, path: str, problems: list, warnings: list) -> dict | None:
    """An object of the file at `path` (None when absent or not an object); unknown keys warned."""
    section = parent.get(path.rsplit(".", 1)[-1])
    if section is None:
        return None
    if not isinstance(section, dict):
        problems.append((path, f"must be an object, got {type_name(section)}"))
        return None
    _warn_unknown(section, path, KNOWN_KEYS[path], warnings)
    return section


def _string(section: dict | None, path: str, problems: list) -> str | None:
    value = (section or {}).get(path.rsplit(".", 1)[-1])
    if value is not None and (not isinstance(value, str) or not value):
        problems.append((path, f"must be a non-empty string, got {show(value)}"))
        return None
    return value


def _parse_storage(data: dict, problems: list, warnings: list) -> StorageConfiguration | None:
    storage = _section(data, "storage", problems, warnings)
    if storage is None:
        return None
    kind = storage.get("type", "s3")
    if kind not in STORAGE_TYPES:
        problems.append(("storage.type", f"got {show(kind)}; accepted: {', '.join(map(show, STORAGE_TYPES))}"))
    s3 = _section(storage, "storage.s3", problems, warnings)
    return StorageConfiguration("s3" if kind == "sqlite-s3" else kind, S3Configuration(
        *(_string(s3, f"storage.s3.{name}", problems) for name in ("endpoint", "bucket", "region"))))


def _parse_metrics(raw: Any, problems: list, warnings: list) -> list[MetricConfig]:
    if raw is None:
        problems.append(("metrics", "is required: an object of metric id → {\"type\", \"command\"}"))
        return []
    if isinstance(raw, list):  # the older array form: each entry names itself with "name"
        entries = []
        for index, entry in enumerate(raw):
            if not isinstance(entry, dict):
                problems.append((f"metrics[{index}]", f"must be an object, got {type_name(entry)}"))
                continue
            body = {k: v for k, v in entry.items() if k not in ("name", "id")}
            entries.append((f"metrics[{index}]", entry.get("id", entry.get("name")), body))
    elif isinstance(raw, dict):
        entries = [(f"metrics.{key}", key, value) for key, value in raw.items()]
    else:
        problems.append(("metrics", f"must be an object keyed by metric id, got {type_name(raw)}"))
        return []
    if not entries:
        problems.append(("metrics", "defines no metric; add at least one"))
    if len(entries) > 50:  # Unentropy's limit
        problems.append(("metrics", f"defines {len(entries)} metrics; accepted: at most 50"))
    metrics, seen = [], set()
    for path, metric_id, body in entries:
        metric = _parse_metric(path, metric_id, body, problems, warnings)
        if metric and metric.id in seen:
            problems.append((path, f"metric id {show(metric.id)} is defined twice"))
        elif metric:
            seen.add(metric.id)
            metrics.append(metric)
    return metrics


def _parse_metric(path: str, metric_id: Any, body: Any, problems: list, warnings: list) -> MetricConfig | None:
    before = len(problems)
    if not isinstance(metric_id, str) or not METRIC_ID.fullmatch(metric_id):
        problems.append((f"{path}" if path.startswith("metrics.") else f"{path}.name",
                         f"metric id {show(metric_id)} is invalid; accepted: 1-64 characters of "
                         "lowercase letters, digits and '-'"))
    if not isinstance(body, dict):
        problems.append((path, f"must be an object, got {type_name(body)}"))
        return None
    _warn_unknown(body, path, KNOWN_KEYS["metric"], warnings)
    template = body.get("$ref")
    if template is not None and template not in TEMPLATES:
        problems.append((f"{path}.$ref", f"got {show(template)}; accepted: {', '.join(TEMPLATES)}"))
        return None
    kind, unit, command, description = TEMPLATES.get(template, (None, None, None, None))
    if template and body.get("type", kind) != kind:
        warnings.append(f"{path}.type: ignored: the {template} template is {kind}")
    kind = kind or body.get("type")
    if kind not in ("numeric", "label"):
        problems.append((f"{path}.type", f"got {show(kind)}; accepted: \"numeric\" or \"label\""))
    command = body.get("command", command)
    if not isinstance(command, str) or not command.strip() or len(command) > 1024:
        no_default = f" (the {template} template has no default command)" if template else ""
        problems.append((f"{path}.command", f"got {show(command)}{no_default}; accepted: a non-empty "
                         "shell command of at most 1024 characters"))
    unit = body.get("unit", unit)
    if unit is not None and (not isinstance(unit, str) or not unit
                             or (unit not in UNITS and len(unit) > 10)):
        problems.append((f"{path}.unit", f"got {show(unit)}; accepted: {', '.join(UNITS)} "
                         "or a free text of at most 10 characters"))
    elif isinstance(unit, str) and unit not in UNITS:
        import difflib
        close = difflib.get_close_matches(unit.lower(), UNITS, n=1, cutoff=0.7)
        if close:  # a free-text unit is drawn as text; Unentropy refuses it outright
            warnings.append(f"{path}.unit: {show(unit)} is not a known unit, so values are shown as plain "
                            f"numbers followed by it; did you mean {show(close[0])}?")
    for name in ("name", "description"):
        value = body.get(name, "" if name in body else None)
        if name in body and (not isinstance(value, str) or len(value) > 256):
            problems.append((f"{path}.{name}", f"got {show(value)}; accepted: a string of at most "
                             "256 characters"))
    timeout = body.get("timeout")
    if timeout is not None and (not _whole(timeout) or not 0 < timeout <= 300_000):
        problems.append((f"{path}.timeout", f"got {show(timeout)}; accepted: a whole number of "
                         "milliseconds (as Unentropy) from 1 to 300000 (5 minutes)"))
    elif timeout is not None and timeout < 100:
        warnings.append(f"{path}.timeout: {show(timeout)} is in milliseconds (as in Unentropy), so "
                        f"the command gets {show(timeout)} ms; for seconds write {show(timeout * 1000)}")
    direction = body.get("direction", TEMPLATE_DIRECTIONS.get(template, "neutral"))
    direction = {"higher": "up", "lower": "down"}.get(direction, direction)
    if direction not in ("up", "down", "neutral"):
        problems.append((f"{path}.direction", f"got {show(direction)}; accepted: \"up\" (or \"higher\": "
                         "higher is better), \"down\" (or \"lower\") or \"neutral\""))
    repeat = body.get("repeat", 1)
    if not (_whole(repeat) and 1 <= repeat <= MAX_REPEAT):
        problems.append((f"{path}.repeat", f"got {show(repeat)}; accepted: a whole number of runs from 1 "
                         f"to {MAX_REPEAT} (the median is recorded)"))
    elif repeat > 1 and kind == "label":
        problems.append((f"{path}.repeat", f"got {show(repeat)}; accepted: 1 for a label metric (only "
                         "numbers have a median)"))
    if len(problems) > before:
        return None
    return MetricConfig(metric_id, kind, command, unit, body.get("name", template),
                        body.get("description", description),
                        timeout / 1000 if timeout is not None else None, direction, repeat)


MAX_REPEAT = 50


def endpoint_problem(value: str, allow_http: bool, allow_path: bool = False) -> str | None:
    """Why an endpoint URL is refused, or None when it is acceptable."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an absolute https:// URL with a host"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "must not contain user information (credentials go in the credential inputs)"
    if parts.query or parts.fragment or "?" in value or "#" in value:
        return "must not contain a query or fragment"
    if parts.path.strip("/") and not allow_path:
        first = parts.path.strip("/").split("/")[0]
        return (f"has a path (/{parts.path.strip('/')}): if {first!r} is your bucket, give it with "
                "--bucket (input s3-bucket) and the endpoint without it; for a gateway served under a "
                "path, pass --allow-endpoint-path (input allow-endpoint-path)")
    if parts.scheme == "http" and not (allow_http or is_loopback(host)):
        return ("uses http://, accepted only for loopback hosts or with --allow-http "
                "(input allow-http) for a private network")
    return None


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bucket_problem(name: str) -> str | None:
    """Why a bucket name breaks the S3 general-purpose bucket naming rules, or None."""
    if not 3 <= len(name) <= 63:
        return "must be 3 to 63 characters long"
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", name):
        return ("may contain only lowercase letters, digits, '.' and '-', and must start and "
                "end with a letter or digit")
    if ".." in name:
        return "must not contain '..'"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return "must not be formatted as an IP address"
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if name.startswith(prefix):
            return f"must not start with {prefix!r}"
    for suffix in ("-s3alias", "--ol-s3", ".mrap", "--x-s3"):
        if name.endswith(suffix):
            return f"must not end with {suffix!r}"
    return None


def local_path_problem(path: Path) -> str | None:
    """Why a local database path cannot be a database file, or None."""
    if path.is_dir():
        return f"is a folder; give the database file's path (e.g. {path / DEFAULT_DATABASE_KEY})"
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else f"is under {parent}, which is a file, not a folder"
    return None


def database_key_problem(key: str) -> str | None:
    if not key:
        return "must not be empty"
    if len(key.encode("utf-8")) > 1024:
        return "must be at most 1024 bytes of UTF-8"
    if key.startswith("/"):
        return "must not start with '/'"
    if ".." in key.split("/"):
        return "must not contain a '..' segment"
    return None


@dataclass(frozen=True)
class ActionParameters:
    """Everything one run needs, resolved from flags, action inputs, environment and file."""
    s3: S3Configuration
    credentials: S3Credentials | None
    storage_type: str = "s3"  # s3 | sqlite-local | sqlite-artifact
    storage_type_name: str = "sqlite-s3"  # as the user spelled it (the storage-type output)
    artifact_name: str = "unentropy-metrics"
    artifact_branch: str | None = None
    database_key: str = DEFAULT_DATABASE_KEY
    local_db: Path | None = None
    report_dir: Path = Path(DEFAULT_REPORT_DIR)
    workdir: Path = Path(".")
    addressing_style: str = "auto"
    retry_attempts: int = 5
    request_timeout: float = 30.0
    timeout: float = 300.0
    jobs: int = 1
    max_conflict_retries: int = 10
    conditional_writes: bool = True
    on_corrupt: str = "fail"
    backup: bool = True
    backup_every: float = 24.0  # hours between .bak refreshes (0: every upload)
    new_history: bool = False  # a missing key beside its backups starts a new history only when asked
    pass_env: tuple[str, ...] = ()  # credential variables the metric commands may see, by name
    integrity: str = "auto"  # auto (the trust chain) | full | quick
    commit: str | None = None
    branch: str | None = None
    run_id: str | None = None
    run_number: int | None = None
    event: str | None = None
    report_branch: str | None = None
    report: bool = True

    @property
    def location(self) -> str:
        if self.storage_type == "sqlite-artifact":
            return f"artifact {self.artifact_name}"
        if self.local_db is not None:
            return str(self.local_db)
        return f"s3://{self.s3.bucket}/{self.database_key}"

    @classmethod
    def from_sources(cls, args: argparse.Namespace, environ: Mapping[str, str],
                     config: Config, config_path: Path, storage: bool = True) -> "ActionParameters":
        """Resolve every parameter (flag → action input → environment → file) and validate it;
        without `storage`, none of the storage's (for runs that touch none)."""
        sources = _Sources(args, environ)
        problems: list[tuple[str, str]] = []
        missing: list[tuple[str, str]] = []
        storage_type = _storage_type(sources, args, environ, config, problems) if storage else "sqlite-local"
        key = sources.get("database_key", "database-key", (), config.database_key, "database.key")
        if key and (why := database_key_problem(key[0])) and storage_type != "sqlite-local":
            problems.append((key[1], f"{show(key[0])} {why}"))
        local_db = Path(args.local_db) if getattr(args, "local_db", None) else None
        if storage_type == "sqlite-artifact" and key and Path(key[0]).is_absolute():
            problems.append((key[1], f"{show(key[0])} must be relative: it is the artifact's file"))
        where = "--local-db"
        if storage_type == "sqlite-local" and local_db is None:
            local_db = Path(key[0] if key else DEFAULT_DATABASE_KEY)  # Unentropy: the key is a path
            where = key[1] if key else "database.key"
        if local_db is not None and (why := local_path_problem(local_db)):
            problems.append((where, f"{show(str(local_db))} {why}"))
        s3, credentials = S3Configuration(region="us-east-1"), None
        if storage_type == "s3":
            s3 = _s3_settings(sources, config, config_path, problems, missing)
            credentials = _credentials(sources, missing)
        numbers = {name: sources.number(name, input_name, default, low, high, problems, kind)
                   for name, input_name, default, low, high, kind in NUMERIC_PARAMETERS}
        style = sources.get("addressing_style", "addressing-style")
        if style and style[0] not in ("auto", "path", "virtual"):
            problems.append((style[1], f"got {show(style[0])}; accepted: auto, path, virtual"))
        on_corrupt = sources.get("on_corrupt", "on-corrupt")
        if on_corrupt and on_corrupt[0] not in ("fail", "restore", "recreate"):
            problems.append((on_corrupt[1], f"got {show(on_corrupt[0])}; accepted: fail, restore, recreate"))
        pass_env = _variable_names(sources, problems)
        if missing:
            raise TrackMetricsError(
                "PARAM_MISSING", "missing required parameters:\n" + "\n".join(
                    f"  {name}: give it with {how}" for name, how in missing), type="validation",
                details={"missing": [name for name, _ in missing]})
        if problems:
            raise config_error(problems, "PARAM_INVALID", "parameter")
        run_number = sources.get("run_number", None)
        return cls(
            s3=s3, credentials=credentials, storage_type=storage_type,
            storage_type_name=(sources.get("storage_type", "storage-type") or (
                {"s3": "sqlite-s3"}.get(storage_type, storage_type),))[0],
            artifact_name=(sources.get("artifact_name", "artifact-name") or ("unentropy-metrics",))[0],
            artifact_branch=(sources.get("artifact_branch", "artifact-branch-filter") or (None,))[0],
            database_key=key[0] if key else DEFAULT_DATABASE_KEY,
            local_db=local_db,
            report_dir=Path((sources.get("report_dir", "report-dir") or (config.report_dir or DEFAULT_REPORT_DIR,))[0]),
            workdir=Path(getattr(args, "workdir", None) or "."),
            addressing_style=style[0] if style else "auto",
            conditional_writes=not getattr(args, "no_conditional_writes", False),
            on_corrupt=on_corrupt[0] if on_corrupt else "fail",
            backup=not getattr(args, "no_backup", False),
            new_history=sources.flag("new_history", "new-history"), pass_env=pass_env,
            integrity=getattr(args, "integrity", None) or "auto",
            commit=getattr(args, "commit", None), branch=getattr(args, "branch", None),
            run_id=getattr(args, "run_id", None), event=getattr(args, "event", None),
            run_number=int(run_number[0]) if run_number else None,
            report_branch=getattr(args, "report_branch", None),
            report=not getattr(args, "no_report", False),
            **numbers)


def _variable_names(sources: "_Sources", problems: list) -> tuple[str, ...]:
    """--pass-env (repeatable, comma-separated) or input pass-env: names of variables."""
    given = getattr(sources.args, "pass_env", None) or []
    where = "--pass-env"
    if not given and sources.environ.get("INPUT_PASS-ENV", "").strip():
        given, where = [sources.environ["INPUT_PASS-ENV"]], "input pass-env"
    names = tuple(name for item in given for name in re.split(r"[\s,]+", item) if name)
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            problems.append((where, f"got {show(name)}; accepted: environment variable names such as GITHUB_TOKEN"))
    return names


def _storage_type(sources: "_Sources", args: argparse.Namespace, environ: Mapping[str, str],
                  config: Config, problems: list) -> str:
    """s3, sqlite-local or sqlite-artifact: the flag or input, else --local-db, else the file's
    storage.type, else S3 when a bucket or endpoint is given, else Unentropy's defaults (its
    action keeps history in artifacts; its configuration defaults to a local file)."""
    if getattr(args, "command", "run") == "test":
        return "sqlite-local"  # `test` touches no storage: nothing of it is needed
    found = sources.get("storage_type", "storage-type")
    if found and found[0] not in STORAGE_TYPES:
        problems.append((found[1], f"got {show(found[0])}; accepted: {', '.join(map(show, STORAGE_TYPES))}"))
        found = None
    if found:
        kind = found[0]
    elif getattr(args, "local_db", None):
        kind = "sqlite-local"
    elif config.storage is not None:
        kind = config.storage.type
    elif sources.get("bucket", "s3-bucket") or sources.get("endpoint", "s3-endpoint"):
        kind = "s3"
    else:
        kind = "sqlite-artifact" if environ.get("GITHUB_ACTIONS") == "true" else "sqlite-local"
    return "s3" if kind == "sqlite-s3" else kind


# (name, action input, default, minimum, maximum, type)
NUMERIC_PARAMETERS = (
    ("retry_attempts", "retry-attempts", 5, 1, 20, int),
    ("request_timeout", None, 30.0, 0.1, 3600, float),
    ("timeout", "timeout", 300.0, 1, 86400, float),
    ("jobs", "jobs", 1, 1, 64, int),
    ("max_conflict_retries", None, 10, 0, 100, int),
    ("backup_every", "backup-every", 24.0, 0, 87600, float),
)


class _Sources:
    """Looks a parameter up in precedence order: CLI flag, action input, environment, file."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]):
        self.args = args
        self.environ = environ

    def get(self, attr: str, input_name: str | None, env_names: Sequence[str] = (),
            file_value: str | None = None, file_path: str = "") -> tuple[str, str] | None:
        value = getattr(self.args, attr, None)
        if value is not None and value != "":
            return str(value), "--" + attr.replace("_", "-")
        if input_name and self.environ.get(f"INPUT_{input_name.upper()}", "").strip():
            return self.environ[f"INPUT_{input_name.upper()}"].strip(), f"input {input_name}"
        for name in env_names:
            if self.environ.get(name, "").strip():
                return self.environ[name].strip(), name
        if file_value is not None:
            return file_value, file_path
        return None

    def flag(self, attr: str, input_name: str) -> bool:
        if getattr(self.args, attr, False):
            return True
        return self.environ.get(f"INPUT_{input_name.upper()}", "").strip().lower() == "true"

    def number(self, attr, input_name, default, low, high, problems, kind):
        found = self.get(attr, input_name)
        if found is None:
            return default
        try:
            value = kind(found[0])
            if not low <= value <= high or (kind is float and not math.isfinite(value)):
                raise ValueError
            return value
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            problems.append((found[1], f"got {show(found[0])}; accepted: {what} from {low} to {high}"))
            return default


def _s3_settings(sources: _Sources, config: Config, config_path: Path, problems: list,
                 missing: list) -> S3Configuration:
    file_s3 = config.storage.s3 if config.storage else S3Configuration()
    endpoint = sources.get("endpoint", "s3-endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                           file_s3.endpoint, "storage.s3.endpoint")
    bucket = sources.get("bucket", "s3-bucket", (), file_s3.bucket, "storage.s3.bucket")
    region = sources.get("region", "s3-region", ("AWS_REGION", "AWS_DEFAULT_REGION"),
                         file_s3.region, "storage.s3.region")
    if config.storage is None and not any((endpoint, bucket)):
        raise TrackMetricsError(
            "CONFIG_STORAGE_MISSING",
            f"{config_path} has no \"storage\" block. Add one:\n"
            '  "storage": {"type": "s3", "s3": {"endpoint": "https://s3.eu-west-1.amazonaws.com",'
            ' "bucket": "my-metrics", "region": "eu-west-1"}}\n'
            "or run on a local file with --local-db PATH.", type="validation")
    if endpoint and (why := endpoint_problem(endpoint[0], sources.flag("allow_http", "allow-http"),
                                             sources.flag("allow_endpoint_path", "allow-endpoint-path"))):
        problems.append((endpoint[1], f"{show(endpoint[0])} {why}"))
    if bucket is None:
        missing.append(("bucket", "--bucket, input s3-bucket or storage.s3.bucket in the file"))
    elif why := bucket_problem(bucket[0]):
        problems.append((bucket[1], f"{show(bucket[0])} {why}"))
    if region and not REGION.fullmatch(region[0]):
        problems.append((region[1], f"{show(region[0])} is invalid; accepted: lowercase "
                         "letters, digits and '-' (e.g. eu-west-1, or auto for R2)"))
    return S3Configuration(endpoint[0] if endpoint else None, bucket[0] if bucket else None,
                           region[0] if region else "us-east-1")


def _credentials(sources: _Sources, missing: list) -> S3Credentials | None:
    key_id = sources.get("access_key_id", "s3-access-key-id", ("AWS_ACCESS_KEY_ID",))
    secret = sources.get("secret_access_key", "s3-secret-access-key", ("AWS_SECRET_ACCESS_KEY",))
    token = sources.get("session_token", "s3-session-token", ("AWS_SESSION_TOKEN",))
    if key_id is None and secret is None:
        found = credential_chain()
        if found is not None:
            return found
    if key_id is None:
        missing.append(("access key id", "input s3-access-key-id, the AWS_ACCESS_KEY_ID "
                        "environment variable, --access-key-id, or an AWS profile, web identity "
                        "token or instance role (botocore's credential chain)"))
    if secret is None:
        missing.append(("secret access key", "input s3-secret-access-key, the "
                        "AWS_SECRET_ACCESS_KEY environment variable or --secret-access-key"))
    if key_id is None or secret is None:
        return None
    for found in (key_id, secret, token):
        if found and re.search(r"[\x00-\x1f\x7f]", found[0]):  # a header cannot carry it; never echo it
            raise TrackMetricsError(
                "PARAM_INVALID", f"{found[1]} holds a line break or another control character (its value "
                "is not shown): copy the credential again without the trailing newline", type="validation")
    names = sorted({found[1] for found in (key_id, secret, token) if found})
    kind = ("flags" if names[0].startswith("--") else "action inputs" if names[0].startswith("input ")
            else "the environment")
    return S3Credentials(key_id[0], secret[0], token[0] if token else None,
                         f"{kind} ({', '.join(name.removeprefix('input ') for name in names)})")


def credential_chain() -> S3Credentials | None:
    """Credentials the way AWS users have them when no key is given: botocore's provider chain
    (AWS_PROFILE and the shared files, SSO, web identity, ECS, instance roles), imported only
    then. Temporary ones are refreshed by botocore as they near expiry."""
    try:
        from botocore.session import get_session
    except ImportError:
        return None  # the missing dependency is reported where S3 needs it
    try:
        provider = get_session().get_credentials()
        frozen = provider.get_frozen_credentials() if provider is not None else None
    except Exception as exc:  # a broken profile or an unreachable STS: say so, not a traceback
        raise TrackMetricsError("PARAM_INVALID", f"the AWS credential chain failed: {type(exc).__name__}: "
                                f"{str(exc)[:300]}", type="validation") from exc
    if frozen is None:
        return None
    return S3Credentials(frozen.access_key, frozen.secret_key, frozen.token, provider.method, provider)


SECRET_SOURCES = ("INPUT_S3-SECRET-ACCESS-KEY", "INPUT_S3-SESSION-TOKEN",
                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN")
SECRET_FLAGS = ("--secret-access-key", "--session-token")


def find_secrets(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Every secret value the process was given, found before anything else runs."""
    found = [environ[name].strip() for name in SECRET_SOURCES if environ.get(name, "").strip()]
    for index, arg in enumerate(argv):
        for flag in SECRET_FLAGS:
            if arg == flag and index + 1 < len(argv):
                found.append(argv[index + 1])
            elif arg.startswith(flag + "="):
                found.append(arg.split("=", 1)[1])
    return [value for value in found if value]


# ============================================================================================
# Storage (S3)
# ============================================================================================

@dataclass(frozen=True)
class DatabaseFile:
    key: str
    size: int
    last_modified: str | None
    etag: str | None
    version_id: str | None
    sha256: str
    location: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UploadResult:
    key: str
    etag: str | None
    version_id: str | None
    size: int
    last_modified: str | None
    sha256: str


class Conflict(Exception):
    """The object changed since it was downloaded (HTTP 412/409 on a conditional write)."""


class S3Error(Exception):
    """An error answer from the storage: the S3 code from its XML body (or the HTTP status)."""

    def __init__(self, status: int, code: str, message: str = "", *, region: str = "",
                 server_time: str = "", retry_after: float | None = None):
        super().__init__(f"{code or status}: {message}")
        self.status, self.code, self.message = status, code or str(status), message
        self.region, self.server_time, self.retry_after = region, server_time, retry_after

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status == 429 or self.code in UNAVAILABLE_CODES


AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity"}
UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "Throttling",
                     "ThrottlingException", "RequestTimeout"}
# What each authentication failure means, from the answer's code (never "check everything").
AUTH_MEANING = {
    "SignatureDoesNotMatch": "the secret access key does not match the access key id (the signature "
                             "did not verify): check the secret",
    "InvalidAccessKeyId": "unknown access key id: the key does not exist at this endpoint (another "
                          "provider's or account's key, or a deleted one)",
    "ExpiredToken": "the session token has expired; refresh the credentials (a longer session, or "
                    "the credential chain, which refreshes them)",
    "TokenRefreshRequired": "the session token has expired; refresh the credentials",
    "InvalidToken": "the session token is not valid for these keys (a stale or truncated token)",
    "InvalidSecurity": "the credentials' security token is not valid",
}
REGION_ANSWERS = {"AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect", "301", "307"}
PERMISSION_FOR = {"GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
                  "PutObject": "s3:PutObject",
                  "CopyObject": "s3:GetObject and s3:PutObject (the backup copy; --no-backup skips it)",
                  "DeleteObject": "s3:DeleteObject", "ListObjectVersions": "s3:ListBucketVersions",
                  "ListObjectsV2": "s3:ListBucket"}


def s3_error(exc: Exception, action: str, target: str) -> TrackMetricsError:
    """Classify a failed request into one of the S3_* codes, with what to check."""
    details = {"action": action, "target": target}
    if lasting_tls_error(exc):
        plain = "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc)
        return TrackMetricsError(
            "S3_NETWORK", f"{action} {target}: TLS failed ({type(exc).__name__}: {exc}), which retrying "
            "cannot change; " + ("the endpoint answers plain HTTP: use an http:// endpoint with "
                                 "--allow-http (input allow-http)" if plain else
                                 "check the endpoint's certificate (AWS_CA_BUNDLE names a CA bundle)"),
            retryable=False, details=details)
    if not isinstance(exc, S3Error):
        return TrackMetricsError(
            "S3_NETWORK", f"{action} {target}: network error ({type(exc).__name__}: {exc}); check "
            "the endpoint URL, DNS, TLS certificates and that the storage is reachable from this "
            "machine", retryable=True, details=details)
    code, status = exc.code, exc.status
    details.update(s3_code=code, http_status=status)
    if code == "RequestTimeTooSkewed":
        return TrackMetricsError("S3_CLOCK_SKEWED", f"{action} {target}: {clock_skew(exc)}; fix this "
                                 "machine's time (NTP): retrying cannot", details=details)
    if code in REGION_ANSWERS or (exc.region and code in ("AuthorizationHeaderMalformed", "400")):
        region = exc.region or "another region"
        return TrackMetricsError(
            "S3_WRONG_REGION", f"{action} {target}: the bucket is in {region}, and the request was "
            f"signed for another ({code}); pass --region {region} (input s3-region)", details=details)
    if code in AUTH_CODES:
        meaning = AUTH_MEANING.get(code, "the storage rejected the credentials")
        return TrackMetricsError("S3_AUTH_FAILED", f"{action} {target}: {meaning} ({code})", details=details)
    if code == "NoSuchBucket":
        return TrackMetricsError(
            "S3_BUCKET_NOT_FOUND", f"{action} {target}: the bucket does not exist (NoSuchBucket); "
            "check the bucket name, region and endpoint, or create the bucket", details=details)
    if code == "AccessDenied" or status == 403:
        permission = PERMISSION_FOR.get(action, "the needed permission")
        hint = (" (S3 also answers 403 instead of 404 for a missing object when s3:ListBucket is "
                "not granted)" if action in ("GetObject", "HeadObject") else "")
        return TrackMetricsError(
            "S3_ACCESS_DENIED", f"{action} {target}: access denied ({code}); the credentials "
            f"need {permission} on this key{hint}", details=details)
    if exc.retryable:
        return TrackMetricsError(
            "S3_UNAVAILABLE", f"{action} {target}: the storage is unavailable ({code}) after "
            "retries; try again later", retryable=True, details=details)
    return TrackMetricsError("S3_ERROR", f"{action} {target}: {code}: {exc.message}", details=details)


def lasting_tls_error(exc: BaseException) -> bool:
    """A TLS failure that a retry cannot change (a certificate, plain HTTP on an https:// URL),
    unlike a handshake cut short by the network."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError))


def clock_skew(error: S3Error) -> str:
    """How far this machine's clock is from the storage's, from the answer's <ServerTime>."""
    try:
        server = dt.datetime.fromisoformat(error.server_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "this machine's clock differs too much from the storage's (RequestTimeTooSkewed)"
    offset = time.time() - server
    size = f"about {round(abs(offset) / 60)} min" if abs(offset) >= 90 else f"{abs(offset):.0f} s"
    return f"this machine's clock is {'ahead of' if offset > 0 else 'behind'} the storage's by {size}"


def check_upload_size(size: int) -> None:
    if size > SINGLE_PUT_LIMIT:
        raise TrackMetricsError(
            "DB_TOO_LARGE", f"the database is {size:,} bytes, over the 5 GiB single-PUT limit; a "
            "multipart upload is not atomic everywhere and cannot carry a conditional write, so "
            "it is refused", type="storage")


def is_aws_endpoint(endpoint: str | None) -> bool:
    if not endpoint:
        return True
    from urllib.parse import urlsplit
    host = urlsplit(endpoint).hostname or ""
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def file_digests(path: Path) -> tuple[str, str, int]:
    """SHA-256 (hex), MD5 (base64, for Content-MD5) and size, in one pass over the file; the
    two hashes run on two cores (hashlib releases the GIL), which halves this at 256 MiB."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as handle, ThreadPoolExecutor(max_workers=1) as helper:
        while chunk := handle.read(CHUNK_SIZE):
            pending = helper.submit(md5.update, chunk)
            sha256.update(chunk)
            pending.result()
            size += len(chunk)
    return sha256.hexdigest(), base64.b64encode(md5.digest()).decode(), size


def utc_stamp(moment: dt.datetime) -> str:
    """The one form every build's timestamp is stored in (JavaScript's toISOString, as Unentropy
    writes it): everything orders builds by this string, so no other form may enter."""
    moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_stamp(text: Any) -> dt.datetime | None:
    """An ISO 8601 time with an offset (extended or basic form, `Z` or `±hh:mm`); None otherwise."""
    text = str(text or "").strip()
    basic = re.fullmatch(r"(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)", text)
    if basic:  # Python 3.10's fromisoformat reads the extended form only
        day, hours, minutes, seconds, fraction, offset = basic.group(1, 2, 3), *basic.group(4, 5, 6, 7, 8)
        text = f"{'-'.join(day)}T{hours}:{minutes}:{seconds}{fraction or ''}{offset}"
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def iso(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return None if value is None else str(value)


class S3Client:
    """The handful of S3 requests the tool makes, signed by botocore's SigV4 signer and sent
    with http.client. A full botocore client would load service models and endpoint rules:
    several times the start-up time and memory of everything else in a run.

    Each request is retried on connection errors, timeouts, 5xx and throttling, with jittered
    exponential backoff, up to `attempts` times (the same policy as botocore's standard mode).
    No checksum headers beyond Content-MD5 are sent: several providers reject them."""

    def __init__(self, params: ActionParameters, environ: Mapping[str, str],
                 warn: Callable[[str], None] = lambda message: None):
        import http.client  # here, not at the top: runs without S3 never need it
        from urllib.parse import urlsplit
        try:
            from botocore.auth import S3SigV4Auth
            from botocore.credentials import Credentials
        except ImportError:
            raise TrackMetricsError(
                "DEPENDENCY_MISSING", "S3 storage needs botocore, which is not installed: "
                "`python3 -m pip install botocore`, or run the file with `uv run track_metrics.py` "
                "or `pipx run track_metrics.py` (they read its PEP 723 header)", type="validation") from None
        class Signer(S3SigV4Auth):
            def payload(self, request):  # an upload's SHA-256 is known already: no second pass
                known = request.context.get("payload_sha256")
                return known if known and self._should_sha256_sign_payload(request) else super().payload(request)

        credentials = params.credentials
        self.signer = Signer(credentials.provider or Credentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token),
            "s3", params.s3.region)
        self.bucket = params.s3.bucket
        self.region, self.redirected, self.warn = params.s3.region, False, warn
        self.aws, self.refreshable = params.s3.endpoint is None, credentials.provider is not None
        endpoint = urlsplit(params.s3.endpoint or f"https://s3.{params.s3.region}.amazonaws.com")
        self.scheme, self.netloc = endpoint.scheme, endpoint.netloc
        self.base_path = endpoint.path.rstrip("/")
        style = params.addressing_style
        if style == "auto":  # virtual-hosted for AWS, except for dotted names TLS cannot cover
            style = "virtual" if is_aws_endpoint(params.s3.endpoint) and "." not in self.bucket else "path"
        self.virtual = style == "virtual"
        self.attempts = params.retry_attempts
        self.read_timeout = params.request_timeout
        self.connect_timeout = min(10.0, params.request_timeout)
        self.environ = environ
        self.httplib = http.client
        self.errors = (OSError, http.client.HTTPException)  # what the network can throw
        self._connection = None
        self._connection_used = 0.0

    def url(self, key: str, query: str = "") -> tuple[str, str]:
        """(host, path-with-query) of a key in the bucket."""
        from urllib.parse import quote
        host = f"{self.bucket}.{self.netloc}" if self.virtual else self.netloc
        path = self.base_path + ("" if self.virtual else "/" + self.bucket) + "/" + quote(key, safe="/~")
        return host, path + (f"?{query}" if query else "")

    def send(self, method: str, key: str, *, query: str = "", headers: Mapping[str, str] | None = None,
             body: Any = None, stream: bool = False, body_sha256: str | None = None
             ) -> http.client.HTTPResponse | tuple[int, dict, bytes]:
        """One request with retries. A 2xx answer comes back as (status, headers, body), or as
        the open response when `stream`; anything else raises S3Error or a network error."""
        attempt, refreshed = 0, False
        while True:
            attempt += 1
            host, target = self.url(key, query)
            if hasattr(body, "seek"):
                body.seek(0)
            try:
                response = self._send_once(method, host, target, dict(headers or {}), body, body_sha256)
                if 200 <= response.status < 300:
                    if stream:
                        return response
                    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
                error = parse_error(response.status, response.read(), dict(response.getheaders()))
            except self.errors as exc:
                self.close()
                if attempt >= self.attempts or isinstance(exc, socket.gaierror) or lasting_tls_error(exc):
                    raise  # a name that does not resolve, or a TLS failure, will not change on a retry
                time.sleep(random.uniform(0, min(5.0, 0.1 * 2 ** attempt)))
                continue
            if self.follow_region(error):  # as botocore's redirector: re-sign for it, once
                continue
            if error.code in ("ExpiredToken", "TokenRefreshRequired") and not refreshed and self.refresh():
                refreshed = True
                continue
            if not error.retryable or attempt >= self.attempts:
                raise error
            pause = error.retry_after if error.retry_after is not None else random.uniform(0, min(5.0, 0.1 * 2 ** attempt))
            time.sleep(min(pause, 60.0))  # the run's deadline (SIGALRM) still bounds it

    def follow_region(self, error: S3Error) -> bool:
        """A bucket in another region (AuthorizationHeaderMalformed with <Region>, 301 or 307 with
        x-amz-bucket-region): sign for that region from now on, and on AWS use its regional host.
        A custom endpoint keeps its host: the tool never moves to another one unasked."""
        if self.redirected or not error.region or error.region == self.region \
                or error.code not in REGION_ANSWERS | {"400"}:
            return False
        old, self.region, self.redirected = self.region, error.region, True
        self.signer._region_name = error.region
        if self.aws:
            self.netloc = f"s3.{error.region}.amazonaws.com"
            self.close()
        self.warn(f"the bucket is in {error.region}, not {old}: this run follows it; pass --region "
                  f"{error.region} (input s3-region) to save the extra request"
                  + ("" if self.aws else " (the endpoint's host is kept)"))
        return True

    def refresh(self) -> bool:
        """New credentials from the chain that supplied the expired ones (never for given keys)."""
        if not self.refreshable:
            return False
        fresh = credential_chain()
        if fresh is None:
            return False
        self.signer.credentials = fresh.provider
        self.warn("the session token had expired; refreshed the credentials from "
                  f"{fresh.source} and retried")
        return True

    def _send_once(self, method: str, host: str, target: str, headers: dict, body: Any,
                   body_sha256: str | None):
        from botocore.awsrequest import AWSRequest
        headers["Host"] = host
        headers["User-Agent"] = f"track_metrics/{__version__}"
        if method in ("PUT", "POST") and not any(name.lower() == "content-length" for name in headers):
            headers["Content-Length"] = str(body_length(body))  # S3 answers 411 without it
        request = AWSRequest(method=method, url=f"{self.scheme}://{host}{target}", data=body, headers=headers)
        request.context["payload_sha256"] = body_sha256
        self.signer.add_auth(request)
        connection, proxied = self._connect(host)
        connection.putrequest(method, f"{self.scheme}://{host}{target}" if proxied else target,
                              skip_host=True, skip_accept_encoding=True)
        for name, value in request.headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body is not None:
            connection.send(body)
        response = connection.getresponse()
        self._connection_used = time.monotonic()
        return response

    def _connect(self, host: str) -> tuple[http.client.HTTPConnection, bool]:
        """One kept-alive connection (through HTTP(S)_PROXY when the environment names one)."""
        if self._connection is not None and self._connection[0].sock is not None \
                and time.monotonic() - self._connection_used < 4:  # idle ones may be closed by now
            return self._connection
        self.close()
        from urllib.parse import urlsplit
        from urllib.request import getproxies_environment, proxy_bypass_environment
        proxies = getproxies_environment() if not proxy_bypass_environment(host.split(":")[0]) else {}
        proxy = proxies.get(self.scheme)
        address = urlsplit(proxy if "//" in proxy else "//" + proxy).netloc if proxy else host
        if self.scheme == "https":
            import ssl
            context = ssl.create_default_context(cafile=self.environ.get("AWS_CA_BUNDLE") or None)
            if not context.cert_store_stats()["x509_ca"]:  # a slim image without CA certificates
                import botocore
                context.load_verify_locations(os.path.join(os.path.dirname(botocore.__file__), "cacert.pem"))
            connection = self.httplib.HTTPSConnection(address, timeout=self.connect_timeout, context=context,
                                                     blocksize=CHUNK_SIZE)
            if proxy:
                connection.set_tunnel(host)
        else:
            connection = self.httplib.HTTPConnection(address, timeout=self.connect_timeout, blocksize=CHUNK_SIZE)
        connection.connect()
        connection.sock.settimeout(self.read_timeout)
        self._connection = (connection, bool(proxy) and self.scheme == "http")
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection[0].close()
            self._connection = None


def body_length(body: Any) -> int:
    """The bytes a request body will send: every request is framed by its Content-Length."""
    if body is None:
        return 0
    if hasattr(body, "fileno"):
        return os.fstat(body.fileno()).st_size - body.tell()
    return len(body)


def parse_error(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> S3Error:
    """The Code and Message of an S3 XML error body (HEAD answers have none: the status stands),
    with what a few answers add: the bucket's region, the server's time, a Retry-After."""
    code = message = region = server_time = ""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if body:
        import xml.etree.ElementTree as ElementTree
        try:
            root = ElementTree.fromstring(body)
            code, message = root.findtext("Code") or "", root.findtext("Message") or ""
            region, server_time = root.findtext("Region") or "", root.findtext("ServerTime") or ""
        except ElementTree.ParseError:
            message = body[:200].decode("utf-8", "replace")
    if not code:
        code = {403: "AccessDenied", 404: "NotFound", 409: "ConditionalRequestConflict",
                412: "PreconditionFailed"}.get(status, str(status))
    retry_after = headers.get("retry-after", "")
    return S3Error(status, code, message, region=region or headers.get("x-amz-bucket-region", ""),
                   server_time=server_time or iso_from_http_date(headers.get("date", "")),
                   retry_after=float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after) else None)


def iso_from_http_date(value: str) -> str:
    from email.utils import parsedate_to_datetime
    try:
        return parsedate_to_datetime(value).isoformat() if value else ""
    except (TypeError, ValueError):
        return ""


WRONG_ETAG = '"0123456789abcdef0123456789abcdef"'
WRONG_PRECONDITIONS = (("If-None-Match: * on an existing object", {"If-None-Match": "*"}),
                       ("a wrong If-Match", {"If-Match": WRONG_ETAG}))
PROBE_BODY = b"track_metrics probe"
ETAG_FORMS = ("quoted", "unquoted")  # as AWS documents If-Match; as Ceph RGW accepts it


def bare_etag(etag: str) -> str:
    return etag.strip().strip('"')


def etag_in(form: str, etag: str) -> str:
    return f'"{bare_etag(etag)}"' if form == "quoted" else bare_etag(etag)


def same_etag(first: str | None, second: str | None) -> bool:
    return bool(first and second) and bare_etag(first).lower() == bare_etag(second).lower()


def changed_since(head: dict | None, previous: DatabaseFile | None) -> bool:
    """Whether the object (its HEAD, None if missing) is no longer the one downloaded."""
    if head is None or previous is None:
        return (head is None) != (previous is None)
    return not same_etag(head.get("etag"), previous.etag)


@dataclass(frozen=True)
class Conditions:
    """How a provider's conditional requests work, learned once per endpoint by the probe and
    remembered in the object's metadata (the stamp): which ETag form its If-Match accepts, and
    whether it honours a copy's precondition (when not, every copy is checked afterwards)."""
    etag_form: str
    copy_checked: bool

    def if_match(self, etag: str) -> str:
        return etag_in(self.etag_form, etag)

    def stamp(self, host: str) -> str:
        return (f"honoured if-match={self.etag_form} "
                f"copy-if-match={'honoured' if self.copy_checked else 'ignored'} {host}")

    @classmethod
    def from_stamp(cls, stamp: str | None, host: str) -> "Conditions | None":
        found = re.fullmatch(r"honoured if-match=(quoted|unquoted) copy-if-match=(honoured|ignored) (\S+)",
                             stamp or "")
        if not found or found.group(3) != host:
            return None  # another endpoint's, or an older tool's that never tried the right ETag
        return cls(found.group(1), found.group(2) == "honoured")

    def describe(self) -> str:
        return (f"If-Match with the {self.etag_form} ETag"
                + (" (as AWS documents it)" if self.etag_form == "quoted" else " (the server refuses it quoted)")
                + "; copies: " + ("the precondition is honoured" if self.copy_checked
                                  else "the precondition is ignored, so each copy is checked afterwards"))


class S3Storage:
    """The database object in an S3-compatible bucket."""

    def __init__(self, params: ActionParameters, console: Console, writer: str,
                 environ: Mapping[str, str] | None = None):
        self.params = params
        self.bucket = params.s3.bucket
        self.key = params.database_key
        self.location = params.location
        self.console = console
        self.writer = writer
        self.http = S3Client(params, os.environ if environ is None else environ, console.warning)
        self._etag_mismatch: str | None = None  # SHA-256 of a download its ETag did not match
        self.landed = False  # the storage accepted this run's upload
        self.conditions: Conditions | None = None  # learn_conditions: once per run
        self.versioning: str | None = None  # keeps_versions: "enabled" or "off"

    def _call(self, action: str, method: str, key: str, **request: Any) -> tuple[int, dict, bytes]:
        self.console.debug(f"  {action} s3://{self.bucket}/{key}")
        try:
            return self.http.send(method, key, **request)
        except S3Error as exc:
            if exc.status in (409, 412):
                raise Conflict(exc.code) from exc
            raise s3_error(exc, action, f"s3://{self.bucket}/{key}") from exc
        except self.http.errors as exc:
            if isinstance(exc, socket.gaierror):
                host = self.http.url(key)[0].rsplit(":", 1)[0]
                raise TrackMetricsError(
                    "S3_NETWORK", f"{action} s3://{self.bucket}/{key}: the host {host} does not resolve "
                    f"({exc.strerror or exc}); check the endpoint URL for a typo", retryable=False,
                    details={"action": action, "host": host}) from exc
            raise s3_error(exc, action, f"s3://{self.bucket}/{key}") from exc

    def fetch(self, dest: Path, key: str | None = None, version_id: str | None = None) -> DatabaseFile | None:
        """Download an object into `dest`; None only when the key does not exist (NoSuchKey).
        Requests are retried by S3Client; an error while reading the body is retried here."""
        received = set()  # the SHA-256 of each download that did not match its metadata
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                return self._fetch_once(dest, key or self.key, version_id)
            except TrackMetricsError as exc:
                received.add(exc.details.get("received_sha256"))
                if exc.code == "CHECKSUM_MISMATCH" and attempt == DOWNLOAD_ATTEMPTS and len(received) == 1 \
                        and None not in received:
                    source = f"s3://{self.bucket}/{key or self.key}"
                    raise TrackMetricsError(
                        "CHECKSUM_MISMATCH", f"{exc.message}, on each of {attempt} downloads: the stored "
                        "bytes are stable but are not the ones their metadata names (damaged, or written "
                        "with another object's metadata), so retrying cannot help. Restore the backup "
                        f"(`aws s3 cp {source}.bak {source}`) or an older version; nothing was written",
                        retryable=False) from None
                if exc.code not in ("CHECKSUM_MISMATCH", "S3_NETWORK") or not exc.retryable \
                        or attempt == DOWNLOAD_ATTEMPTS:
                    raise
                self.console.warning(f"download attempt {attempt} failed ({exc.message}); "
                                     "downloading again")
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _fetch_once(self, dest: Path, key: str, version_id: str | None) -> DatabaseFile | None:
        from urllib.parse import quote
        location = f"s3://{self.bucket}/{key}"
        try:
            response = self._call("GetObject", "GET", key, stream=True,
                                  query=f"versionId={quote(version_id, safe='')}" if version_id else "")
        except TrackMetricsError as exc:
            if exc.details.get("s3_code") == "NoSuchKey":
                return None
            raise
        headers = {k.lower(): v for k, v in response.getheaders()}
        expected = int(headers.get("content-length", -1))
        metadata = object_metadata(headers)
        md5 = None if metadata.get("sha256") else content_md5(headers)
        digest, size = hashlib.sha256(), 0
        try:
            with open(dest, "wb") as handle:
                while chunk := response.read(CHUNK_SIZE):
                    handle.write(chunk)
                    digest.update(chunk)
                    if md5:
                        md5.update(chunk)
                    size += len(chunk)
        except self.http.errors as exc:
            self.http.close()
            if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, ConnectionError):
                raise  # a local disk problem, not the network's
            raise TrackMetricsError("S3_NETWORK", f"reading the body of {location} failed "
                                    f"after {size} bytes: {type(exc).__name__}", retryable=True)
        sha256 = digest.hexdigest()
        if expected >= 0 and size != expected:
            self.http.close()
            raise TrackMetricsError("CHECKSUM_MISMATCH", f"{location}: received {size} bytes "
                                    f"of {expected}", retryable=True)
        if metadata.get("sha256") and metadata["sha256"] != sha256:
            raise TrackMetricsError("CHECKSUM_MISMATCH", f"{location}: SHA-256 of the "
                                    f"downloaded bytes is {sha256}, the object's metadata says "
                                    f"{metadata['sha256']}", retryable=True, details={"received_sha256": sha256})
        etag = headers.get("etag", "").strip('"').lower()
        if md5 and md5.hexdigest() != etag:
            if self._etag_mismatch == sha256:  # the same bytes twice: the ETag is not their MD5
                self.console.warning(f"{location}: its ETag is not the MD5 of its content (the "
                                     "provider computes it otherwise), so this download was "
                                     "checked by downloading it twice instead")
            else:
                self._etag_mismatch = sha256
                raise TrackMetricsError("CHECKSUM_MISMATCH", f"{location}: MD5 of the downloaded "
                                        f"bytes is {md5.hexdigest()}, the object's ETag says {etag}",
                                        retryable=True)
        return DatabaseFile(key, size, headers.get("last-modified"), headers.get("etag"),
                            headers.get("x-amz-version-id"), sha256, location, metadata)

    def stat(self, key: str) -> dict | None:
        """HEAD an object: its headers, None for 404. Only after the bucket is known to exist."""
        try:
            return self._call("HeadObject", "HEAD", key)[1]
        except TrackMetricsError as exc:
            if exc.details.get("http_status") == 404:
                return None
            raise

    def store(self, path: Path, previous: DatabaseFile | None, sha256: str, md5: str, size: int,
              generation: int, successor_holds_build: Callable[[], bool], checked: str = "",
              history: int = 0) -> UploadResult:
        """One streaming PUT from the file, conditional on the object we started from, and the
        proof that the object now holds this run's build."""
        check_upload_size(size)
        headers = {"Content-Length": str(size), "Content-MD5": md5, "Content-Type": CONTENT_TYPE,
                   "x-amz-meta-sha256": sha256, "x-amz-meta-tool-version": __version__,
                   "x-amz-meta-writer": self.writer, "x-amz-meta-generation": str(generation)}
        if checked:  # the trust chain: the next run's download of these bytes needs only quick_check
            headers["x-amz-meta-checked"] = checked
        if history:  # builds kept and pruned: what a backup must never lose (see backup)
            headers["x-amz-meta-history"] = str(history)
        if self.versioning or (previous and previous.metadata.get("versioning")):  # keeps_versions' verdict
            headers["x-amz-meta-versioning"] = self.versioning or previous.metadata["versioning"]
        conditional = self.params.conditional_writes
        if conditional:
            conditions = self.learn_conditions(previous)
            headers["x-amz-meta-conditional-writes"] = conditions.stamp(self.host)
            headers.update({"If-Match": conditions.if_match(require_etag(previous))} if previous
                           else {"If-None-Match": "*"})
        try:
            with open(path, "rb") as body:
                response = self._call("PutObject", "PUT", self.key, headers=headers, body=body,
                                      body_sha256=sha256)[1]
        except Conflict as conflict:
            # A retried PUT can land and still answer 412: look before calling it a conflict.
            head = self.stat(self.key)
            if not self._is_ours(head, sha256):
                self.refused_matching(conflict, head, previous, headers)
                raise
            response = head
        except TrackMetricsError as exc:
            if exc.details.get("s3_code") == "NoSuchKey" and previous is not None:
                raise Conflict("object deleted since download") from exc
            if not exc.retryable:
                raise
            # Every answer was lost or refused (a race's loser can get a 500): the PUT may have
            # landed all the same, or another run's may have, which is a conflict like a 412.
            head = self.stat(self.key)
            if conditional and not self._is_ours(head, sha256) and changed_since(head, previous):
                raise Conflict(f"{exc.code} while the object changed") from exc
            try:
                return self._verify(sha256, size, generation, head, successor_holds_build)
            except TrackMetricsError:
                raise exc from None
        self.landed = True  # the storage accepted it; what follows only proves it
        return self._verify(sha256, size, generation, self.stat(self.key), successor_holds_build,
                            response)

    def refused_matching(self, conflict: Conflict, head: dict | None, previous: DatabaseFile | None,
                         headers: Mapping[str, str]) -> None:
        """A 412 while the object is still the one the precondition named: no other run wrote,
        the server refused a matching precondition. Retrying would only repeat it."""
        if changed_since(head, previous):
            return  # a real conflict
        sent = f"If-Match: {headers['If-Match']}" if "If-Match" in headers else "If-None-Match: *"
        raise TrackMetricsError(
            "S3_CONDITIONAL_WRITES_UNSUPPORTED", f"the storage refused {sent} ({conflict}) although "
            f"{self.location} is still {'missing' if head is None else 'the object with that ETag'}: no other "
            "run wrote it, the server refuses a matching precondition. Nothing was written; run "
            "`track_metrics.py check` to see which conditional requests this endpoint accepts",
            details={"sent": sent, "answer": str(conflict)}) from conflict

    def _is_ours(self, head: dict | None, sha256: str) -> bool:
        metadata = object_metadata(head or {})
        return head is not None and metadata.get("writer") == self.writer and metadata.get("sha256") == sha256

    def _verify(self, sha256: str, size: int, generation: int, head: dict | None,
                successor_holds_build: Callable[[], bool], response: dict | None = None) -> UploadResult:
        """Success needs proof: the object read back (HEAD) is this run's upload, whole, or a
        successor (a higher generation by another writer) whose history holds this build."""
        if head is None:
            raise TrackMetricsError("S3_UPLOAD_UNVERIFIED", f"{self.location} is missing right "
                                    "after the upload")
        metadata = object_metadata(head)
        result = UploadResult(self.key, (response or head).get("etag"),
                              (response or head).get("x-amz-version-id"), size,
                              head.get("last-modified"), sha256)
        if self._is_ours(head, sha256):
            if int(head.get("content-length", -1)) != size:
                raise TrackMetricsError("S3_UPLOAD_UNVERIFIED", f"{self.location} holds "
                                        f"{head.get('content-length')} bytes after uploading {size}")
            self.landed = True
            return result
        successor = metadata.get("generation", "")
        if successor.isdigit() and int(successor) > generation and metadata.get("sha256") != sha256 \
                and successor_holds_build():
            self.landed = True
            self.console.info("upload: a concurrent run has already updated the object after ours, "
                              "and its history holds this build")
            return result
        self.landed = False  # whatever the storage accepted, the object does not hold this build
        raise TrackMetricsError(
            "S3_UPLOAD_UNVERIFIED", f"{self.location} does not hold this run's build: it holds "
            f"generation {successor[:20] or 'unknown'} by another writer, not a successor with this "
            "build in it (the storage dropped the write, or a writer without conditional writes "
            "replaced it)")

    def copy(self, previous: DatabaseFile, target: str) -> None:
        """Server-side copy of the current object, only while it is still the one that was
        downloaded (412 if it changed). Never by version id: a slow run that lost the race
        would copy an old version over a newer one. Where the server ignores the copy's
        precondition, the copy is checked afterwards: a backup is never silently another object."""
        headers = {"x-amz-metadata-directive": "COPY"}
        if previous.etag:
            headers["x-amz-copy-source-if-match"] = previous.etag
        body = self._copy(self.key, target, headers)
        if self.conditions is None or not self.conditions.copy_checked:
            self.check_copy(previous, target, body)

    def _copy(self, source: str, target: str, headers: Mapping[str, str]) -> bytes:
        from urllib.parse import quote
        headers = {"x-amz-copy-source": f"/{self.bucket}/{quote(source, safe='/~')}", **headers}
        _, _, body = self._call("CopyObject", "PUT", target, headers=headers)
        if b"<Error>" in body[:512]:  # S3 can answer a failed copy with 200 and an error body
            error = parse_error(500, body)
            raise s3_error(error, "CopyObject", f"s3://{self.bucket}/{target}")
        return body

    def check_copy(self, previous: DatabaseFile, target: str, answer: bytes) -> None:
        """The copy is the downloaded object: the same ETag, or (a multipart source's copy gets
        a new one) the same SHA-256 in its metadata. Otherwise the source changed: a conflict."""
        copied = re.search(rb"<ETag>([^<]*)</ETag>", answer)
        if copied and same_etag(html.unescape(copied.group(1).decode("utf-8", "replace")), previous.etag):
            return
        head = self.stat(target)
        if head and (same_etag(head.get("etag"), previous.etag)
                     or object_metadata(head).get("sha256") == previous.sha256):
            return
        self.console.warning(f"s3://{self.bucket}/{target} is not the downloaded object (the source "
                             "changed before the copy, and this server ignores a copy's precondition); "
                             "copying again from the newer object")
        raise Conflict("the copy's source changed")

    def backup(self, previous: DatabaseFile, destructive: bool = False) -> None:
        """Keep the version about to be replaced as `<key>.bak` when the backup is older than
        --backup-every hours (or the change removes history), unless the bucket keeps versions
        (they are the backups) or the backup holds a longer history (builds kept plus builds
        pruned, which only grows) than the object: then the backup is a history that was lost
        or restarted (--new-history), and the last copy of it stays."""
        head = self.stat(self.key + ".bak")
        kept, current = object_metadata(head or {}).get("history", ""), previous.metadata.get("history", "")
        if kept.isdigit() and current.isdigit() and int(kept) > int(current):
            self.console.warning(f"{self.location}.bak holds a longer history ({kept} builds, with the "
                                 f"pruned ones) than the object ({current}): it is kept, not overwritten")
            return
        modified = iso_from_http_date((head or {}).get("last-modified", ""))
        age = (now_utc() - dt.datetime.fromisoformat(modified)).total_seconds() / 3600 if modified else None
        if age is not None and age < self.params.backup_every and not destructive:
            self.console.debug(f"  backup: {self.key}.bak is {age:.1f} h old (refreshed every "
                               f"{self.params.backup_every:g} h)")
        elif not self.keeps_versions(previous.metadata.get("versioning")):
            self.copy(previous, self.key + ".bak")

    def keeps_versions(self, stamped: str | None = None) -> bool:
        """Whether the bucket keeps older versions: the object's stamp, else asked once
        (GetBucketVersioning; refused counts as no) and stamped like the conditional-write verdict."""
        self.versioning = self.versioning or stamped
        if self.versioning is None:
            try:
                body = self._call("GetBucketVersioning", "GET", "", query="versioning")[2]
                self.versioning = "enabled" if b"<Status>Enabled</Status>" in body else "off"
            except TrackMetricsError as exc:
                self.console.debug(f"  backup: bucket versioning unknown ({exc.code}): keeping .bak")
                self.versioning = "off"
        return self.versioning == "enabled"

    def backup_policy(self) -> str:
        """What `check` says of the backups."""
        if not self.params.backup:
            return "none (--no-backup)"
        if self.keeps_versions():
            return "bucket versioning is on: older versions are the backups (no .bak copy)"
        return (f"{self.key}.bak, refreshed when older than {self.params.backup_every:g} h and before every "
                "prune; turn on bucket versioning to keep every version instead")

    @property
    def host(self) -> str:
        from urllib.parse import urlsplit
        return urlsplit(self.params.s3.endpoint or "").hostname or "aws"

    @property
    def probe_key(self) -> str:
        return f"{self.key}.probe-{self.writer[:12]}"

    def learn_conditions(self, expected: DatabaseFile | None) -> Conditions:
        """How this endpoint's conditional writes work: the stamp of the object when it was
        written through this endpoint, else the probe's answer. A provider that ignores
        preconditions, or refuses the right one in every form, would lose builds: refused."""
        if self.conditions is None:
            self.conditions = Conditions.from_stamp(
                (expected.metadata if expected else {}).get("conditional-writes"), self.host)
        if self.conditions is None:
            self.conditions, why = self.probe_conditions()
            if self.conditions is None:
                raise TrackMetricsError(
                    "S3_CONDITIONAL_WRITES_UNSUPPORTED", f"{why}, so concurrent runs would silently "
                    "overwrite each other's builds. Nothing was written. If only one run at a time "
                    "ever writes this key (a CI concurrency group), pass --no-conditional-writes",
                    type="storage")
            self.console.debug(f"  conditional writes: {self.conditions.describe()}")
        return self.conditions

    def put_probe(self) -> str:
        """PUT the probe object; its ETag (the answer's, else a HEAD's)."""
        try:
            headers = self._call("PutObject", "PUT", self.probe_key, body=PROBE_BODY)[1]
        except TrackMetricsError as exc:
            exc.message += (f"; the conditional-write check writes s3://{self.bucket}/{self.key}.probe-*: "
                            "grant s3:PutObject and s3:DeleteObject there too")
            raise
        return headers.get("etag") or (self.stat(self.probe_key) or {}).get("etag", "")

    def refusal(self, **condition: str) -> str:
        """The answer to a conditional PUT of the probe object: "" when it was accepted."""
        try:
            self._call("PutObject", "PUT", self.probe_key, headers=condition, body=PROBE_BODY)
            return ""
        except Conflict as refused:
            return f"{refused.__cause__.status} {refused}" if isinstance(refused.__cause__, S3Error) else str(refused)

    def try_conditions(self, etag: str) -> tuple[Conditions | None, str]:
        """On the probe object (ETag `etag`): wrong preconditions must be refused, the right one
        accepted in one of its forms; then whether a copy's wrong precondition is refused.
        The conditions, or None and why not (with the server's exact answers)."""
        accepted = [label for label, condition in WRONG_PRECONDITIONS if not self.refusal(**condition)]
        if accepted:
            return None, f"the storage accepted {' and '.join(accepted)}: it ignores conditional writes"
        answers = []
        for form in ETAG_FORMS:
            answer = self.refusal(**{"If-Match": etag_in(form, etag)})
            if not answer:
                break
            answers.append(f"If-Match: {etag_in(form, etag)} got {answer}")
        else:
            return None, ("the storage refused If-Match with the object's own ETag in every form ("
                          + "; ".join(answers) + ")")
        copy = self.probe_key + "-copy"
        try:
            self._copy(self.probe_key, copy, {"x-amz-copy-source-if-match": WRONG_ETAG})
            copy_checked = False
            self.remove(copy)
        except Conflict:
            copy_checked = True
        conditions = Conditions(form, copy_checked)
        return conditions, conditions.describe()

    def probe_conditions(self) -> tuple[Conditions | None, str]:
        """try_conditions on a probe object beside the database key, which is removed again."""
        etag = self.put_probe()
        try:
            return self.try_conditions(etag)
        finally:
            self.remove(self.probe_key)

    def delete(self, key: str) -> None:
        self._call("DeleteObject", "DELETE", key)

    def remove(self, key: str) -> None:
        """Delete a probe object; a failure is only a warning (the verdict stands)."""
        try:
            self.delete(key)
        except TrackMetricsError as exc:
            self.console.warning(f"could not remove the probe object ({exc.code}); delete "
                                 f"s3://{self.bucket}/{key} or grant s3:DeleteObject")

    def other_databases(self) -> list[str]:
        """The other `.db` objects in the key's folder (one ListObjectsV2 request)."""
        import xml.etree.ElementTree as ElementTree  # the storage's own answer, not user data
        from urllib.parse import quote
        folder = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
        # The prefix without its last '/', filtered here: fewer query values need a '%2F'.
        query = "list-type=2&max-keys=1000" + (f"&prefix={quote(folder[:-1], safe='')}" if folder else "")
        body = self._call("ListObjectsV2", "GET", "", query=query)[2]
        keys = [node.text or "" for node in ElementTree.fromstring(body).iter()
                if node.tag.rsplit("}", 1)[-1] == "Key"]
        return [key for key in keys if key.startswith(folder) and "/" not in key[len(folder):]
                and key.endswith(".db") and key != self.key]

    def older_versions(self) -> list[str]:
        """Version ids of the database key, newest first, without the current one."""
        import xml.etree.ElementTree as ElementTree  # the storage's own answer, not user data
        from urllib.parse import quote
        body = self._call("ListObjectVersions", "GET", "", query=f"prefix={quote(self.key, safe='')}&versions")[2]
        versions = []
        for version in ElementTree.fromstring(body).iter():
            if version.tag.rsplit("}", 1)[-1] != "Version":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in version}
            if fields.get("Key") == self.key and fields.get("IsLatest") != "true" \
                    and fields.get("VersionId") not in ("", "null"):
                versions.append(fields["VersionId"])
        return versions  # S3 lists a key's versions newest first


def content_md5(headers: Mapping[str, str]):
    """An MD5 to check a download against, when its ETag is the MD5 of the content: S3 and
    most providers make it so for a single-part upload without KMS or customer-key encryption."""
    etag = headers.get("etag", "").strip('"')
    encryption = headers.get("x-amz-server-side-encryption", "").lower()
    if not re.fullmatch(r"[0-9a-fA-F]{32}", etag) or encryption.startswith("aws:kms") \
            or "x-amz-server-side-encryption-customer-algorithm" in headers:
        return None
    return hashlib.md5(usedforsecurity=False)


def require_etag(previous: DatabaseFile) -> str:
    if not previous.etag:
        raise TrackMetricsError(
            "S3_NO_ETAG", f"the storage answered the download of {previous.location} without an "
            "ETag, which a conditional write needs; nothing was written. If only one run at a "
            "time ever writes this key, pass --no-conditional-writes")
    return previous.etag


def object_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    return {name[len("x-amz-meta-"):]: value for name, value in headers.items()
            if name.lower().startswith("x-amz-meta-")}


class LocalStorage:
    """A database file on this machine (--local-db): same pipeline, no network. A run holds an
    exclusive lock on the file's folder from download to upload, so two runs at once queue
    instead of losing a build."""

    def __init__(self, path: Path, console: Console | None = None):
        self.path = Path(os.path.realpath(path))  # a link's target: lock its folder, replace it
        self.key = path.name
        self.location = str(path) if self.path == path.absolute() else f"{path} (-> {self.path})"
        self.console = console
        self.landed = False
        self._lock: int | None = None

    def lock(self) -> None:
        """Take the folder's lock (waiting for another run to finish), then tidy what a killed
        run left: with the lock held, no staging file can belong to a live run."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the SHA-256 check in store still guards
            return
        if not self.path.parent.is_dir() and self.console:
            self.console.info(f"download: creating the folder {self.path.parent} for {self.location}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.path.parent, os.O_RDONLY)
        except OSError as exc:
            raise TrackMetricsError("LOCAL_IO_FAILED", f"cannot use the folder {self.path.parent}: "
                                    f"{exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.console:
                self.console.info(f"download: another run is using {self.location}; waiting for it")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        import glob
        for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def sidecars(self) -> list[Path]:
        return [Path(f"{self.path}{suffix}") for suffix in ("-journal", "-wal")
                if Path(f"{self.path}{suffix}").exists()]

    def fingerprint(self) -> str | None:
        """The file's SHA-256, and its journal's or WAL's: a commit to either is a change."""
        if not self.path.exists():
            return None
        return "+".join(file_digests(path)[0] for path in [self.path, *self.sidecars()])

    def readable_in_place(self) -> bool:
        """Whether a reader may read the file itself, read-only: nothing beside it to apply and
        not in WAL mode (whose readers leave files beside it)."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read(20)[18:20] != b"\x02\x02" and not self.sidecars()
        except OSError:
            return False

    def fetch(self, dest: Path) -> DatabaseFile | None:
        """A copy of the database as SQLite reads it: a crashed writer's hot journal rolled back,
        a WAL's commits applied (a plain copy of the file would take neither); with `dest` the
        file itself (a reader's, when readable_in_place), nothing is copied or hashed."""
        if not self.path.exists():
            return None
        try:
            status = self.path.stat()
            modified = iso(dt.datetime.fromtimestamp(status.st_mtime, dt.timezone.utc))
            if dest == self.path:
                return DatabaseFile(self.key, status.st_size, modified, None, None, "", self.location)
            if self.sidecars():
                self.read_through_sqlite(dest)
            else:
                shutil.copyfile(self.path, dest)
        except OSError as exc:
            raise TrackMetricsError("LOCAL_IO_FAILED", f"cannot read {self.location}: {exc.strerror or exc}") from exc
        sha256, _, size = file_digests(dest)
        return DatabaseFile(self.key, size, modified, self.fingerprint(), None, sha256, self.location)

    def read_through_sqlite(self, dest: Path) -> None:
        dest.unlink(missing_ok=True)
        try:
            source = sqlite3.connect(self.path)
            try:
                source.execute("PRAGMA trusted_schema=OFF")
                target = sqlite3.connect(dest)
                try:
                    source.backup(target)
                    target.execute("PRAGMA journal_mode=DELETE")
                finally:
                    target.close()
            finally:
                source.close()  # the last connection: SQLite checkpoints and removes the WAL
        except sqlite3.Error as exc:
            raise TrackMetricsError("DB_CORRUPT", f"{self.location} cannot be read with its "
                                    f"{' and '.join(p.name for p in self.sidecars()) or 'journal'}: {exc}; "
                                    "nothing was changed") from exc

    def store(self, path: Path, previous: DatabaseFile | None, sha256: str, md5: str, size: int,
              generation: int, successor_holds_build: Callable[[], bool], checked: str = "",
              history: int = 0) -> UploadResult:
        if self.fingerprint() != (previous.etag if previous else None):
            raise Conflict("the local database changed during the run")
        # What a journal or WAL left beside the file is in this run's copy already; beside the new
        # file SQLite would roll it back or replay it over the new history on the next open.
        try:
            for sidecar in (*self.sidecars(), Path(f"{self.path}-shm")):
                sidecar.unlink(missing_ok=True)
            replace_file(path, self.path)
        except OSError as exc:
            raise TrackMetricsError("LOCAL_IO_FAILED", f"cannot write {self.location}: {exc.strerror or exc} "
                                    f"(check the folder's permissions and free space)") from exc
        self.landed = True
        return UploadResult(self.key, sha256, None, size, iso(dt.datetime.now(dt.timezone.utc)), sha256)

    def backup(self, previous: DatabaseFile, destructive: bool = False) -> None:
        """Local files are the user's own; no backup copy is made."""


def open_storage(params: "ActionParameters", console: Console, environ: Mapping[str, str], workspace: Path,
                 writer: str) -> "S3Storage | LocalStorage | ArtifactStorage":
    """The storage the parameters name: the one place that chooses between the three."""
    if params.storage_type == "sqlite-artifact":
        return ArtifactStorage(params, console, environ, workspace)
    if params.local_db is not None:
        return LocalStorage(params.local_db, console)
    return S3Storage(params, console, writer, environ)


def replace_file(source: Path, target: Path) -> None:
    """Copy `source` over `target` atomically and durably: readers see the old file or the
    new one, and a crash leaves at most a staging file (removed by the next locked run)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(source, "rb") as reader, open(staging, "wb") as writer:
            shutil.copyfileobj(reader, writer, CHUNK_SIZE)
            writer.flush()
            os.fsync(writer.fileno())  # on disk before the rename makes it the database
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable where folders sync
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def github_request(url: str, token: str, method: str = "GET", body: dict | None = None):
    """One GitHub REST API request. The token is an unredirected header: it never follows a
    redirect to another host (an artifact's /zip answer sends the download to blob storage)."""
    import urllib.request
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Accept": "application/vnd.github+json",
                                              "X-GitHub-Api-Version": "2022-11-28", "Content-Type": "application/json",
                                              "User-Agent": f"track_metrics/{__version__}"})
    request.add_unredirected_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=60)


ARTIFACT_DAMAGE = ("CHECKSUM_MISMATCH", "DB_NOT_SQLITE", "DB_CORRUPT", "DB_SCHEMA_UNKNOWN", "DB_TOO_LARGE")


class ArtifactStorage:
    """History kept as GitHub Actions artifacts (Unentropy's default `sqlite-artifact`): the
    newest non-expired artifact of that name on the branch is downloaded, the builds of the
    next newest ones that it lacks are merged in (artifacts are immutable, so runs that ran
    at once each left their own), and the result is left at the artifact path for the
    workflow's `actions/upload-artifact` step."""

    SIBLINGS = 3  # older artifacts merged in beside the newest

    def __init__(self, params: "ActionParameters", console: Console, environ: Mapping[str, str],
                 workspace: Path):
        token = environ.get("GITHUB_TOKEN", "").strip() or environ.get("INPUT_GITHUB-TOKEN", "").strip()
        repository = environ.get("GITHUB_REPOSITORY", "").strip()
        missing = [name for name, value in (("GITHUB_TOKEN", token), ("GITHUB_REPOSITORY", repository))
                   if not value]
        if missing:
            raise TrackMetricsError(
                "PARAM_MISSING", f"storage-type sqlite-artifact needs {' and '.join(missing)} (the "
                "action passes github.token; elsewhere set them, or use sqlite-s3 / sqlite-local)",
                type="validation", details={"missing": missing})
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", repository):
            raise TrackMetricsError("PARAM_INVALID", f"GITHUB_REPOSITORY {show(repository)} is not "
                                    "'owner/repo'", type="validation")
        self.console, self.workspace, self.token = console, workspace, token
        self.api = (environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
        self.repository = repository
        self.name = params.artifact_name
        self.branch = params.artifact_branch or environ.get("GITHUB_REF_NAME") or "main"
        self.path = Path(params.database_key)
        self.key = self.path.name
        self.location = f"artifact {self.name} on {self.branch}"
        self.landed = False
        self.source_run_id: str | None = None

    def _api_error(self, exc: Exception, what: str) -> TrackMetricsError:
        import urllib.error
        if isinstance(exc, urllib.error.HTTPError):
            code = {401: "GITHUB_AUTH_FAILED", 403: "GITHUB_ACCESS_DENIED"}.get(exc.code, "GITHUB_API_ERROR")
            hint = (" (the workflow needs `permissions: actions: read`)" if exc.code in (401, 403) else "")
            return TrackMetricsError(code, f"{what}: HTTP {exc.code} {exc.reason}{hint}",
                                     retryable=exc.code >= 500 or exc.code == 429)
        return TrackMetricsError("GITHUB_NETWORK", f"{what}: {type(exc).__name__}: {exc}", retryable=True)

    def artifacts(self) -> list[dict]:
        """This branch's non-expired artifacts of the name, newest first (every page)."""
        from urllib.parse import quote
        found, page = [], 1
        while True:
            url = (f"{self.api}/repos/{self.repository}/actions/artifacts?name={quote(self.name, safe='')}"
                   f"&per_page=100&page={page}")
            try:
                with github_request(url, self.token) as response:
                    data = json.load(response)
            except Exception as exc:  # HTTP, network or JSON: never "no history yet"
                raise self._api_error(exc, f"listing the artifacts of {self.repository}") from None
            batch = data.get("artifacts") or []
            found += batch
            if len(batch) < 100 or len(found) >= int(data.get("total_count") or 0):
                break
            page += 1
        branch = [a for a in found if a.get("name") == self.name and not a.get("expired")
                  and (a.get("workflow_run") or {}).get("head_branch") == self.branch]
        # A fork's pull request from its own branch of the same name uploads artifacts too: only
        # runs of this repository's own code may write its history (or be a gate's baseline).
        mine = [a for a in branch if (a.get("workflow_run") or {}).get("repository_id") is not None
                and a["workflow_run"].get("head_repository_id") == a["workflow_run"]["repository_id"]]
        if len(mine) < len(branch):
            self.console.warning(f"skipped {count(len(branch) - len(mine), 'artifact')} named {self.name} on "
                                 f"{self.branch} that another repository's code made (a fork's pull request)")
        return sorted(mine, key=lambda a: (a.get("created_at") or "", a.get("id") or 0), reverse=True)

    def download(self, artifact: dict, dest: Path) -> None:
        """The artifact's zip (following the redirect without the token), and the database in it."""
        import zipfile
        archive = self.workspace / f"artifact-{artifact['id']}.zip"
        try:
            with github_request(f"{self.api}/repos/{self.repository}/actions/artifacts/{artifact['id']}/zip",
                                self.token) as response, open(archive, "wb") as handle:
                shutil.copyfileobj(response, handle, CHUNK_SIZE)
        except Exception as exc:
            raise self._api_error(exc, f"downloading artifact {artifact['id']}") from None
        try:
            with zipfile.ZipFile(archive) as bundle:
                members = [m for m in bundle.infolist() if not m.is_dir()]
                member = next((m for m in members if Path(m.filename).name == self.key), None) \
                    or (members[0] if len(members) == 1 else None)
                if member is None:
                    raise TrackMetricsError("DB_NOT_SQLITE", f"artifact {artifact['id']} holds no {self.key}")
                check_upload_size(member.file_size)
                with bundle.open(member) as source, open(dest, "wb") as target:
                    shutil.copyfileobj(source, target, CHUNK_SIZE)
        except zipfile.BadZipFile:
            raise TrackMetricsError("CHECKSUM_MISMATCH", f"artifact {artifact['id']} is not a valid zip",
                                    retryable=True) from None
        finally:
            archive.unlink(missing_ok=True)

    def fetch(self, dest: Path) -> DatabaseFile | None:
        listed = self.artifacts()
        if not listed:
            return None
        unreadable: list[TrackMetricsError] = []
        for index, newest in enumerate(listed):
            try:  # a junk or damaged artifact never blocks the history: the next newest is used
                self.download(newest, dest)
                check_database(dest)
                break
            except TrackMetricsError as exc:
                if exc.code not in ARTIFACT_DAMAGE:
                    raise  # the API or the network, not the artifact: never "no history"
                self.console.warning(f"artifact {newest['id']} skipped ({exc.code}): {exc.message}")
                unreadable.append(exc)
        else:
            raise unreadable[0]  # none readable: an error, never a first run
        self.source_run_id = str((newest.get("workflow_run") or {}).get("id") or "")
        self.console.info(f"download: artifact {newest['id']} from run {self.source_run_id}")
        self.merge_siblings(dest, listed[index + 1:index + 1 + self.SIBLINGS])
        sha256, _, size = file_digests(dest)
        return DatabaseFile(self.key, size, newest.get("created_at"), str(newest["id"]), None, sha256,
                            self.location)

    def merge_siblings(self, dest: Path, siblings: Sequence[dict]) -> None:
        """Add the builds of older artifacts that the newest lacks (a concurrent run's)."""
        for artifact in siblings:
            sibling = self.workspace / f"sibling-{artifact['id']}.db"
            try:
                self.download(artifact, sibling)
                check_database(sibling)
            except TrackMetricsError as exc:
                self.console.warning(f"artifact {artifact['id']} not merged ({exc.code}): {exc.message}")
                continue
            connection = open_database(dest)
            try:
                connection.execute("PRAGMA journal_mode=DELETE")
                pruned = pruned_builds(sibling)
                added = merge_salvage(connection, *salvage_rows(sibling))
                added -= min(added, forget_pruned(connection, pruned))  # no pruned build comes back
            finally:
                connection.close()
                sibling.unlink(missing_ok=True)
            if added:
                self.console.info(f"download: merged {count(added, 'build')} that only artifact "
                                  f"{artifact['id']} (run {(artifact.get('workflow_run') or {}).get('id')}) had")

    def store(self, path: Path, previous: DatabaseFile | None, sha256: str, md5: str, size: int,
              generation: int, successor_holds_build: Callable[[], bool], checked: str = "",
              history: int = 0) -> UploadResult:
        """Leave the database at the artifact path; the workflow's upload step publishes it."""
        replace_file(path, self.path)
        self.landed = True
        return UploadResult(self.key, None, None, size, iso(dt.datetime.now(dt.timezone.utc)), sha256)

    def backup(self, previous: DatabaseFile, destructive: bool = False) -> None:
        """Older artifacts are the backups (until they expire)."""


# ============================================================================================
# Database
# ============================================================================================

SCHEMA_VERSION = "2.0.0"
# Unentropy's schema 2.0.0, statement for statement, so either tool can read the other's file.
# The builds `prune` removed, so that a merge of older copies (artifact siblings) never brings
# them back; a build recorded or imported again leaves the list.
PRUNED_DDL = ("CREATE TABLE IF NOT EXISTS track_metrics_pruned (commit_sha TEXT NOT NULL, run_id TEXT NOT NULL,"
              " PRIMARY KEY (commit_sha, run_id)) WITHOUT ROWID")
# A repeated metric's samples (a JSON array; the median is metric_values' value), read by the gate.
SAMPLES_DDL = ("CREATE TABLE IF NOT EXISTS track_metrics_samples (build_id INTEGER NOT NULL, metric_id TEXT NOT NULL,"
               " samples TEXT NOT NULL, PRIMARY KEY (build_id, metric_id)) WITHOUT ROWID")
SCHEMA_DDL = (
    """CREATE TABLE IF NOT EXISTS schema_version (
      version TEXT PRIMARY KEY,
      applied_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
      description TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS metric_definitions (
    id TEXT PRIMARY KEY CHECK(id GLOB '[a-z0-9-]*'),
    type TEXT NOT NULL CHECK(type IN ('numeric', 'label')),
    unit TEXT,
    description TEXT
  )""",
    """CREATE TABLE IF NOT EXISTS build_contexts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    commit_sha TEXT NOT NULL,
    branch TEXT NOT NULL,
    run_id TEXT NOT NULL,
    run_number INTEGER NOT NULL,
    event_name TEXT,
    timestamp DATETIME NOT NULL,
    UNIQUE(commit_sha, run_id)
  )""",
    "CREATE INDEX IF NOT EXISTS idx_build_timestamp ON build_contexts(timestamp)",
    "CREATE INDEX IF NOT EXISTS idx_build_branch ON build_contexts(branch)",
    "CREATE INDEX IF NOT EXISTS idx_build_commit ON build_contexts(commit_sha)",
    "CREATE INDEX IF NOT EXISTS idx_build_event_timestamp ON build_contexts(event_name, timestamp)",
    """CREATE TABLE IF NOT EXISTS metric_values (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    metric_id TEXT NOT NULL,
    build_id INTEGER NOT NULL,
    value_numeric REAL,
    value_label TEXT,
    FOREIGN KEY (metric_id) REFERENCES metric_definitions(id),
    FOREIGN KEY (build_id) REFERENCES build_contexts(id),
    UNIQUE(metric_id, build_id),
    CHECK(
      (value_numeric IS NOT NULL AND value_label IS NULL) OR
      (value_numeric IS NULL AND value_label IS NOT NULL)
    )
  )""",
    "CREATE INDEX IF NOT EXISTS idx_metric_value_build ON metric_values(build_id)",
    # This tool's own bookkeeping (the upload generation, the summary's seal) and the summary
    # the report reads (see refresh_summary); Unentropy ignores both tables.
    "CREATE TABLE IF NOT EXISTS track_metrics_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS track_metrics_summary (
    size INTEGER NOT NULL, metric_id TEXT NOT NULL, block INTEGER NOT NULL, n INTEGER NOT NULL,
    lo REAL NOT NULL, lo_build INTEGER NOT NULL, hi REAL NOT NULL, hi_build INTEGER NOT NULL,
    PRIMARY KEY (size, metric_id, block)) WITHOUT ROWID""",
    # Each label metric's trend values in (time, id) order, cut where the value changes: a label
    # card reads its changes, not every value (see refresh_labels).
    """CREATE TABLE IF NOT EXISTS track_metrics_labels (
    metric_id TEXT NOT NULL, run INTEGER NOT NULL, value TEXT NOT NULL, first_build INTEGER NOT NULL,
    last_build INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (metric_id, run)) WITHOUT ROWID""",
    PRUNED_DDL,
    SAMPLES_DDL,
)
REQUIRED_COLUMNS = {
    "schema_version": {"version"},
    "metric_definitions": {"id", "type", "unit", "description"},
    "build_contexts": {"id", "commit_sha", "branch", "run_id", "run_number", "event_name", "timestamp"},
    "metric_values": {"id", "metric_id", "build_id", "value_numeric", "value_label"},
}


UNIQUE_KEYS = {"metric_definitions": ("id",), "build_contexts": ("commit_sha", "run_id"),
               "metric_values": ("metric_id", "build_id")}


def has_unique_key(connection: sqlite3.Connection, table: str, columns: Sequence[str]) -> bool:
    """Whether `table` has a UNIQUE (or PRIMARY KEY) index on exactly `columns`, not partial."""
    for _, name, unique, _, partial in connection.execute(f"PRAGMA index_list({table})"):
        if unique and not partial and tuple(row[2] for row in connection.execute(
                "SELECT * FROM pragma_index_info(?)", (name,))) == tuple(columns):
            return True
    return False


def open_database(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """Open an untrusted database file: no schema-defined functions, no extensions; a reader's
    `read_only`, through SQLite's own read-only mode (it may be the user's own file)."""
    connection = sqlite3.connect(path.resolve().as_uri() + "?mode=ro" if read_only else str(path),
                                 isolation_level=None, uri=read_only)
    connection.execute("PRAGMA trusted_schema=OFF")
    connection.execute("PRAGMA cell_size_check=ON")
    return connection


def opened_database(path: Path, read_only: bool = False) -> contextlib.closing:
    """open_database for a `with` block, which closes the connection."""
    return contextlib.closing(open_database(path, read_only))


UNTOUCHED = "the remote object was left untouched (see --on-corrupt)"


CHECKS = {"full": "integrity_check", "quick": "quick_check", "schema": None}  # integrity → page scan


def check_database(path: Path, integrity: str = "full") -> None:
    """Header, SQLite's page scan (integrity_check, quick_check, or none for "schema": bytes this
    tool checked and vouched for by their SHA-256) and the schema; raises DB_NOT_SQLITE,
    DB_CORRUPT or DB_SCHEMA_UNKNOWN."""
    with open(path, "rb") as handle:
        header = handle.read(16)
    if header != SQLITE_HEADER:
        raise TrackMetricsError("DB_NOT_SQLITE", "the database object is not a SQLite file (its "
                                f"first 16 bytes are not 'SQLite format 3'); {UNTOUCHED}")
    pragma = CHECKS[integrity]
    connection = open_database(path, read_only=True)
    try:
        rows = [row[0] for row in connection.execute(f"PRAGMA {pragma}(20)")] if pragma else ["ok"]
        if rows != ["ok"]:
            raise TrackMetricsError("DB_CORRUPT", f"SQLite {pragma} failed: {'; '.join(rows[:3])[:300]}; {UNTOUCHED}")
        objects = connection.execute("SELECT type, name FROM sqlite_master").fetchall()
        tables = {name for kind, name in objects if kind == "table"} - {"sqlite_sequence"}
        triggers = sorted(str(name) for kind, name in objects if kind == "trigger")
        if triggers:  # they would run on this tool's inserts: an untrusted file must not act
            raise TrackMetricsError("DB_SCHEMA_UNKNOWN", f"the database has triggers ({', '.join(triggers)[:200]}),"
                                    " which metrics databases never have; refusing to write to it")
        if not tables:
            return
        for table, columns in REQUIRED_COLUMNS.items():
            found = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if not columns <= found:
                raise TrackMetricsError(
                    "DB_SCHEMA_UNKNOWN", f"the database is SQLite but not a metrics database "
                    f"(table {table} {'lacks ' + ', '.join(sorted(columns - found)) if found else 'is missing'}; "
                    f"tables found: {', '.join(sorted(tables))[:200]})")
        for table, columns in UNIQUE_KEYS.items():
            if not has_unique_key(connection, table, columns):
                raise TrackMetricsError(
                    "DB_SCHEMA_UNKNOWN", f"the database is not a metrics database this tool can "
                    f"write: table {table} has no UNIQUE key on ({', '.join(columns)}), which "
                    "recording a build relies on; refusing to write to it")
        versions = [str(row[0]) for row in connection.execute("SELECT version FROM schema_version")]
        newer = [v for v in versions if v.split(".")[0].isdigit() and int(v.split(".")[0]) > 2]
        if newer:  # not damage: --on-corrupt never acts on it
            raise TrackMetricsError("DB_SCHEMA_NEWER", f"the database has schema version "
                                    f"{max(newer)[:40]}, newer than this tool's {SCHEMA_VERSION}; "
                                    "upgrade track_metrics. The object was left untouched")
    except sqlite3.DatabaseError as exc:
        raise TrackMetricsError("DB_CORRUPT", f"SQLite cannot read the database: {exc}; {UNTOUCHED}") from exc
    finally:
        connection.close()


def ensure_schema(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA_DDL:
        connection.execute(statement)
    connection.execute("INSERT OR IGNORE INTO schema_version (version, description) VALUES (?, ?)",
                       (SCHEMA_VERSION, "Clean schema with string metric IDs"))
    connection.execute("COMMIT")


@dataclass(frozen=True)
class BuildContext:
    commit_sha: str
    branch: str
    run_id: str
    run_number: int | None
    event_name: str | None
    timestamp: str
    actor: str | None = None


def record_build(connection: sqlite3.Connection, build: BuildContext, metrics: Sequence[MetricConfig],
                 values: Mapping[str, Any], samples: Mapping[str, Sequence[float]] = {}) -> tuple[int, dict[str, str]]:
    """Record one build's values (the schema exists: apply_build ensures it), idempotent on
    (commit_sha, run_id): a re-run replaces them.

    Returns the build id and, per metric that could not be recorded, why."""
    skipped: dict[str, str] = {}
    connection.execute("BEGIN IMMEDIATE")
    try:
        stored = dict(connection.execute("SELECT id, type FROM metric_definitions"))
        run_number = build.run_number
        if run_number is None:
            existing = connection.execute(
                "SELECT run_number FROM build_contexts WHERE commit_sha = ? AND run_id = ?",
                (build.commit_sha, build.run_id)).fetchone()
            run_number = existing[0] if existing else connection.execute(
                "SELECT COALESCE(MAX(run_number), 0) + 1 FROM build_contexts").fetchone()[0]
        connection.execute(
            "INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (commit_sha, run_id) DO UPDATE SET"
            " branch = excluded.branch, run_number = excluded.run_number,"
            " event_name = excluded.event_name, timestamp = excluded.timestamp",
            (build.commit_sha, build.branch, build.run_id, run_number, build.event_name, build.timestamp))
        build_id = connection.execute("SELECT id FROM build_contexts WHERE commit_sha = ? AND run_id = ?",
                                      (build.commit_sha, build.run_id)).fetchone()[0]
        connection.execute("DELETE FROM track_metrics_pruned WHERE commit_sha = ? AND run_id = ?",
                           (build.commit_sha, build.run_id))
        for metric in metrics:
            if metric.id not in values:
                continue
            if stored.get(metric.id, metric.type) != metric.type:
                skipped[metric.id] = (f"not recorded: the database has it as a {stored[metric.id]} "
                                      f"metric, the configuration as {metric.type}; give the metric "
                                      "a new id to change its type")
                continue
            connection.execute(  # a changed unit or description follows the config, as in Unentropy
                "INSERT INTO metric_definitions (id, type, unit, description) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET unit = COALESCE(excluded.unit, unit),"
                " description = COALESCE(excluded.description, description)",
                (metric.id, metric.type, metric.unit, metric.description))
            value = values[metric.id]
            numeric, label = (value, None) if metric.type == "numeric" else (None, value)
            connection.execute(
                "INSERT INTO metric_values (metric_id, build_id, value_numeric, value_label)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (metric_id, build_id) DO UPDATE SET"
                " value_numeric = excluded.value_numeric, value_label = excluded.value_label",
                (metric.id, build_id, numeric, label))
            store_samples(connection, build_id, metric.id, samples.get(metric.id))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return build_id, skipped


def samples_join(connection: sqlite3.Connection, values: str = "v") -> tuple[str, str]:
    """The column and join that read each value's runs beside it (NULL in a file without them)."""
    if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'track_metrics_samples'").fetchone():
        return "NULL", ""
    return "s.samples", (" LEFT JOIN track_metrics_samples s ON s.build_id = "
                         f"{values}.build_id AND s.metric_id = {values}.metric_id")


def store_samples(connection: sqlite3.Connection, build_id: int, metric: str, samples: Sequence[float] | None) -> None:
    """Keep a repeated metric's samples beside its value (a re-run without them drops the old ones)."""
    connection.execute("DELETE FROM track_metrics_samples WHERE build_id = ? AND metric_id = ?", (build_id, metric))
    if samples and len(samples) > 1:
        connection.execute("INSERT INTO track_metrics_samples VALUES (?, ?, ?)",
                           (build_id, metric, json.dumps([float(v) for v in samples])))


def salvage_rows(damaged: Path) -> tuple[list, list, list]:
    """What can still be read of a damaged metrics database: its definitions, builds and
    values, each table scanned without its indexes up to the first unreadable page."""
    queries = ("SELECT id, type, unit, description FROM metric_definitions NOT INDEXED",
               "SELECT id, commit_sha, branch, run_id, run_number, event_name, timestamp"
               " FROM build_contexts NOT INDEXED",
               "SELECT metric_id, build_id, value_numeric, value_label FROM metric_values NOT INDEXED")
    tables: list[list] = []
    try:
        connection = sqlite3.connect(damaged.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return [], [], []
    try:
        connection.execute("PRAGMA trusted_schema=OFF")
        for query in queries:
            rows: list = []
            with contextlib.suppress(sqlite3.DatabaseError):
                for row in connection.execute(query):
                    rows.append(row)
            tables.append(rows)
    except sqlite3.DatabaseError:
        return [], [], []
    finally:
        connection.close()
    return tables[0], tables[1], tables[2]


def merge_salvage(connection: sqlite3.Connection, definitions: list, builds: list, values: list) -> int:
    """Add the salvaged builds that the database lacks (by commit and run id), with their
    values where the metric's type agrees; returns how many builds were added."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        known = dict(connection.execute("SELECT id, type FROM metric_definitions"))
        for row in definitions:
            if row[0] not in known and connection.execute(
                    "INSERT OR IGNORE INTO metric_definitions (id, type, unit, description)"
                    " VALUES (?, ?, ?, ?)", row).rowcount:
                known[row[0]] = row[1]
        added = {}
        for old_id, *fields in builds:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO build_contexts (commit_sha, branch, run_id, run_number,"
                " event_name, timestamp) VALUES (?, ?, ?, ?, ?, ?)", fields)
            if cursor.rowcount:
                added[old_id] = cursor.lastrowid
        for metric_id, build_id, numeric, label in values:
            if build_id in added and (known.get(metric_id) == "numeric") == (numeric is not None):
                connection.execute("INSERT OR IGNORE INTO metric_values (metric_id, build_id,"
                                   " value_numeric, value_label) VALUES (?, ?, ?, ?)",
                                   (metric_id, added[build_id], numeric, label))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return len(added)


def pruned_builds(path: Path) -> list[tuple[str, str]]:
    """The (commit, run id) pairs a database's prunes removed (none in a foreign one)."""
    connection = open_database(path, read_only=True)
    try:
        return connection.execute("SELECT commit_sha, run_id FROM track_metrics_pruned").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


def forget_pruned(connection: sqlite3.Connection, pruned: Sequence[tuple[str, str]]) -> int:
    """Add `pruned` to the database's list, then remove every build on the list (a merge of an
    older copy may have brought them back); returns how many builds were removed."""
    connection.execute(PRUNED_DDL)
    connection.executemany("INSERT OR IGNORE INTO track_metrics_pruned VALUES (?, ?)", pruned)
    removed = [row[0] for row in connection.execute(
        "SELECT b.id FROM build_contexts b JOIN track_metrics_pruned p USING (commit_sha, run_id)")]
    if removed:
        apply_prune(connection, removed)
    return len(removed)


def holds_build(path: Path, build: BuildContext, values: Mapping[str, Any]) -> bool:
    """Whether a database file holds this build with these values."""
    connection = open_database(path, read_only=True)
    try:
        row = connection.execute("SELECT id FROM build_contexts WHERE commit_sha = ? AND run_id = ?",
                                 (build.commit_sha, build.run_id)).fetchone()
        stored = {} if row is None else {metric: numeric if numeric is not None else label
                                         for metric, numeric, label in connection.execute(
            "SELECT metric_id, value_numeric, value_label FROM metric_values WHERE build_id = ?", row)}
    except sqlite3.DatabaseError:
        return False
    finally:
        connection.close()
    return row is not None and all(stored.get(metric) == value for metric, value in values.items())


def bump_generation(connection: sqlite3.Connection) -> int:
    """Count uploads inside the database, so two different states never look alike."""
    connection.execute(
        "INSERT INTO track_metrics_state (key, value) VALUES ('generation', '1') ON CONFLICT (key)"
        " DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)")
    return int(connection.execute(
        "SELECT value FROM track_metrics_state WHERE key = 'generation'").fetchone()[0])


# The summary: per numeric metric and block of consecutive build ids, how many values the block
# holds, its lowest and highest and which builds hold them — at two block sizes. Every change
# this tool makes refreshes the blocks it touched, in the same file, so a report of 165,000
# builds reads a few thousand rows instead of 3.3 million values. A file anyone else wrote (or
# changed since) fails the seal's check: the report then reads the values, and this tool's next
# change rebuilds the summary.
SUMMARY_SIZES = (16, 256)
TREND_EVENTS = ("push", "import")  # the builds a report's trend and a gate's baseline are made of
TREND_SQL = "('push', 'import')"
# Whether any build is not a trend build, as ranges of the (event, time) index (NOT IN would scan it).
OTHER_BUILDS = ("EXISTS (SELECT 1 FROM build_contexts WHERE event_name IS NULL OR event_name < 'import' OR"
                " event_name > 'push' OR (event_name > 'import' AND event_name < 'push'))")
# What a block is made of: numeric values (one build each) or the blocks of the size below —
# table, key, count, lowest, highest, their builds, and which rows count.
BLOCK_PARTS = {
    1: ("metric_values", "s.build_id", "1", "s.value_numeric", "s.value_numeric", "s.build_id", "s.build_id",
        "typeof(s.build_id) = 'integer' AND s.build_id >= 0 AND typeof(s.value_numeric) IN ('integer', 'real')"),
    SUMMARY_SIZES[0]: ("track_metrics_summary", "s.block", "s.n", "s.lo", "s.hi", "s.lo_build", "s.hi_build",
                       f"s.size = {SUMMARY_SIZES[0]}"),
}


def fold_values(rows: Iterator[tuple[str, int, float]], size: int) -> dict[tuple[str, int], list]:
    """(metric, build, value) rows as blocks of `size` build ids, as the summary holds them:
    {(metric, block): [n, lo, lo_build, hi, hi_build]}, ties to the older build."""
    blocks: dict[tuple[str, int], list] = {}
    get = blocks.get
    for metric_id, build_id, value in rows:
        key = (metric_id, build_id // size)
        block = get(key)
        if block is None:
            blocks[key] = [1, value, build_id, value, build_id]
            continue
        block[0] += 1
        if value < block[1] or (value == block[1] and build_id < block[2]):
            block[1], block[2] = value, build_id
        if value > block[3] or (value == block[3] and build_id < block[4]):
            block[3], block[4] = value, build_id
    return blocks


def watch_changes(connection: sqlite3.Connection) -> None:
    """Note, for this connection only (TEMP triggers live in memory, never in the file), which
    smallest summary blocks a change touches, and the builds it added values to (-1: it deleted
    or changed a value)."""
    size = SUMMARY_SIZES[0]
    connection.execute("CREATE TEMP TABLE IF NOT EXISTS touched (block INTEGER PRIMARY KEY)")
    connection.execute("CREATE TEMP TABLE IF NOT EXISTS appended (build INTEGER PRIMARY KEY)")
    for event, rows in (("INSERT", ("new",)), ("DELETE", ("old",)), ("UPDATE", ("old", "new"))):
        build = "new.build_id" if event == "INSERT" else "-1"
        actions = "".join(  # not OR IGNORE: an upsert's own conflict clause would override it
            f"INSERT INTO touched SELECT CAST({row}.build_id AS INTEGER) / {size} WHERE NOT EXISTS (SELECT 1"
            f" FROM touched WHERE block = CAST({row}.build_id AS INTEGER) / {size});" for row in rows) + (
            f"INSERT INTO appended SELECT {build} WHERE NOT EXISTS (SELECT 1 FROM appended WHERE build = {build});")
        connection.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS touched_{event.lower()} AFTER {event}"
                           f" ON main.metric_values BEGIN {actions} END")


def refresh_summary(connection: sqlite3.Connection, rebuild: bool) -> str:
    """Bring the summary up to date with the blocks `watch_changes` noted (all of it when
    `rebuild`, or when a change touched much of the history), in one transaction, and say what
    was done. In a few MB at any size: SQLite folds a block; a rebuild folds the values in
    chunks (summarise_values)."""
    base = SUMMARY_SIZES[0]
    touched = [row[0] for row in connection.execute("SELECT block FROM temp.touched")]
    if not (rebuild or touched):
        return "unchanged"
    last = connection.execute("SELECT COALESCE(MAX(id), 0) FROM build_contexts").fetchone()[0]
    rebuild = rebuild or len(touched) > max(64, last // base // 4)
    connection.execute("BEGIN IMMEDIATE")
    try:
        if rebuild:
            connection.execute("DELETE FROM track_metrics_summary")
        leave_out = connection.execute(f"SELECT {OTHER_BUILDS}").fetchone()[0]  # values of other builds
        for below, size in zip((1, *SUMMARY_SIZES), SUMMARY_SIZES):
            if rebuild and below == 1:
                summarise_values(connection, leave_out)
                continue
            for block in [None] if rebuild else sorted({number * base // size for number in touched}):
                summarise_block(connection, size, below, block, leave_out)
        refresh_labels(connection, rebuild)
        connection.execute("DELETE FROM temp.touched")
        connection.execute("DELETE FROM temp.appended")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return "rebuilt" if rebuild else f"{count(len(touched), 'block')} of {base} builds refreshed"


def summarise_values(connection: sqlite3.Connection, leave_out: bool, chunk: int = 100_000) -> None:
    """Every smallest block from the values: one scan in page order, folded `chunk` values at a
    time and merged into what the chunks before left (ties to the older build). Half the time
    of SQLite's GROUP BY, which sorts 3 million values and then looks each block's builds up."""
    values = connection.execute(
        "SELECT metric_id, build_id, value_numeric FROM metric_values NOT INDEXED WHERE typeof(build_id) ="
        f" 'integer' AND build_id >= 0 AND typeof(value_numeric) IN ('integer', 'real')")
    if leave_out:  # the values of builds that are not trend builds
        trend = {row[0] for row in connection.execute(f"SELECT id FROM build_contexts WHERE event_name IN {TREND_SQL}")}
        values = (row for row in values if row[1] in trend)
    holder = "CASE WHEN excluded.{0} {1} {0} OR (excluded.{0} = {0} AND excluded.{0}_build < {0}_build)" \
             " THEN excluded.{0}_build ELSE {0}_build END"
    while blocks := fold_values(itertools.islice(values, chunk), SUMMARY_SIZES[0]):
        connection.executemany(
            f"INSERT INTO track_metrics_summary VALUES ({SUMMARY_SIZES[0]}, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT"
            f" (size, metric_id, block) DO UPDATE SET n = n + excluded.n, lo_build = {holder.format('lo', '<')},"
            f" lo = MIN(lo, excluded.lo), hi_build = {holder.format('hi', '>')}, hi = MAX(hi, excluded.hi)",
            [(metric, block, *fold) for (metric, block), fold in blocks.items()])


def summarise_block(connection: sqlite3.Connection, size: int, below: int, block: int | None,
                     leave_out: bool) -> None:
    """Recompute one block of `size` builds (every block when `block` is None; from the values,
    one block only) from its parts: count, lowest and highest, then the oldest build holding each."""
    table, key, n, lo, hi, lo_build, hi_build, where = BLOCK_PARTS[below]
    if below == 1 and leave_out:  # the values of builds that are not trend builds
        where += f" AND (SELECT event_name FROM build_contexts WHERE id = s.build_id) IN {TREND_SQL}"
    ratio, outer = size // below, "track_metrics_summary"
    only = ("", "") if block is None else (f" AND {key} BETWEEN ? AND ?", f" AND {outer}.block = ?")
    if block is not None:
        connection.execute(f"DELETE FROM {outer} WHERE size = ? AND block = ?", (size, block))
    connection.execute(
        f"INSERT INTO {outer} (size, metric_id, block, n, lo, lo_build, hi, hi_build) SELECT {size},"
        f" s.metric_id, {key} / {ratio}, SUM({n}), MIN({lo}), 0, MAX({hi}), 0 FROM {table} AS s WHERE {where}{only[0]}"
        f" GROUP BY s.metric_id, {key} / {ratio}", () if block is None else (block * ratio, block * ratio + ratio - 1))
    holder = (f"(SELECT MIN({{}}) FROM {table} AS s WHERE {where} AND s.metric_id = {outer}.metric_id"
              f" AND {key} BETWEEN {outer}.block * {ratio} AND {outer}.block * {ratio} + {ratio - 1}"
              f" AND {{}} = {outer}.{{}})")
    connection.execute(f"UPDATE {outer} SET lo_build = {holder.format(lo_build, lo, 'lo')},"
                       f" hi_build = {holder.format(hi_build, hi, 'hi')} WHERE size = {size}{only[1]}",
                       () if block is None else (block,))


LAST_RUN = "l.run = (SELECT MAX(run) FROM track_metrics_labels WHERE metric_id = l.metric_id)"


def refresh_labels(connection: sqlite3.Connection, rebuild: bool) -> None:
    """Keep each label metric's runs of equal trend values in time order: values added after a
    metric's last run (a tracking run's build) extend its runs; any other change rebuilds them
    from every value (walking the (timestamp, id) index, one metric at a time)."""
    values = ("SELECT v.metric_id, v.value_label, b.id, b.timestamp FROM build_contexts b CROSS JOIN metric_values v"
              " ON v.build_id = b.id AND {} WHERE typeof(v.value_label) = 'text' AND b.event_name IN"
              f" {TREND_SQL} ORDER BY b.timestamp, b.id")
    appended = values.format("b.id IN (SELECT build FROM temp.appended)")
    rebuild = rebuild or connection.execute(
        "SELECT EXISTS (SELECT 1 FROM temp.appended WHERE build = -1) OR EXISTS (SELECT 1 FROM"
        f" ({appended}) a JOIN track_metrics_labels l ON l.metric_id = a.metric_id AND {LAST_RUN}"
        " JOIN build_contexts p ON p.id = l.last_build WHERE (a.timestamp, a.id) <= (p.timestamp, p.id))").fetchone()[0]
    if rebuild:
        connection.execute("DELETE FROM track_metrics_labels")
    labels = [row[0] for row in connection.execute("SELECT id FROM metric_definitions WHERE type != 'numeric'")]
    rows = itertools.chain.from_iterable(connection.execute(values.format("v.metric_id = ?"), (metric,))
                                         for metric in labels) if rebuild else connection.execute(appended)
    stored = {row[0]: list(row) for row in connection.execute(f"SELECT * FROM track_metrics_labels l WHERE {LAST_RUN}")}
    connection.executemany("INSERT OR REPLACE INTO track_metrics_labels VALUES (?, ?, ?, ?, ?, ?)",
                           [run for chain in label_runs(rows, stored).values() for run in chain])


def label_runs(rows: Iterator[Sequence], stored: Mapping[str, list] = {}) -> dict[str, list[list]]:
    """(metric, value, build, …) rows in time order as each metric's runs of equal values, rows
    as track_metrics_labels holds them: [metric, run, value, first build, last build, count];
    a metric's runs continue its `stored` last run (which comes back first, extended or not)."""
    runs: dict[str, list[list]] = {}
    for metric, value, build, *_ in rows:
        chain = runs.setdefault(metric, [stored[metric]] if metric in stored else [])
        if chain and chain[-1][2] == value:
            chain[-1][4:] = [build, chain[-1][5] + 1]
        else:
            chain.append([metric, chain[-1][1] + 1 if chain else 1, value, build, build, 1])
    return runs


def summary_seal(path: Path, connection: sqlite3.Connection, commits: int = 0) -> str:
    """What the summary was made for: the file's change counter (SQLite increments it at every
    committed write in rollback-journal mode, by anyone), its newest value's id, its build count."""
    with open(path, "rb") as handle:
        header = handle.read(28)
    if header[18:20] != b"\x01\x01":  # WAL mode: the counter is not kept
        return ""
    counter = (int.from_bytes(header[24:28], "big") + commits) % 2 ** 32
    last, builds = connection.execute("SELECT (SELECT MAX(id) FROM metric_values),"
                                      " (SELECT COUNT(*) FROM build_contexts)").fetchone()
    return f"3 {counter} {last} {builds}"  # 3: trend builds only, with the labels' runs


def summary_sealed(path: Path) -> bool:
    """Whether this tool's last change sealed the file's summary (nobody has written it since)."""
    with opened_database(path, read_only=True) as connection:
        return summary_trusted(path, connection)


def unreadable(exc: sqlite3.DatabaseError) -> TrackMetricsError:
    """A damaged page that the checks before reading did not scan, met while reading."""
    return TrackMetricsError("DB_CORRUPT", f"SQLite cannot read the database: {exc} (`--integrity full` "
                             "checks every page before reading); nothing was changed")


def summary_trusted(path: Path, connection: sqlite3.Connection) -> bool:
    try:
        stored = connection.execute("SELECT value FROM track_metrics_state WHERE key = 'summary'").fetchone()
        return bool(stored) and stored[0] == summary_seal(path, connection) != ""
    except sqlite3.Error:  # a file without this tool's tables
        return False


def seal_summary(path: Path, connection: sqlite3.Connection) -> None:
    """The last write of a change: the seal the file will match once this commit counts."""
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("INSERT INTO track_metrics_state (key, value) VALUES ('summary', ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = excluded.value", (summary_seal(path, connection, commits=1),))
    connection.execute("COMMIT")


def build_summary(path: Path) -> None:
    """Summarise a whole database (the benchmarks' and tests' histories, written directly)."""
    with opened_database(path) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
        ensure_schema(connection)
        watch_changes(connection)
        refresh_summary(connection, rebuild=True)
        seal_summary(path, connection)


def count_builds(path: Path) -> int:
    connection = open_database(path, read_only=True)
    try:
        return connection.execute("SELECT COUNT(*) FROM build_contexts").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def prepare_upload(path: Path, integrity: str) -> tuple[str, str, int]:
    """The file must be one consistent database (no -wal/-journal) that passes the checks."""
    for suffix in ("-wal", "-journal", "-shm"):
        if Path(str(path) + suffix).exists():
            raise TrackMetricsError("DB_CORRUPT", f"the database has a leftover {suffix} file; "
                                    "refusing to upload an inconsistent copy")
    check_database(path, integrity)
    return file_digests(path)


# ============================================================================================
# Collection
# ============================================================================================

NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
# JavaScript's whitespace and line terminators (String.prototype.trim, parseFloat), not Python's.
JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009" \
           "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
JS_FLOAT = re.compile(r"[+-]?(Infinity|([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?)")


def js_parse_float(text: str) -> float | None:
    """JavaScript's parseFloat: the longest leading decimal literal ("87.5%" → 87.5), or None."""
    match = JS_FLOAT.match(text.lstrip(JS_SPACE))
    if not match:
        return None
    literal = match.group(0)
    return float(literal.replace("Infinity", "inf"))


def parse_value(output: str, kind: str) -> Any:
    """A metric's value, read as Unentropy reads it: the first line of the trimmed output, a
    label as it is, a number by JavaScript's parseFloat ("87.5%" → 87.5, "12 files" → 12).
    Where that finds no number, the last non-empty line when it is a plain number (a superset:
    Unentropy records nothing there)."""
    text = output.strip(JS_SPACE).split("\n")[0].strip(JS_SPACE)
    if not text:
        raise ValueError("the command printed nothing on stdout")
    if kind == "label":
        if len(text) > 256:
            raise ValueError(f"a label is at most 256 characters, got {len(text)}")
        return text
    value = js_parse_float(text)
    if value is None:
        lines = [line.strip(JS_SPACE) for line in output.split("\n") if line.strip(JS_SPACE)]
        if NUMBER.fullmatch(lines[-1]):
            value = float(lines[-1])
    if value is None:
        raise ValueError(f"expected a number such as 42, -3.5, 1e3 or 87.5%; got {text[:60]!r}")
    if not math.isfinite(value):
        raise ValueError(f"the value is not a finite number: {text[:60]!r}")
    return value


def one_line_reason(reason: str) -> str:
    """Why a metric failed, in one line: the error itself, not "Traceback (most recent call
    last):" (the last line of a command's stderr is where Python, Node and most tools say it)."""
    head, _, stderr = reason.partition("; stderr: ")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (f"{head.splitlines()[0]}; stderr: {lines[-1]}" if lines else head.splitlines()[0])[:200]


def cut_short(output: str) -> str | None:
    """The first line, when the number parseFloat reads from it stops before more digits
    ("1,234" reads as 1, "12 of 40" as 12): Unentropy records that silently; it deserves a word."""
    text = output.strip(JS_SPACE).split("\n")[0].strip(JS_SPACE)
    match = JS_FLOAT.match(text)
    return text if match and re.search(r"\d", text[match.end():]) else None


@dataclass
class MetricOutcome:
    id: str
    value: Any = None
    error: str | None = None
    warning: str | None = None
    duration_ms: int = 0
    samples: tuple[float, ...] = ()  # a repeated metric's every value, in run order

    @property
    def ok(self) -> bool:
        return self.error is None


class CommandRunner:
    """Runs metric commands in their own process groups, so a timeout or a cancellation kills
    everything a command started, and nothing outlives the run."""

    def __init__(self, workdir: Path, environ: Mapping[str, str], secrets: Sequence[str],
                 sources: Sequence[str] | None = None, base: Path = Path("."), passed: Sequence[str] = ()):
        self.workdir = workdir
        self.environ = environ
        self.secrets = secrets
        self.passed = passed  # credential variables the user hands to the commands by name
        self.sources = sources  # for @collect, with the configuration's folder they are relative to
        self.base = base
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def run(self, metric: MetricConfig, build: BuildContext, timeout: float) -> MetricOutcome:
        """The metric's value; a repeated metric's command runs `repeat` times, one after the
        other (the deadline shared), and its median is the value."""
        if metric.repeat <= 1:
            return self._run_once(metric, build, timeout)
        import statistics
        deadline, outcomes = time.monotonic() + timeout, []
        for _ in range(metric.repeat):
            outcome = self._run_once(metric, build, max(deadline - time.monotonic(), 0.1))
            if not outcome.ok:
                outcome.error = f"run {len(outcomes) + 1} of {metric.repeat}: {outcome.error}"
                return outcome
            outcomes.append(outcome)
        samples = tuple(float(outcome.value) for outcome in outcomes)
        warnings = sorted({outcome.warning for outcome in outcomes if outcome.warning})
        return MetricOutcome(metric.id, statistics.median(samples), None, "; ".join(warnings) or None,
                             sum(outcome.duration_ms for outcome in outcomes), samples)

    def _run_once(self, metric: MetricConfig, build: BuildContext, timeout: float) -> MetricOutcome:
        started = time.monotonic()
        if metric.command.strip().startswith("@collect "):
            return self.collect(metric, started)
        env = command_environment(self.environ, self.secrets, self.passed)
        env.update(UNENTROPY_COMMIT_SHA=build.commit_sha, UNENTROPY_BRANCH=build.branch,
                   UNENTROPY_RUN_ID=build.run_id, UNENTROPY_RUN_NUMBER=str(build.run_number or ""),
                   UNENTROPY_ACTOR=build.actor or "", UNENTROPY_METRIC_KEY=metric.id,
                   UNENTROPY_METRIC_TYPE=metric.type)
        try:
            process = subprocess.Popen(["/bin/sh", "-c", metric.command], cwd=self.workdir, env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return MetricOutcome(metric.id, error=f"cannot start the command: {exc}")
        with self.lock:
            self.live.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            return MetricOutcome(metric.id, error=f"timed out after {timeout:g} s (the command and "
                                 "everything it started were killed)",
                                 duration_ms=elapsed_ms(started))
        except BaseException:  # cancelled: nothing the command started may outlive the run
            kill_group(process)
            raise
        finally:
            with self.lock:
                self.live.discard(process)
        return self._outcome(metric, process.returncode, stdout, stderr, started)

    def collect(self, metric: MetricConfig, started: float) -> MetricOutcome:
        """A built-in collector, run in this process (no shell, no timeout: as Unentropy)."""
        try:
            value = run_collector(metric.command.strip()[len("@collect "):], self.sources, self.base,
                                  self.workdir)
            if not math.isfinite(value):
                raise CollectError(f"the collector produced {js_string(value)}")
        except CollectError as exc:
            return MetricOutcome(metric.id, error=f"@collect failed: {exc}", duration_ms=elapsed_ms(started))
        return self._outcome(metric, 0, js_string(value).encode(), b"", started)

    def _outcome(self, metric, returncode, stdout: bytes, stderr: bytes, started) -> MetricOutcome:
        err_tail = stderr.decode("utf-8", "replace").strip()[-500:]
        outcome = MetricOutcome(metric.id, duration_ms=elapsed_ms(started))
        try:
            # Stored as printed; everything shown (logs, report, summary, outputs) is redacted.
            outcome.value = parse_value(stdout.decode("utf-8", "replace"), metric.type)
        except ValueError as exc:
            status = f"exited with {returncode}; " if returncode else ""
            outcome.error = f"{status}{exc}" + (f"; stderr: {err_tail}" if err_tail else "")
            return outcome
        warnings = []
        if returncode:
            warnings.append(f"exited with {returncode} but printed a valid value; recorded "
                            "it" + (f" (stderr: {err_tail})" if err_tail else ""))
        if metric.type == "numeric" and (line := cut_short(stdout.decode("utf-8", "replace"))):
            warnings.append(f"recorded {js_string(outcome.value)} from {line[:60]!r}, as Unentropy reads it: the "
                            "number stops before the rest of the line; print plain digits (1234, not 1,234) "
                            "if another value was meant")
        outcome.warning = "; ".join(warnings) or None
        return outcome

    def kill_all(self) -> None:
        with self.lock:
            for process in list(self.live):
                kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


CREDENTIAL_VARIABLES = frozenset({  # never handed to a metric command: a pull request can change it
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "GITHUB_TOKEN", "GH_TOKEN", "ACTIONS_RUNTIME_TOKEN", "ACTIONS_RUNTIME_URL", "ACTIONS_RESULTS_URL",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_CACHE_URL",
    "INPUT_S3-ACCESS-KEY-ID", "INPUT_S3-SECRET-ACCESS-KEY", "INPUT_S3-SESSION-TOKEN", "INPUT_GITHUB-TOKEN"})


def command_environment(environ: Mapping[str, str], secrets: Sequence[str],
                        passed: Sequence[str] = ()) -> dict[str, str]:
    """The run's environment without credentials (the list above, and any variable holding a
    secret value), except the variables the user passes by name (--pass-env GITHUB_TOKEN)."""
    return {name: value for name, value in environ.items() if name in passed or (
        name not in CREDENTIAL_VARIABLES and not any(
            len(secret) >= MIN_SECRET_LENGTH and secret in value for secret in secrets))}


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def collect_metrics(metrics: Sequence[MetricConfig], runner: CommandRunner, build: BuildContext,
                    jobs: int, deadline: float) -> list[MetricOutcome]:
    """Run every metric command (up to `jobs` at once); results come back in config order."""
    def one(metric: MetricConfig) -> MetricOutcome:
        remaining = deadline - time.monotonic()
        timeout = min((metric.timeout or DEFAULT_COMMAND_TIMEOUT) * metric.repeat, max(remaining, 0.1))
        return runner.run(metric, build, timeout)

    if jobs <= 1:
        return [one(metric) for metric in metrics]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            return list(pool.map(one, metrics))
        except BaseException:
            runner.kill_all()
            raise


def git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def detect_build(environ: Mapping[str, str], params: ActionParameters, now: dt.datetime,
                 git_lookup: Callable[[Sequence[str]], str | None]) -> BuildContext:
    """The build's context from GitHub Actions, GitLab CI, or git; flags override each field."""
    commit = branch = run_id = event = actor = None
    run_number: str | None = None
    if environ.get("GITHUB_ACTIONS") == "true":
        commit = github_head_sha(environ) or environ.get("GITHUB_SHA")
        ref = environ.get("GITHUB_REF", "")
        branch = (environ.get("GITHUB_HEAD_REF") or environ.get("GITHUB_REF_NAME")
                  or re.sub(r"^refs/(heads|tags)/", "", ref) or None)
        run_id, run_number = environ.get("GITHUB_RUN_ID"), environ.get("GITHUB_RUN_NUMBER")
        event, actor = environ.get("GITHUB_EVENT_NAME"), environ.get("GITHUB_ACTOR")
    elif environ.get("GITLAB_CI") == "true":
        commit = environ.get("CI_COMMIT_SHA")
        branch = (environ.get("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME")
                  or environ.get("CI_COMMIT_REF_NAME"))
        run_id, run_number = environ.get("CI_PIPELINE_ID"), environ.get("CI_PIPELINE_IID")
        event, actor = environ.get("CI_PIPELINE_SOURCE"), environ.get("GITLAB_USER_LOGIN")
        event = {"merge_request_event": "pull_request", "external_pull_request_event": "pull_request"
                 }.get(event or "", event)
    elif environ.get("CI", "").lower() in ("true", "1"):  # any other CI: a push unless it says PR
        pull = [environ.get(name, "") for name in PULL_REQUEST_VARIABLES]
        event = "pull_request" if any(value and value != "false" for value in pull) else "push"
    commit = params.commit or commit or git_lookup(["rev-parse", "HEAD"]) or "unknown"
    branch = params.branch or branch or git_lookup(["rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    timestamp = utc_stamp(now)
    run_id = params.run_id or run_id or "local-" + now.strftime("%Y%m%dT%H%M%S%fZ")
    number = params.run_number if params.run_number is not None else (
        int(run_number) if run_number and run_number.isdigit() else None)
    event = params.event or event or ("local" if not run_number else None)
    return BuildContext(commit, branch, run_id, number, event, timestamp, actor or environ.get("USER"))


# How CIs other than GitHub and GitLab say a build is for a pull request.
PULL_REQUEST_VARIABLES = ("CIRCLE_PULL_REQUEST", "BUILDKITE_PULL_REQUEST", "CHANGE_ID",
                          "SYSTEM_PULLREQUEST_PULLREQUESTID", "TRAVIS_PULL_REQUEST", "BITBUCKET_PR_ID",
                          "DRONE_PULL_REQUEST", "CI_PULL_REQUEST")


def github_head_sha(environ: Mapping[str, str]) -> str | None:
    """On pull_request events GITHUB_SHA is a merge commit; the PR's head commit is in the event."""
    if not environ.get("GITHUB_EVENT_NAME", "").startswith("pull_request"):
        return None
    try:
        with open(environ.get("GITHUB_EVENT_PATH", ""), encoding="utf-8") as handle:
            return json.load(handle)["pull_request"]["head"]["sha"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ============================================================================================
# Built-in collectors (@collect), as Unentropy 0.3.16 computes them
# ============================================================================================

JS_SPACE_CLASS = "[" + JS_SPACE + "]"
JS_NON_SPACE = re.compile("[^" + JS_SPACE + "]")
JS_EMPTY_LINES = re.compile("^" + JS_SPACE_CLASS + "*$", re.M)
JS_END_OF_LINE = re.compile("$", re.M)
GLOB_CHARS = re.compile(r"[*?\[\]{}]")
VCS_FOLDERS = {".git", ".hg", ".svn"}
COLLECTORS = ("loc", "size", "coverage-lcov", "coverage-cobertura", "coverage-clover")
# The `sloc` library's languages: extension → (single-line comment, block start, block stop).
_C, _BLOCK_C = r"/{2}", (r"/\*+", r"\*/{1}")
SLOC_RULES: dict[str, tuple] = {}
for _exts, _rule in (
        ("coffee iced", (r"#[^{]", r"#{3}", r"#{3}")),
        ("cr ls mochi nix r rb jl pl prql yaml hr rpy py", (r"#", None, None)),
        ("js jsx mjs c cc cpp cs cxx h m mm hpp hx hxx ino java php php5 go groovy scss less rs sass "
         "styl scala swift ts jade gs nut kt kts tsx fs fsi fsx bsl dart", (_C, None, None)),
        ("latex tex sty cls erl ly ily", (r"%", None, None)),
        ("agda lua hs sql", (r"--", None, None)),
        ("brs monkey vb", (r"'", None, None)),
        ("rkt clj cljs hy asm", (r";", None, None)),
        ("f90 f95 f03 f08 f18", (r"!", None, None)),
        ("nim", (r"(?:^[^#]*)(#)(?:(?![#!]))", r"#{2}", None)),
        ("handlebars hbs mustache css svg html htm xml vue ml mli", (None, None, None))):
    for _ext in _exts.split():
        SLOC_RULES[_ext] = _rule
for _exts, _block in (
        ("js jsx mjs c cc cpp cs cxx h m mm hpp hx hxx ino java ls nix php php5 go css sass scss less "
         "rs styl scala ts gs groovy nut kt kts tsx sql dart", _BLOCK_C),
        ("py rpy", (r"\"{3}|'{3}", r"\"{3}|'{3}")), ("handlebars hbs mustache", (r"\{\{!", r"\}\}")),
        ("hs agda", (r"\{-", r"-\}")), ("html htm svg xml vue", (r"<!--", r"-->")),
        ("lua", (r"--\[{2}", r"--\]{2}")), ("monkey", (r"(?i)#rem", r"(?i)#end")),
        ("rb", (r"=begin", r"=end")), ("rkt", (r"#\|", r"\|#")), ("jl", (r"#=", r"=#")),
        ("ml mli fs fsi fsx", (r"\(\*", r"\*\)")), ("ly ily", (r"%\{", r"%\}"))):
    for _ext in _exts.split():
        SLOC_RULES[_ext] = (SLOC_RULES[_ext][0], *_block)
LANGUAGES = {
    "TypeScript": "ts tsx", "JavaScript": "js jsx mjs", "Python": "py", "Go": "go", "Java": "java",
    "PHP": "php php5", "Ruby": "rb", "Rust": "rs", "C": "c h", "C++": "cpp cc cxx hpp hxx", "C#": "cs",
    "CSS": "css scss sass less styl", "HTML": "html htm", "SQL": "sql", "Vue": "vue",
    "Kotlin": "kt kts", "Swift": "swift", "Scala": "scala", "Dart": "dart", "Erlang": "erl",
    "Haskell": "hs", "Lua": "lua", "XML": "xml", "YAML": "yaml", "F#": "fs fsi fsx", "Groovy": "groovy",
    "Objective-C": "m mm", "Perl": "pl", "R": "r", "Crystal": "cr", "Nim": "nim", "Nix": "nix",
    "CoffeeScript": "coffee iced", "Clojure": "clj cljs", "Julia": "jl", "Lisp": "rkt", "JSON": "json",
    "OCaml": "ml mli", "Visual Basic": "vb", "Markdown": "md",
}


class CollectError(Exception):
    """A built-in collector could not produce a value (the metric fails, as in Unentropy)."""


def js_count(pattern: re.Pattern, text: str) -> int:
    """How many matches JavaScript's String.match(/…/g) finds (an empty match steps one on)."""
    found, position = 0, 0
    while position <= len(text) and (match := pattern.search(text, position)):
        found += 1
        position = match.end() + (match.end() == match.start())
    return found


def _first_match(pattern: re.Pattern | None, text: str, group: int = 0) -> tuple[int, str] | None:
    """(index, text) of a regex's first match; for a group, sloc's own index arithmetic."""
    match = pattern.search(text) if pattern is not None else None
    if match is None:
        return None
    if group:
        return match.start() + len(match.group(1)), match.group(1)
    return match.start(), match.group(0)


def sloc_source_lines(code: str, extension: str) -> int:
    """Source lines (not blank, not comment-only) exactly as the `sloc` library counts them."""
    single_rule, start_rule, stop_rule = SLOC_RULES[extension]
    single = re.compile(single_rule) if single_rule else None
    start = re.compile(start_rule) if start_rule else None
    stop_re = re.compile(stop_rule) if stop_rule else None
    group = 1 if extension == "nim" else 0
    code = re.sub(r"\r\n|\r", "\n", code)
    if code.endswith("\n"):
        code = code[:-1]
    total = 1 + code.count("\n")
    empty = js_count(JS_EMPTY_LINES, code)
    found: dict[str, list] = {"single": [], "block": [], "mixed": []}
    last: list[int] | None = None
    index = 0

    def mixed(lines: list[str], at: int, start_at: int | None, match: tuple | None) -> None:
        if JS_NON_SPACE.search(lines[0]) and ((last and last[1] == at) or start_at == at):
            found["mixed"].append([at, at, 0])
        if match is not None and JS_NON_SPACE.search(lines[-1][:match[0]]):
            found["mixed"].append([start_at, start_at, 0])

    while code:
        if code[0] == "\n":
            code, index = code[1:], index + 1
            continue
        block_match, single_match = _first_match(start, code), _first_match(single, code, group)
        if not (block_match or single_match):
            mixed(code.split("\n"), index, None, None)
            break
        kind = "single" if single_match and (not block_match or block_match[0] > single_match[0]) else "block"
        match = single_match if kind == "single" else block_match
        comment_start = match[0] + len(match[1])
        comment = code[comment_start:]
        lines = code[:match[0]].split("\n")
        start_at = len(lines) - 1 + index
        stop = _first_match(JS_END_OF_LINE if kind == "single" else (stop_re or JS_END_OF_LINE), comment)
        if stop is None:
            break  # an unterminated block comment: sloc stops counting comments here
        blank = js_count(JS_EMPTY_LINES, code[match[0]:comment_start + stop[0] + len(stop[1])])
        comment = comment[:stop[0]]
        span = comment.count("\n")
        code = code[comment_start + len(comment) + len(stop[1]):]
        mixed(lines, index, start_at, match)
        last = [start_at, start_at + span, blank]
        found[kind].append(last)
        index = start_at + span

    def line_sum(spans: list) -> int:
        return sum(stop - begin + 1 - (i + 1 < len(spans) and spans[i + 1][0] == stop)
                   for i, (begin, stop, _) in enumerate(spans))

    block_ends = [stop for _, stop, _ in found["block"]]
    comment_lines = line_sum(found["block"]) + line_sum(found["single"]) \
        - sum(begin in block_ends for begin, _, _ in found["single"])
    block_empty = sum(blank for _, _, blank in found["block"])
    return total - comment_lines - empty + block_empty + line_sum(found["mixed"])


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def js_string(value: float) -> str:
    """A number as JavaScript's String() writes it (7, not 7.0)."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))


def js_int(text: Any) -> float:
    """JavaScript's parseInt(text, 10): the leading whole number, or NaN."""
    match = re.match(r"[+-]?[0-9]+", str(text or "").lstrip(JS_SPACE))
    return int(match.group(0)) if match else math.nan


def glob_regex(pattern: str) -> re.Pattern:
    """A micromatch-style glob (**, *, ?, [..], {a,b}) as a regex over '/'-separated paths;
    '*' and '**' do not match names starting with '.' unless the pattern spells the dot."""
    pattern = pattern[2:] if pattern.startswith("./") else pattern
    out, i, depth = [], 0, 0
    while i < len(pattern):
        char = pattern[i]
        at_segment = i == 0 or pattern[i - 1] == "/"
        if pattern.startswith("**", i) and at_segment and pattern[i + 2:i + 3] in ("/", ""):
            tail = pattern[i + 2:i + 3] == "/"
            out.append(r"(?:(?!\.)[^/]*(?:/(?!\.)[^/]*)*/)?" if tail else r"(?:(?!\.)[^/]*(?:/(?!\.)[^/]*)*)?")
            i += 3 if tail else 2
            continue
        if char == "*":
            out.append((r"(?!\.)" if at_segment else "") + r"[^/]*")
        elif char == "?":
            out.append(r"[^/]")
        elif char == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        elif char == "{":
            out.append("(?:")
            depth += 1
        elif char == "}" and depth:
            out.append(")")
            depth -= 1
        elif char == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + ")" * depth)


def matches_sources(path: str, patterns: Sequence[str], base: Path) -> bool:
    """Unentropy's sources filter (micromatch): a path is kept when a pattern matches it and no
    later `!pattern` does; absolute paths are taken relative to the configuration's folder."""
    normalized = path.replace("\\", "/")
    normalized = normalized[2:] if normalized.startswith("./") else normalized
    if os.path.isabs(normalized):
        normalized = os.path.relpath(normalized, base.resolve()).replace(os.sep, "/")
    kept = omitted = False
    for pattern in patterns:  # in order, as micromatch: a later pattern overrules an earlier one
        if pattern.startswith("!"):
            omitted = omitted or bool(glob_regex(pattern[1:]).fullmatch(normalized))
        elif glob_regex(pattern).fullmatch(normalized):
            kept, omitted = True, False
    return (kept or all(p.startswith("!") for p in patterns)) and not omitted


def normalize_sources(patterns: Sequence[str], base: Path) -> list[str]:
    """A pattern naming a directory means everything under it (as Unentropy's loader)."""
    result = []
    for pattern in patterns:
        negated, core = pattern.startswith("!"), pattern.lstrip("!") if pattern.startswith("!") else pattern
        if not GLOB_CHARS.search(core) and (base / core).is_dir():
            result.append(("!" if negated else "") + core.rstrip("/") + "/**")
        else:
            result.append(pattern)
    return result


def glob_paths(patterns: Sequence[str], cwd: Path, only_files: bool = True,
               ignore: Sequence[str] = ()) -> list[Path]:
    """What fast-glob finds for these patterns under `cwd` (no symbolic links followed, no
    dot-files unless a pattern spells them, `!pattern` and `ignore` leaving entries out);
    each pattern is walked from its static folder, which may lie above `cwd` (`../src/**`)."""
    negative = [glob_regex(p[1:]) for p in patterns if p.startswith("!")] + [glob_regex(p) for p in ignore]
    found: dict[str, Path] = {}
    for pattern in (p[2:] if p.startswith("./") else p for p in patterns if not p.startswith("!")):
        regex, parts = glob_regex(pattern), pattern.split("/")
        static = "/".join(itertools.takewhile(lambda part: not GLOB_CHARS.search(part), parts[:-1]))
        root = cwd / static if static else cwd
        if not root.is_dir():
            if not GLOB_CHARS.search(pattern) and (cwd / pattern).is_file():
                found.setdefault(os.path.normpath(cwd / pattern), cwd / pattern)
            continue
        for folder, directories, files in os.walk(root):
            relative = os.path.relpath(folder, root).replace(os.sep, "/")
            prefix = (static + "/" if static else "") + ("" if relative == "." else relative + "/")
            directories[:] = [d for d in directories if not os.path.islink(os.path.join(folder, d))
                              and not any(r.fullmatch(prefix + d) for r in negative)]
            for name in files + ([] if only_files else directories):
                full = os.path.join(folder, name)
                path = prefix + name
                if (only_files and os.path.islink(full)) or not regex.fullmatch(path) \
                        or any(r.fullmatch(path) for r in negative):
                    continue
                found.setdefault(os.path.normpath(full), Path(full))
    return list(found.values())


def collect_loc(path: str | None, language: str | None, excludes: Sequence[str],
                sources: Sequence[str] | None, base: Path, cwd: Path) -> int:
    if path is not None:
        root = cwd / path
        if not root.exists():
            raise CollectError(f"Directory not found: {path}")
        if not root.is_dir():
            raise CollectError(f"Path is not a directory: {path}")
        skipped = {name.lower() for name in excludes} | VCS_FOLDERS
        files = []
        for folder, directories, names in os.walk(root):
            directories[:] = [d for d in directories if d.lower() not in skipped
                              and not os.path.islink(os.path.join(folder, d))]
            files += [Path(folder, n) for n in names if not os.path.islink(os.path.join(folder, n))]
    elif sources:
        files = glob_paths(sources, base, ignore=excludes)
    else:
        raise CollectError("Path is required when sources is not configured")
    allowed = set(LANGUAGES.get(language, "").split()) if language else None
    fallback_only = language is not None and not allowed
    total = 0
    for file in files:
        extension = os.path.splitext(file.name)[1].lower()[1:]
        if allowed and extension not in allowed:
            continue
        content = read_text(file)
        if not fallback_only and extension in SLOC_RULES:
            total += sloc_source_lines(content, extension)
        else:
            total += sum(1 for line in content.split("\n") if line.strip(JS_SPACE))
    return total


def folder_size(path: Path) -> int:
    """get-folder-size: every entry's own size (directories included), each inode once."""
    seen, total = set(), 0
    pending = [str(path)]
    while pending:
        item = pending.pop()
        stats = os.lstat(item)
        if stats.st_ino not in seen:
            seen.add(stats.st_ino)
            total += stats.st_size
        if stat.S_ISDIR(stats.st_mode):
            pending += [os.path.join(item, name) for name in os.listdir(item)]
    return total


def collect_size(paths: Sequence[str], sources: Sequence[str] | None, base: Path) -> int:
    if not paths:
        if not sources:
            raise CollectError("At least one path is required when sources is not configured")
        return sum(os.lstat(file).st_size for file in glob_paths(sources, base))
    total = 0
    for path in paths:
        if GLOB_CHARS.search(path):
            matched = glob_paths([path], base, only_files=False)
            if not matched:
                raise CollectError(f"No files matched glob pattern: {path}")
            total += sum(folder_size(item) for item in matched)
        else:
            try:
                total += folder_size(base / path)
            except FileNotFoundError:
                raise CollectError(f"ENOENT: no such file or directory, lstat '{path}'") from None
    return total


def collect_lcov(path: str, kind: str, fallback: float, sources: Sequence[str] | None,
                 base: Path, cwd: Path) -> float:
    records, current = [], {"file": "", "LF": 0.0, "LH": 0.0, "BRF": 0.0, "BRH": 0.0, "FNF": 0.0, "FNH": 0.0}
    for line in re.split(r"\r?\n", read_text(cwd / path)):
        if not line.strip():
            continue
        if line.strip().startswith("end_of_record"):
            records.append(current)
            current = {"file": "", "LF": 0.0, "LH": 0.0, "BRF": 0.0, "BRH": 0.0, "FNF": 0.0, "FNH": 0.0}
        prefix, _, payload = line.partition(":")
        prefix, payload = prefix.upper().strip(), payload.strip()
        if prefix == "SF":
            current["file"] = payload
        elif prefix in current:
            current[prefix] = js_number(payload)
    if sources:
        records = [r for r in records if matches_sources(r["file"], sources, base)]
    found_key, hit_key = {"line": ("LF", "LH"), "branch": ("BRF", "BRH"), "function": ("FNF", "FNH")}[kind]
    found = sum(r[found_key] for r in records)
    hit = sum(r[hit_key] for r in records)
    if not found or math.isnan(found):
        return fallback
    return hit / found * 100


def js_number(text: str) -> float:
    """JavaScript's Number(text) for the integers LCOV holds ("" is 0, junk is NaN)."""
    text = text.strip(JS_SPACE)
    if not text:
        return 0.0
    try:
        return float(text) if JS_FLOAT.fullmatch(text) and "Infinity" not in text else math.nan
    except ValueError:
        return math.nan


def _xml_root(path: Path, fmt: str):
    import xml.etree.ElementTree as ElementTree
    try:
        root = ElementTree.fromstring(read_text(path))
    except ElementTree.ParseError:
        raise CollectError(f"Failed to parse {fmt} XML: {path}") from None
    if root.tag != "coverage":
        raise CollectError(f"Missing coverage element in: {path}")
    return root


def _line_union(entries: Iterator[tuple[str, Iterator[tuple[float, bool]]]]) -> float:
    """Coverage of the union of line numbers per file (covered when any report hit it)."""
    total: dict[str, set] = {}
    covered: dict[str, set] = {}
    for name, lines in entries:
        for number, hit in lines:
            if not math.isnan(number):
                total.setdefault(name, set()).add(number)
                if hit:
                    covered.setdefault(name, set()).add(number)
    valid = sum(len(s) for s in total.values())
    return sum(len(s) for s in covered.values()) / valid * 100 if valid else 0.0


def collect_cobertura(paths: Sequence[str], kind: str, sources: Sequence[str] | None,
                      base: Path, cwd: Path) -> float:
    reports = [(path, _xml_root(cwd / path, "Cobertura")) for path in paths]

    def classes(root):
        for package in root.findall("./packages/package"):
            for cls in package.findall("./classes/class"):
                if not sources or matches_sources(cls.get("filename", ""), sources, base):
                    yield package, cls

    if kind == "line":
        return _line_union((cls.get("filename", ""), (
            (js_int(line.get("number")), js_int(line.get("hits") or "0") > 0)
            for line in cls.findall("./lines/line"))) for _, root in reports for _, cls in classes(root))
    if kind == "branch":
        covered = valid = 0
        for path, root in reports:
            if not sources:
                if root.get("lines-covered") is None or root.get("lines-valid") is None:
                    raise CollectError(f"Missing lines-covered/lines-valid attributes in: {path}")
                if root.get("branches-covered") is not None and root.get("branches-valid") is not None:
                    covered, valid = covered + js_int(root.get("branches-covered")), valid + js_int(root.get("branches-valid"))
                continue
            for _, cls in classes(root):
                for line in cls.findall("./lines/line"):
                    counts = re.search(r"\((\d+)/(\d+)\)", line.get("condition-coverage") or "")
                    if line.get("branch") == "true" and counts:
                        covered, valid = covered + int(counts.group(1)), valid + int(counts.group(2))
        return covered / valid * 100 if valid else 0.0
    methods: dict[tuple, float] = {}
    for _, root in reports:
        for package, cls in classes(root):
            for method in cls.findall("./methods/method"):
                key = (package.get("name"), cls.get("name"), method.get("name"), method.get("signature"))
                rate = js_parse_float(method.get("line-rate") or "")
                rate = math.nan if rate is None else rate
                if key not in methods or (not math.isnan(rate) and (math.isnan(methods[key]) or rate > methods[key])):
                    methods[key] = rate
    if not methods:
        raise CollectError("No function coverage data found in any report")
    return sum(1 for rate in methods.values() if not math.isnan(rate) and rate > 0) / len(methods) * 100


def collect_clover(paths: Sequence[str], kind: str, sources: Sequence[str] | None,
                   base: Path, cwd: Path) -> float:
    files = []
    for path in paths:
        root = _xml_root(cwd / path, "Clover")
        project = root.find("./project")
        if project is None:
            raise CollectError(f"Missing project element in: {path}")
        for file in project.findall("./file") + project.findall("./package/file"):
            if not sources or matches_sources(file.get("name", ""), sources, base):
                files.append((file.get("name", ""), file))
    if kind == "line":
        return _line_union((name, ((js_int(line.get("num")), js_int(line.get("count") or "0") > 0)
                                   for line in file.findall("./line") if line.get("type") == "stmt"))
                           for name, file in files)
    covered_name, valid_name = {"branch": ("coveredconditionals", "conditionals"),
                                "function": ("coveredmethods", "methods")}[kind]
    covered = valid = 0
    for _, file in files:
        metrics = file.find("./metrics")
        if metrics is not None and metrics.get(covered_name) is not None and metrics.get(valid_name) is not None:
            covered += _or_zero(js_int(metrics.get(covered_name)))
            valid += _or_zero(js_int(metrics.get(valid_name)))
    return covered / valid * 100 if valid else 0.0


def _or_zero(value: float) -> float:
    return 0 if math.isnan(value) else value


def split_arguments(text: str) -> list[str]:
    """Unentropy's @collect argument splitting: spaces and tabs, '…' and "…" quotes."""
    tokens, current, quote = [], "", None
    for char in text:
        if quote:
            if char == quote:
                quote = None
            else:
                current += char
        elif char in "'\"":
            quote = char
        elif char in " \t":
            if current:
                tokens.append(current)
            current = ""
        else:
            current += char
    return tokens + ([current] if current else [])


COLLECT_OPTIONS = {  # collector → {option: (alias, takes an array)}
    "loc": {"language": ("l", False), "exclude": ("e", True)},
    "size": {},
    "coverage-lcov": {"type": ("t", False), "fallback": (None, False)},
    "coverage-cobertura": {"type": ("t", False)},
    "coverage-clover": {"type": ("t", False)},
}


def parse_collect(tokens: Sequence[str]) -> tuple[str, list[str], dict[str, Any]]:
    """(collector, positional arguments, options) of an @collect command, or CollectError."""
    if not tokens:
        raise CollectError(f"No collector specified. Available collectors: {', '.join(COLLECTORS)}")
    name, rest = tokens[0], list(tokens[1:])
    if name not in COLLECT_OPTIONS:
        raise CollectError(f"Unknown collector {name!r}. Available collectors: {', '.join(COLLECTORS)}")
    known = COLLECT_OPTIONS[name]
    aliases = {alias: option for option, (alias, _) in known.items() if alias}
    positional: list[str] = []
    options: dict[str, Any] = {}
    while rest:
        token = rest.pop(0)
        if not token.startswith("-") or token == "-" or re.fullmatch(r"-[0-9.]+", token):
            positional.append(token)
            continue
        option, _, inline = token.lstrip("-").partition("=")
        option = aliases.get(option, option)
        array = known.get(option, (None, False))[1]
        values = [inline] if inline else []
        while rest and not rest[0].startswith("-") and (array or not values):
            values.append(rest.pop(0))
        if option not in known:  # as Unentropy's yargs: an unknown option (and its value) is ignored
            continue
        if not values:
            raise CollectError(f"Not enough arguments following: {option}")
        # A repeated array option adds to it (--exclude a --exclude b); another one's last wins.
        options[option] = options.get(option, []) + values if array else values[0]
    if "type" in options and options["type"] not in ("line", "branch", "function"):
        raise CollectError(f"Invalid values: Argument: type, Given: {options['type']!r}, "
                           "Choices: \"line\", \"branch\", \"function\"")
    return name, positional, options


def run_collector(arguments: str, sources: Sequence[str] | None, base: Path, cwd: Path) -> float:
    """The value of `@collect <arguments>`, computed here, in the standard library."""
    name, positional, options = parse_collect(split_arguments(arguments))
    sources = normalize_sources(sources, base) if sources else None
    kind = options.get("type", "line")
    try:
        if name == "loc":
            if len(positional) > 1:
                raise CollectError(f"Unknown arguments: {', '.join(positional[1:])}")
            return collect_loc(positional[0] if positional else None, options.get("language"),
                               options.get("exclude", []), sources, base, cwd)
        if name == "size":
            return collect_size(positional, sources, base)
        if not positional:
            raise CollectError("Not enough non-option arguments: got 0, need at least 1")
        if name == "coverage-lcov":
            if len(positional) > 1:
                raise CollectError(f"Unknown arguments: {', '.join(positional[1:])}")
            fallback = js_parse_float(options.get("fallback", "0"))
            return collect_lcov(positional[0], kind, math.nan if fallback is None else fallback,
                                sources, base, cwd)
        collect = collect_cobertura if name == "coverage-cobertura" else collect_clover
        return collect(positional, kind, sources, base, cwd)
    except OSError as exc:
        raise CollectError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


# ============================================================================================
# Report
# ============================================================================================

@dataclass
class Series:
    """What the report shows of one metric; builds are named by id."""
    id: str
    type: str
    unit: str | None
    name: str
    description: str | None
    direction: str
    count: int = 0
    drawn: list[tuple[int, Any]] = field(default_factory=list)  # (build, value) to draw, by build id
    minimum: Any = None
    maximum: Any = None
    last_two: list[tuple[int, Any]] = field(default_factory=list)  # the previous and the latest (build, value)
    changes: list[tuple[int, Any]] = field(default_factory=list)  # labels: the last changes
    change_count: int = 0


class Builds:
    """The builds a report covers: how many, their span and branches, the newest few, and the
    details of the builds the report names, read by id when asked."""

    def __init__(self, connection: sqlite3.Connection, branch: str | None, recent: int = 20):
        # As Unentropy's report: the trend is push and import builds; a branch chosen shows all of
        # its builds (its pull requests too), and a history without trend builds (a laptop's) all.
        trend, other = connection.execute(
            f"SELECT EXISTS (SELECT 1 FROM build_contexts WHERE event_name IN {TREND_SQL}), {OTHER_BUILDS}").fetchone()
        self.trend_only = not branch and trend == 1
        # Filtered only when there is something to leave out: the (timestamp, id) index alone then
        # walks a history of trend builds, without reading each build's row for its event.
        where, arguments = (" WHERE branch = ?", (branch,)) if branch else \
            (f" WHERE event_name IN {TREND_SQL}", ()) if self.trend_only and other else ("", ())
        self.connection, self.filter = connection, (where.replace(" WHERE ", " AND b."), arguments)
        self.total, first, last = connection.execute(
            f"SELECT COUNT(*), MIN(timestamp), MAX(timestamp) FROM build_contexts{where}", arguments).fetchone()
        self.span = [str(first or ""), str(last or "")]
        counted = connection.execute(f"SELECT branch, COUNT(*) FROM build_contexts{where} GROUP BY branch"
                                     " ORDER BY branch", arguments).fetchall()
        self.branches = [str(name) for name, _ in counted]
        self.per_branch = [number for _, number in counted]  # the header's count when a branch is chosen
        self.details: dict[int, tuple[str, str, Any, str]] = {}  # id → commit, branch, run, time
        self.times: dict[int, float] = {}  # id → seconds
        self.newest = [build_id for (build_id,) in connection.execute(  # idx_build_timestamp holds (time, id)
            f"SELECT id FROM build_contexts{where} ORDER BY timestamp DESC, id DESC LIMIT ?", (*arguments, recent))]

    def __len__(self) -> int:
        return self.total

    def describe(self, ids: Iterator[int]) -> None:
        """Read the details of these builds (in chunks: SQLite limits a query's parameters)."""
        wanted = sorted({build_id for build_id in ids if build_id not in self.details})
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            for build_id, commit, branch, run_number, timestamp in self.connection.execute(
                    "SELECT id, commit_sha, branch, run_number, timestamp FROM build_contexts WHERE id IN"
                    f" ({','.join('?' * len(chunk))})", chunk):
                self.details[build_id] = (str(commit), str(branch), run_number, str(timestamp))
                self.times[build_id] = parse_time(timestamp)


def read_history(path: Path, connection: sqlite3.Connection, configured: Sequence[MetricConfig],
                 branch: str | None = None, recent: int = 20,
                 limit: int = 1000) -> tuple[Builds, Iterator[Series], dict[tuple[str, int], Any]]:
    """The builds, the newest builds' values and, one metric at a time, what the report needs of
    it: at most about `limit` points to draw (each bucket's lowest and highest, and the latest),
    while count, minimum and maximum cover every value. Numeric metrics come from the summary
    when the file's seal vouches for it (a few thousand rows at any history size), otherwise —
    and for one branch — from their values."""
    builds = Builds(connection, branch, recent)
    by_id = {metric.id: metric for metric in configured}
    definitions = connection.execute(
        "SELECT id, type, unit, description FROM metric_definitions ORDER BY rowid").fetchall()
    cells = dict(((str(metric_id), build_id), value) for build_id, metric_id, value in connection.execute(
        "SELECT build_id, metric_id, CASE WHEN typeof(value_numeric) IN ('integer', 'real') THEN value_numeric"
        " WHEN typeof(value_label) = 'text' THEN value_label END FROM metric_values WHERE build_id IN"
        f" ({','.join('?' * len(builds.newest))})", builds.newest) if value is not None)
    summarised = builds.trend_only and summary_trusted(path, connection)  # the summary holds the trend
    # The largest block size that still gives 250 blocks (1,000 points' worth); fewer builds: values.
    size = max([s for s in SUMMARY_SIZES if builds.total // s >= limit // 4] or [0])
    filter_sql, filter_arguments = builds.filter

    def series() -> Iterator[Series]:
        for metric_id, kind, unit, description in definitions:
            metric = by_id.get(metric_id)
            item = Series(str(metric_id), str(kind), (metric.unit if metric and metric.unit else None) or unit,
                          (metric.name if metric and metric.name else None) or str(metric_id),
                          (metric.description if metric and metric.description else None) or description,
                          metric.direction if metric else "neutral")
            column, types = ("value_numeric", "'integer', 'real'") if kind == "numeric" else ("value_label", "'text'")
            in_time_order = (  # CROSS JOIN: walk the index on (timestamp, id), find each build's value by key
                f"SELECT b.id, v.{column} FROM build_contexts b CROSS JOIN metric_values v ON v.metric_id = ?"
                f" AND v.build_id = b.id WHERE typeof(v.{column}) IN ({types}){filter_sql} ORDER BY b.timestamp")
            item.last_two = connection.execute(f"{in_time_order} DESC, b.id DESC LIMIT 2",
                                               (metric_id, *filter_arguments)).fetchall()[::-1]
            if kind != "numeric":  # labels: their runs of equal values, or every value in time order
                if summarised:
                    item.count, item.change_count = connection.execute(
                        "SELECT COALESCE(SUM(n), 0), COUNT(*) FROM track_metrics_labels WHERE metric_id = ?",
                        (metric_id,)).fetchone()
                    item.changes = connection.execute(
                        "SELECT first_build, value FROM track_metrics_labels WHERE metric_id = ? ORDER BY run"
                        " DESC LIMIT 10", (metric_id,)).fetchall()[::-1]
                else:
                    label_changes(item, connection.execute(f"{in_time_order}, b.id", (metric_id, *filter_arguments)))
                yield item
                continue
            if summarised and size:
                blocks = connection.execute(
                    "SELECT n, lo, lo_build, hi, hi_build FROM track_metrics_summary WHERE size = ?"
                    " AND metric_id = ? ORDER BY block", (size, metric_id)).fetchall()
            else:
                rows = connection.execute(
                    f"SELECT v.metric_id, v.build_id, v.value_numeric FROM metric_values v"
                    f"{' JOIN build_contexts b ON b.id = v.build_id' if filter_sql else ''} WHERE v.metric_id = ?"
                    f" AND typeof(v.build_id) = 'integer' AND typeof(v.value_numeric) IN ('integer', 'real')"
                    f"{filter_sql}", (metric_id, *filter_arguments))
                folded = fold_values(rows, max(1, builds.total // limit))
                blocks = [folded[key] for key in sorted(folded)]
            summarise_blocks(item, blocks, limit)
            yield item
    return builds, series(), cells


def label_changes(item: Series, points: Iterator[tuple[int, Any]]) -> None:
    """A label metric from its (build, value) points in time order: its count and last changes,
    from its runs of equal values as the summary keeps them (label_runs)."""
    runs = label_runs((item.id, value, build) for build, value in points).get(item.id, [])
    item.count, item.change_count = sum(run[5] for run in runs), len(runs)
    item.changes = [(run[3], run[2]) for run in runs[-10:]]


def summarise_blocks(item: Series, blocks: Sequence[Sequence], limit: int) -> None:
    """Count, minimum and maximum of every value, and at most about `limit` points to draw: the
    lowest and highest of each bucket of consecutive blocks (spikes survive), and the latest."""
    if not blocks:
        return
    item.count = sum(block[0] for block in blocks)
    item.minimum = min(block[1] for block in blocks)
    item.maximum = max(block[3] for block in blocks)
    buckets = max(1, limit // 2 - 1)
    chunks = ([blocks[i * len(blocks) // buckets:(i + 1) * len(blocks) // buckets] for i in range(buckets)]
              if len(blocks) > buckets else [[block] for block in blocks])
    drawn: dict[int, Any] = {}
    for chunk in chunks:
        low, high = min(chunk, key=lambda block: block[1]), max(chunk, key=lambda block: block[3])
        drawn[low[2]], drawn[high[4]] = low[1], high[3]
    drawn.update(item.last_two[-1:])
    item.drawn = sorted(drawn.items())


def count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def format_number(value: float, decimals: int = 2) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.{decimals}f}".rstrip("0").rstrip(".")


def format_value(value: Any, unit: str | None) -> str:
    """A value as people read it: 85.3%, 12,345, 1.2 MB, 1m 30s."""
    if isinstance(value, str):
        return value
    if unit == "percent":
        return format_number(value, 2) + "%"
    if unit == "integer":
        return f"{round(value):,}"
    if unit == "bytes":
        size, scale = abs(value), ("B", "KB", "MB", "GB", "TB")
        index = 0
        while size >= 1024 and index < len(scale) - 1:
            size, index = size / 1024, index + 1
        sign = "-" if value < 0 else ""
        return f"{sign}{int(size)} B" if index == 0 else f"{sign}{size:.1f} {scale[index]}"
    if unit == "duration":
        return format_duration(value)
    if unit in (None, "", "decimal"):
        return format_number(value, 3 if unit == "decimal" else 2)
    return f"{format_number(value)} {unit}"


def format_duration(seconds: float) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 1:
        return f"{sign}{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{sign}{format_number(seconds, 1)}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{sign}{hours}h {minutes}m"
    return f"{sign}{minutes}m {secs}s" if secs else f"{sign}{minutes}m"


def format_change(latest: float, previous: float | None, unit: str | None) -> tuple[str, float]:
    """'+1.2 MB (+3.4%)' and the signed difference."""
    if previous is None:
        return "first value", 0.0
    delta = latest - previous
    sign = "+" if delta > 0 else ("−" if delta < 0 else "±")
    text = sign + format_value(abs(delta), unit).lstrip("-")
    if unit == "percent":  # a difference of percentages is in points; say which number is which
        text = text.rstrip("%") + " pp"
    if previous:
        text += f" ({sign}{abs(delta) / abs(previous) * 100:.1f}%{' relative' if unit == 'percent' else ''})"
    return text, delta


def parse_time(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def nice_ticks(low: float, high: float, count: int = 4, unit: str | None = None) -> list[float]:
    """Round tick values from at or below `low` to at or above `high`: round in the unit's own
    numbers (whole for integers, 1024-based for bytes, so 200 KB is a tick, not 195.3 KB)."""
    if low == high:
        low, high = low - (abs(low) * 0.1 or 1), high + (abs(high) * 0.1 or 1)
    scale = 1.0
    if unit == "bytes":  # the unit format_value will name: ticks are round in it
        while max(abs(low), abs(high)) / scale >= 1024 and scale < 1024**4:
            scale *= 1024
    raw = (high - low) / scale / count
    magnitude = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if unit in ("integer", "bytes") else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in multiples if m * magnitude >= raw)
    if unit == "integer" or (unit == "bytes" and scale == 1):
        step = max(1.0, round(step))
    step *= scale
    first, last = math.floor(low / step), math.ceil(high / step)
    return [round(index * step, 10) for index in range(first, last + 1)]


def time_labels(low: float, high: float) -> list[str]:
    """Four x-axis labels, as precise as the span needs: times within a day, dates and times
    within a week, dates beyond."""
    span = high - low
    shape = "%H:%M" if span <= 86400 else ("%m-%d %H:%M" if span <= 7 * 86400 else "%Y-%m-%d")
    labels = [dt.datetime.fromtimestamp(low + span * index / 3, dt.timezone.utc).strftime(shape)
              for index in range(4)]
    if span <= 86400:  # the day once, on the first label
        labels[0] = dt.datetime.fromtimestamp(low, dt.timezone.utc).strftime("%Y-%m-%d ") + labels[0]
    return labels


def svg_chart(series: Series, points: Sequence[tuple[float, float, int]]) -> str:
    """An inline SVG line chart of (time, value, build index) points: axes, gridlines, tick
    labels and a marker on the latest point. `points` are already downsampled for drawing."""
    ticks = nice_ticks(series.minimum, series.maximum, unit=series.unit)
    labels = [format_value(tick, series.unit) for tick in ticks]
    # Tick labels stand in a margin of their own, wide enough at the phone-size font.
    width, height, right, top, bottom = 600, 240, 8, 12, 30
    left = min(170, 14 + 12 * max(len(label) for label in labels))
    y_low, y_high = ticks[0], ticks[-1]
    t_low, t_high = points[0][0], points[-1][0]
    if t_high == t_low:
        t_low, t_high = t_low - 3600, t_high + 3600

    x_scale = (width - left - right) / (t_high - t_low)
    y_scale = (height - top - bottom) / ((y_high - y_low) or 1)

    def x(t: float) -> float:
        return left + (t - t_low) * x_scale

    def y(v: float) -> float:
        return top + (y_high - v) * y_scale

    esc = html.escape
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" data-metric="{esc(series.id)}" '
             f'aria-label="{esc(series.name)}: {series.count} values over time">']
    for tick, label in zip(ticks, labels):
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}"/><text class="tick" x="{left - 6}" y="{y(tick) + 4:.1f}" '
                     f'text-anchor="end">{esc(label)}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{height - bottom}" '
                 f'y2="{height - bottom}"/>')
    shown = []
    for index, label in enumerate(time_labels(t_low, t_high)):
        if label in shown:
            continue
        shown.append(label)
        moment = t_low + (t_high - t_low) * index / 3
        parts.append(f'<text class="tick{" inner" if index in (1, 2) else ""}" x="{x(moment):.1f}" '
                     f'y="{height - 6}" text-anchor="{("start", "middle", "middle", "end")[index]}">{label}</text>')
    line = " ".join(f"{left + (t - t_low) * x_scale:.1f},{top + (y_high - v) * y_scale:.1f}" for t, v, _ in points)
    parts.append(f'<polyline class="line" points="{line}"/>')
    last_t, last_v, _ = points[-1]
    parts.append(f'<circle class="latest" cx="{x(last_t):.1f}" cy="{y(last_v):.1f}" r="4.5">'
                 f'<title>latest: {esc(format_value(last_v, series.unit))}</title></circle>'
                 '<circle class="hover" r="0" cx="0" cy="0"/></svg>')
    return "".join(parts)


DARK = "--bg:#101216;--card:#1a1d23;--text:#e9ebef;--muted:#9aa1ad;--line:#6ea8fe;--grid:#2b2f37;--good:#4ade80;--bad:#f87171;--border:#2b2f37"
# report.mode: auto follows the system; light or dark (data-mode on <html>) holds whatever it is.
REPORT_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--text:#1b1d21;--muted:#646a75;--line:#2563eb;--grid:#e6e8ec;--good:#15803d;--bad:#b91c1c;--border:#e2e5ea;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root:not([data-mode=light]){""" + DARK + """}}
:root[data-mode=dark]{""" + DARK + """;color-scheme:dark}:root[data-mode=light]{color-scheme:light}
.section{margin:20px 0 0}.section>h2{font-size:1.1rem}.section>p{margin:.2rem 0 0}
*{box-sizing:border-box}[hidden]{display:none!important}html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--text)}
main{max-width:1400px;margin:0 auto;padding:16px}
h1{font-size:1.35rem;margin:0 0 .2rem;overflow-wrap:anywhere}h2{font-size:1rem;margin:0}
.muted{color:var(--muted)}.meta{display:flex;flex-wrap:wrap;gap:2px 16px;margin:0;color:var(--muted)}
.filters{display:flex;flex-wrap:wrap;gap:8px 16px;margin:12px 0 0;font-size:.9rem}
.filters select,.filters input{font:inherit;color:inherit;background:var(--card);border:1px solid var(--border);border-radius:6px;padding:2px 6px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr));gap:16px;margin:16px 0}
.card{background:var(--card);border:1px solid var(--border);border-radius:10px;padding:14px;min-width:0}
.latest-value{font-size:1.7rem;font-weight:650;margin:.25rem 0;overflow-wrap:anywhere}
.stats{display:flex;flex-wrap:wrap;gap:2px 16px;font-size:.85rem;color:var(--muted)}
.better{color:var(--good);font-weight:600}.worse{color:var(--bad);font-weight:600}
.chart{width:100%;height:auto;display:block;margin-top:8px;overflow:visible}
.chart .grid{stroke:var(--grid);stroke-width:1}.chart .axis{stroke:var(--muted);stroke-width:1}
.chart .tick{fill:var(--muted);font-size:13px;paint-order:stroke;stroke:var(--card);stroke-width:4px;stroke-linejoin:round}
.scroll-hint{display:none;font-size:.8rem;margin:.3rem 0 0}
@media (max-width:640px){.chart .tick{font-size:21px}.chart .tick.inner{display:none}.scroll-hint{display:block}}
.chart .line{fill:none;stroke:var(--line);stroke-width:2;stroke-linejoin:round}
.chart .latest{fill:var(--line);stroke:var(--card);stroke-width:2}.chart .hover{fill:var(--text)}
.tip{position:fixed;z-index:9;pointer-events:none;background:var(--text);color:var(--bg);padding:4px 8px;border-radius:6px;font-size:.8rem;white-space:nowrap}
.table-wrap{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--border);white-space:nowrap}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
ol.timeline{margin:.4rem 0 0;padding-left:1.2rem;font-size:.85rem}ol.timeline li{overflow-wrap:anywhere}
@media print{:root{--bg:#fff;--card:#fff;--text:#000;--muted:#444}.filters,.tip{display:none}.card{break-inside:avoid}}
"""

# Progressive enhancement only: hover tooltips and a branch/date filter. Without it (JavaScript
# off, or a CSP without this script's hash) every number, chart and table is still there.
REPORT_JS = """(function(){
var data=JSON.parse(document.getElementById('tm-data').textContent),tip=document.getElementById('tm-tip');
var branch=document.getElementById('tm-branch'),since=document.getElementById('tm-since'),charts=[];
function visible(b){var build=data.builds[b];return (!branch.value||data.branches[build[2]]===branch.value)&&(!since.value||build[1]>=since.value);}
document.querySelectorAll('svg.chart').forEach(function(svg){
 var d=data.charts[svg.getAttribute('data-metric')];if(!d)return;
 var line=svg.querySelector('.line'),dot=svg.querySelector('.hover');
 var pts=line.getAttribute('points').split(' ').map(function(p){var a=p.split(',');return[+a[0],+a[1]];});
 var chart={svg:svg,d:d,line:line,pts:pts,all:line.getAttribute('points')};charts.push(chart);
 svg.addEventListener('mousemove',function(e){
  var r=svg.getBoundingClientRect(),x=(e.clientX-r.left)*svg.viewBox.baseVal.width/r.width,best=-1,gap=1e9;
  for(var i=0;i<pts.length;i++){if(!visible(d.b[i]))continue;var g=Math.abs(pts[i][0]-x);if(g<gap){gap=g;best=i;}}
  if(best<0)return;var b=data.builds[d.b[best]];
  tip.textContent=d.v[best]+' \\u00b7 '+b[0]+' \\u00b7 '+b[1]+' UTC';tip.hidden=false;
  tip.style.left=Math.min(e.clientX+12,window.innerWidth-tip.offsetWidth-4)+'px';tip.style.top=(e.clientY+14)+'px';
  dot.setAttribute('cx',pts[best][0]);dot.setAttribute('cy',pts[best][1]);dot.setAttribute('r',4);});
 svg.addEventListener('mouseleave',function(){tip.hidden=true;dot.setAttribute('r',0);});
});
function card(c){var a=c.svg.closest('article'),q=function(s){return a.querySelector(s);};
 if(!c.saved)c.saved={v:q('.latest-value').textContent,ch:q('.change').textContent,cls:q('.change').className,
  mn:q('.stat-min').textContent,mx:q('.stat-max').textContent,n:q('.stat-count').textContent,
  cx:q('.latest').getAttribute('cx'),cy:q('.latest').getAttribute('cy')};return q;}
function restat(c){var q=card(c),s=c.saved,idx=[];
 c.d.b.forEach(function(b,i){if(visible(b))idx.push(i);});
 var all=!branch.value&&!since.value,last=idx[idx.length-1],prev=idx[idx.length-2],mark=q('.latest');
 if(all||!idx.length){q('.latest-value').textContent=all?s.v:'\u2013';q('.change').textContent=all?s.ch:'no value';
  q('.change').className=all?s.cls:'change';q('.stat-min').textContent=all?s.mn:'';q('.stat-max').textContent=all?s.mx:'';
  q('.stat-count').textContent=all?s.n:'0 points';mark.setAttribute('cx',s.cx);mark.setAttribute('cy',s.cy);
  mark.setAttribute('r',all?4.5:0);return;}
 var lo=idx[0],hi=idx[0];idx.forEach(function(i){if(c.d.r[i]<c.d.r[lo])lo=i;if(c.d.r[i]>c.d.r[hi])hi=i;});
 q('.latest-value').textContent=c.d.v[last];q('.stat-min').textContent='min '+c.d.v[lo];
 q('.stat-max').textContent='max '+c.d.v[hi];q('.stat-count').textContent=idx.length+(idx.length==1?' point':' points');
 var ch=change(c.d.r[last],prev===undefined?undefined:c.d.r[prev],c.d.u),cls='change';
 if(prev!==undefined){var d=c.d.r[last]-c.d.r[prev];if(d&&c.d.d!='neutral')cls+=((d>0)==(c.d.d=='up')?' better':' worse');}
 q('.change').textContent=ch;q('.change').className=cls;
 mark.setAttribute('cx',c.pts[last][0]);mark.setAttribute('cy',c.pts[last][1]);mark.setAttribute('r',4.5);}
function num(v,n){if(Number.isInteger(v)&&Math.abs(v)<1e15)return v.toLocaleString('en-US');
 var t=v.toLocaleString('en-US',{minimumFractionDigits:n,maximumFractionDigits:n});return t.replace(/\\.?0+$/,'');}
function dur(s){var g=s<0?'-':'';s=Math.abs(s);if(s<1)return g+(s*1000).toFixed(0)+'ms';if(s<60)return g+num(s,1)+'s';
 var m=Math.floor(Math.round(s)/60),x=Math.round(s)%60,h=Math.floor(m/60);m%=60;
 return g+(h?h+'h '+m+'m':(x?m+'m '+x+'s':m+'m'));}
function fmt(v,u){if(u=='percent')return num(v,2)+'%';if(u=='integer')return Math.round(v).toLocaleString('en-US');
 if(u=='bytes'){var z=Math.abs(v),i=0,sc=['B','KB','MB','GB','TB'];while(z>=1024&&i<4){z/=1024;i++;}
  return (v<0?'-':'')+(i?z.toFixed(1)+' '+sc[i]:Math.floor(z)+' B');}
 if(u=='duration')return dur(v);if(!u||u=='decimal')return num(v,u=='decimal'?3:2);return num(v,2)+' '+u;}
function change(a,p,u){if(p===undefined)return 'first value';var d=a-p,g=d>0?'+':d<0?'\u2212':'\u00b1';
 var t=g+fmt(Math.abs(d),u).replace(/^-/,'');if(u=='percent')t=t.replace(/%$/,'')+' pp';
 if(p)t+=' ('+g+(Math.abs(d)/Math.abs(p)*100).toFixed(1)+'%'+(u=='percent'?' relative':'')+')';return t;}
var count=document.getElementById('tm-count'),total=count.textContent;
function apply(){charts.forEach(function(c){c.line.setAttribute('points',(!branch.value&&!since.value)?c.all:
 c.pts.filter(function(p,i){return visible(c.d.b[i]);}).map(function(p){return p.join(',');}).join(' '));restat(c);});
 document.getElementById('tm-branch-label').textContent='branch: '+(branch.value||'all branches');
 var shown={};charts.forEach(function(c){c.d.b.forEach(function(b){if(visible(b))shown[b]=1;});});
 count.textContent=since.value?Object.keys(shown).length+' builds drawn':branch.value?
  (function(n){return n+(n==1?' build':' builds');})(data.counts[data.branches.indexOf(branch.value)]||0):total;
 document.querySelectorAll('ol.timeline li').forEach(function(li){li.hidden=(branch.value&&li.getAttribute('data-branch')!==branch.value)||(since.value&&li.getAttribute('data-time')<since.value);});
 document.querySelectorAll('tr[data-branch]').forEach(function(row){row.hidden=(branch.value&&row.getAttribute('data-branch')!==branch.value)||(since.value&&row.getAttribute('data-time')<since.value);});}
branch.addEventListener('change',apply);since.addEventListener('change',apply);
document.getElementById('tm-filters').hidden=false;
})();"""


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_report(builds: Builds, series: Iterator[Series], cells: Mapping[tuple[str, int], Any],
                  generated: dt.datetime, title: str, branch: str | None = None, mode: str = "auto",
                  sections: Sequence = ()) -> tuple[str, list[list[str]]]:
    """The report as one HTML document — nothing is loaded from anywhere — and the job
    summary's rows (metric, latest, previous, change). `sections` (Unentropy's
    report.sections) group the cards under headings; metrics in no section come last.
    `cells` are the newest builds' values, by (metric, build)."""
    esc = html.escape
    cards, labels, summary, shown = [], [], [], []
    card_of: dict[str, str] = {}
    names: dict[str, str] = {}
    units: dict[str, str | None] = {}
    chart_data: dict[str, dict[str, list]] = {}
    referenced: set[int] = set()
    for item in series:
        if not item.count:
            continue
        shown.append(item.id)
        names[item.id], units[item.id] = item.name, item.unit
        if item.type == "numeric":
            builds.describe(build_id for build_id, _ in item.drawn)
            times = builds.times
            drawn = sorted((times[build_id], value, build_id)  # a value of a lost build is not drawn
                           for build_id, value in item.drawn if build_id in times)
            chart_data[item.id] = {"b": [p[2] for p in drawn], "v": [format_value(p[1], item.unit) for p in drawn],
                                   "r": [p[1] for p in drawn], "u": item.unit or "", "d": item.direction}
            referenced.update(p[2] for p in drawn)
            cards.append(_numeric_card(item, drawn))
            card_of[item.id] = cards[-1]
        else:
            builds.describe(build_id for build_id, _ in item.changes)
            labels.append(_label_card(item, builds))
            card_of[item.id] = labels[-1]
        summary.append(_summary_row(item))
    builds.describe(builds.newest)
    branches = builds.branches
    branch_index = {name: index for index, name in enumerate(branches)}
    data = {"branches": branches, "charts": chart_data, "counts": builds.per_branch, "builds": {
        build_id: [builds.details[build_id][0][:7], builds.details[build_id][3][:16].replace("T", " "),
                   branch_index.get(builds.details[build_id][1], -1)] for build_id in sorted(referenced)}}
    data_json = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    span = f"{esc(builds.span[0][:10])} → {esc(builds.span[1][:10])}" if len(builds) else "no builds yet"
    options = "".join(f'<option>{esc(name)}</option>' for name in sorted(branches))
    mode_attribute = f' data-mode="{mode}"' if mode in ("light", "dark") else ""
    document = (
        f'<!DOCTYPE html><html lang="en"{mode_attribute}><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        f'style-src {csp_hash(REPORT_CSS)}; script-src {csp_hash(REPORT_JS)}; img-src data:">'
        f'<title>{esc(title)} · metrics</title><style>{REPORT_CSS}</style></head><body><main>'
        f'<header><h1>{esc(title)}</h1><p class="meta"><span id="tm-count">{count(len(builds), "build")}</span>'
        f'<span>{span}</span><span id="tm-branch-label">branch: {esc(branch) if branch else "all branches"}</span>'
        f'<span>generated {generated.strftime("%Y-%m-%d %H:%M")} UTC by track_metrics {__version__}</span></p>'
        '<p class="filters" id="tm-filters" hidden><label>Branch <select id="tm-branch">'
        f'<option value="">all</option>{options}</select></label><label>Since '
        '<input type="date" id="tm-since"></label></p></header>'
        f'{_card_sections(card_of, cards + labels, sections)}'
        f'{_builds_table(builds, shown, cells, names, units)}</main>'
        '<div class="tip" id="tm-tip" hidden></div>'
        f'<script type="application/json" id="tm-data">{data_json}</script>'
        f'<script>{REPORT_JS}</script></body></html>\n')
    return document, summary


def _card_sections(card_of: Mapping[str, str], ordered: Sequence[str], sections: Sequence) -> str:
    """The cards, grouped by report.sections when the configuration has them."""
    if not ordered:
        return '<section class="cards"><p>No values recorded yet.</p></section>'
    if not sections:
        return f'<section class="cards">{"".join(ordered)}</section>'
    esc, placed, parts = html.escape, set(), []
    for name, description, charts in sections:
        ids = [i for _, chart_ids in charts for i in chart_ids if i in card_of and i not in placed]
        placed.update(ids)
        if ids:
            note = f'<p class="muted">{esc(description)}</p>' if description else ""
            parts.append(f'<section class="section"><h2>{esc(name)}</h2>{note}<div class="cards">'
                         f'{"".join(card_of[i] for i in ids)}</div></section>')
    rest = [card for i, card in card_of.items() if i not in placed]
    if rest:
        parts.append(f'<section class="section"><h2>Other metrics</h2><div class="cards">{"".join(rest)}</div></section>')
    return "".join(parts)


def _card_head(item: Series, kind: str) -> str:
    text = f'<article class="card {kind}" id="metric-{html.escape(item.id)}"><h2>{html.escape(item.name)}</h2>'
    if item.description:
        text += f'<div class="muted">{html.escape(item.description)}</div>'
    return text


def _numeric_card(item: Series, drawn: Sequence[tuple[float, float, int]]) -> str:
    latest, previous = item.last_two[-1][1], (item.last_two[0][1] if len(item.last_two) > 1 else None)
    change, delta = format_change(latest, previous, item.unit)
    mood = ""
    if delta and item.direction != "neutral":
        mood = "better" if (delta > 0) == (item.direction == "up") else "worse"
    esc = html.escape
    return (f'{_card_head(item, "metric")}<div class="latest-value">{esc(format_value(latest, item.unit))}</div>'
            f'<div class="stats"><span class="change {mood}">{esc(change)}</span>'
            f'<span class="stat-min">min {esc(format_value(item.minimum, item.unit))}</span>'
            f'<span class="stat-max">max {esc(format_value(item.maximum, item.unit))}</span>'
            f'<span class="stat-count">{count(item.count, "point")}</span></div>{svg_chart(item, drawn)}</article>')


def _label_card(item: Series, builds: Builds) -> str:
    esc = html.escape
    items = "".join(
        f'<li data-branch="{esc(builds.details[build_id][1])}" data-time="{esc(builds.details[build_id][3][:16].replace("T", " "))}">'
        f'<code>{esc(str(value))}</code> <span class="muted">since '
        f'{esc(builds.details[build_id][3][:16].replace("T", " "))} · {esc(builds.details[build_id][0][:7])}</span></li>'
        for build_id, value in item.changes[::-1] if build_id in builds.details)
    return (f'{_card_head(item, "label")}<div class="latest-value">{esc(str(item.last_two[-1][1]))}</div>'
            f'<div class="stats"><span>{count(item.change_count, "change")} in {count(item.count, "build")}</span></div>'
            f'<ol class="timeline">{items}</ol></article>')


def _builds_table(builds: Builds, shown: Sequence[str], cells: Mapping[tuple[str, int], Any],
                  names: Mapping[str, str], units: Mapping[str, str | None]) -> str:
    if not len(builds):
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(names.get(metric_id, metric_id))}</th>" for metric_id in shown)
    rows = []
    for build_id in builds.newest:
        commit, branch, run_number, timestamp = builds.details[build_id]
        when = str(timestamp)[:16].replace("T", " ")
        values = "".join(f"<td>{esc(format_value(cells[metric_id, build_id], units[metric_id]))}</td>"
                         if (metric_id, build_id) in cells else "<td>–</td>" for metric_id in shown)
        rows.append(f'<tr data-branch="{esc(str(branch))}" data-time="{esc(when)}"><td><code>'
                    f'{esc(str(commit)[:7])}</code></td><td>{esc(str(branch))}</td><td>#{esc(str(run_number))}'
                    f'</td><td>{esc(when)}</td>{values}</tr>')
    hint = f'<p class="scroll-hint muted">The table scrolls sideways: {len(shown) + 4} columns.</p>'
    return (f'<section class="card"><h2>Recent builds</h2>{hint}<div class="table-wrap"><table><thead><tr>'
            f'<th>commit</th><th>branch</th><th>run</th><th>time (UTC)</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _summary_row(item: Series) -> list[str]:
    latest = item.last_two[-1][1]
    previous = item.last_two[0][1] if len(item.last_two) > 1 else None
    if previous is None:
        change = "–"
    elif item.type == "numeric":
        change = format_change(latest, previous, item.unit)[0]
    else:
        change = "changed" if previous != latest else "–"
    return [item.name, format_value(latest, item.unit),
            format_value(previous, item.unit) if previous is not None else "–", change]


def summary_markdown(rows: Sequence[Sequence[str]]) -> str:
    """The job summary: metric, latest, previous, change."""
    lines = ["### Metrics", "", "| Metric | Latest | Previous | Change |", "|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(database: Path, report_dir: Path, configured: Sequence[MetricConfig], title: str,
                 secrets: Sequence[str], branch: str | None = None, mode: str = "auto",
                 sections: Sequence = ()) -> tuple[Path, str]:
    """Write `<report_dir>/index.html` atomically; return its path and the job summary."""
    with opened_database(database, read_only=True) as connection:
        builds, series, cells = read_history(database, connection, configured, branch)
        document, rows = render_report(builds, series, cells, now_utc(), title, branch, mode, sections)
    report_dir.mkdir(parents=True, exist_ok=True)
    target, staging = report_dir / "index.html", report_dir / ".index.html.tmp"
    staging.write_text(redact(document, secrets), encoding="utf-8")
    os.replace(staging, target)
    return target, summary_markdown(rows)


# ============================================================================================
# Quality gate
# ============================================================================================

GATE_MARKER = "<!-- unentropy-quality-gate -->"
GATE_RESULTS = ".unentropy/quality-gate-results.json"
BASELINE_EVENTS = TREND_EVENTS  # pull-request builds are never a baseline
COMMENT_LIMIT = 65_536  # GitHub's limit on a comment's body
ACCEPT_LABEL = "metrics-accepted"


@dataclass
class RuleResult:
    mode: str
    severity: str
    status: str  # pass | fail | unknown | accepted
    message: str
    allowed: str = ""
    band: float | None = None  # the noise band (0: a deterministic series; None: no noise model)
    centre: float | None = None  # what the value was compared with: the baseline, or the recent level
    detectable: float | None = None  # the smallest worsening that fails the rule, in the metric's unit
    runs: int = 0  # history values the noise model read


@dataclass
class MetricVerdict:
    metric: str
    name: str
    unit: str | None
    direction: str
    value: float | None
    baseline: float | None = None
    baseline_commit: str | None = None
    rules: list[RuleResult] = field(default_factory=list)
    runs: int = 0  # history values a noise model read
    history: list[float] = field(default_factory=list)  # the base branch's values, oldest first
    accepted: bool = False  # failed, and the pull request's accept label lets it pass

    @property
    def status(self) -> str:
        blockers = [r for r in self.rules if r.severity == "blocker"]
        if any(r.status == "fail" for r in self.rules) and self.accepted:
            return "accepted"
        if any(r.status == "fail" for r in blockers):
            return "fail"
        if any(r.status == "fail" for r in self.rules):
            return "warn"
        return "pass" if any(r.status == "pass" for r in self.rules) else "unknown"


def student_t_quantile(probability: float, freedom: int) -> float:
    """The one-sided Student-t quantile t(p, ν): the Cornish-Fisher expansion (Abramowitz and
    Stegun 26.7.5), then Newton steps on the exact CDF of integer ν (26.7.3-4); microseconds."""
    p, nu = probability, max(1, int(freedom))
    if nu == 1:
        return math.tan(math.pi * (p - 0.5))
    if nu == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    import statistics
    z = statistics.NormalDist().inv_cdf(p)
    g = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    t = z + sum(term / nu ** (power + 1) for power, term in enumerate(g))
    if nu > 200:  # the expansion alone is good to 1e-9 here
        return t
    scale = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    for _ in range(3):
        theta = math.atan(t / math.sqrt(nu))
        c, s = math.cos(theta) ** 2, math.sin(theta)
        term = total = 1.0
        if nu % 2:
            for j in range(1, (nu - 1) // 2):
                term *= c * 2 * j / (2 * j + 1)
                total += term
            area = 2 / math.pi * (theta + s * math.cos(theta) * total)
        else:
            for j in range(1, nu // 2):
                term *= c * (2 * j - 1) / (2 * j)
                total += term
            area = s * total
        t -= ((1 + area) / 2 - p) / (scale * (1 + t * t / nu) ** (-(nu + 1) / 2))
    return t


@dataclass(frozen=True)
class Noise:
    """What the base branch's history, up to the baseline build, says about a metric's noise."""
    sigma: float  # one history value's noise; 0: the series is deterministic
    freedom: int  # the estimate's degrees of freedom
    levels: tuple[tuple[float, int], ...]  # (centre, values behind it) of each plausible recent level
    runs: int  # history values used
    model: str = "t"
    spread: float = 0.0  # iqr: the residuals' interquartile range

    def band(self, level: int, confidence: float, multiplier: float, share: float) -> float:
        """How far one value (`share`: its variance against one history value's) may stray above
        a level of `level` values by noise alone: one-sided, at `confidence` (t) or k·IQR."""
        if self.sigma == 0:
            return 0.0
        widen = math.sqrt(share + 1 / level)
        if self.model == "iqr":
            return multiplier * self.spread * widen
        return student_t_quantile(confidence, self.freedom) * self.sigma * widen


CHANGE_POINT = 4.0  # a level shift this many standard errors wide is a step, not noise
OUTLIER = 3.5  # a value this many noise widths from its neighbours' median is an outlier
SAMPLE_OUTLIER = 5.0  # a repeated run this many run widths from its runs' median is left out
STRAY_CUT = 2.5  # … or this many, where the history's own runs stray
PLAUSIBLE = 2.5  # a shift this wide is judged both ways (since it, and over the whole level)
SEGMENTED = 8  # the fewest values searched for outliers and steps


def estimate_noise(values: Sequence[float], model: str = "t") -> Noise | None:
    """Noise and recent levels of a series (oldest first, the baseline build's value last), robust
    to steps and outliers: a first width from the median absolute deviation of consecutive
    differences; outliers against their neighbours left out; binary segmentation at level shifts
    of CHANGE_POINT standard errors; the width pooled within the segments. More than half of the
    differences zero: deterministic (any change is real). None below 3 values."""
    import statistics
    values = [float(v) for v in values]
    if len(values) < 3:
        return None
    diffs = [b - a for a, b in zip(values, values[1:])]
    middle = statistics.median(diffs)
    rough = statistics.median(abs(d - middle) for d in diffs) / (0.6745 * math.sqrt(2))
    if 2 * sum(d == 0 for d in diffs) >= len(diffs) or rough == 0:
        return Noise(0.0, len(values) - 1, ((values[-1], 1),), len(values), model)
    last, kept, segments, sigma = len(values) - 1, values, [values], rough
    for _ in range(2):  # the second pass leaves outliers out by the pooled width the first made precise
        if len(values) >= SEGMENTED:  # fewer values say too little of outliers and steps
            kept = [v for i, v in enumerate(values)  # the baseline build's value stays: it may start a level
                    if i == last or abs(v - statistics.median(values[max(0, i - 2):i + 3])) <= OUTLIER * sigma]
            segments = _segments(kept, rough, CHANGE_POINT)
        residuals = [v - statistics.fmean(segment) for segment in segments for v in segment]
        freedom = len(kept) - len(segments)
        if freedom < 1:
            return None
        sigma = math.sqrt(sum(r * r for r in residuals) / freedom)
    newest = segments[-1]
    levels = [(statistics.fmean(newest), len(newest))]
    split, score = _best_split(newest, rough, minimum_right=SEGMENTED)
    if split and score > PLAUSIBLE:  # a shift not proven, but plausible: a failure must fail both
        levels.append((statistics.fmean(newest[split:]), len(newest) - split))
    spread = 0.0
    if model == "iqr" and len(residuals) >= 4:
        quartiles = statistics.quantiles(residuals, n=4, method="inclusive")
        spread = quartiles[2] - quartiles[0]
    return Noise(sigma, freedom, tuple(levels), len(values), model, spread)


def _best_split(values: Sequence[float], sigma: float, minimum_right: int = 1) -> tuple[int, float]:
    """Where a level shift is likeliest in `values` (index of the new level's first value) and its
    size in standard errors; (0, 0.0) when there is no room for one."""
    total, count = sum(values), len(values)
    best, score, before = 0, 0.0, 0.0
    for index in range(1, count - minimum_right + 1):
        before += values[index - 1]
        left, right = index, count - index
        if left < 2 and right < 2:
            continue
        shift = abs((total - before) / right - before / left)
        stat = shift / (sigma * math.sqrt(1 / left + 1 / right))
        if stat > score:
            best, score = index, stat
    return best, score


def _segments(values: Sequence[float], sigma: float, threshold: float) -> list[list[float]]:
    """Binary segmentation: split where a shift is `threshold` standard errors wide, recursively."""
    if len(values) < 3:
        return [list(values)]
    split, score = _best_split(values, sigma)
    if not split or score <= threshold:
        return [list(values)]
    return _segments(values[:split], sigma, threshold) + _segments(values[split:], sigma, threshold)


def measure(samples: Sequence[float], width: float | None, cut: float) -> tuple[float, int]:
    """One measurement's runs as one value, and how many runs are behind it: their mean, without
    runs more than `cut` run widths from their median (a run on a busy machine)."""
    import statistics
    if len(samples) == 1 or not width:
        return statistics.fmean(samples), len(samples)
    middle = statistics.median(samples)
    kept = [s for s in samples if abs(s - middle) <= cut * width] or [middle]
    return statistics.fmean(kept), len(kept)


def run_width(history: Sequence[tuple[float, Sequence[float] | None]]) -> tuple[float | None, float]:
    """One run's noise within a build, from the history's repeated builds: the median of every
    build's pairwise run differences, which is 0.6745·√2 widths (outliers barely move it); and the
    cut that leaves a run out: SAMPLE_OUTLIER widths, or STRAY_CUT where the history's own runs
    stray (two or more beyond OUTLIER widths from their build's median)."""
    import statistics
    repeated = [runs for _, runs in history if runs]
    gaps = [abs(a - b) for runs in repeated for i, a in enumerate(runs) for b in runs[i + 1:]]
    width = statistics.median(gaps) / (0.6745 * math.sqrt(2)) if len(gaps) >= 3 else 0.0
    if not width:
        return None, SAMPLE_OUTLIER
    middles = [statistics.median(runs) for runs in repeated]
    strays = sum(abs(s - middle) > OUTLIER * width for runs, middle in zip(repeated, middles) for s in runs)
    return width, STRAY_CUT if strays >= 2 else SAMPLE_OUTLIER


@dataclass(frozen=True)
class Judged:
    """A noise model's reading of one metric: the history's noise, this PR's measurement and the
    variance of that measurement against one history value's (runs behind each)."""
    noise: Noise
    statistic: float
    share: float
    runs: int  # this PR's runs
    kept: int  # … the runs behind the statistic: a run far from the others is left out


def judge_noise(history: Sequence[tuple[float, Sequence[float] | None]], samples: Sequence[float],
                model: str) -> Judged | None:
    """History values (oldest first, with their runs when repeated) and this PR's runs, read by
    the noise model: a repeated history's values are its runs' means, so they compare with this
    PR's mean; their noise scales with how many runs are behind each side."""
    import statistics
    within, cut = run_width(history)
    measured = [measure(runs, within, cut) if runs else (value, 1) for value, runs in history]
    noise = estimate_noise([value for value, _ in measured], model)
    if noise is None:
        return None
    behind = statistics.median(runs for _, runs in measured)
    statistic, kept = measure(samples, within if within is not None else noise.sigma * math.sqrt(behind), cut)
    return Judged(noise, statistic, behind / kept, len(samples), kept)


def evaluate_rule(rule: Mapping[str, Any], verdict: MetricVerdict, judged: Judged | None = None) -> RuleResult:
    """One threshold rule on one metric. "Worse" follows the metric's direction (neutral: up).
    Without noise the value is compared with the baseline build; with noise, with the recent
    level (never across a step; a plausible step is judged both ways, and both must fail) and
    a one-sided band on top of the rule's own tolerance."""
    mode, severity = rule["mode"], rule.get("severity", "blocker")
    value, unit = verdict.value, verdict.unit
    if value is None:
        return RuleResult(mode, severity, "unknown", "no value was collected in this run")
    if mode in ("min", "max"):
        target = float(rule["target"])
        ok = value >= target if mode == "min" else value <= target
        return RuleResult(mode, severity, "pass" if ok else "fail",
                          f"{format_value(value, unit)} {'≥' if mode == 'min' else '≤'} {format_value(target, unit)}"
                          if ok else f"{format_value(value, unit)} is {'below' if mode == 'min' else 'above'} "
                          f"the {mode} of {format_value(target, unit)}", f"{mode} {format_value(target, unit)}",
                          centre=target)
    noisy = judged is not None and judged.noise.sigma > 0
    levels = judged.noise.levels if noisy else ((verdict.baseline, 0),)
    if levels[0][0] is None:
        return RuleResult(mode, severity, "unknown", "no baseline build with this metric")
    if judged is not None:
        value = judged.statistic
    noise = rule.get("noise") or {}
    readings = []
    for centre, size in levels:
        worse = (centre - value) if verdict.direction != "down" else (value - centre)
        if mode == "no-regression":
            allowed = float(rule["tolerance"]) if "tolerance" in rule else (
                abs(centre) * float(rule["tolerancePercent"]) / 100 if "tolerancePercent" in rule else 0.5)
        else:  # delta-max-drop
            allowed = abs(centre) * float(rule["maxDropPercent"]) / 100
        band = judged.noise.band(size, float(noise.get("confidence", 0.99)), float(noise.get("multiplier", 1.5)),
                                 judged.share) if noisy else (0.0 if judged is not None else None)
        readings.append((centre, worse, max(allowed, band or 0.0), band))
    failed = all(worse > allowed + 1e-12 * max(1.0, abs(centre)) for centre, worse, allowed, _ in readings)
    centre, worse, allowed, band = readings[0]
    words = change_in_words(verdict.name, value, centre, unit, verdict.direction, allowed)
    if judged is not None and judged.runs > 1:
        behind = f"{judged.kept} of {judged.runs}" if judged.kept < judged.runs else str(judged.runs)
        words += f" (the mean of {behind} runs)"
    if noisy:
        words += f"; noise band {format_value(band, unit)} from {count(judged.noise.runs, 'run')}"
    return RuleResult(mode, severity, "fail" if failed else "pass", words,
                      f"{'rise' if verdict.direction == 'down' else 'fall'} > {change_amount(allowed, centre, unit)}",
                      band, centre, allowed, judged.noise.runs if judged is not None else 0)


def change_in_words(name: str, value: float, reference: float, unit: str | None, direction: str,
                    allowed: float) -> str:
    """"coverage fell 0.7 pp; allowed 0.5 pp": points for percentages, % for relative changes."""
    delta = value - reference
    verb = "rose" if delta > 0 else ("fell" if delta < 0 else "is unchanged")
    shown = f"{name} {verb}" + (f" {change_amount(abs(delta), reference, unit)}" if delta else "")
    return f"{shown}; allowed {'rise' if direction == 'down' else 'fall'} {change_amount(allowed, reference, unit)}"


def change_amount(size: float, reference: float, unit: str | None) -> str:
    """A change's size: points for percentages, else % of the reference with the amount."""
    if unit == "percent":
        return format_number(size, 2) + " pp"
    if reference:
        return f"{size / abs(reference) * 100:.1f}% ({format_value(size, unit)})"
    return format_value(size, unit)


class Baseline:
    """Where each metric's baseline comes from: the build of the commit the measured code is
    based on (a merge commit's first parent, or the merge base of a PR head with the base
    branch), walking first-parent ancestors to the nearest one with a value; without git
    history, the event's base commit, then the newest build on the branch."""

    def __init__(self, connection: sqlite3.Connection | None, branch: str, workdir: Path,
                 environ: Mapping[str, str], max_age_days: int, now: dt.datetime):
        self.connection, self.branch, self.kind, self.commits = connection, branch, "none", []
        self.considered = 0
        self.found: dict[str, tuple[int, str]] = {}  # metric → the baseline build's (id, timestamp)
        self.cutoff = (now - dt.timedelta(days=max_age_days)).strftime("%Y-%m-%dT%H:%M:%S")
        head = git(["rev-parse", "HEAD"], workdir)
        parents = (git(["rev-list", "--parents", "-n", "1", "HEAD"], workdir) or "").split()[1:]
        start = None
        if head and len(parents) >= 2:
            start, self.kind = parents[0], "merge-commit first parent"
        elif head:
            for ref in (f"origin/{branch}", branch):
                base = git(["merge-base", "HEAD", ref], workdir)
                if base:
                    start, self.kind = base, f"merge base with {ref}"
                    break
        if start:
            self.commits = (git(["rev-list", "--first-parent", "-n", "500", start], workdir) or "").split()
        if not self.commits:
            event_base = github_event_base(environ)
            if event_base:
                self.commits, self.kind = [event_base], "the event's base commit"

    def value(self, metric: str) -> tuple[float | None, str | None]:
        """(value, commit) of the metric's baseline build."""
        if self.connection is None:
            return None, None
        events = ",".join("?" * len(BASELINE_EVENTS))
        query = ("SELECT b.commit_sha, v.value_numeric, b.id, b.timestamp FROM build_contexts b"
                 " JOIN metric_values v ON v.build_id = b.id WHERE v.metric_id = ?"
                 f" AND b.event_name IN ({events}) AND typeof(v.value_numeric) IN ('integer', 'real')")
        if self.commits:
            found = {}
            for chunk in range(0, len(self.commits), 400):
                part = self.commits[chunk:chunk + 400]
                rows = self.connection.execute(
                    query + f" AND b.commit_sha IN ({','.join('?' * len(part))}) ORDER BY b.timestamp",
                    (metric, *BASELINE_EVENTS, *part)).fetchall()
                found.update((row[0], row) for row in rows)
            for commit in self.commits:
                if commit in found:
                    self.found[metric] = found[commit][2:]
                    return found[commit][1], commit
            if not self.kind.startswith("the event"):
                return None, None
        row = self.connection.execute(query + " AND b.branch = ? AND b.timestamp >= ? ORDER BY b.timestamp DESC LIMIT 1",
                                      (metric, *BASELINE_EVENTS, self.branch, self.cutoff)).fetchone()
        if row:
            self.kind = "the newest build on the branch"
            self.found[metric] = row[2:]
            return row[1], row[0]
        return None, None

    def history(self, metric: str, size: int) -> list[tuple[float, list[float] | None]]:
        """The metric's last `size` values on the baseline branch up to its baseline build (that
        build's value last), oldest first, each with its runs when the metric was repeated."""
        if self.connection is None or metric not in self.found:
            return []
        build, moment = self.found[metric]
        column, join = samples_join(self.connection)
        rows = self.connection.execute(
            f"SELECT v.value_numeric, {column} FROM build_contexts b JOIN metric_values v ON v.build_id = b.id{join}"
            f" WHERE v.metric_id = ? AND (b.id = ? OR (b.branch = ? AND b.event_name IN"
            f" ({','.join('?' * len(BASELINE_EVENTS))}) AND (b.timestamp, b.id) < (?, ?)))"
            " AND typeof(v.value_numeric) IN ('integer', 'real') ORDER BY b.timestamp DESC, b.id DESC LIMIT ?",
            (metric, build, self.branch, *BASELINE_EVENTS, moment, build, size)).fetchall()
        history = []
        for value, runs in reversed(rows):
            try:
                runs = [float(v) for v in json.loads(runs)] if runs else None
            except (ValueError, TypeError):  # another tool's bytes: the value alone
                runs = None
            history.append((float(value), runs))
        return history


def github_event_base(environ: Mapping[str, str]) -> str | None:
    event = github_event(environ)
    try:
        return event["pull_request"]["base"]["sha"]
    except (KeyError, TypeError):
        return None


def github_event(environ: Mapping[str, str]) -> dict:
    try:
        with open(environ.get("GITHUB_EVENT_PATH", ""), encoding="utf-8") as handle:
            event = json.load(handle)
        return event if isinstance(event, dict) else {}
    except (OSError, ValueError):
        return {}


def evaluate_gate(config: Config, values: Mapping[str, Any], baseline: Baseline) -> list[MetricVerdict]:
    """Each thresholded numeric metric's verdict; a value may be a list: a repeated metric's runs."""
    rules_of: dict[str, list] = {}
    for rule in (config.quality_gate or {}).get("thresholds", []):
        rules_of.setdefault(rule["metric"], []).append(rule)
    verdicts = []
    for metric in config.metrics:
        if metric.id in rules_of and metric.type == "numeric":
            value = values.get(metric.id)
            runs = [float(v) for v in value] if isinstance(value, (list, tuple)) else (
                [float(value)] if isinstance(value, (int, float)) else [])
            verdicts.append(judge_metric(metric, rules_of[metric.id], runs, baseline.value(metric.id),
                                         lambda size, metric=metric.id: baseline.history(metric, size)))
    return verdicts


def judge_metric(metric: MetricConfig, rules: Sequence[Mapping[str, Any]], runs: Sequence[float],
                 baseline: tuple[float | None, str | None],
                 history: Callable[[int], list[tuple[float, list[float] | None]]]) -> MetricVerdict:
    """One metric's verdict from this PR's runs, its baseline build (value, commit) and its base
    branch's history up to that build (the last `size` values, oldest first)."""
    import statistics
    verdict = MetricVerdict(metric.id, metric.name or metric.id, metric.unit,
                            metric.direction if metric.direction != "neutral" else "up",
                            statistics.median(runs) if runs else None, *baseline)
    windows = [int(rule["noise"].get("sampleSize", 30)) for rule in rules if rule.get("noise")]
    past = history(max([SPARK_VALUES, *windows]))  # one read for every rule and the comment's chart
    verdict.history = [value for value, _ in past]
    for rule in rules:
        noise, judged = rule.get("noise"), None
        if noise and runs and rule["mode"] in ("no-regression", "delta-max-drop"):
            window = past[-int(noise.get("sampleSize", 30)):]
            judged = judge_noise(window, runs, noise.get("model", "t"))
            verdict.runs = max(verdict.runs, len(window))
        verdict.rules.append(evaluate_rule(rule, verdict, judged))
    return verdict


def gate_status(verdicts: Sequence[MetricVerdict]) -> str:
    if any(v.status == "fail" for v in verdicts):
        return "fail"
    return "pass" if any(v.status in ("pass", "warn", "accepted") for v in verdicts) else "unknown"


SPARK_VALUES = 30  # base-branch values in a sparkline and a chart
SPARKS = "▁▂▃▄▅▆▇█"
MERMAID_LIMIT = 50_000  # Mermaid's own limit on a diagram's text


def sparkline(values: Sequence[float]) -> str:
    """▁▂▃▅▇: the values' shape in one line of text."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARKS[3] * len(values)
    return "".join(SPARKS[min(7, int((v - low) / (high - low) * 8))] for v in values)


def plain_number(value: float) -> str:
    """A number as Mermaid reads it: no exponent, no thousands separator."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def mermaid_chart(verdict: MetricVerdict) -> str:
    """A failing metric's history on the base branch with this PR's value as the last point, and
    the line it had to stay on the right side of (the level and allowed worsening), as a
    Mermaid xychart (GitHub draws Mermaid in comments)."""
    history = verdict.history[-SPARK_VALUES:]
    points = [*history, verdict.value]
    labels = [f'"{i - len(history)}"' for i in range(len(history))] + ['"PR"']  # builds before the PR
    rule = next((r for r in verdict.rules if r.status == "fail" and r.centre is not None), None)
    series = [f"  line [{', '.join(plain_number(p) for p in points)}]"]
    if rule is not None and rule.mode in ("min", "max"):
        limit = rule.centre
    elif rule is not None and rule.detectable is not None:
        limit = rule.centre + (rule.detectable if verdict.direction == "down" else -rule.detectable)
    else:
        limit = None
    if limit is not None:
        series.append(f"  line [{', '.join(plain_number(limit) for _ in points)}]")
    drawn = points + ([limit] if limit is not None else [])
    low, high = min(drawn), max(drawn)
    pad = (high - low) * 0.1 or abs(high) * 0.1 or 1
    title = verdict.name.replace('"', "'")
    axis = (verdict.unit or "value").replace('"', "'")
    return "\n".join(["```mermaid", "xychart-beta", f'  title "{title}"', f"  x-axis [{', '.join(labels)}]",
                      f'  y-axis "{axis}" {plain_number(low - pad)} --> {plain_number(high + pad)}', *series, "```"])


def gate_comment(marker: str, status: str, mode: str, verdicts: Sequence[MetricVerdict], baseline_kind: str | None,
                 branch: str, limit: int, note: str = "", accept_label: str = "") -> str:
    """The PR comment: a table of the failing metrics (each with its history drawn and its rule
    said in words), the rest folded; capped in rows and at GitHub's 65,536 characters, never
    cutting inside a block."""
    icon = {"pass": "✅", "fail": "❌", "unknown": "❔"}[status]
    head = [marker, f"## {icon} Quality gate: {status} ({mode} mode)", ""]
    if note:
        head += [note, ""]
    if baseline_kind is not None:
        head.append(f"Baseline: {baseline_kind} on `{branch}`.")
    accepted = [v for v in verdicts if v.status == "accepted"]
    if accepted:
        head += ["", f"The label `{accept_label}` accepts {count(len(accepted), 'regression')}: "
                 f"{', '.join(v.name for v in accepted)[:300]}. Remove it to gate them again."]
    header = ["", "| metric | trend | baseline | this PR | change | runs | detects | result |",
              "|---|---|---|---|---|---|---|---|"]

    def row(verdict: MetricVerdict) -> str:
        base = "—" if verdict.baseline is None else format_value(verdict.baseline, verdict.unit)
        if verdict.baseline_commit:
            base += f" (`{verdict.baseline_commit[:7]}`)"
        value = "—" if verdict.value is None else format_value(verdict.value, verdict.unit)
        change = format_change(verdict.value, verdict.baseline, verdict.unit)[0] \
            if verdict.value is not None and verdict.baseline is not None else "—"
        detects = "; ".join(r.allowed for r in verdict.rules if r.allowed) or "—"
        result = "; ".join(f"{r.status} ({r.severity})" if r.status == "fail" else r.status for r in verdict.rules)
        if verdict.status == "accepted":
            result = f"accepted ({result})"
        trend = sparkline([*verdict.history[-SPARK_VALUES:], *([verdict.value] if verdict.value is not None else [])])
        cells = [verdict.name, trend or "—", base, value, change, str(verdict.runs or "—"), detects, result]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    def said(verdict: MetricVerdict) -> list[str]:
        failed = [r for r in verdict.rules if r.status == "fail"]
        lines = ["", f"**{verdict.name}**: " + "; ".join(r.message for r in failed)]
        chart = mermaid_chart(verdict) if verdict.value is not None and verdict.history else ""
        return lines + (["", chart] if chart and len(chart) <= MERMAID_LIMIT else [])

    failing = [v for v in verdicts if v.status in ("fail", "warn", "accepted")]
    rest = [v for v in verdicts if v.status not in ("fail", "warn", "accepted")]
    shown_failing, shown_rest = failing[:limit], rest[:max(0, limit - len(failing))]
    budget = COMMENT_LIMIT - 200  # room for the closing line
    lines = list(head)
    if shown_failing:
        lines += header + [row(v) for v in shown_failing]
    else:
        lines += ["", "No metric failed."]
    size = sum(len(line) + 1 for line in lines)
    dropped = 0
    for verdict in shown_failing:  # whole blocks only: a cut Mermaid block would not render
        block = said(verdict)
        cost = sum(len(line) + 1 for line in block)
        if size + cost > budget:
            dropped += 1
            continue
        lines, size = lines + block, size + cost
    if shown_rest:
        folded = ["", f"<details><summary>{count(len(rest), 'other metric')}</summary>", *header,
                  *(row(v) for v in shown_rest), "", "</details>"]
        if size + sum(len(line) + 1 for line in folded) <= budget:
            lines += folded
        else:
            dropped += len(shown_rest)
    hidden = len(verdicts) - len(shown_failing) - len(shown_rest)
    if hidden:
        lines += ["", f"{count(hidden, 'more metric')} not shown (max-pr-comment-metrics)."]
    if dropped:
        lines += ["", f"{count(dropped, 'chart or table')} left out to stay within GitHub's 65,536 characters; "
                  "the job summary and the results file have every metric."]
    return "\n".join(lines) + "\n"


GITHUB_ACTIONS_BOT = "github-actions[bot]"


class PullRequestComments:
    """One gate comment per pull request, found by its marker on every page and edited in place."""

    def __init__(self, environ: Mapping[str, str], number: int, console: Console):
        self.api = (environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
        self.repository, self.number, self.console = environ["GITHUB_REPOSITORY"], number, console
        self.token = environ["GITHUB_TOKEN"]
        self.login: str | None = None  # the token's user, asked only when a comment needs it

    def _call(self, method: str, url: str, body: dict | None = None) -> Any:
        with github_request(url, self.token, method, body) as response:
            return json.load(response)

    def posted_by_us(self, comment: Mapping[str, Any]) -> bool:
        """Whether the identity the gate posts as wrote the comment: anyone can write the marker
        (a pull request's author could then edit the verdict). GITHUB_TOKEN posts as
        github-actions[bot]; any other token's user is asked of the API once, when needed."""
        login = (comment.get("user") or {}).get("login")
        if login == GITHUB_ACTIONS_BOT:
            return True
        if self.login is None:
            try:
                self.login = self._call("GET", f"{self.api}/user").get("login") or ""
            except Exception:  # an installation token may not read /user: it is the bot
                self.login = ""
        return bool(login) and login == self.login

    def upsert(self, marker: str, body: str) -> str:
        """The comment's URL, after updating the existing one or creating it."""
        base = f"{self.api}/repos/{self.repository}/issues"
        page = 1
        while True:
            comments = self._call("GET", f"{base}/{self.number}/comments?per_page=100&page={page}")
            mine = next((c for c in comments if marker in (c.get("body") or "") and self.posted_by_us(c)), None)
            if mine:
                return self._call("PATCH", f"{base}/comments/{mine['id']}", {"body": body}).get("html_url", "")
            if len(comments) < 100:
                break
            page += 1
        return self._call("POST", f"{base}/{self.number}/comments", {"body": body}).get("html_url", "")


@dataclass
class GateSettings:
    mode: str
    comment: bool
    marker: str
    max_metrics: int
    output_file: Path
    branch: str
    values_file: Path | None = None
    comment_file: Path | None = None
    accept_label: str = ACCEPT_LABEL


def gate_settings(args: argparse.Namespace, environ: Mapping[str, str], config: Config) -> GateSettings:
    gate = config.quality_gate or {}
    sources = _Sources(args, environ)
    problems: list[tuple[str, str]] = []
    mode = (sources.get("gate_mode", "quality-gate-mode") or (gate.get("mode", "soft"), ""))[0]
    if mode not in ("off", "soft", "hard"):
        problems.append(("quality-gate-mode", f"got {show(mode)}; accepted: off, soft, hard"))
    comment = sources.get("pr_comment", "enable-pr-comment")
    comment_on = comment[0].lower() == "true" if comment else bool(gate.get("enablePullRequestComment", True))
    limit = sources.number("max_comment_metrics", "max-pr-comment-metrics", gate.get("maxCommentMetrics", 30),
                           1, 100, problems, int)
    if problems:
        raise config_error(problems, "PARAM_INVALID", "parameter")
    branch = (sources.get("base_branch", None) or (None,))[0] or (gate.get("baseline") or {}).get("referenceBranch") \
        or environ.get("GITHUB_BASE_REF") or environ.get("CI_MERGE_REQUEST_TARGET_BRANCH_NAME") or "main"
    marker = (sources.get("comment_marker", "pr-comment-marker") or (GATE_MARKER,))[0]
    output = Path((sources.get("output_file", "output-file") or (GATE_RESULTS,))[0])
    label = (sources.get("accept_label", "accept-label") or (gate.get("acceptLabel", ACCEPT_LABEL),))[0]
    return GateSettings(mode, comment_on, marker, limit, output, branch,
                        Path(args.values) if getattr(args, "values", None) else None,
                        Path(args.comment_file) if getattr(args, "comment_file", None) else None, label)


def gate_values(settings: GateSettings, params: ActionParameters, config: Config, console: Console,
                environ: Mapping[str, str]) -> dict[str, Any]:
    """This run's values: collected exactly as `run` collects them, or read from --values."""
    if settings.values_file is not None:
        try:
            document = json.loads(settings.values_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrackMetricsError("PARAM_INVALID", f"--values {settings.values_file}: {exc}",
                                    type="validation") from exc
        document = document.get("values", document) if isinstance(document, dict) else None
        if not isinstance(document, dict):
            raise TrackMetricsError("PARAM_INVALID", f"--values {settings.values_file}: expected an object "
                                    "of metric id → value", type="validation")
        return checked_values(document, config, f"--values {settings.values_file}")
    build = detect_build(environ, params, now_utc(), lambda args: git(args, params.workdir))
    runner = CommandRunner(params.workdir, environ, console.secrets, config.sources, config.base_path,
                           params.pass_env)
    outcomes = collect_metrics(config.metrics, runner, build, params.jobs, time.monotonic() + params.timeout)
    for outcome in outcomes:
        if outcome.ok:
            console.info(f"  {outcome.id} = {outcome.value!s}")
        else:
            console.warning(f"metric {outcome.id} skipped: {outcome.error}")
    return {outcome.id: list(outcome.samples) if outcome.samples else outcome.value
            for outcome in outcomes if outcome.ok}


def checked_values(document: Mapping[str, Any], config: Config, where: str) -> dict[str, Any]:
    """A values file's metric id → value (a number, a repeated metric's list of runs, or a
    label's text), each id a metric of the configuration: a typo must not make a green gate."""
    import difflib
    kinds = {metric.id: metric.type for metric in config.metrics}
    values = {}
    for name, value in document.items():
        if name not in kinds:
            close = difflib.get_close_matches(str(name), sorted(kinds), n=1, cutoff=0.6)
            raise TrackMetricsError("PARAM_INVALID", f"{where}: {show(name)} is not a metric of this configuration"
                                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; metrics: "
                                    f"{', '.join(sorted(kinds))[:200]}", type="validation")
        runs = value if isinstance(value, list) else [value]
        if kinds[name] == "label":
            readable = isinstance(value, str) and len(value) <= 256
            accepted = "a label of at most 256 characters"
        else:
            readable = 0 < len(runs) <= MAX_REPEAT and all(_number(v) for v in runs)
            accepted = f"a finite number, or a list of 1 to {MAX_REPEAT} (a repeated metric's runs)"
        if not readable:
            raise TrackMetricsError("PARAM_INVALID", f"{where}: {name} is {show(value)[:40]}; accepted: {accepted}",
                                    type="validation")
        values[name] = value
    return values


def pull_request_labels(environ: Mapping[str, str]) -> set[str]:
    labels = (github_event(environ).get("pull_request") or {}).get("labels") or []
    return {label.get("name") for label in labels if isinstance(label, dict) and isinstance(label.get("name"), str)}


def gate_command(args: argparse.Namespace, environ: Mapping[str, str], console: Console, config: Config,
                 config_path: Path) -> int:
    """`gate`: did this pull request make a metric worse than the code it is based on?"""
    started = time.monotonic()
    settings = gate_settings(args, environ, config)
    workspace = Path(tempfile.mkdtemp(prefix="track_metrics-gate-"))
    note, connection, params = "", None, None
    values: dict[str, Any] = {}
    verdicts: list[MetricVerdict] = []
    baseline_kind: str | None = None
    considered = 0
    try:
        if settings.mode != "off":
            try:
                params = ActionParameters.from_sources(args, environ, config, config_path)
            except TrackMetricsError as exc:
                if exc.code != "PARAM_MISSING":
                    raise
                note = (f"No baseline: {exc.message.splitlines()[-1].strip()} — a pull request from a fork "
                        "gets no secrets; use the two-workflow pattern (`gate --values`) to gate it.")
                params = ActionParameters.from_sources(args, environ, config, config_path, storage=False)
            path = None
            if not note:
                try:
                    path = read_database(params, console, environ, workspace, settings.branch)
                except TrackMetricsError as exc:
                    if settings.mode == "hard" and exc.code not in ("S3_ACCESS_DENIED", "S3_AUTH_FAILED"):
                        raise
                    note = f"No baseline: the database could not be read ({exc.code}: {exc.message})"
            connection = open_database(path, read_only=True) if path else None
            values = gate_values(settings, params, config, console, environ)
            gate = config.quality_gate or {}
            baseline = Baseline(connection, settings.branch, params.workdir, environ,
                                int((gate.get("baseline") or {}).get("maxAgeDays", 90)), now_utc())
            verdicts = evaluate_gate(config, values, baseline)
            if not gate.get("thresholds"):
                note = ("The configuration has no qualityGate.thresholds, so the gate judges nothing; add a rule "
                        "per metric (the README recommends one for each kind of metric).")
            if connection is not None:
                baseline_kind = baseline.kind
                considered, local = connection.execute(
                    "SELECT COALESCE(SUM(event_name IN ('push', 'import')), 0),"
                    " COALESCE(SUM(event_name = 'local'), 0) FROM build_contexts WHERE branch = ?",
                    (settings.branch,)).fetchone()
                if not considered and local and not note:
                    note = (f"The history's only builds of `{settings.branch}` are local ones ({count(local, 'build')}"
                            "), which are never a baseline: record the base branch's builds from CI, or with "
                            "`--event push` where a laptop stands in for it.")
            if settings.accept_label in pull_request_labels(environ):
                for verdict in verdicts:
                    verdict.accepted = True
        else:
            note = "The quality gate is off (quality-gate-mode off): nothing was evaluated."
    finally:
        if connection is not None:
            connection.close()
        shutil.rmtree(workspace, ignore_errors=True)
    status = gate_status(verdicts) if settings.mode != "off" else "unknown"
    failing = [v.metric for v in verdicts if v.status == "fail"]
    body = console.redact(gate_comment(settings.marker, status, settings.mode, verdicts, baseline_kind,
                                       settings.branch, settings.max_metrics, note, settings.accept_label))
    if settings.comment_file:
        settings.comment_file.write_text(body, encoding="utf-8")
    comment_url = post_gate_comment(settings, body, environ, console) if settings.mode != "off" else ""
    if environ.get("GITHUB_STEP_SUMMARY"):
        with open(environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(body.replace(settings.marker + "\n", "") + "\n")
    document = {
        **unentropy_gate_document(config, settings, status, verdicts, values, comment_url, started),
        "status": status, "mode": settings.mode, "referenceBranch": settings.branch,
        "baseline": {"kind": baseline_kind or "none", "buildsConsidered": considered}, "note": note,
        "acceptLabel": settings.accept_label, "accepted": [v.metric for v in verdicts if v.status == "accepted"],
        "failingMetrics": failing, "metricsCollected": len(values),
        "metrics": [{"metric": v.metric, "name": v.name, "unit": v.unit, "direction": v.direction,
                     "value": v.value, "baseline": v.baseline, "baselineCommit": v.baseline_commit,
                     "runs": v.runs, "status": v.status, "rules": [dataclasses.asdict(r) for r in v.rules]}
                    for v in verdicts],
    }
    results_json = console.redact(json.dumps(document, separators=(",", ":")))
    settings.output_file.parent.mkdir(parents=True, exist_ok=True)
    settings.output_file.write_text(console.redact(json.dumps(document, indent=2)) + "\n", encoding="utf-8")
    outputs = {"quality-gate-status": status, "quality-gate-mode": settings.mode,
               "quality-gate-failing-metrics": ",".join(failing), "quality-gate-comment-url": comment_url,
               "metrics-collected": str(len(values)), "baseline-builds-considered": str(considered),
               "baseline-reference-branch": settings.branch,
               "quality-gate-results-path": str(settings.output_file), "quality-gate-results-json": results_json}
    if environ.get("GITHUB_OUTPUT"):
        write_outputs(environ["GITHUB_OUTPUT"], outputs, console.secrets)
    console.info(f"gate: {status} ({settings.mode} mode){': ' + ', '.join(failing) + ' failed' if failing else ''}")
    if note:
        console.warning(note)
    if getattr(args, "json", False):
        sys.stdout.write(results_json + "\n")
    return EXIT_FAILED if status == "fail" and settings.mode == "hard" else EXIT_OK


def unentropy_gate_document(config: Config, settings: GateSettings, status: str, verdicts: Sequence[MetricVerdict],
                            values: Mapping[str, Any], comment_url: str, started: float) -> dict[str, Any]:
    """The results document as Unentropy 0.3.16's quality gate writes it (workflows read
    `fromJSON(...).qualityGate`); this tool's own fields sit beside it."""
    gate = config.quality_gate or {}
    thresholds: dict[str, dict] = {}
    for rule in gate.get("thresholds") or []:
        thresholds.setdefault(rule.get("metric"), rule)
    metrics = []
    for verdict in verdicts:
        failed = [r for r in verdict.rules if r.status == "fail" and not verdict.accepted]
        entry: dict[str, Any] = {
            "metric": verdict.metric, "unit": verdict.unit, "baseline": verdict.baseline,
            "pullRequestValue": verdict.value, "threshold": thresholds.get(verdict.metric),
            "status": "fail" if failed else {"accepted": "pass"}.get(verdict.status, verdict.status),  # pass, fail, unknown
            "message": "; ".join(r.message for r in (failed or verdict.rules)) or None,
            "isBlocking": any(r.severity == "blocker" for r in (failed or verdict.rules))}
        if isinstance(verdict.value, (int, float)) and isinstance(verdict.baseline, (int, float)):
            entry["absoluteDelta"] = verdict.value - verdict.baseline
            if verdict.baseline:
                entry["relativeDeltaPercent"] = entry["absoluteDelta"] / verdict.baseline * 100
        metrics.append({name: value for name, value in entry.items() if value is not None})
    import statistics
    values = {name: statistics.median(value) if isinstance(value, list) else value for name, value in values.items()}
    judged = {verdict.metric for verdict in verdicts}
    units = {metric.id: metric.unit for metric in config.metrics}
    metrics += [{name: value for name, value in (("metric", metric), ("unit", units.get(metric)),
                                                 ("pullRequestValue", value), ("status", "unknown"),
                                                 ("message", "No threshold configured for this metric"),
                                                 ("isBlocking", False)) if value is not None}
                for metric, value in values.items() if metric not in judged and not isinstance(value, str)]
    summary = {"totalMetrics": len(metrics), "evaluatedMetrics": sum("threshold" in m for m in metrics),
               **{key: sum(m["status"] == name for m in metrics)
                  for key, name in (("passed", "pass"), ("failed", "fail"), ("unknown", "unknown"))}}
    total = max(len(config.metrics), len(values))
    return {"timestamp": utc_stamp(now_utc()), "durationMs": elapsed_ms(started),
            "collection": {"successful": len(values), "failed": total - len(values), "total": total},
            "prCommentUrl": comment_url or None,
            "qualityGate": {"status": status, "mode": settings.mode, "metrics": metrics,
                            "failingMetrics": [m for m in metrics if m["status"] == "fail" and m["isBlocking"]],
                            "summary": summary,
                            "baselineInfo": {"referenceBranch": settings.branch,
                                             "maxAgeDays": int((gate.get("baseline") or {}).get("maxAgeDays", 90))}}}


def post_gate_comment(settings: GateSettings, body: str, environ: Mapping[str, str], console: Console) -> str:
    """Create or update the PR comment; any refusal (a fork's read-only token) is a warning."""
    number = (github_event(environ).get("pull_request") or {}).get("number")
    if not (settings.comment and number and environ.get("GITHUB_TOKEN") and environ.get("GITHUB_REPOSITORY")):
        return ""
    import urllib.error
    try:
        return PullRequestComments(environ, int(number), console).upsert(settings.marker, body)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else type(exc).__name__
        console.warning(f"gate: the pull request comment could not be written ({reason}); a fork's token "
                        "is read-only, and the job needs `permissions: pull-requests: write`")
        return ""


# ============================================================================================
# History in and out: import, export
# ============================================================================================

IMPORT_FIELDS = {"metric_id", "timestamp", "value_numeric", "value_label", "commit_sha", "branch", "source",
                 "run_id", "run_number", "metadata"}
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ImportRecord:
    """One value of Unentropy's canonical import format, its build resolved."""
    metric_id: str
    timestamp: str
    value: Any  # float for value_numeric, str for value_label
    commit_sha: str
    branch: str
    run_id: str
    run_number: int
    unit: str | None = None
    description: str | None = None
    samples: tuple[float, ...] = ()

    @property
    def type(self) -> str:
        return "label" if isinstance(self.value, str) else "numeric"


def canonical_problem(record: Any) -> str | None:
    """Why a canonical record (a parsed JSONL line) is refused, or None; strict as Unentropy's."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type_name(record)}"
    unknown = sorted(set(record) - IMPORT_FIELDS)
    if unknown:
        return f"unknown field {unknown[0]!r} (accepted: {', '.join(sorted(IMPORT_FIELDS))})"
    if not isinstance(record.get("metric_id"), str) or not METRIC_ID.fullmatch(record["metric_id"]):
        return f"metric_id {show(record.get('metric_id'))} must be 1-64 of a-z, 0-9, '-'"
    if parse_stamp(record.get("timestamp")) is None:
        return f"timestamp {show(record.get('timestamp'))} must be ISO 8601 with an offset (…Z or …+02:00)"
    numeric, label = record.get("value_numeric"), record.get("value_label")
    if (numeric is None) == (label is None):
        return "exactly one of value_numeric or value_label must be set"
    if numeric is not None and not _number(numeric):
        return f"value_numeric {show(numeric)} must be a finite number"
    if label is not None and (not isinstance(label, str) or len(label) > 256):
        return "value_label must be a string of at most 256 characters"
    if "commit_sha" in record and (not isinstance(record["commit_sha"], str) or not COMMIT.fullmatch(record["commit_sha"])):
        return f"commit_sha {show(record['commit_sha'])} must be 40 lowercase hex characters"
    for name, limit in (("branch", 255), ("source", 64), ("run_id", 64)):
        if name in record and (not isinstance(record[name], str) or not 1 <= len(record[name]) <= limit):
            return f"{name} must be a string of 1 to {limit} characters"
    if "run_number" in record and not (_whole(record["run_number"]) and 0 <= record["run_number"] < 2**63):
        return "run_number must be a whole number from 0 to 2^63 - 1 (SQLite's largest integer)"
    if "metadata" in record and not isinstance(record["metadata"], dict):
        return "metadata must be an object"
    samples = (record.get("metadata") or {}).get("samples")
    if samples is not None and not (isinstance(samples, list) and 1 < len(samples) <= MAX_REPEAT
                                    and all(_number(v) for v in samples) and numeric is not None):
        return f"metadata.samples must be 2 to {MAX_REPEAT} finite numbers beside a value_numeric"
    return None


def import_lines(text: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """(line number, canonical record or a problem string) for each record of the file."""
    if fmt == "jsonl":
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as exc:
                    yield number, f"not JSON: {exc}"
    elif fmt == "csv":
        import csv
        import io
        rows = csv.DictReader(io.StringIO(text, newline=""))
        for row in rows:
            record: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
            try:
                if "value_numeric" in record:
                    record["value_numeric"] = float(record["value_numeric"])
                if "run_number" in record:
                    record["run_number"] = int(record["run_number"])
            except ValueError as exc:
                yield rows.line_num, f"{exc}"
                continue
            yield rows.line_num, record
    else:  # benchmark-action: window.BENCHMARK_DATA = {...} (data.js) or the same JSON
        try:
            data = json.loads(re.sub(r"^\s*window\.BENCHMARK_DATA\s*=\s*", "", text.strip()).rstrip(";"))
            suites = data["entries"]
        except (ValueError, KeyError, TypeError) as exc:
            yield 1, f"not github-action-benchmark data: {exc}"
            return
        number = 0
        for entries in suites.values():
            for entry in entries:
                commit = entry.get("commit") or {}
                moment = commit.get("timestamp") or iso(dt.datetime.fromtimestamp((entry.get("date") or 0) / 1000, dt.timezone.utc))
                for bench in entry.get("benches") or []:
                    number += 1
                    yield number, {"metric_id": slug(str(bench.get("name", ""))), "timestamp": moment,
                                   "value_numeric": bench.get("value"), "commit_sha": str(commit.get("id", "")).lower(),
                                   "source": "benchmark-action", "metadata": {"unit": bench.get("unit")}}


def slug(name: str) -> str:
    """A benchmark's name as a metric id."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", name.lower())).strip("-")[:64] or "benchmark"


def resolve_imports(text: str, fmt: str, trend_branch: str, workdir: Path, strict: bool
                    ) -> tuple[list[ImportRecord], list[tuple[int, str]]]:
    """The file's records with their builds resolved, and each refused line's number and reason.
    A record without a commit takes the trend branch's last commit at its time (`git log`)."""
    records, problems, nearest = [], [], {}
    for number, record in import_lines(text, fmt):
        why = record if isinstance(record, str) else canonical_problem(record)
        kept = (record.get("metadata") or {}).get("commit") if not why else None  # export's non-hex commit
        commit = None if why else record.get("commit_sha") or (kept if isinstance(kept, str) and 0 < len(kept) <= 64 else None)
        stamp = None if why else utc_stamp(parse_stamp(record["timestamp"]))
        if not why and not commit:
            if stamp not in nearest:
                nearest[stamp] = git(["log", "-1", "--format=%H", f"--before={stamp}", trend_branch], workdir)
            commit = nearest[stamp]
            why = None if commit else f"no commit of {trend_branch} at or before {stamp} (a shallow clone?)"
        if why:
            problems.append((number, why))
            if strict:
                break
            continue
        source = record.get("source", "manual")
        unit = (record.get("metadata") or {}).get("unit")
        description = (record.get("metadata") or {}).get("description")
        value = record["value_numeric"] if record.get("value_numeric") is not None else record["value_label"]
        records.append(ImportRecord(record["metric_id"], stamp,
                                    float(value) if not isinstance(value, str) else value, commit,
                                    record.get("branch", trend_branch),
                                    record.get("run_id", f"import:{source}:{commit[:12]}"),
                                    record.get("run_number", 0), str(unit)[:32] if unit else None,
                                    str(description)[:256] if description else None,
                                    tuple(float(v) for v in (record.get("metadata") or {}).get("samples") or ())))
    return records, problems


def apply_imports(connection: sqlite3.Connection, records: Sequence[ImportRecord]) -> tuple[int, list[str]]:
    """Add the records as `import` builds, grouped by (commit, run id); an existing value is
    left as it is (importing the same file twice adds nothing). Returns (values added, refusals)."""
    ensure_schema(connection)
    connection.execute("BEGIN IMMEDIATE")
    try:
        types = dict(connection.execute("SELECT id, type FROM metric_definitions"))
        added, refused = 0, []
        for record in records:
            if types.setdefault(record.metric_id, record.type) != record.type:
                refused.append(f"{record.metric_id}: a {record.type} value for a {types[record.metric_id]} metric")
                continue
            connection.execute("INSERT INTO metric_definitions (id, type, unit, description) VALUES (?, ?, ?, ?)"
                               " ON CONFLICT (id) DO UPDATE SET unit = COALESCE(unit, excluded.unit),"
                               " description = COALESCE(description, excluded.description)",
                               (record.metric_id, record.type, record.unit, record.description))
            connection.execute(
                "INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
                " VALUES (?, ?, ?, ?, 'import', ?) ON CONFLICT (commit_sha, run_id) DO NOTHING",
                (record.commit_sha, record.branch, record.run_id, record.run_number, record.timestamp))
            build_id = connection.execute("SELECT id FROM build_contexts WHERE commit_sha = ? AND run_id = ?",
                                          (record.commit_sha, record.run_id)).fetchone()[0]
            connection.execute("DELETE FROM track_metrics_pruned WHERE commit_sha = ? AND run_id = ?",
                               (record.commit_sha, record.run_id))
            numeric, label = (None, record.value) if record.type == "label" else (record.value, None)
            inserted = connection.execute(
                "INSERT INTO metric_values (metric_id, build_id, value_numeric, value_label) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (metric_id, build_id) DO NOTHING", (record.metric_id, build_id, numeric, label)).rowcount
            if inserted and record.samples:
                store_samples(connection, build_id, record.metric_id, record.samples)
            added += inserted
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return added, refused


def export_history(connection: sqlite3.Connection, fmt: str, metric: str | None, branch: str | None,
                   since: str | None) -> Iterator[str]:
    """The history as canonical JSONL (one value a line; `import` reads it back) or CSV."""
    column, join = samples_join(connection)
    query = ("SELECT v.metric_id, b.timestamp, v.value_numeric, v.value_label, b.commit_sha, b.branch, b.run_id,"
             f" b.run_number, d.unit, d.description, {column} FROM metric_values v"
             f" JOIN build_contexts b ON b.id = v.build_id LEFT JOIN metric_definitions d ON d.id = v.metric_id{join}"
             " WHERE 1 = 1")
    arguments: list[Any] = []
    for clause, value in ((" AND v.metric_id = ?", metric), (" AND b.branch = ?", branch), (" AND b.timestamp >= ?", since)):
        if value:
            query, arguments = query + clause, arguments + [value]
    columns = ("metric_id", "timestamp", "value_numeric", "value_label", "commit_sha", "branch", "run_id", "run_number")
    if fmt == "csv":
        yield ",".join(columns) + "\n"
    for row in connection.execute(query + " ORDER BY b.timestamp, b.id, v.metric_id", arguments):
        record = {name: value for name, value in zip(columns, row) if value is not None}
        # What import needs to recreate the same build key and definition (canonical fields
        # take a 40-hex commit only: another one, such as "unknown", travels in the metadata).
        metadata = {name: value for name, value in zip(("unit", "description"), row[8:10]) if value}
        if row[10]:
            metadata["samples"] = json.loads(row[10])
        if not COMMIT.fullmatch(str(record.get("commit_sha", ""))):
            metadata["commit"] = record.pop("commit_sha", "")
        if metadata and fmt != "csv":
            record["metadata"] = metadata
        if fmt == "csv":
            import csv
            import io
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow([record.get(name, "") for name in columns])
            yield buffer.getvalue()
        else:
            yield json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class PruneRequest:
    pull_requests_days: float | None = None
    older_days: float | None = None
    keep: str | None = None  # "daily" or "weekly": one build per branch and day/week beyond the cut
    vacuum: bool = False
    dry_run: bool = False


def prune_plan(connection: sqlite3.Connection, request: PruneRequest, now: dt.datetime) -> list[int]:
    """The builds a retention policy removes. The latest build of every branch always stays."""
    builds = connection.execute("SELECT id, branch, COALESCE(event_name, ''), timestamp FROM build_contexts"
                                " ORDER BY timestamp, id").fetchall()
    latest = {branch: build_id for build_id, branch, _, _ in builds}
    cutoff = now.timestamp() - 86400 * (request.older_days or 0)
    pr_cutoff = now.timestamp() - 86400 * (request.pull_requests_days or 0)
    kept_period: dict[tuple, int] = {}
    for build_id, branch, event, stamp in reversed(builds):  # newest first: a period keeps its last
        moment = parse_time(stamp)
        if request.keep and moment < cutoff:
            day = dt.datetime.fromtimestamp(moment, dt.timezone.utc).date()
            period = day.isocalendar()[:2] if request.keep == "weekly" else day
            kept_period.setdefault((branch, period), build_id)
    removed = []
    for build_id, branch, event, stamp in builds:
        moment = parse_time(stamp)
        if build_id == latest[branch] or build_id in kept_period.values():
            continue
        if (request.pull_requests_days is not None and event.startswith("pull_request") and moment < pr_cutoff) \
                or (request.older_days is not None and moment < cutoff):
            removed.append(build_id)
    return removed


def apply_prune(connection: sqlite3.Connection, removed: Sequence[int]) -> int:
    """Delete these builds and their values in one transaction; returns the values removed."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        values = 0
        for start in range(0, len(removed), 500):
            chunk = list(removed[start:start + 500])
            marks = ",".join("?" * len(chunk))
            connection.execute(f"INSERT OR IGNORE INTO track_metrics_pruned SELECT commit_sha, run_id FROM"
                               f" build_contexts WHERE id IN ({marks})", chunk)
            values += connection.execute(f"DELETE FROM metric_values WHERE build_id IN ({marks})", chunk).rowcount
            connection.execute(SAMPLES_DDL)
            connection.execute(f"DELETE FROM track_metrics_samples WHERE build_id IN ({marks})", chunk)
            connection.execute(f"DELETE FROM build_contexts WHERE id IN ({marks})", chunk)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return values


def backfill_commits(workdir: Path, since: str | None, last: int | None, every: int) -> list[str]:
    """First-parent history, oldest first: since a revision, or the last N commits; every K-th."""
    revisions = ["rev-list", "--first-parent", "--reverse", f"{since}..HEAD" if since else "HEAD"]
    commits = (git(revisions, workdir) or "").split()
    if last:
        commits = commits[-last:]
    return commits[::-1][::every][::-1]  # every K-th, counted from the newest, which is always in


WORKTREES = threading.Lock()


def backfill_commit(commit: str, metrics: Sequence[MetricConfig], config: Config, params: "ActionParameters",
                    console: Console, environ: Mapping[str, str], root: Path, scratch: Path,
                    branch: str) -> list[ImportRecord]:
    """One commit, checked out into a temporary worktree, measured as a run would measure it."""
    tree = scratch / f"tree-{commit[:12]}"
    with WORKTREES:  # git locks its worktree list: parallel adds would fail, not wait
        added = subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), commit], cwd=root,
                               capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL).returncode == 0
    if not added:
        console.warning(f"backfill: cannot check out {commit[:12]}; skipped")
        return []
    try:
        when = git(["show", "-s", "--format=%cI", commit], root) or iso(now_utc())
        moment = utc_stamp(dt.datetime.fromisoformat(when))
        base = tree / os.path.relpath(config.base_path.resolve(), root.resolve())
        runner = CommandRunner(tree, environ, console.secrets, config.sources, base, params.pass_env)
        build = BuildContext(commit, branch, f"backfill:{commit[:12]}", 0, "import", moment)
        outcomes = collect_metrics(metrics, runner, build, 1, time.monotonic() + params.timeout)
        units = {metric.id: metric.unit for metric in metrics}
        return [ImportRecord(outcome.id, moment, outcome.value, commit, branch, build.run_id, 0, units[outcome.id])
                for outcome in outcomes if outcome.ok]
    finally:
        with WORKTREES:
            git(["worktree", "remove", "--force", str(tree)], root)


def backfill_command(args: argparse.Namespace, params: "ActionParameters", config: Config, console: Console,
                     environ: Mapping[str, str]) -> int:
    """`backfill`: measure past commits and record each as an import build at its commit time.
    Resumable (commits already recorded are skipped), uploads every --checkpoint commits."""
    root = Path(git(["rev-parse", "--show-toplevel"], params.workdir) or params.workdir)
    metrics = [m for m in config.metrics if args.all_metrics or re.match(r"\s*@collect (loc|size)\b", m.command)]
    if not metrics:
        raise TrackMetricsError("PARAM_INVALID", "no metric can be measured without a build (only @collect loc "
                                "and size can); pass --all-metrics to run every command", type="validation")
    workspace = Path(tempfile.mkdtemp(prefix="track_metrics-backfill-"))
    try:
        stored = read_database(params, console, environ, workspace, args.trend_branch)
        known = set()
        if stored:
            connection = open_database(stored, read_only=True)
            known = {row[0] for row in connection.execute("SELECT DISTINCT commit_sha FROM build_contexts")}
            connection.close()
        commits = [c for c in backfill_commits(root, args.since, args.last, args.every) if c not in known]
        console.info(f"backfill: {count(len(commits), 'commit')} to measure ({', '.join(m.id for m in metrics)})")
        step = args.checkpoint or len(commits) or 1
        started, done = time.monotonic(), 0
        with cancellation(params.timeout), ThreadPoolExecutor(max_workers=params.jobs) as pool:
            for start in range(0, len(commits), step):
                batch: list[ImportRecord] = []
                for records in pool.map(lambda c: backfill_commit(c, metrics, config, params, console, environ, root,
                                                                  workspace, args.trend_branch), commits[start:start + step]):
                    batch += records
                    done += 1
                    left = (time.monotonic() - started) / done * (len(commits) - done)
                    console.info(f"backfill: {done}/{len(commits)} commits, about {format_duration(left)} left")
                if batch:
                    result = run(params, config, console, environ,
                                 ImportChange(ImportRequest("backfill", records=tuple(batch))))
                    if result.error:
                        console.error(f"[{result.error.code}] {result.error.message}")
                        return result.error.exit_code
        console.info(f"done: {count(done, 'commit')} backfilled in {params.location}")
        return EXIT_OK
    finally:
        git(["worktree", "prune"], root)
        shutil.rmtree(workspace, ignore_errors=True)


class Change:
    """A writing verb's change to the history (run, import, prune; backfill imports). The one
    update path, TrackingRun, downloads and checks the base, lets the change prepare itself
    once (the collect phase: run the commands, read the file, plan the removals), applies it
    to the base, and after a conflict applies it again to the newer base. Probing, locking,
    backups, the stamp and cleanup are the update path's, alike for every change."""
    dry_run = False
    vacuum = False
    destructive = False  # removes history: the backup is refreshed first, whatever its age
    changed = True  # set by apply: False when the base needs no new version (nothing is uploaded)
    said = ""  # what it did (or, dry, would do), for the run's last line
    rerun = "re-run the same command (what it adds is recorded once)"

    def prepare(self, tracking: "TrackingRun", phase: WorkflowPhase) -> None:
        raise NotImplementedError

    def apply(self, connection: sqlite3.Connection, tracking: "TrackingRun") -> Callable[[], None]:
        """Change this attempt's base (inside apply_build); returns what to do once it is kept."""
        raise NotImplementedError

    def held_by(self, successor: Path) -> bool:
        """Whether a database another writer put after ours holds this change."""
        raise NotImplementedError


@dataclass(frozen=True)
class ImportRequest:
    file: str
    format: str = "jsonl"
    trend_branch: str = "main"
    dry_run: bool = False
    strict: bool = False
    records: tuple = ()  # already resolved (backfill): no file to read


class ImportChange(Change):
    """`import` (and backfill): records of a history file added as import builds."""

    def __init__(self, request: ImportRequest):
        self.request, self.dry_run = request, request.dry_run
        self.records: list[ImportRecord] = []

    def prepare(self, tracking: "TrackingRun", phase: WorkflowPhase) -> None:
        """The file's records, each refused line reported with its number."""
        request, console = self.request, tracking.console
        if request.records:
            self.records, problems = list(request.records), []
        else:
            try:
                text = Path(request.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TrackMetricsError("IMPORT_INVALID", f"cannot read {request.file}: {exc}", type="validation")
            self.records, problems = resolve_imports(text, request.format, request.trend_branch,
                                                     tracking.params.workdir, request.strict)
        for number, why in problems:
            console.warning(f"{request.file}:{number}: {why}")
        if problems and request.strict:
            raise TrackMetricsError("IMPORT_INVALID", f"{request.file}:{problems[0][0]}: {problems[0][1]} "
                                    "(--strict: nothing was imported)", type="validation")
        if not self.records:
            raise TrackMetricsError("IMPORT_INVALID", f"{request.file} holds no valid record; nothing "
                                    "was imported", type="validation")
        builds = {(r.commit_sha, r.run_id) for r in self.records}
        phase.metadata.update(records=len(self.records), builds=len(builds), refused=len(problems))
        tracking.result.metrics_collected = sorted({r.metric_id for r in self.records})
        console.info(f"import: {count(len(self.records), 'value')} in {count(len(builds), 'build')} "
                     f"from {request.file}" + (f"; {count(len(problems), 'line')} refused" if problems else ""))
        if request.dry_run:
            trial = tracking.workspace / "dry-run.db"
            shutil.copyfile(tracking.base, trial)
            with opened_database(trial) as connection:
                added, refused = apply_imports(connection, self.records)  # on a copy of the copy
            self.said = f"would add {count(added, 'value')} (dry run: nothing was uploaded, no report written)"
            console.info(f"import: {self.said}")

    def apply(self, connection: sqlite3.Connection, tracking: "TrackingRun") -> Callable[[], None]:
        added, refused = apply_imports(connection, self.records)
        self.changed = added > 0
        self.said = f"{count(added, 'new value')} imported" if added else \
            "nothing new to import (every value is already there): nothing was uploaded"

        def done() -> None:
            for why in refused:
                tracking.console.warning(f"import: not recorded: {why}")
            tracking.console.info(f"import: {count(added, 'new value')} added")
        return done

    def held_by(self, successor: Path) -> bool:
        return all(holds_build(successor, BuildContext(r.commit_sha, r.branch, r.run_id, None, None, ""),
                               {r.metric_id: r.value}) for r in self.records)


class PruneChange(Change):
    """`prune`: the builds a retention policy removes, planned again on every attempt's base."""

    destructive = True

    def __init__(self, request: PruneRequest):
        self.request, self.dry_run, self.vacuum = request, request.dry_run, request.vacuum

    def prepare(self, tracking: "TrackingRun", phase: WorkflowPhase) -> None:
        """What the policy removes, said before anything is uploaded."""
        with opened_database(tracking.base) as connection:
            removed = prune_plan(connection, self.request, now_utc())
        phase.metadata["builds_removed"] = len(removed)
        verb = "would remove" if self.dry_run else "removes"
        tracking.console.info(f"prune: {verb} {count(len(removed), 'build')} of "
                              f"{count(tracking.result.total_builds, 'build')} (the latest build of every "
                              "branch stays)")
        if self.dry_run:
            self.said = (f"would remove {count(len(removed), 'build')} (dry run: nothing was uploaded, "
                         "no report written)")

    def apply(self, connection: sqlite3.Connection, tracking: "TrackingRun") -> Callable[[], None]:
        removed = prune_plan(connection, self.request, now_utc())  # on this attempt's base
        values = apply_prune(connection, removed)
        self.changed = bool(removed) or self.vacuum
        self.said = f"removed {count(len(removed), 'build')}" if self.changed else \
            "nothing to prune: nothing was uploaded"
        return lambda: tracking.console.info(f"prune: removed {count(len(removed), 'build')} and "
                                             f"{count(values, 'value')}")

    def held_by(self, successor: Path) -> bool:
        return True  # a successor that only added builds holds our removals too


# ============================================================================================
# Workflow
# ============================================================================================

@dataclass
class WorkflowError:
    type: str
    code: str
    message: str
    retryable: bool
    details: dict = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: TrackMetricsError | Cancelled) -> "WorkflowError":
        if isinstance(exc, Cancelled):
            return cls("storage", exc.code, exc.message, True, {})
        return cls(exc.type, exc.code, exc.message, exc.retryable, exc.details)

    @property
    def exit_code(self) -> int:
        if self.code.startswith(("CONFIG_", "PARAM_")) or self.code in ("DEPENDENCY_MISSING", "IMPORT_INVALID"):
            return EXIT_USAGE
        return EXIT_RETRYABLE if self.retryable else EXIT_FAILED


@dataclass
class WorkflowPhase:
    name: str
    status: str = "pending"  # pending → running → completed | failed | skipped
    start_time: str | None = None
    end_time: str | None = None
    duration_ms: int | None = None
    error: WorkflowError | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class ActionResult:
    success: bool = False
    phases: list[WorkflowPhase] = field(default_factory=lambda: [WorkflowPhase(name) for name in PHASES])
    report_path: str | None = None
    database_location: str | None = None
    database: DatabaseFile | None = None
    metrics_collected: list[str] = field(default_factory=list)
    metrics_failed: dict[str, str] = field(default_factory=dict)
    total_builds: int = 0
    duration_ms: int = 0
    error: WorkflowError | None = None
    storage_type: str = ""
    artifact: dict = field(default_factory=dict)  # sqlite-artifact: name, path, source-run-id…

    def phase(self, name: str) -> WorkflowPhase:
        return next(phase for phase in self.phases if phase.name == name)

    def to_json(self, secrets: Sequence[str]) -> str:
        return redact(json.dumps(dataclasses.asdict(self), indent=2, default=str), secrets)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


NO_CONDITIONAL_WRITES = (
    "conditional writes are off (--no-conditional-writes): runs that upload at the same time can "
    "lose each other's builds. Let only one job at a time write this key: on GitHub Actions, "
    "`concurrency: {group: track-metrics, cancel-in-progress: false}` on the job; on GitLab CI, "
    "`resource_group: track-metrics`")


class RunChange(Change):
    """`run`: this build's values, from the metric commands (run once; re-applied on conflicts)."""

    def __init__(self):
        self.build: BuildContext | None = None
        self.values: dict[str, Any] = {}
        self.samples: dict[str, tuple[float, ...]] = {}  # repeated metrics' samples
        self.recorded: dict[str, Any] = {}  # the values the database took

    @property
    def rerun(self) -> str:
        return (f"re-run with --commit {self.build.commit_sha} --run-id {self.build.run_id} "
                "(the same build is then replaced, never duplicated)")

    def prepare(self, tracking: "TrackingRun", phase: WorkflowPhase) -> None:
        params, console, result = tracking.params, tracking.console, tracking.result
        self.build = detect_build(tracking.environ, params, now_utc(), lambda args: git(args, params.workdir))
        console.info(f"collect: commit {self.build.commit_sha[:12]} on {self.build.branch}, "
                     f"run {self.build.run_id}")
        if "unknown" in (self.build.commit_sha, self.build.branch):
            console.warning("no CI variables and no git checkout here: the build is recorded as "
                            f"commit {self.build.commit_sha} on {self.build.branch}; pass --commit "
                            "and --branch (or run inside the repository)")
        runner = CommandRunner(params.workdir, tracking.environ, console.secrets, tracking.config.sources,
                               tracking.config.base_path, params.pass_env)
        try:
            outcomes = collect_metrics(tracking.config.metrics, runner, self.build, params.jobs,
                                       time.monotonic() + params.timeout)
        except BaseException:
            runner.kill_all()
            raise
        for outcome in outcomes:
            console.debug(f"  {outcome.id}: ran in {outcome.duration_ms} ms")
            if outcome.ok:
                self.values[outcome.id] = outcome.value
                if outcome.samples:
                    self.samples[outcome.id] = outcome.samples
                result.metrics_collected.append(outcome.id)
                shown = js_string(outcome.value) if isinstance(outcome.value, float) else outcome.value
                runs = f", median of {len(outcome.samples)} runs" if outcome.samples else ""
                console.info(f"  {outcome.id} = {shown} ({outcome.duration_ms} ms{runs})")
                if outcome.warning:
                    console.warning(f"metric {outcome.id}: {outcome.warning}")
            else:
                result.metrics_failed[outcome.id] = console.redact(outcome.error)
                console.warning(f"metric {outcome.id} skipped: {outcome.error}")
        phase.metadata.update(collected=len(self.values), failed=result.metrics_failed)
        if not self.values:
            raise TrackMetricsError("COLLECT_NOTHING", "no metric command produced a value; "
                                    "nothing was uploaded (see the warnings above)", type="collection")

    def apply(self, connection: sqlite3.Connection, tracking: "TrackingRun") -> Callable[[], None]:
        build_id, skipped = record_build(connection, self.build, tracking.config.metrics, self.values, self.samples)
        orphans = connection.execute(  # the foreign keys of what this run added, not the whole file's
            "SELECT COUNT(*) FROM metric_values v LEFT JOIN metric_definitions d ON d.id = v.metric_id"
            " LEFT JOIN build_contexts b ON b.id = v.build_id WHERE v.build_id = ? AND"
            " (d.id IS NULL OR b.id IS NULL)", (build_id,)).fetchone()[0]

        def done() -> None:
            result = tracking.result
            for metric, reason in skipped.items():
                tracking.console.warning(f"metric {metric} {reason}")
                result.metrics_failed[metric] = reason
            result.metrics_collected = [m for m in result.metrics_collected if m not in skipped]
            self.recorded = {m: v for m, v in self.values.items() if m not in skipped}
            if not self.recorded:
                tracking.keep_workspace = False
                raise TrackMetricsError("COLLECT_NOTHING", "no collected value could be recorded (see "
                                        "the warnings above); nothing was uploaded", type="collection")
            if orphans:
                raise TrackMetricsError("DB_CORRUPT", f"{orphans} of this build's values lost their metric "
                                        "or build row; nothing was uploaded")
        return done

    def held_by(self, successor: Path) -> bool:
        return holds_build(successor, self.build, self.recorded)


class TrackingRun:
    """One run: download → validate → collect → upload → report, each phase timed and logged."""

    def __init__(self, params: ActionParameters, config: Config, console: Console,
                 environ: Mapping[str, str], change: Change | None):
        self.params = params
        self.config = config
        self.console = console
        self.environ = environ
        self.result = ActionResult(database_location=params.location, storage_type=params.storage_type_name)
        self.writer = uuid.uuid4().hex
        self.workspace = Path(tempfile.mkdtemp(prefix="track_metrics-"))
        self.keep_workspace = False
        self.storage: S3Storage | LocalStorage | ArtifactStorage | None = None
        self.expected: DatabaseFile | None = None  # the object the next upload must replace
        self.base: Path | None = None  # the database the change is applied to
        self.downloaded = self.workspace / "downloaded.db"  # or a local file a reader reads in place
        self.change = change  # None: only read (report)
        self.trusted = True  # the base was checked in full (or vouched for): the chain holds
        self.working = self.workspace / "working.db"
        self.backup_allowed = False
        self.generation = 0
        self.history = 0  # builds kept plus builds pruned, stamped on the upload

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[WorkflowPhase]:
        phase = self.result.phase(name)
        phase.status, phase.start_time = "running", iso(now_utc())
        started = time.monotonic()
        with self.console.group(name):
            try:
                yield phase
            except (TrackMetricsError, Cancelled) as exc:
                phase.status, phase.error = "failed", WorkflowError.from_exception(exc)
                raise  # main prints the error, once
            except BaseException:
                phase.status = "failed"
                raise
            else:
                phase.status = "completed"
            finally:
                phase.end_time, phase.duration_ms = iso(now_utc()), elapsed_ms(started)
                self.console.info(f"{name}: {phase.status} in {phase.duration_ms} ms")

    def execute(self) -> ActionResult:
        started = time.monotonic()
        try:
            self.download()
            self.validate()
            if self.change is not None:
                with self.phase("collect") as phase:
                    self.change.prepare(self, phase)
            if self.writing:
                self.upload()
            else:
                self.working = self.base
            if self.params.report and not (self.change and self.change.dry_run):
                self.report()
            self.result.success = self.result.error is None
        except (TrackMetricsError, Cancelled) as exc:
            self.result.error = WorkflowError.from_exception(exc)
        finally:
            for phase in self.result.phases:
                if phase.status == "pending":
                    phase.status = "skipped"
            self.result.duration_ms = elapsed_ms(started)
            self.cleanup()
        return self.result

    @property
    def writing(self) -> bool:
        return self.change is not None and not self.change.dry_run

    def download(self) -> None:
        with self.phase("download") as phase:
            self.storage = open_storage(self.params, self.console, self.environ, self.workspace, self.writer)
            if isinstance(self.storage, LocalStorage) and self.change is not None:
                self.storage.lock()
            self.fetch_expected()
            if isinstance(self.storage, ArtifactStorage):
                self.result.artifact = {"name": self.storage.name, "path": str(self.storage.path),
                                        "source-run-id": self.storage.source_run_id or ""}
            if self.expected is None and self.change is None:
                raise TrackMetricsError("DB_NOT_FOUND", f"{self.storage.location} does not exist: there "
                                        "is no history to report on (check the path or key)")
            if self.expected is None and self.change is not None:
                self.refuse_a_lost_history()
                self.refuse_a_second_history()
            if self.expected is None:
                phase.metadata["first_run"] = True
                self.console.info(f"download: {self.storage.location} does not exist yet; "
                                  "starting a new database")
            else:
                phase.metadata.update(size=self.expected.size, sha256=self.expected.sha256,
                                      etag=self.expected.etag)
                self.console.info(f"download: {self.storage.location}: {self.expected.size:,} bytes, " + (
                    f"sha256 {self.expected.sha256[:12]}…" if self.expected.sha256 else "read in place"))
            if self.writing:
                self.check_conditional_writes(phase)

    def refuse_a_lost_history(self) -> None:
        """A missing key beside its `.bak` or older versions is a deleted history, not a first
        run: starting over would, at the next backup, overwrite the last copy of it."""
        if not isinstance(self.storage, S3Storage) or self.params.new_history:
            return
        backup = self.storage.stat(self.storage.key + ".bak")
        try:
            versions = [] if backup else self.storage.older_versions()
        except TrackMetricsError:  # s3:ListBucketVersions is not required
            versions = []
        if not backup and not versions:
            return
        source = f"s3://{self.storage.bucket}/{self.storage.key}"
        restore = (f"aws s3 cp {source}.bak {source}" if backup else
                   f"aws s3api copy-object --bucket {self.storage.bucket} --key {self.storage.key} --copy-source "
                   f"'{self.storage.bucket}/{self.storage.key}?versionId={versions[0]}'")
        found = (f"{source}.bak ({int(backup.get('content-length', 0)):,} bytes, {backup.get('last-modified', '')})"
                 if backup else f"{count(len(versions), 'older version')} of it")
        raise TrackMetricsError(
            "DB_MISSING", f"{source} does not exist, but {found} does: the history was deleted or "
            f"moved, and a new one would later overwrite its backup. Nothing was written. Restore it "
            f"(`{restore}`, then run again), or pass --new-history (input new-history) to start over")

    def refuse_a_second_history(self) -> None:
        """No silent second history: a first run beside other databases is most likely a typo'd
        key (or Unentropy's unentropy-metrics.db under another name); it needs --new-history."""
        if not isinstance(self.storage, S3Storage) or self.params.new_history:
            return
        try:
            others = self.storage.other_databases()
        except TrackMetricsError as exc:  # s3:ListBucket is not required: skip quietly
            self.console.debug(f"  could not list the key's folder ({exc.code})")
            return
        if others:
            import difflib
            closest = (difflib.get_close_matches(self.storage.key, others, n=1, cutoff=0) or others)[0]
            raise TrackMetricsError(
                "DB_MISSING", f"{self.storage.location} does not exist, but {', '.join(others[:5])} "
                f"{'is' if len(others) == 1 else 'are'} beside it. Nothing was written. If {closest} is "
                f"your history, pass --database-key (input database-key) {closest}; if a second history "
                "is meant, pass --new-history (input new-history)")

    def fetch_expected(self) -> None:
        """(Re)download the object the next upload must replace; a reader reads a local file in place."""
        in_place = self.change is None and isinstance(self.storage, LocalStorage) and self.storage.readable_in_place()
        self.downloaded = self.storage.path if in_place else self.workspace / "downloaded.db"
        self.expected = self.storage.fetch(self.downloaded)
        if self.expected and self.writing and isinstance(self.storage, S3Storage) \
                and self.params.conditional_writes:
            require_etag(self.expected)  # before anything, a backup copy included, is written

    def check_conditional_writes(self, phase: WorkflowPhase) -> None:
        """Refuse, before anything is collected, to write to a provider whose conditional writes
        do not work: it would lose builds (S3Storage.learn_conditions, once per endpoint)."""
        if not isinstance(self.storage, S3Storage):
            return
        if not self.params.conditional_writes:
            self.console.warning(NO_CONDITIONAL_WRITES)
            return
        phase.metadata["conditional_writes"] = self.storage.learn_conditions(self.expected).describe()

    def validate(self) -> None:
        with self.phase("validate") as phase:
            for attempt in range(self.params.max_conflict_retries + 1):
                try:
                    self.base = self.load_base(self.downloaded)
                    break
                except Conflict:  # the object changed while this run was setting it aside
                    self.conflict_pause(attempt, "validate: the object changed while it was being "
                                        "checked; checking the newer version")
                    self.fetch_expected()
            phase.metadata["builds"] = self.result.total_builds = count_builds(self.base)

    def conflict_pause(self, attempt: int, message: str) -> None:
        """Wait before another try at a changed object; past the last try, S3_CONFLICT."""
        if attempt == self.params.max_conflict_retries:
            raise TrackMetricsError(
                "S3_CONFLICT", f"{self.storage.location} kept changing under this run "
                f"({attempt + 1} attempts); concurrent runs are writing the same key. "
                "Re-run the job", retryable=True)
        delay = min(5.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5)
        self.console.info(f"{message} (retry in {delay:.2f} s)")
        time.sleep(delay)

    def load_base(self, downloaded: Path) -> Path:
        """The database this run builds on: the download when it is sound, a new one on the
        first run, or what --on-corrupt says when the object is damaged. Damage counts only
        when a second download gives the same bytes (a transit error is not damage), and
        nothing is replaced before the damaged object is kept aside and its readable rows
        are salvaged into the continued history."""
        self.backup_allowed = self.expected is not None
        self.trusted = True  # a new database, a fully checked backup; damage() judges a download
        if self.expected is None:
            return self.new_database()
        damage = self.damage(downloaded)
        if damage is None:
            return downloaded
        if self.params.on_corrupt == "fail" or self.change is None:
            raise damage
        self.backup_allowed = False  # never let a damaged object replace a good .bak
        base = self.restore(damage) if self.params.on_corrupt == "restore" else None
        keep = f"{self.storage.key}.corrupt-{now_utc().strftime('%Y%m%dT%H%M%SZ')}"
        self.storage.copy(self.expected, keep)  # 412 (Conflict) if the object changed meanwhile
        base = base or self.new_database()
        with opened_database(base) as connection:
            salvaged = merge_salvage(connection, *salvage_rows(downloaded))
        self.console.warning(f"{damage.message.split(';')[0]}; kept it as s3://{self.storage.bucket}/"
                             f"{keep}; carried over {count(salvaged, 'build')} still readable in it")
        return base

    def vouched(self) -> bool:
        """Whether this tool checked these very bytes in full before uploading them: the object's
        metadata says so, and its SHA-256 (which the download verified) is theirs."""
        metadata = self.expected.metadata if self.expected else {}
        return metadata.get("checked") == "integrity" and metadata.get("sha256") == self.expected.sha256

    def download_check(self) -> str:
        """The download's check: the bytes this tool checked and uploaded (vouched for by their
        SHA-256, which the download verified) need the header and schema only, as does, for a
        reader, a file whose summary this tool's last change sealed; any other object a full
        integrity_check before a change, a quick_check before a report."""
        if self.params.integrity in ("full", "quick"):
            return self.params.integrity
        if self.vouched() or (self.change is None and summary_sealed(self.downloaded)):
            return "schema"
        return "quick" if self.change is None else "full"

    def damage(self, downloaded: Path) -> TrackMetricsError | None:
        """Why the downloaded object is damaged, confirmed by downloading it again; None when
        it is sound (then `downloaded` holds a sound copy)."""
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                level = self.download_check()
                check_database(downloaded, level)
                self.trusted = level == "full" or self.vouched()
                self.console.debug(f"  validate: {CHECKS[level] or 'header and schema'}" + (
                    "" if level != "schema" else " (vouched by its SHA-256)" if self.vouched()
                    else " (its summary sealed by this tool)"))
                return None
            except TrackMetricsError as exc:
                if exc.code not in ("DB_NOT_SQLITE", "DB_CORRUPT") or not isinstance(self.storage, S3Storage):
                    raise  # not damage (a newer or foreign schema): never --on-corrupt's business
                found = exc
                again = self.storage.fetch(self.workspace / "again.db")
                if again is None:
                    raise Conflict("the object was deleted since the download") from exc
                if again.sha256 == self.expected.sha256:
                    return exc
                self.console.warning(f"download: the object's bytes differed between two downloads "
                                     f"({exc.code} in the first); checking the newer download")
                os.replace(self.workspace / "again.db", downloaded)
                self.expected = again
        return found

    def restore(self, damage: TrackMetricsError) -> Path:
        """The newest valid backup: an older version of the object, else `<key>.bak`."""
        candidates: list[tuple[str, str | None]] = []
        try:
            candidates += [(self.storage.key, version) for version in self.storage.older_versions()]
        except TrackMetricsError as exc:
            self.console.warning(f"cannot list older versions ({exc.code}); trying {self.storage.key}.bak")
        candidates.append((self.storage.key + ".bak", None))
        for index, (key, version) in enumerate(candidates):
            target = self.workspace / f"restore-{index}.db"
            if self.storage.fetch(target, key, version) is None:
                continue
            try:
                check_database(target, "quick" if self.params.integrity == "quick" else "full")
            except TrackMetricsError:
                continue
            label = f"version {version}" if version else f"s3://{self.storage.bucket}/{key}"
            self.console.warning(f"{damage.message.split(';')[0]}; continuing from {label}")
            return target
        raise TrackMetricsError(damage.code, damage.message + "; --on-corrupt restore found no "
                                "valid older version or .bak to continue from", type=damage.type)

    def new_database(self) -> Path:
        path = self.workspace / "new.db"
        path.unlink(missing_ok=True)
        with opened_database(path) as connection:
            connection.execute("PRAGMA journal_mode=DELETE")
            ensure_schema(connection)
        return path

    def upload(self) -> None:
        with self.phase("upload") as phase:
            for attempt in range(self.params.max_conflict_retries + 1):
                try:
                    if attempt:
                        self.fetch_expected()
                        self.base = self.load_base(self.downloaded)
                    prepared = self.apply_build()
                    if prepared is None:
                        break
                    sha256, md5, size = prepared
                    if self.params.backup and self.backup_allowed:
                        self.storage.backup(self.expected, self.change.destructive)
                    uploaded = self.storage.store(self.working, self.expected, sha256, md5, size,
                                                  self.generation, self.successor_holds_change,
                                                  "integrity" if self.trusted else "quick", self.history)
                    break
                except Conflict:
                    self.conflict_pause(attempt, "upload: another run updated the database; adding "
                                        "this build to the newer version")
            if prepared is None:
                phase.metadata["unchanged"] = True
                self.result.total_builds = count_builds(self.working)
                self.console.info(f"upload: nothing changed in {self.storage.location}; nothing was uploaded")
                return
            phase.metadata.update(attempts=attempt + 1, size=size, sha256=sha256, etag=uploaded.etag)
            self.result.database = DatabaseFile(self.storage.key, size, uploaded.last_modified,
                                                uploaded.etag, uploaded.version_id, sha256,
                                                self.storage.location)
            self.result.total_builds = count_builds(self.working)
            if isinstance(self.storage, ArtifactStorage):
                self.result.artifact["upload-required"] = True
            self.console.info(f"upload: {self.storage.location}: {size:,} bytes, "
                              f"{count(self.result.total_builds, 'build')}")

    def successor_holds_change(self) -> bool:
        """Whether the object another writer put after ours holds this run's change."""
        successor = self.workspace / "successor.db"
        try:
            return self.storage.fetch(successor) is not None and self.change.held_by(successor)
        finally:
            successor.unlink(missing_ok=True)

    def apply_build(self) -> tuple[str, str, int] | None:
        """Apply this run's change to the base database (a conflict downloads a new base, so it
        is moved, not copied: at hundreds of MB a copy costs), and ready it for upload; None
        when the change found nothing to change. The change is the verb's: a build (run),
        records (import) or removals (prune)."""
        os.replace(self.base, self.working)
        self.keep_workspace = True  # from here on the change exists only locally
        connection = open_database(self.working)
        try:
            connection.execute("PRAGMA journal_mode=DELETE")
            ensure_schema(connection)
            trusted = summary_trusted(self.working, connection)
            watch_changes(connection)
            done = self.change.apply(connection, self)
            if self.change.changed:
                self.console.debug(f"  summary: {refresh_summary(connection, rebuild=not trusted)}"
                                   f"{'' if trusted else ' (the file was not sealed by this tool)'}")
                self.generation = bump_generation(connection)
                self.history = connection.execute("SELECT (SELECT COUNT(*) FROM build_contexts)"
                                                  " + (SELECT COUNT(*) FROM track_metrics_pruned)").fetchone()[0]
                if self.change.vacuum:
                    connection.execute("VACUUM")
                seal_summary(self.working, connection)
        except sqlite3.Error as exc:
            raise TrackMetricsError("DB_WRITE_FAILED", f"changing the database failed: {exc}; "
                                    f"{UNTOUCHED.replace(' (see --on-corrupt)', '')}") from exc
        finally:
            connection.close()
        done()
        if not self.change.changed:
            self.keep_workspace = False
            return None
        check_upload_size(self.working.stat().st_size)
        # A change made by SQLite to a checked file cannot break its pages: the schema and this
        # change's own rows (the change checks them) suffice; an unchecked base gets quick_check.
        return prepare_upload(self.working, "full" if self.params.integrity == "full" else
                              "schema" if self.trusted and self.params.integrity == "auto" else "quick")

    def report(self) -> None:
        with self.phase("report") as phase:
            try:
                title = (self.environ.get("GITHUB_REPOSITORY") or self.environ.get("CI_PROJECT_PATH")
                         or self.params.workdir.resolve().name or self.params.database_key)
                path, summary = write_report(self.working, self.params.report_dir, self.config.metrics,
                                             title, self.console.secrets, self.params.report_branch,
                                             self.config.report_mode, self.config.report_sections)
                if self.result.metrics_failed:
                    summary += "\n**Not recorded:**\n\n" + "".join(
                        f"- `{metric}`: {one_line_reason(reason)}\n" for metric, reason in self.result.metrics_failed.items())
                summary_path = self.environ.get("GITHUB_STEP_SUMMARY")
                if summary_path:
                    with open(summary_path, "a", encoding="utf-8") as handle:
                        handle.write(self.console.redact(summary))
            except (OSError, sqlite3.Error, ValueError) as exc:
                if type(exc) is sqlite3.DatabaseError:
                    raise unreadable(exc) from exc
                raise TrackMetricsError("REPORT_FAILED", f"the report could not be written "
                                        f"({type(exc).__name__}: {exc}); the database is safe",
                                        type="report") from exc
            self.result.report_path = str(path)
            phase.metadata["path"] = str(path)
            self.keep_workspace = False

    def cleanup(self) -> None:
        if isinstance(self.storage, LocalStorage):
            self.storage.unlock()
        uploaded = self.result.phase("upload").status == "completed"
        if self.keep_workspace and not uploaded and self.working.exists():
            rerun = self.change.rerun
            if self.storage is not None and self.storage.landed:
                self.console.error(f"the storage accepted this run's upload, but it was not "
                                   f"verified; the change is most likely stored. To make sure, "
                                   f"{rerun}. The changed database is kept at {self.working}")
            else:
                self.console.error(f"this run's change is not in the storage; the changed database "
                                   f"is kept at {self.working} so its data can be recovered; to "
                                   f"record it, {rerun}")
            return
        shutil.rmtree(self.workspace, ignore_errors=True)


@contextlib.contextmanager
def cancellation(timeout: float) -> Iterator[None]:
    """SIGTERM/SIGINT and the run's deadline raise Cancelled wherever the run is; the
    remote object is then unchanged or fully replaced (a single PUT is atomic)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum, _frame):
        if signum == signal.SIGALRM:
            raise Cancelled("RUN_TIMEOUT", f"the run passed its --timeout of {timeout:g} s and "
                            "was stopped")
        raise Cancelled("CANCELLED", f"the run was cancelled ({signal.Signals(signum).name})")

    previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(params: ActionParameters, config: Config, console: Console | None = None,
        environ: Mapping[str, str] | None = None, change: Change | None = None,
        read_only: bool = False) -> ActionResult:
    """One tracking run (a RunChange), another change (ImportChange, PruneChange), or with
    `read_only` the report of the stored history."""
    console = console or Console()
    environ = os.environ if environ is None else environ
    tracking = TrackingRun(params, config, console, environ, None if read_only else change or RunChange())
    try:
        with cancellation(params.timeout):
            return tracking.execute()
    except Cancelled as exc:  # landed between phases, outside execute's own handling
        tracking.result.error = WorkflowError.from_exception(exc)
        return tracking.result


def read_database(params: ActionParameters, console: Console, environ: Mapping[str, str],
                  workspace: Path, branch: str) -> Path | None:
    """The stored database for a reader (gate, export, backfill), read as `report` reads it —
    the update path's own download and checks, without a change — into `workspace`; None when
    there is none yet (never created, never uploaded). Artifacts are `branch`'s unless the
    parameters name one."""
    reader = TrackingRun(dataclasses.replace(params, artifact_branch=params.artifact_branch or branch),
                         Config(), console, environ, None)
    try:
        reader.download()
        reader.validate()
        target = workspace / "stored.db"
        if not reader.base.is_relative_to(reader.workspace):  # read in place: the user's own file
            return reader.base
        os.replace(reader.base, target)
        return target
    except TrackMetricsError as exc:
        if exc.code != "DB_NOT_FOUND":
            raise
        console.info(f"{reader.storage.location} does not exist yet")
        return None
    finally:
        reader.cleanup()


def bucket_region(storage: S3Storage) -> str:
    """The bucket's region as the storage says it (x-amz-bucket-region), beside the configured one."""
    configured = storage.params.s3.region
    region = storage.http.region  # already the bucket's, when an answer redirected this run
    if not storage.http.redirected:
        try:
            region = storage._call("HeadBucket", "HEAD", "")[1].get("x-amz-bucket-region") or region
        except TrackMetricsError:
            pass
    if region == configured:
        return region
    return f"{region}; the configuration says {configured}: pass --region {region}"


def diagnose(storage: S3Storage) -> list[tuple[str, str, str]]:
    """`check`: each capability the tool needs, as (check, "ok"/"FAILED"/"skipped", advice)."""
    rows: list[tuple[str, str, str]] = []
    names = ["endpoint reachable", "credentials accepted", "bucket exists",
             "read (s3:GetObject)", "write (s3:PutObject)", "conditional writes honoured",
             "delete (s3:DeleteObject)"]

    def fail(failed: str, advice: str) -> list[tuple[str, str, str]]:
        rows.append((failed, "FAILED", advice))
        return rows + [(name, "skipped", "") for name in names[len(rows):]]

    try:
        storage._call("GetObject", "GET", storage.key, headers={"Range": "bytes=0-15"})
    except TrackMetricsError as error:
        if error.details.get("s3_code") not in ("NoSuchKey", "InvalidRange"):
            stage = {"S3_NETWORK": 0, "S3_AUTH_FAILED": 1, "S3_BUCKET_NOT_FOUND": 2}.get(error.code, 3)
            rows.extend((name, "ok", "") for name in names[:stage])
            return fail(names[stage], error.message)
    rows.extend((name, "ok", "") for name in names[:4])
    rows.append(("bucket region", "ok", bucket_region(storage)))
    rows.append(("backups", "ok", storage.backup_policy()))
    try:
        etag = storage.put_probe()
    except TrackMetricsError as exc:
        return fail(names[4], exc.message)
    rows.append((names[4], "ok", ""))
    try:  # a real update of an existing object: the right precondition passes, wrong ones do not
        conditions, description = storage.try_conditions(etag)
        rows.append((names[5], "ok", description) if conditions else (names[5], "FAILED", (
            f"{description}; concurrent runs would lose builds: use another provider, or "
            "--no-conditional-writes with one writer at a time (a CI concurrency group)")))
    except TrackMetricsError as exc:
        rows.append((names[5], "FAILED", exc.message))
    finally:
        try:
            storage.delete(storage.probe_key)
            rows.append((names[6], "ok", ""))
        except TrackMetricsError as exc:
            rows.append((names[6], "FAILED", f"{exc.message}; remove s3://{storage.bucket}/"
                         f"{storage.probe_key} by hand"))
    return rows


# ============================================================================================
# Command line
# ============================================================================================

VERBS = {  # verb → (what it does, an example)
    "run": ("collect the metrics, add this build to the history, write the report (the default verb)",
            "track_metrics.py run --config unentropy.json --bucket acme-metrics --region eu-west-1"),
    "report": ("write the report from the stored history, collecting nothing (no configuration needed: "
               "it draws every metric the database defines)", "track_metrics.py report --local-db metrics.db"),
    "check": ("diagnose the storage: endpoint, credentials (and which provider gave them), bucket, "
              "read, write, conditional writes, delete", "track_metrics.py check --bucket acme-metrics"),
    "verify": ("validate a configuration file and touch nothing", "track_metrics.py verify .github/unentropy.json"),
    "test": ("run every metric and print a table of values, touching no storage", "track_metrics.py test"),
    "collect": ("print one built-in collector's value: loc, size, coverage-lcov, coverage-cobertura, "
                "coverage-clover", "track_metrics.py collect loc ./src --language TypeScript"),
    "gate": ("compare this run's values with the baseline (qualityGate rules), comment on the pull "
             "request; read-only", "track_metrics.py gate --local-db metrics.db --quality-gate-mode hard"),
    "import": ("add a history file (Unentropy's canonical JSONL, CSV, or github-action-benchmark's "
               "data.js) as import builds, through the same compare-and-swap as a run",
               "track_metrics.py import history.jsonl --bucket acme-metrics --dry-run"),
    "prune": ("remove old builds by a retention policy, in one compare-and-swap upload with a .bak "
              "kept; --dry-run first", "track_metrics.py prune --older-than 365 --keep-weekly --vacuum --dry-run"),
    "backfill": ("measure past commits (each in a temporary git worktree) and record them as import builds "
                 "at their commit times; resumable", "track_metrics.py backfill --last 50 --every 5 --checkpoint 10"),
    "export": ("write the history as canonical JSONL (which import reads back) or CSV",
               "track_metrics.py export --local-db metrics.db --metric coverage --format csv"),
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand a verb; the options a verb shares with others come from parent parsers,
    so `VERB --help` shows exactly that verb's options and an example."""
    def group(title: str, *options: tuple) -> argparse.ArgumentParser:
        parent = argparse.ArgumentParser(add_help=False)
        section = parent.add_argument_group(title)
        for flags, settings in options:
            section.add_argument(*flags, **settings)
        return parent

    flag = {"action": "store_true"}
    common = group("output", (("--config",), {"help": "configuration file (default: unentropy.json; input config-file)"}),
                   (("--json",), {**flag, "help": "print the result as JSON on stdout (logs go to stderr)"}),
                   (("--verbose",), {**flag, "help": "log each storage request and command as it runs"}))
    storage = group(
        "storage",
        (("--storage-type",), {"help": "sqlite-s3 (or s3), sqlite-local (the key is a file path) or sqlite-artifact "
                                       "(GitHub Actions artifacts); default: storage.type, else S3 when a bucket is "
                                       "given, else sqlite-artifact under GitHub Actions and sqlite-local elsewhere"}),
        (("--local-db",), {"metavar": "PATH", "help": "a local SQLite file instead of remote storage"}),
        (("--endpoint",), {"help": "S3 endpoint URL (default: AWS S3 for the region)"}),
        (("--bucket",), {"help": "bucket name (or storage.s3.bucket in the file)"}),
        (("--region",), {"help": "S3 region (default: us-east-1)"}),
        (("--database-key",), {"metavar": "KEY", "help": f"object key or file (default: {DEFAULT_DATABASE_KEY})"}),
        (("--access-key-id",), {"help": "prefer AWS_ACCESS_KEY_ID (without keys: botocore's credential chain)"}),
        (("--secret-access-key",), {"help": "prefer AWS_SECRET_ACCESS_KEY: command lines are visible"}),
        (("--session-token",), {"help": "prefer AWS_SESSION_TOKEN"}),
        (("--artifact-name",), {"help": "sqlite-artifact: the artifact's name (default: unentropy-metrics)"}),
        (("--artifact-branch",), {"help": "sqlite-artifact: the branch whose artifacts hold the history "
                                          "(input artifact-branch-filter; default: GITHUB_REF_NAME)"}),
        (("--addressing-style",), {"help": "auto (default: path-style except on AWS), path or virtual"}),
        (("--allow-http",), {**flag, "help": "accept an http:// endpoint on a private network"}),
        (("--allow-endpoint-path",), {**flag, "help": "accept an endpoint with a path (a gateway served under "
                                                      "one); otherwise refused as a bucket written into it"}),
        (("--integrity",), {"choices": ("auto", "full", "quick"), "help": "auto (default): SQLite's full "
                            "integrity_check only for a database this tool did not vouch for, quick_check otherwise; "
                            "full: integrity_check on both sides; quick: quick_check only"}),
        (("--request-timeout",), {"metavar": "SECONDS", "help": "per-request timeout (default: 30)"}),
        (("--retry-attempts",), {"metavar": "N", "help": "attempts per storage request (default: 5)"}),
        (("--timeout",), {"metavar": "SECONDS", "help": "deadline for the whole run (default: 300)"}))
    collection = group(
        "collection and the build's context",
        (("--workdir",), {"help": "where metric commands run (default: the current directory, as Unentropy)"}),
        (("--jobs",), {"metavar": "N", "help": "metric commands run at once (default: 1)"}),
        (("--pass-env",), {"metavar": "NAME", "action": "append", "help": "hand this credential variable "
                           "(e.g. GITHUB_TOKEN for a `gh` metric) to the metric commands, which never see "
                           "credentials otherwise; repeatable, or comma-separated (input pass-env)"}),
        (("--commit",), {"help": "the build's commit, when CI or git cannot tell"}),
        (("--branch",), {"help": "the build's branch, when CI or git cannot tell"}),
        (("--run-id",), {"help": "the build's run id: the same commit and run id replace a build, never duplicate it"}),
        (("--run-number",), {"type": int, "help": "the build's run number"}),
        (("--event",), {"help": "push, pull_request, import… (default: from the CI; local outside CI)"}))
    report = group("report",
                   (("--report-dir",), {"metavar": "DIR", "help": f"where index.html goes (default: {DEFAULT_REPORT_DIR})"}),
                   (("--report-branch",), {"metavar": "BRANCH", "help": "draw only this branch's builds (default: all)"}))
    writing = group(
        "writing the history",
        (("--no-report",), {**flag, "help": "track and upload only; write no report"}),
        (("--no-conditional-writes",), {**flag, "help": "plain PUT for providers without If-Match (concurrent "
                                                        "runs can then lose builds)"}),
        (("--max-conflict-retries",), {"metavar": "N", "help": "re-applications after a concurrent upload (default: 10)"}),
        (("--on-corrupt",), {"help": "fail (default), restore (from the newest valid backup) or recreate"}),
        (("--no-backup",), {**flag, "help": "do not keep <key>.bak before overwriting"}),
        (("--backup-every",), {"metavar": "HOURS", "help": "refresh <key>.bak when it is older than this "
                                                           "(default: 24; 0: every upload; always before a prune)"}),
        (("--new-history",), {**flag, "help": "start a new history although the key's backups (.bak, older "
                                              "versions) exist: its database was deleted on purpose"}),
        (("--fail-on-missing",), {**flag, "help": "exit 1 when any metric recorded no value"}))
    gate = group(
        "quality gate",
        (("--quality-gate-mode",), {"dest": "gate_mode", "help": "off, soft (default) or hard"}),
        (("--base-branch",), {"help": "the baseline branch (default: qualityGate.baseline.referenceBranch, "
                                      "GITHUB_BASE_REF, GitLab's target branch, else main)"}),
        (("--values",), {"metavar": "FILE.json", "help": "this run's values (metric id → value) instead of running "
                                                          "the commands: the fork two-workflow pattern"}),
        (("--comment-file",), {"metavar": "FILE", "help": "also write the comment's Markdown here (other CIs)"}),
        (("--output-file",), {"help": f"the results document (default: {GATE_RESULTS})"}),
        (("--pr-comment-marker",), {"dest": "comment_marker", "help": f"the comment's marker (default: {GATE_MARKER})"}),
        (("--max-pr-comment-metrics",), {"dest": "max_comment_metrics", "help": "rows in the comment (default: 30)"}),
        (("--enable-pr-comment",), {"dest": "pr_comment", "help": "true (default) or false"}),
        (("--accept-label",), {"help": f"a pull request label that accepts its regressions (default: "
                                       f"qualityGate.acceptLabel, else {ACCEPT_LABEL})"}))
    importing = group(
        "import",
        (("--format",), {"choices": ("jsonl", "csv", "benchmark-action"), "default": "jsonl",
                         "help": "the file's format (default: jsonl, Unentropy's canonical records)"}),
        (("--trend-branch",), {"default": "main", "help": "records without a commit take this branch's last "
                                                          "commit at their time (git log; default: main)"}),
        (("--dry-run",), {**flag, "help": "say what would be added; upload nothing"}),
        (("--strict",), {**flag, "help": "stop at the first bad line and import nothing"}))
    exporting = group(
        "export",
        (("--format",), {"choices": ("jsonl", "csv"), "default": "jsonl", "help": "default: jsonl"}),
        (("--metric",), {"help": "only this metric"}), (("--branch",), {"help": "only this branch's builds"}),
        (("--since",), {"metavar": "DATE", "help": "only builds from this date (2025-01-31) on"}),
        (("--output",), {"metavar": "FILE", "help": "write here instead of stdout"}))
    pruning = group(
        "prune",
        (("--pull-requests-older-than",), {"metavar": "DAYS", "type": float, "help": "remove pull-request builds older than this"}),
        (("--older-than",), {"metavar": "DAYS", "type": float, "help": "remove every build older than this …"}),
        (("--keep-daily",), {"dest": "keep", "action": "store_const", "const": "daily",
                             "help": "… but one build per branch and day"}),
        (("--keep-weekly",), {"dest": "keep", "action": "store_const", "const": "weekly",
                              "help": "… but one build per branch and week"}),
        (("--vacuum",), {**flag, "help": "shrink the file afterwards (SQLite VACUUM)"}),
        (("--dry-run",), {**flag, "help": "say what would be removed; upload nothing"}))
    backfilling = group(
        "backfill",
        (("--since",), {"metavar": "REV", "help": "the commits after this revision (first-parent history)"}),
        (("--last",), {"metavar": "N", "type": int, "help": "the last N commits"}),
        (("--every",), {"metavar": "K", "type": int, "default": 1, "help": "every K-th commit (default: each)"}),
        (("--all-metrics",), {**flag, "help": "run every metric command, not only those that need no build "
                                              "(@collect loc and size)"}),
        (("--checkpoint",), {"metavar": "N", "type": int, "help": "upload every N commits (default: once, at the end)"}),
        (("--trend-branch",), {"default": "main", "help": "the branch the builds are recorded on (default: main)"}))
    parents = {"run": [common, storage, collection, report, writing], "report": [common, storage, report],
               "backfill": [common, storage, collection, writing, backfilling],
               "prune": [common, storage, report, writing, pruning],
               "import": [common, storage, report, writing, importing], "export": [common, storage, exporting],
               "check": [common, storage], "verify": [common], "test": [common, collection],
               "collect": [common], "gate": [common, storage, collection, gate]}
    parser = argparse.ArgumentParser(
        prog="track_metrics.py", description="Track a codebase's metrics across CI runs in a SQLite database "
        "on S3-compatible storage, a local file or GitHub Actions artifacts.",
        epilog="Without a verb, `run`. Exit codes: 0 ok, 1 failed, 2 bad configuration or parameters, "
               "75 retryable. `track_metrics.py VERB --help` shows a verb's options.")
    parser.add_argument("--version", action="version", version=f"track_metrics {__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="VERB", title="verbs")
    for verb, (summary, example) in VERBS.items():
        sub = verbs.add_parser(verb, parents=parents[verb], help=summary, description=summary[0].upper() + summary[1:] + ".",
                               epilog=f"example: {example}")
        if verb == "verify":
            sub.add_argument("config_file", nargs="?", metavar="CONFIG", help="the file to check (default: --config)")
        if verb == "import":
            sub.add_argument("file", help="the history file")
        if verb == "collect":
            sub.add_argument("collector", choices=COLLECTORS, help="the collector")
            sub.add_argument("arguments", nargs=argparse.REMAINDER, help="its arguments, as after @collect")
    return parser


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The verb's arguments; no verb (or only options) means `run`, as before verbs existed."""
    argv = list(argv)
    guessed = not argv or (argv[0] not in VERBS and argv[0] not in ("-h", "--help", "--version"))
    if guessed:
        argv.insert(0, "run")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unrecognized(unknown, argv[1] if guessed and len(argv) > 1 else None, parser, argv[0]))
    return args


def unrecognized(unknown: Sequence[str], first: str | None, parser: argparse.ArgumentParser, verb: str) -> str:
    """argparse's complaint, with a did-you-mean for a mistyped verb or option."""
    import difflib
    options = list(parser._subparsers._group_actions[0].choices[verb]._option_string_actions)
    hints = []
    for token in unknown:
        name = token.split("=", 1)[0]
        if name.startswith("-"):
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        else:
            close = difflib.get_close_matches(name, list(VERBS), n=1, cutoff=0.6) if token == first else []
        if close:
            hints.append(f"{token}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + ("".join(f"\n  {hint}" for hint in hints))


def write_outputs(path: str, outputs: Mapping[str, str], secrets: Sequence[str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for name, value in outputs.items():
            delimiter = f"EOF_{uuid.uuid4().hex}"  # multi-line safe, and no value can forge it
            handle.write(f"{name}<<{delimiter}\n{redact(value, secrets)}\n{delimiter}\n")


def write_github_outputs(path: str, result: ActionResult, secrets: Sequence[str]) -> None:
    database = result.database
    outputs = {
        "success": str(result.success).lower(), "storage-type": result.storage_type,
        "database-location": result.database_location or "",
        "database-size": str(database.size) if database else "",
        "database-sha256": database.sha256 if database else "",
        "metrics-collected": str(len(result.metrics_collected)),
        "metrics-failed": ",".join(result.metrics_failed),
        "total-builds": str(result.total_builds), "duration": str(result.duration_ms),
        "report-path": result.report_path or "",
        "error-code": result.error.code if result.error else "",
        "error-message": result.error.message if result.error else "",
        "source-run-id": result.artifact.get("source-run-id", ""),
        "artifact-upload-required": str(bool(result.artifact.get("upload-required"))).lower(),
        "artifact-name": result.artifact.get("name", ""),
        "artifact-path": result.artifact.get("path", ""),
    }
    write_outputs(path, outputs, secrets)


def check(params: ActionParameters, console: Console, as_json: bool) -> int:
    if params.local_db is not None:
        console.error("check diagnoses S3 storage; there is nothing to check with --local-db")
        return EXIT_USAGE
    storage = S3Storage(params, console, uuid.uuid4().hex)
    rows = diagnose(storage)
    rows.insert(0, ("credentials", "ok", f"from {params.credentials.source}"))
    if as_json:
        document = [{"check": name, "status": status, "advice": advice} for name, status, advice in rows]
        sys.stdout.write(console.redact(json.dumps(document, indent=2)) + "\n")
    else:
        width = max(len(name) for name, _, _ in rows)
        table = "\n".join(f"{name:<{width}}  {status:<7}  {advice}".rstrip() for name, status, advice in rows)
        sys.stdout.write(console.redact(f"{params.location}\n{table}") + "\n")
    return EXIT_OK if all(status == "ok" for _, status, _ in rows) else EXIT_FAILED


def export_command(args: argparse.Namespace, params: ActionParameters, console: Console,
                   environ: Mapping[str, str]) -> int:
    """`export`: the stored history, read-only, as JSONL or CSV on stdout or in --output."""
    workspace = Path(tempfile.mkdtemp(prefix="track_metrics-export-"))
    try:
        path = read_database(params, console, environ, workspace, params.artifact_branch or "main")
        if path is None:
            raise TrackMetricsError("DB_NOT_FOUND", f"{params.location} does not exist: nothing to export")
        with opened_database(path, read_only=True) as connection:
            lines = export_history(connection, args.format, args.metric, args.branch, args.since)
            if args.output:
                with open(args.output, "w", encoding="utf-8", newline="") as handle:
                    handle.writelines(lines)
            else:
                sys.stdout.writelines(lines)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return EXIT_OK


def done_line(command: str, result: ActionResult, change: Change | None = None) -> str:
    """The last line of a successful run: what was recorded, what failed, where it all is."""
    report = f"; report: {result.report_path}" if result.report_path else ""
    if change is not None and change.said:
        return f"done: {change.said}; {count(result.total_builds, 'build')} in {result.database_location}{report}"
    if command != "run":  # report: import and prune say what they did (change.said)
        return f"done: {count(result.total_builds, 'build')} in {result.database_location}{report}"
    recorded, failed = len(result.metrics_collected), list(result.metrics_failed)
    what = f"{recorded} of {count(recorded + len(failed), 'metric')} recorded; failed: {', '.join(failed)}" \
        if failed else f"{count(recorded, 'metric')} recorded"
    return f"done: {what}, {count(result.total_builds, 'build')} in {result.database_location}{report}"


def collect_command(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`collect COLLECTOR ARGS…`: print one built-in collector's value (with the sources of
    ./unentropy.json, or of --config FILE, when there is one)."""
    argv = list(argv)
    config_path = Path("unentropy.json")
    if "--config" in argv[:-1]:
        at = argv.index("--config")
        config_path = Path(argv[at + 1])
        del argv[at:at + 2]
    try:
        config = load_config(config_path) if config_path.exists() else Config()
        value = run_collector(" ".join(shlex_quote(arg) for arg in argv), config.sources,
                              config.base_path, Path("."))
    except TrackMetricsError as exc:
        sys.stderr.write(f"[{exc.code}] {exc.message}\n")
        return EXIT_USAGE
    except CollectError as exc:
        sys.stderr.write(f"collect: {exc}\n")
        return EXIT_FAILED
    sys.stdout.write(js_string(value) + "\n")
    return EXIT_OK


def shlex_quote(arg: str) -> str:
    """Quote an argument for split_arguments (which knows quotes, not escapes)."""
    if arg and not re.search(r"[\s'\"]", arg):
        return arg
    return f"'{arg}'" if "'" not in arg else f'"{arg}"'


def verify_command(config_path: Path, console: Console) -> int:
    config = load_config(config_path)
    for warning in config.warnings:
        console.warning(warning)
    sys.stdout.write(f"{config_path}: valid, {count(len(config.metrics), 'metric')}"
                     f"{', ' + count(len(config.warnings), 'warning') if config.warnings else ''}\n")
    return EXIT_OK


def test_command(params: ActionParameters, config: Config, console: Console,
                 environ: Mapping[str, str]) -> int:
    """Run every metric as `run` would and print the values; no storage, no database."""
    build = detect_build(environ, params, now_utc(), lambda args: git(args, params.workdir))
    runner = CommandRunner(params.workdir, environ, console.secrets, config.sources, config.base_path,
                           params.pass_env)
    deadline = time.monotonic() + params.timeout
    with cancellation(params.timeout):
        outcomes = collect_metrics(config.metrics, runner, build, params.jobs, deadline)
    width = max(len(m.id) for m in config.metrics)
    rows = []
    for metric, outcome in zip(config.metrics, outcomes):
        shown = format_value(outcome.value, metric.unit) if outcome.ok and metric.type == "numeric" \
            else (outcome.value if outcome.ok else f"FAILED: {outcome.error}")
        rows.append(f"{'ok' if outcome.ok else '--'}  {metric.id:<{width}}  {shown}  "
                    f"({outcome.duration_ms} ms)")
    failed = sum(not outcome.ok for outcome in outcomes)
    rows.append(f"{len(outcomes) - failed} of {count(len(outcomes), 'metric')} collected"
                + (f"; {failed} failed" if failed else ""))
    sys.stdout.write(console.redact("\n".join(rows)) + "\n")
    return EXIT_OK if not failed else EXIT_FAILED


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    if argv[:1] == ["collect"] and argv[1:2] not in (["-h"], ["--help"]):
        return collect_command(argv[1:], environ)
    console = Console(github=environ.get("GITHUB_ACTIONS") == "true")
    for secret in find_secrets(argv, environ):  # ::add-mask:: before anything else is printed
        console.add_secret(secret)
    try:
        args = parse_arguments(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has explained
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    console.verbose = args.verbose or environ.get("INPUT_VERBOSE", "").lower() == "true"
    result = ActionResult()
    try:
        config_input = environ.get("INPUT_CONFIG-FILE", "").strip()
        config_path = Path(args.config or getattr(args, "config_file", None) or config_input or "unentropy.json")
        named_by = "--config" if args.config else "the action's config-file input" if \
            config_input and not getattr(args, "config_file", None) else ""
        if args.command == "verify":
            return verify_command(config_path, console)
        if args.command == "prune" and args.pull_requests_older_than is None and args.older_than is None:
            raise TrackMetricsError("PARAM_MISSING", "prune needs --pull-requests-older-than DAYS or "
                                    "--older-than DAYS", type="validation")
        if args.command in ("check", "report", "import", "export", "prune") and not config_path.exists():
            # check needs no metrics; report draws every metric the database defines, as stored
            config = Config(storage=StorageConfiguration() if args.command == "check" else None)
        else:
            config = load_config(config_path, named_by)
        for warning in config.warnings:
            console.warning(warning)
        if args.command == "gate":
            with cancellation(float(environ.get("INPUT_TIMEOUT") or 300)):
                return gate_command(args, environ, console, config, config_path)
        params = ActionParameters.from_sources(args, environ, config, config_path)
        if params.credentials is not None:  # the chain's come from files or STS, not the environment
            for secret in (params.credentials.secret_access_key, params.credentials.session_token or ""):
                console.add_secret(secret)
        from urllib.parse import urlsplit
        endpoint = urlsplit(params.s3.endpoint or "")
        if params.local_db is None and endpoint.scheme == "http" and not is_loopback(endpoint.hostname or ""):
            console.warning("the endpoint uses plain http://: requests are signed but the database "
                            "travels unencrypted; use https:// outside a private network")
        verbs = {"check": lambda: check(params, console, args.json),
                 "test": lambda: test_command(params, config, console, environ),
                 "export": lambda: export_command(args, params, console, environ),
                 "backfill": lambda: backfill_command(args, dataclasses.replace(params, report=False), config,
                                                      console, environ)}
        if args.command in verbs:
            return verbs[args.command]()
        changes = {"run": RunChange, "report": lambda: None,
                   "import": lambda: ImportChange(ImportRequest(args.file, args.format, args.trend_branch,
                                                                args.dry_run, args.strict)),
                   "prune": lambda: PruneChange(PruneRequest(args.pull_requests_older_than, args.older_than,
                                                             args.keep, args.vacuum, args.dry_run))}
        change = changes[args.command]()
        result = run(params, config, console, environ, change, read_only=change is None)
        if result.success:
            console.info(done_line(args.command, result, change))
            if args.command == "run" and result.metrics_failed and getattr(args, "fail_on_missing", False):
                console.error(f"[METRICS_MISSING] {', '.join(result.metrics_failed)} recorded no value "
                              "(--fail-on-missing)")
                result.success = False
                result.error = WorkflowError("collection", "METRICS_MISSING", "metrics failed: "
                                             + ", ".join(result.metrics_failed), False)
        elif result.error:
            console.error(f"[{result.error.code}] {result.error.message}")
    except (TrackMetricsError, Cancelled, sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.DatabaseError):
            if type(exc) is not sqlite3.DatabaseError:
                raise
            exc = unreadable(exc)
        for secret in getattr(exc, "secrets", ()):
            console.add_secret(secret)
        result.error = WorkflowError.from_exception(exc)
        for phase in result.phases:
            phase.status = "skipped" if phase.status == "pending" else phase.status
        console.error(f"[{exc.code}] {exc.message}")
    if environ.get("GITHUB_OUTPUT"):
        write_github_outputs(environ["GITHUB_OUTPUT"], result, console.secrets)
    if environ.get("GITHUB_STEP_SUMMARY") and result.error:  # a failed run says so where people look
        with open(environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(console.redact(f"### Metrics\n\n❌ The run failed: `{result.error.code}` — "
                                        f"{result.error.message}\n"))
    if args.json:
        sys.stdout.write(result.to_json(console.secrets) + "\n")
    return EXIT_OK if result.success else (result.error.exit_code if result.error else EXIT_FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
