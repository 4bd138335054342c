"""A stage's command as a process group: its lines streamed to a log, killed on timeout or cancel, its failure
classified (a config error or a NaN stop is not retried) and named in one line."""
import os
import re
import signal
import subprocess
import threading
from pathlib import Path


class StageFailed(RuntimeError):
    """A stage's command failed; `code` is the aligntok exit code when DVC reported it (else dvc's own)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


NO_RETRY = {2, 3}  # bad input or params, NaN/Inf stop: the same params would fail the same way again


def transient(task, task_run, state) -> bool:
    """Retry only what a rerun can fix (a killed or crashed process, a lost node), never bad input or divergence."""
    try:
        state.result()
    except StageFailed as e:
        return e.code not in NO_RETRY
    except Exception:  # noqa: BLE001 - anything else (OSError, a crash): worth one more try
        return True
    return False


def run_streaming(cmd: list[str], cwd: Path, env: dict, timeout_s: float, log) -> None:
    """Run `cmd` in a new process group, forward its lines to `log`, kill the group on timeout or cancel."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc)
    timer = threading.Timer(timeout_s, on_timeout)
    timer.start()
    tail: list[str] = []
    try:
        for line in proc.stdout:
            log(line.rstrip())
            tail = (tail + [line])[-50:]
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
    if code != 0:
        # dvc exits 255 whatever the stage did; its last lines carry the stage's own exit code
        found = re.findall(r"exited with (-?\d+)", "".join(tail))
        stage_code = int(found[-1]) if found else code
        why = (f" (killed: timeout after {timeout_s} s)" if timed_out.is_set()
               else f" (killed by signal {-code})" if code < 0 else "")  # preempted, OOM-killed: not a timeout
        said = [line.strip() for line in tail if line.startswith("aligntok: ")]  # the stage's own one-line error
        message = said[-1] if said and stage_code in NO_RETRY else f"{' '.join(cmd)} exited with {stage_code}{why}"
        raise StageFailed(message, stage_code)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
