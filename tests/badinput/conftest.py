"""One real nbd-serve for the whole bad-input module: it must survive every case."""

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
    with running_server(tmp, "--config", str(config), "--log-level", "debug") as srv:
        yield srv
