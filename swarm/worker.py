"""`python -m swarm.worker`: an operator's everyday commands for the machine they lend.

configure   write the server's YAML config (from flags, or asking when standard input is a terminal)
set         change one key of it, checked against the schema
start       run the server from it (`python -m swarm.serve --config FILE`)
status      ask the running server, on its local port, how it is doing

None of them imports torch or hivemind, so each answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from blocks.errors import BlocksError
from configs.loader import ConfigError, build_parser, is_list_option, read_yaml, validate
from configs.paths import worker_config
from configs.schema import ServerOptions
from swarm.preflight import check_model_and_blocks
from swarm.status import ServerStatus, StatusFile

PROG = "python -m swarm.worker"
# Asked for by `configure` on a terminal, in this order, when no flag gave them.
ASKED = ("model", "blocks", "initial_peers", "region", "public_name", "relay")

EPILOG = f"""\
commands:
  configure   write the config file (flags as `python -m swarm.serve`; asks on a terminal)
  set         change one key:  {PROG} set max_length 4096
  start       run the server from the config (extra flags override it for this run)
  status      the running server's blocks, sessions, load, relay link, reachability and recent problems

The config file is --config FILE, else $SWARM_WORKER_CONFIG, else ~/.config/swarm/worker.yaml
($XDG_CONFIG_HOME is honoured). `{PROG} COMMAND --help` explains each command.

example:
  {PROG} configure --model ./SmolLM2-135M --num-blocks 8 \\
      --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap... --region asia-east
  {PROG} start &
  {PROG} status"""


class WorkerError(Exception):
    """A mistake the operator can fix; the message says how."""


def status_path(config: Path) -> Path:
    """Where a server started by `start` says how to reach it: beside its config."""
    return config.with_name(config.stem + ".status.json")


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="the worker's config file [default: %(default)s]")


def _config(path: Optional[str]) -> Path:
    return Path(path).expanduser() if path else worker_config()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WorkerError(f"no config at {path}: write one with `{PROG} configure`")
    try:
        return read_yaml(path, ServerOptions)
    except ConfigError as e:
        raise WorkerError(str(e)) from None


def _check(values: dict[str, Any]) -> ServerOptions:
    try:
        options = validate(ServerOptions, values)
        check_model_and_blocks(options)
    except (ConfigError, BlocksError, ValueError) as e:
        raise WorkerError(str(e)) from None
    return options


def _write(path: Path, values: dict[str, Any], options: ServerOptions) -> None:
    """Writes the keys that are set, as the schema read them (a number, not its text), owner-only (a
    config may hold a join token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Swarm worker config, written by `{PROG}`. Every key is an option of `python -m swarm.serve`\n"
        f"# (see its --help); change one with `{PROG} set KEY VALUE`.\n"
    )
    typed = options.model_dump(mode="json")
    body = yaml.safe_dump({k: typed[k] for k in ServerOptions.model_fields if k in values}, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header + body)
    tmp.replace(path)


def _running(path: Path) -> Optional[StatusFile]:
    """The status file of a server started from this config, if its process is alive."""
    try:
        found = StatusFile.read(status_path(path))
    except (OSError, ValueError):
        return None
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return found


# ---- configure -------------------------------------------------------------------------------


def _ask(values: dict[str, Any]) -> None:
    """Asks for the main keys on the terminal; Enter keeps what is shown, '-' clears it."""
    print("Configure this worker (Enter keeps the value in brackets, '-' clears it).", flush=True)
    for name in ASKED:
        field = ServerOptions.model_fields[name]
        is_list = is_list_option(ServerOptions, name)
        while True:
            shown = values.get(name, "" if field.is_required() else field.get_default(call_default_factory=True))
            shown = " ".join(shown) if isinstance(shown, list) else ("" if shown is None else shown)
            try:
                answer = input(f"{name} ({field.description}) [{shown}]: ").strip()
            except EOFError:
                raise WorkerError("configure: standard input closed before the answers were given") from None
            trial = dict(values)
            if answer == "-":
                trial.pop(name, None)
            elif answer:
                trial[name] = answer.replace(",", " ").split() if is_list else answer
            problem = _problem_with(trial, name)
            if problem is None:
                values.clear()
                values.update(trial)
                break
            print(f"  {problem}", flush=True)


def _problem_with(values: dict[str, Any], name: str) -> Optional[str]:
    """What is wrong with key `name` in `values` (other keys may still be missing), or None."""
    try:
        validate(ServerOptions, values)
    except ConfigError as e:
        mine = [part for part in str(e).split(": ", 1)[1].split("; ") if part.startswith(name + ":")]
        if mine:
            return "; ".join(mine)
        if name == "model" and "model:" in str(e):
            return "a model is required"
    if name in ("model", "blocks", "num_blocks") and "model" in values:
        try:
            check_model_and_blocks(ServerOptions.model_construct(**values))
        except (BlocksError, ValueError, OSError) as e:
            return str(e)
    return None


def configure(argv: list[str]) -> int:
    parser = build_parser(
        ServerOptions,
        f"{PROG} configure",
        "Write the worker's config file. Flags are those of `python -m swarm.serve`; keys the file already "
        "has are kept unless a flag changes them. On a terminal it asks for the main keys "
        f"({', '.join(ASKED)}).",
        config_help=f"the config file to write [default: {worker_config()}]",
    )
    parser.add_argument(
        "--no-input", action="store_true", help="never ask, even on a terminal (flags and the existing file only)"
    )
    given = vars(parser.parse_args(argv))
    path = _config(given.pop("config", None))
    no_input = given.pop("no_input")
    interactive = sys.stdin.isatty() and not no_input
    values = _read(path) if path.is_file() else {}
    values.update(given)
    if interactive:
        _ask(values)
    elif "model" not in values:
        raise WorkerError("configure: --model is required (there is no terminal to ask on)")
    _write(path, values, _check(values))
    where = "" if path == worker_config() else f" --config {path}"
    print(f"wrote {path}; start the server with `{PROG} start{where}`")
    return 0


# ---- set -------------------------------------------------------------------------------------


def _key(raw: str) -> str:
    name = raw.removeprefix("--").replace("-", "_").lower()
    name = getattr(ServerOptions, "RENAMED", {}).get(name, name)
    if name not in ServerOptions.model_fields:
        close = difflib.get_close_matches(name, ServerOptions.model_fields, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise WorkerError(f"set: unknown key {raw!r}{hint}; `{PROG} set --help` lists the keys")
    return name


def set_key(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} set",
        description="Change one key of the worker's config file, checked against the server's options.",
        epilog="keys: " + ", ".join(ServerOptions.model_fields) + "\n\nA list (initial_peers, announce_maddrs) "
        "takes several values. The running server keeps its settings until it is started again.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_flag(parser)
    parser.add_argument("key", help="an option of `python -m swarm.serve`, as max_length or max-length")
    parser.add_argument("value", nargs="+", help="its new value")
    args = parser.parse_args(argv)
    path = _config(args.config)
    name = _key(args.key)
    is_list = is_list_option(ServerOptions, name)
    if not is_list and len(args.value) > 1:
        raise WorkerError(f"set: {name} takes one value, got {len(args.value)}")
    values = _read(path)
    old = repr(values[name]) if name in values else "(default)"
    values[name] = [v for item in args.value for v in item.split(",") if v] if is_list else args.value[0]
    options = _check(values)
    _write(path, values, options)
    print(f"{name}: {old} → {options.model_dump(mode='json')[name]!r} in {path}")
    if _running(path) is not None:
        print(f"the running server keeps its settings until restarted (`{PROG} start`)")
    return 0


# ---- start -----------------------------------------------------------------------------------


def start(argv: list[str]) -> int:
    parser = build_parser(
        ServerOptions,
        f"{PROG} start",
        "Run the server from the worker's config file: this process becomes `python -m swarm.serve --config "
        "FILE`, and stops on SIGINT/SIGTERM as it does. Any flag below overrides the file for this run only.",
        config_help=f"the config file to start from [default: {worker_config()}]",
    )
    given = vars(parser.parse_args(argv))
    path = _config(given.pop("config", None))
    _check({**_read(path), **given})
    running = _running(path)
    if running is not None:
        raise WorkerError(f"start: a server from {path} is already running (pid {running.pid})")
    command = [sys.executable, "-m", "swarm.serve", "--config", str(path), "--status-file", str(status_path(path))]
    sys.stdout.flush()
    os.execv(sys.executable, command + argv)  # its own --config, if given, is the same file again
    return 0  # not reached


# ---- status ----------------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def describe(status: ServerStatus, now: float) -> str:
    """The status as an operator reads it."""
    s = status
    lines = [
        f"server     {s.state} · model {s.model} · blocks {s.start_block}:{s.end_block} · "
        f"version {s.version} · up {_ago(s.uptime_seconds)}" + (f" · region {s.region}" if s.region else ""),
        f"peer       {s.peer_id}",
        *(f"           {address}" for address in s.addresses),
        f"sessions   {s.sessions.open} open"
        + (f" of at most {s.sessions.max_concurrent}" if s.sessions.max_concurrent else "")
        + f" · at most {s.sessions.max_length} tokens each",
        f"cache      {s.cache.tokens_free} of {s.cache.tokens_total} tokens free"
        + (f" · {s.cache.prefix_tokens} hold cached prompts" if s.cache.prefix_tokens else ""),
        "load       "
        + (f"{s.load.throughput_tokens_per_s:.1f} tokens/s announced · " if s.load.throughput_tokens_per_s else "")
        + f"accepts {s.load.acceptance_rate:.0%} of new sessions · {s.load.requests_waiting} steps waiting"
        + (f" · median step {s.load.median_step_ms:.1f} ms" if s.load.median_step_ms is not None else "")
        + f" · {s.load.prompt_tokens} prompt and {s.load.generation_tokens} generated tokens so far",
    ]
    if s.relay is None:
        lines.append("relay      none (not configured)")
    else:
        link = f"worker {s.relay.worker_id}" if s.relay.worker_id is not None else "not registered yet"
        beat = (
            f"last heartbeat {_ago(s.relay.last_heartbeat_seconds_ago)} ago"
            if s.relay.last_heartbeat_seconds_ago is not None
            else "no heartbeat acknowledged yet"
        )
        lines.append(f"relay      {s.relay.url} · {link} · {beat}")
        if s.relay.last_error:
            lines.append(f"           last error: {s.relay.last_error}")
    r = s.reachability
    if r.reachable:
        lines.append("reachable  yes" + (" · a bridge for unreachable servers" if r.bridge else ""))
    else:
        via = ", ".join(r.attached_bridges) or "no bridge yet"
        lines.append(f"reachable  no (behind NAT) · reached through {via}")
    if not s.recent_problems:
        lines.append("problems   none logged")
    else:
        lines.append(f"problems   the last {len(s.recent_problems)} warnings and errors:")
        for p in s.recent_problems:
            lines.append(f"           {_ago(max(0.0, now - p.time))} ago {p.level} {p.logger}: {p.message}")
    return "\n".join(lines)


def status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} status",
        description="Show the running server's state, read from its own local endpoint (GET /status on "
        "its metrics port): blocks, sessions, load, relay link, reachability and recent problems.",
        epilog="Exit status: 0 when it answered, 1 when no server is running from the config.",
    )
    _config_flag(parser)
    parser.add_argument("--url", help="ask this status URL instead (e.g. http://127.0.0.1:9100/status)")
    parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        path = _config(args.config)
        running = _running(path)
        if running is None:
            print(f"no server is running from {path}; start one with `{PROG} start`", file=sys.stderr)
            return 1
        url = running.url
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = ServerStatus.model_validate(json.loads(reply.read(1 << 20)))
    except (urllib.error.URLError, OSError) as e:
        print(f"the server did not answer at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{url} did not answer with a server status: {e}", file=sys.stderr)
        return 1
    print(answer.model_dump_json(indent=2) if args.json else describe(answer, time.time()))
    return 0


COMMANDS = {"configure": configure, "set": set_key, "start": start, "status": status}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Configure, start and watch the Swarm server on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do (see below)")
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, or a usage error naming the commands
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except WorkerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
