"""The configuration loader: CLI over env over YAML over defaults, errors that name the key, earlier names."""

from __future__ import annotations

import pytest

from configs.loader import ConfigError, build_parser, load_config
from configs.schema import ServerOptions


def parse(argv, environ=None):
    return load_config(ServerOptions, build_parser(ServerOptions, "serve", "test"), argv, environ or {})


def test_config_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    yaml_file = tmp_path / "server.yaml"
    yaml_file.write_text(
        "cache_tokens: 111\nregion: asia-east\ndtype: bfloat16\n"
        "initial_peers: [/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N]\n"
    )
    base = ["--model", "m", "--blocks", "0:2", "--config", str(yaml_file)]
    options = parse(base)
    assert (options.cache_tokens, options.region, options.dtype) == (111, "asia-east", "bfloat16")
    assert options.session_timeout == 300 and options.nat_port_map is False
    peers = [f"/ip4/127.0.0.{i}/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N" for i in (1, 2)]
    options = parse(
        base, {"SWARM_CACHE_TOKENS": "222", "SWARM_REGION": "oceania", "SWARM_INITIAL_PEERS": ",".join(peers)}
    )
    assert (options.cache_tokens, options.region, options.initial_peers) == (222, "oceania", peers)
    options = parse(base + ["--cache-tokens", "333", "--nat-port-map"], {"SWARM_CACHE_TOKENS": "222"})
    assert options.cache_tokens == 333 and options.nat_port_map is True
    assert options.block_range == (0, 2)


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--model", "m", "--blocks", "0:2", "--cache-tokens", "-5"], {}, "cache_tokens"),
        (["--model", "m", "--blocks", "2"], {}, "blocks"),
        (["--model", "m", "--blocks", "0:2"], {"SWARM_DTYPE": "int8"}, "dtype"),
        (["--model", "m", "--blocks", "0:2", "--announce-period", "100"], {}, "announce_period"),
        (["--blocks", "0:2"], {}, "model"),
    ],
)
def test_config_errors_name_the_key(argv, environ, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv, environ)


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache_tokenz: 5\n")
    with pytest.raises(ConfigError, match="unknown key.*cache_tokenz"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(tmp_path / "missing.yaml")])


def test_example_yaml_documents_every_option_and_loads():
    from pathlib import Path

    from configs.loader import example_yaml
    from configs.schema import EXAMPLE_SERVER_VALUES

    path = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"
    assert path.read_text() == example_yaml(ServerOptions, "python -m swarm.serve", EXAMPLE_SERVER_VALUES), (
        "configs/example.yaml is out of date: regenerate it with configs.loader.example_yaml"
    )
    options = parse(["--config", str(path)])
    assert options.model == "/path/to/checkpoint" and options.cache_tokens == 16384
    for name in ServerOptions.model_fields:
        assert f"\n{name}:" in path.read_text()


def test_renamed_options_still_work_under_their_earlier_names(tmp_path):
    """The NAT side's options were --relay-*/--no-relay; flags, variables and YAML keys of that name still work."""
    assert parse(["--model", "m", "--relay-hop-limit", "7", "--no-relay"]).bridge_max_circuits == 7
    assert parse(["--model", "m", "--no-relay"]).no_bridge is True
    assert parse(["--model", "m"], {"SWARM_RELAY_MAX_SERVERS": "3"}).bridge_max_servers == 3
    assert (
        parse(["--model", "m"], {"SWARM_RELAY_MAX_SERVERS": "3", "SWARM_BRIDGE_MAX_SERVERS": "5"}).bridge_max_servers
        == 5
    )
    old = tmp_path / "old.yaml"
    old.write_text("model: m\nrelay_max_seconds: 12\n")
    assert parse(["--config", str(old)]).bridge_max_seconds == 12
    both = tmp_path / "both.yaml"
    both.write_text("model: m\nrelay_max_seconds: 12\nbridge_max_seconds: 13\n")
    with pytest.raises(ConfigError, match="both relay_max_seconds and bridge_max_seconds"):
        parse(["--config", str(both)])


def test_the_platforms_worker_variables_are_read_where_the_swarm_names_are_unset():
    platform = {
        "GPU_SERVER_URL": "http://127.0.0.1:8000",
        "GPU_REGION": "asia-east",
        "GPU_ACCEPTANCE_RATE": "0.5",
        "GPU_MAX_CONCURRENT_JOBS": "3",
        "GPU_HEARTBEAT_INTERVAL": "15",
    }
    options = parse(["--model", "m"], platform)
    assert (options.relay, options.region, options.acceptance_rate) == ("http://127.0.0.1:8000", "asia-east", 0.5)
    assert (options.max_concurrent_sessions, options.relay_heartbeat_period) == (3, 15.0)
    assert parse(["--model", "m"], {**platform, "SWARM_REGION": "oceania"}).region == "oceania"  # ours first
    with pytest.raises(ConfigError, match="region"):
        parse(["--model", "m"], {"GPU_REGION": "mars"})
