"""Metric points for MLflow, journaled locally and sent off the training thread.

A stage must neither stall nor lose metrics when the tracking server is down: MLflow's HTTP client retries for
minutes by default (a dead server froze a training loop for 4 minutes), and a run that gives up on tracking loses
every point after the outage. So every point is first appended to a local journal
(`checkpoints/tracking/<run id>.jsonl`, one JSON line per point, flushed), and a background thread sends the
journal's unsent lines in batches, with short timeouts and backoff, recording how many lines MLflow has accepted
in `<run id>.sent`. A point is never sent twice and never dropped: whatever is still unsent when the stage ends
(bounded wait) is sent by the next stage that uses the same run, or by `aligntok tracking sync`.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

from aligntok.config import Params
from aligntok.tracking.uri import bound_http_retries, tracking_uri

JOURNAL_DIR = Path("checkpoints") / "tracking"
BATCH = 500  # MLflow's log_batch accepts at most 1000 metrics per call


class MetricJournal:
    def __init__(self, run_id: str, send: Callable[[str, list[dict]], None], directory: Path = JOURNAL_DIR,
                 interval_s: float = 1.0, max_backoff_s: float = 30.0):
        self.run_id, self.send = run_id, send
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{run_id}.jsonl"
        self.sent_path = directory / f"{run_id}.sent"
        self.interval_s, self.max_backoff_s = interval_s, max_backoff_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._file = open(self.path, "a", encoding="utf-8")
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-sender-{run_id[:8]}", daemon=True)
        self._thread.start()

    def append(self, metrics: dict[str, float], step: int | None) -> None:
        """Record points now (cheap, local); they reach MLflow in the background."""
        ts = int(time.time() * 1000)
        lines = "".join(json.dumps({"key": k, "value": v, "step": step or 0, "timestamp": ts}) + "\n"
                        for k, v in metrics.items())
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        self._wake.set()

    def pending(self) -> int:
        return _count_lines(self.path) - _read_sent(self.sent_path)

    def close(self, timeout_s: float = 20.0) -> int:
        """Stop the sender after one last bounded attempt; returns how many points are still unsent."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            self._file.close()
        return self.pending()

    def discard(self) -> None:
        """Remove a fully sent journal (the `.sent` count first: a journal without it is only resent, never lost)."""
        if self.pending() == 0:
            self.sent_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        backoff = self.interval_s
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            stopping = self._stop
            try:
                flush_journal(self.path, self.sent_path, self.run_id, self.send, lock=self._lock)
                backoff = self.interval_s
            except Exception:  # noqa: BLE001 - the server is away: keep the lines, try again later
                self.failures += 1
                backoff = min(self.max_backoff_s, backoff * 2)
                if stopping:
                    return
            if stopping:
                return


def flush_journal(path: Path, sent_path: Path, run_id: str, send: Callable[[str, list[dict]], None],
                  lock: threading.Lock | None = None) -> int:
    """Send every unsent line of a journal in batches; returns how many were sent. Raises when sending fails."""
    done = _read_sent(sent_path)
    with lock or threading.Lock():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    # a line still being written (no newline yet) waits for the next round
    complete = [ln for ln in lines[done:] if ln.endswith("\n")]
    sent = 0
    for start in range(0, len(complete), BATCH):
        chunk = [json.loads(ln) for ln in complete[start:start + BATCH]]
        send(run_id, chunk)
        sent += len(chunk)
        _write_sent(sent_path, done + sent)
    return sent


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _read_sent(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_sent(path: Path, n: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(n))
    tmp.replace(path)


def send_metrics(run_id: str, points: list[dict]) -> None:
    import mlflow
    from mlflow.entities import Metric
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(p["key"], p["value"], p["timestamp"], p["step"])
                                                     for p in points], synchronous=True)

class SyncFailed(RuntimeError):
    """MLflow refused or could not be reached during `aligntok tracking sync` (one line; the journals are kept)."""


def sync_journals(params: Params) -> int:
    """`aligntok tracking sync`: send every journaled metric point that MLflow has not accepted yet."""
    import mlflow

    from aligntok.tracking.uri import redact
    uri = tracking_uri(params)
    if uri.startswith("http"):
        bound_http_retries()
    mlflow.set_tracking_uri(uri)
    total = 0
    for path in sorted(JOURNAL_DIR.glob("*.jsonl")):
        try:
            sent = flush_journal(path, path.with_suffix(".sent"), path.stem, send_metrics)
        except Exception as e:  # noqa: BLE001 - unreachable, refused: nothing is marked sent, so a rerun resends it
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SyncFailed(f"tracking sync: MLflow at {redact(uri)} did not take the points of {path.stem} "
                             f"({reason}); they stay in {path}: run it again when the server is up") from None
        total += sent
        print(f"{path.stem}: {sent} metric points sent")
    return total
