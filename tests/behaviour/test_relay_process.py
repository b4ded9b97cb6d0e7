"""The relay process on its own: configuration, the generated admin token, storage in SQLite and
PostgreSQL surviving restarts, clear errors for a database it cannot open."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dht.ports import free_port
from tests.helpers.relay_process import RelayProcess, http, signed_registration

pytestmark = pytest.mark.slow


def test_help_names_every_option_and_its_environment_variable():
    run = subprocess.run([sys.executable, "-m", "relay", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for flag in (
        "--mgmt-port",
        "--obs-port",
        "--api-port",
        "--db",
        "--admin-token",
        "--api-keys",
        "--join-token",
        "--open-registration",
        "--max-queued-jobs",
        "--models",
        "--initial-peers",
    ):
        assert flag in run.stdout
    assert "SWARM_RELAY_ADMIN_TOKEN" in run.stdout and "default: 1026" in run.stdout


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "--db",
            f"sqlite:///{blocker}/relay.db",
            "--mgmt-port",
            "0",
            "--obs-port",
            "0",
            "--api-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 2
    assert "cannot open the relay database" in run.stderr and "Traceback" not in run.stderr


def registered_worker_survives_restart(relay: RelayProcess, admin: str, join: str) -> None:
    headers = {"Authorization": f"Bearer {admin}"}
    url = f"{relay.api}/api/v1/workers/register"
    assert http("POST", url, signed_registration("w0", relay.api))[0] == 401  # registration is closed by default
    status, creds, _ = http(
        "POST", url, signed_registration("w1", relay.api, labels={"gpu": "none"}), {"X-Join-Token": join}
    )
    assert status == 201
    assert (
        http("PUT", f"{relay.api}/api/v1/workers/{creds['worker_id']}/config", {"acceptance_rate": 0.5}, headers)[0]
        == 200
    )
    assert relay.stop() == 0
    relay.start()
    status, body, _ = http("GET", f"{relay.api}/v1/workers", headers=headers)
    assert status == 200 and body["pagination"]["total"] == 1
    assert body["items"][0]["labels"] == {"worker-name": "w1", "gpu": "none"}
    config = http("GET", f"{relay.api}/api/v1/workers/{creds['worker_id']}/config", headers=headers)[1]
    assert (config["config_version"], config["config"]["acceptance_rate"]) == (2, 0.5)


def test_environment_configures_the_relay_and_a_generated_admin_token_is_kept(tmp_path):
    db = tmp_path / "relay.db"
    env_args = ["--db", f"sqlite:///{db}"]
    relay = RelayProcess(tmp_path, env_args, api_port=free_port())
    os.environ["SWARM_RELAY_API_KEYS"] = "env-key"
    try:
        relay.start()
        printed = [line for line in relay.child.stdout if "generated admin token" in line]
        joins = [line for line in relay.child.stdout if "generated join token" in line]
        assert len(printed) == 1 and len(joins) == 1
        admin, join = printed[0].rsplit(" ", 1)[1], joins[0].rsplit(" ", 1)[1]
        assert http("GET", f"{relay.api}/v1/models", headers={"X-API-Key": "env-key"})[0] == 200
        assert http("GET", f"{relay.api}/v1/workers", headers={"Authorization": f"Bearer {admin}"})[0] == 200
        registered_worker_survives_restart(relay, admin, join)
        assert not [line for line in relay.child.stdout if "generated" in line]  # both kept, not made anew
        stored = db.read_bytes() + (tmp_path / "relay.db.key").read_bytes()
        assert admin.encode() not in stored and join.encode() not in stored  # only their hashes are kept
    finally:
        os.environ.pop("SWARM_RELAY_API_KEYS", None)
        relay.stop()
    assert (tmp_path / "relay.db.key").stat().st_mode & 0o777 == 0o600
    log = "".join(p.read_text() for p in tmp_path.glob("relay-*.log"))
    assert admin not in log and join not in log


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (run as `nobody` when the tests run as root)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql when it can)")
    root = Path(tempfile.mkdtemp(prefix="swarm-pg-"))  # not under pytest's 0700 tmp: `nobody` must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "nobody", "nogroup")
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    port = free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "swarm", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root}",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://swarm@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_storage_works_the_same(postgres, tmp_path):
    relay = RelayProcess(
        tmp_path,
        ["--db", postgres, "--admin-token", "pg-admin", "--join-token", "pg-join", "--key-file", str(tmp_path / "k")],
        api_port=free_port(),
    )
    try:
        relay.start()
        assert any("database postgresql://swarm@127.0.0.1" in line for line in relay.child.stdout)
        registered_worker_survives_restart(relay, "pg-admin", "pg-join")
    finally:
        relay.stop()
