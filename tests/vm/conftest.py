"""The VM tier's kernels boot in the background as soon as the session knows it will run
them (tests/vm/test_vm_tier.py), and are ended with the session whatever happens."""

from __future__ import annotations

import pytest
import test_vm_tier
import vmrun


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.path.name == "test_vm_tier.py" for item in session.items):
        test_vm_tier.start_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    vmrun.background.shutdown()
