"""Behaviour tests start real processes (servers, relays, bootstraps) on 127.0.0.1: all are marked slow."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/behaviour/" in str(item.path):
            item.add_marker(pytest.mark.slow)
