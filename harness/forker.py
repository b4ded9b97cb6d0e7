"""A preloaded parent that forks the processes of a local swarm (`python -m harness.forker FD [MODULE…]`).

Every server and bootstrap process of a local swarm imports torch and hivemind, seconds of CPU each
on a small machine, and most of a test suite's or demo's start-up. This process imports them once,
then forks one child per request: each child is a real, separate process (its own pid, session,
DHT node, libp2p daemon and sockets) that runs `python -m MODULE ARGS…` as if started afresh, so
SIGKILL, SIGSTOP and exit codes behave as with `subprocess`. Only `harness.processes` talks to it.

Protocol over a Unix socket pair: the parent sends one JSON request with three file descriptors
(stdin, stdout, stderr of the child) at a time; this process answers `{"pid": …}` (or
`{"error": …}`), and later `{"exit": pid, "code": …}` when a child ends (negative: killed by that
signal). When the parent goes away, every remaining child's process group is killed. The modules
to preload are the arguments after FD (default: what servers and bootstrap nodes import).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import sys
from typing import Optional

PRELOAD = ("torch", "hivemind", "swarm.server", "swarm.serve", "bootstrap.__main__")
_MAX_REQUEST = 1 << 20


def _preload(modules: list[str]) -> None:
    import importlib

    for module in modules:
        importlib.import_module(module)


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _send(control: socket.socket, message: dict) -> None:
    control.sendall((json.dumps(message) + "\n").encode())


def serve(control: socket.socket) -> Optional[dict]:
    """Answers requests until the parent goes away; returns (only in a forked child) its request."""
    children: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    try:
        while True:
            events = selector.select(timeout=0.05)
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    _send(control, {"exit": pid, "code": _exit_code(status)})
            if not events:
                continue
            data, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, 3)
            if not data:
                return None
            try:
                request = json.loads(data)
                pid = os.fork()
            except (ValueError, OSError) as e:
                for fd in fds:
                    os.close(fd)
                _send(control, {"error": str(e)})
                continue
            if pid == 0:
                selector.close()
                control.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            children.add(pid)
            _send(control, {"pid": pid})
    finally:
        if os.getpid() == _zygote_pid:
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass


def run_child(request: dict) -> None:
    """Becomes `python -m MODULE ARGS…` with the requested environment, in a session of its own."""
    os.setsid()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    mpfuture = sys.modules.get("hivemind.utils.mpfuture")
    if mpfuture is not None:
        # hivemind's MPFuture locks are process-shared semaphores made when this forker imported it:
        # without fresh ones, a sibling SIGKILLed while holding one would block every other child forever.
        mpfuture.MPFuture.reset_backend()
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [request["module"], *request["args"]]
    for name in (request["module"], request["module"] + ".__main__"):
        sys.modules.pop(name, None)  # it runs afresh as __main__; its imports stay preloaded
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    _exit_without_teardown(code)


def _exit_status(code) -> int:
    """What the interpreter would exit with for `SystemExit(code)` (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _exit_without_teardown(code: int) -> None:
    """Runs the atexit handlers and flushes, then exits without the interpreter's final garbage
    collection: in a forked child that walks (and so copies) the whole preloaded heap of torch and
    hivemind, more than a second per process on a small machine."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_zygote_pid = os.getpid()

if __name__ == "__main__":
    fd = int(sys.argv[1])
    _preload(sys.argv[2:] or list(PRELOAD))
    gc.freeze()  # the preloaded objects are shared with every child: its collections skip them, copying no page
    control_socket = socket.socket(fileno=fd)
    child_request = serve(control_socket)
    if child_request is None:
        os._exit(0)  # nothing to flush; idle native threads of the preloaded libraries must not hold up the exit
    run_child(child_request)
