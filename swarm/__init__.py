"""Swarm server: hosts a range of transformer blocks and serves them to clients over P2P RPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarm-inference")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
