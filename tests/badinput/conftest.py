"""One real nbd-serve for the whole bad-input module: it must survive every case.

Surviving means more than serving the next client: after each test the part of the
server's log that test produced must show no traceback, "Fatal error" or ERROR line
(tests/server/crashwatch.py), and the process must still be alive.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server.nbdtest import ServerProcess, running_server


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("badinput")
    config = tmp / "exports.toml"
    config.write_text(
        "port = 0\n"
        '[[exports]]\nname = ""\nbackend = "memory"\nsize = "8M"\n'
        '[[exports]]\nname = "ro"\nbackend = "memory"\nsize = "1M"\nread_only = true\n'
    )
    with running_server(
        tmp, "--config", str(config), "--log-level", "debug", strict_log=True
    ) as srv:
        yield srv


@pytest.fixture(autouse=True)
def crash_free(victim: ServerProcess) -> Iterator[None]:
    """Fail the test whose input made the server log a crash (at teardown; tests that
    check earlier, in good_client_served, leave only the rest to this)."""
    victim.assert_no_crash(strict=True, what="nbd-serve log before this test")
    yield
    assert victim.alive(), f"nbd-serve died:\n{victim.log()[-4000:]}"
    victim.assert_no_crash(strict=True, what="nbd-serve log of this test")
