"""One trainer per workdir: a lock file naming its holder, kept alive by a heartbeat.

WORKDIR/lock.json holds {host, pid, started, heartbeat}. A second trainer on the same workdir
(even on another host of a shared filesystem) finds it and stops with one line naming the
holder. A lock whose process is gone (same host, pid not running) or whose heartbeat is older
than `stale_after` seconds (a host that died on shared storage) is taken over with a message.
The workdir checks that a run can write where it will write, before anything compiles.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import threading
import time

LOCK = "lock.json"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message is one line."""


def _now() -> float:
  return time.time()


def _stamp(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def check_writable(path: str, what: str) -> None:
  """Creates `path` if needed and writes a probe file there; WorkdirError (one line) if not."""
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise WorkdirError(f"{what} {path} cannot be created: {parent} is a file")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except FileExistsError:
    raise WorkdirError(f"{what} {path} is a file, not a directory") from None
  except OSError as e:
    raise WorkdirError(f"{what} {path} is not writable: {e.strerror}") from None


class WorkdirLock:
  """Context manager: holds WORKDIR/lock.json for the life of a training run."""

  def __init__(self, workdir: str, *, stale_after: float = STALE_AFTER_SECONDS,
               heartbeat: float = HEARTBEAT_SECONDS, log=print):
    self.path = os.path.join(workdir, LOCK)
    self.stale_after = stale_after
    self.heartbeat = heartbeat
    self.log = log
    self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    self._stop = threading.Event()
    self._thread = None

  def holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as stale below

  def _stale(self, held: dict) -> str | None:
    """Why a held lock may be taken over, or None."""
    if not held:
      return "its lock file is unreadable"
    if held.get("host") == self.mine["host"] and not _alive(int(held.get("pid", -1))):
      return f"its process {held.get('pid')} on this host is gone"
    age = _now() - float(held.get("heartbeat", held.get("started", 0)))
    if age > self.stale_after:
      return f"its heartbeat stopped {age:.0f}s ago"
    return None

  def _write(self, exclusive: bool) -> None:
    record = dict(self.mine, heartbeat=_now())
    if exclusive:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    else:
      tmp = f"{self.path}.{self.mine['pid']}.tmp"
      with open(tmp, "w") as f:
        json.dump(record, f)
      os.replace(tmp, self.path)

  def __enter__(self):
    try:
      self._write(exclusive=True)
    except FileExistsError:
      held = self.holder()
      why = self._stale(held) if held is not None else "it was released"
      if why is None:
        raise WorkdirError(
            f"{os.path.dirname(self.path)} is in use by another trainer (pid {held.get('pid')} "
            f"on host {held.get('host')}, started {_stamp(float(held.get('started', 0)))}); "
            "use another --workdir, or stop that run") from None
      self.log(f"lmtrain: taking over the workdir lock of pid {held.get('pid')} on host "
               f"{held.get('host')}: {why}")
      self._write(exclusive=False)
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        raise WorkdirError(f"{os.path.dirname(self.path)} is not writable: {e.strerror}") from None
      raise
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat):
      if (self.holder() or {}).get("pid") != self.mine["pid"]:
        return  # taken over: do not fight for it
      try:
        self._write(exclusive=False)
      except OSError:
        pass  # a missed heartbeat only ages the lock

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    held = self.holder()
    if held and held.get("pid") == self.mine["pid"] and held.get("host") == self.mine["host"]:
      try:
        os.remove(self.path)
      except OSError:
        pass
