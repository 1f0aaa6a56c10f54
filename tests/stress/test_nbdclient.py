"""One nbd-client command line for the guest and the lab helper (stress/nbdclient.py)."""

from __future__ import annotations

from stress.nbdclient import nbd_client_argv


def test_the_defaults_swap_without_a_timeout() -> None:
    assert nbd_client_argv("10.0.2.2", 40123, "/dev/nbd0", "n1") == [
        "nbd-client", "10.0.2.2", "40123", "/dev/nbd0", "-N", "n1", "-b", "4096", "-swap",
    ]  # fmt: skip


def test_every_setting() -> None:
    argv = nbd_client_argv(
        "h", "1", "/dev/nbd1", "e", block_size=512, timeout=30, connections=4, resident=True
    )
    assert argv == [
        "nbd-client", "h", "1", "/dev/nbd1", "-N", "e", "-b", "512",
        "-t", "30", "-C", "4", "-swap", "-L",
    ]  # fmt: skip
    bare = nbd_client_argv("h", 1, "/dev/nbd0", "e", swap=False, connections=1, timeout=0)
    assert "-swap" not in bare and "-t" not in bare and "-C" not in bare
