"""DirectRunner worker processes forked from a copy of the main process instead of started afresh.

With ``--direct_running_mode multi_processing`` Beam starts each worker as ``python -m
apache_beam.runners.worker.sdk_worker_main``: a new interpreter that imports Apache Beam and the stages
(~3–4 CPU s per worker before its first row, as much as curating ~1,000 images). The main process has
already imported all of it. :class:`ForkServer` forks a *zygote* from the main process before the runner
starts any gRPC server or thread; the worker command becomes a stdlib-only client
(``_fork_client.py``, ~20 ms) that hands its environment (Beam's control and logging addresses, the
pipeline options) to the zygote, which forks a worker that runs Beam's own ``sdk_worker_main.main``.
The client exits with the worker's exit code, so Beam sees the same process contract.

:class:`ForkingFnApiRunner` is Beam's FnApiRunner with that one change. :func:`fork_server_for` keeps one
zygote for all passes of a run, and keeps Beam's own command where forking is unsafe: no ``os.fork``, a
library that starts native thread pools (torch, onnxruntime) already imported, or gRPC's threads running
(an earlier pipeline in the same process): a forked child may inherit their locks in a locked state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import traceback
from typing import Iterator

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

log = logging.getLogger(__name__)

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fork_client.py")
#: Beam's worker command for multi_processing (fn_runner.py); the only one replaced.
BEAM_WORKER_MODULE = "-m apache_beam.runners.worker.sdk_worker_main"
#: Imported in the main process, these make forking unsafe (thread pools a child cannot use).
FORK_UNSAFE_MODULES = ("torch", "onnxruntime", "tensorflow", "jax")
#: Threads gRPC's core starts (and keeps after a server stops); a child forked beside them may hang in gRPC.
GRPC_THREAD_PREFIXES = ("grpc_", "event_engine", "default-executo", "resolver-execu")


def fork_unsafe_reason() -> str | None:
    """Why workers cannot be forked from this process now, or None when they can."""
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX"):
        return "no os.fork / AF_UNIX on this platform"
    loaded = [m for m in FORK_UNSAFE_MODULES if m in sys.modules]
    if loaded:
        return f"the main process has imported {', '.join(loaded)}"
    busy = sorted({name for name in _thread_names() if name.startswith(GRPC_THREAD_PREFIXES)})
    if busy:
        return f"gRPC is running in the main process (threads {', '.join(busy)})"
    return None


def _thread_names() -> list[str]:
    """Names of this process's OS threads (Linux: /proc/self/task/*/comm; elsewhere none known)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _run_worker(env: dict[str, str]) -> int:
    """In a forked child: Beam's SDK harness, as ``python -m ...sdk_worker_main`` would run it."""
    from apache_beam.runners.worker import sdk_worker_main

    root = logging.getLogger()
    for handler in list(root.handlers):  # the main process's console handlers: the harness logs to the runner
        root.removeHandler(handler)
    os.environ.clear()
    os.environ.update(env)
    try:
        sdk_worker_main.main([])
        return 0
    except BaseException:  # noqa: BLE001 - reported like an exec'd worker's crash, as an exit code
        traceback.print_exc()
        return 1


def _serve(listener: socket.socket, alive_fd: int, target) -> None:
    """The zygote's loop: fork a worker per request, report its exit code, stop when the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process; it closes ``alive_fd``
    workers: dict[int, socket.socket] = {}       # worker pid -> the client connection waiting on it
    parent_alive = True
    while parent_alive or workers:
        waiting = list(workers.values())
        readable, _, _ = select.select([listener, alive_fd] + waiting if parent_alive else waiting, [], [], 0.2)
        for r in readable:
            if r is alive_fd:
                parent_alive = False  # the run is over (or the main process died): end any leftover worker
                for pid in workers:
                    _kill(pid)
            elif r is listener:
                conn, _ = listener.accept()
                head = _recv_exact(conn, 4)
                body = head and _recv_exact(conn, struct.unpack(">I", head)[0])
                if not body:
                    conn.close()
                    continue
                env = json.loads(body)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the worker
                    code = 1
                    try:
                        listener.close()
                        os.close(alive_fd)
                        for c in list(workers.values()) + [conn]:
                            c.close()
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                        code = target(env)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                workers[pid] = conn
            else:  # a client closed its end before its worker ended: it was killed, so is the worker
                if not r.recv(1):
                    pid = next(p for p, c in workers.items() if c is r)
                    _kill(pid)
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                workers.clear()
                break
            if pid == 0:
                break
            conn = workers.pop(pid, None)
            if conn is not None:
                code = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(struct.pack(">i", code if code >= 0 else 128 - code))
                except OSError:
                    pass
                conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ForkServer:
    """A zygote forked from this process; :attr:`command` starts a worker forked from it, which runs
    ``target(env)`` (Beam's SDK harness by default) and exits with what it returns."""

    def __init__(self, target=None):
        self.target = target or _run_worker
        self.command: str | None = None
        self._dir = self._alive_w = self._pid = None

    @property
    def started(self) -> bool:
        return self._pid is not None

    def __enter__(self) -> "ForkServer":
        return self.start()

    def start(self) -> "ForkServer":
        """Fork the zygote (once)."""
        if self._pid is not None:
            return self
        self._dir = tempfile.mkdtemp(prefix="clip-curate-fork-")
        path = os.path.join(self._dir, "zygote.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        alive_r, self._alive_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 0
            try:
                os.close(self._alive_w)
                _serve(listener, alive_r, self.target)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                shutil.rmtree(self._dir, ignore_errors=True)  # also when the main process was killed
                os._exit(code)
        os.close(alive_r)
        listener.close()
        self._pid = pid
        self.command = " ".join(shlex.quote(a) for a in (sys.executable, "-I", "-S", CLIENT, path))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the zygote (and any worker still running); a no-op when it never started."""
        if self._alive_w is not None:
            os.close(self._alive_w)  # the zygote ends its leftover workers and exits
            self._alive_w = None
        if self._pid:
            os.waitpid(self._pid, 0)
            self._pid = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _replace_worker_command(proto: beam_runner_api_pb2.Pipeline, command: str) -> int:
    """Point every environment that runs Beam's default worker command at ``command``; how many."""
    n = 0
    for env in proto.components.environments.values():
        if env.urn == python_urns.SUBPROCESS_SDK and env.payload.decode().endswith(BEAM_WORKER_MODULE):
            env.payload = command.encode()  # the payload is the command line itself (environments.py)
            n += 1
    return n


class ForkingFnApiRunner(FnApiRunner):
    """Beam's FnApiRunner whose workers are forked by ``server``: started by :func:`fork_server_for` before
    the pipeline is built where it can be, else when the first pipeline runs unless forking is unsafe then."""

    def __init__(self, server: ForkServer, **kwargs):
        super().__init__(**kwargs)
        self._server = server

    def run_pipeline(self, pipeline, options):
        if not self._server.started:
            reason = fork_unsafe_reason()
            if reason is not None:
                log.info("worker processes start afresh: %s", reason)
                return super().run_pipeline(pipeline, options)
            self._server.start()
            log.info("worker processes forked from the main process (%s)", self._server.command)
        return super().run_pipeline(pipeline, options)

    def run_via_runner_api(self, pipeline_proto, options):
        if self._server.started:
            _replace_worker_command(pipeline_proto, self._server.command)
        return super().run_via_runner_api(pipeline_proto, options)


@contextlib.contextmanager
def fork_server_for(options) -> Iterator[ForkServer | None]:
    """A :class:`ForkServer` for the DirectRunner in ``multi_processing`` mode, ended with the context (it
    serves every pass of a run), or None for other runners and modes."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if (runner is not None and str(runner).split(".")[-1] != "DirectRunner") or \
            options.view_as(DirectOptions).direct_running_mode != "multi_processing":
        yield None
        return
    server = ForkServer()
    if fork_unsafe_reason() is None:
        # now, before the pipeline is built: building an embed stage imports torch (Beam's RunInference
        # does), after which a fork is unsafe; the workers import what building adds when they unpickle it
        server.start()
        log.info("worker processes forked from the main process, copied before the pipeline is built (%s)",
                 server.command)
    try:
        yield server
    finally:
        server.close()
