"""site.yml, experiment.yml and teardown.yml over real SSH on a QEMU guest acting as a lab client.

This machine is the controller and the NBD server (nbd_server role, direct mode: no
systemd here); the guest is the swap client (nbd_swap_client role, direct mode: its PID 1
is a shell running sshd) and reaches nbd-serve as 10.0.2.2:PORT. The run is tiny (128 MiB
guest, 4 workers, 192 MiB, 1 loop) so it finishes in minutes under TCG.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from peers import servers

from .guests import SshGuest, ssh_guest
from .support import ansible_env, run, tool

pytestmark = pytest.mark.vm

LAB_EXTRA = "pip install 'swapnbd[lab]' (./dev setup does)"


def playbook(name: str, env: dict[str, str], *extra: str, timeout: float = 1800) -> str:
    done = run(
        [tool("ansible-playbook", LAB_EXTRA), "-i", "inventories/local/hosts.yml", name, *extra],
        env=env,
        timeout=timeout,
    )
    out = done.stdout + done.stderr
    print(out)
    assert done.returncode == 0, f"{name} failed (exit {done.returncode}):\n{out[-6000:]}"
    return out


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed, ...}}."""
    hosts: dict[str, dict[str, int]] = {}
    for line in out.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"^(\S+)\s*:\s*(.*)$", line.strip())
        if match and "=" in match.group(2):
            hosts[match.group(1)] = {
                k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))
            }
    return hosts


def read_guest(guest: SshGuest, command: str) -> str:
    done = guest.ssh(command)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout.strip()


def test_site_experiment_teardown_on_a_guest_over_ssh(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    try:
        check_lab_client(guest_dir, state)
    finally:
        # nbd-serve runs detached (start-stop-daemon): stop it even when the test failed early.
        pidfile = state / "server" / "nbd-serve.pid"
        if pidfile.exists():
            subprocess.run(
                ["start-stop-daemon", "--stop", "--oknodo", "--pidfile", str(pidfile),
                 "--retry", "TERM/15/KILL/5"],
                capture_output=True, check=False,
            )  # fmt: skip


def check_lab_client(guest_dir: Path, state: Path) -> None:
    with ssh_guest(guest_dir) as guest:
        env = ansible_env(
            SWAPNBD_LAB_STATE=str(state),
            SWAPNBD_LAB_SSH_KEY=str(guest.key),
            SWAPNBD_LAB_KNOWN_HOSTS=str(guest.known_hosts),
            SWAPNBD_LAB_CLIENT_PORT=str(guest.port),
            SWAPNBD_LAB_NBD_PORT=str(servers.free_port()),
            SWAPNBD_LAB_EXPORT="swap-" + secrets.token_hex(8),
        )
        limit = ["--limit", "controller,labclient"]
        min_free_before = read_guest(guest, "cat /proc/sys/vm/min_free_kbytes")
        assert min_free_before != "1448"  # so that pinning it is a change, and restoring too

        first = recap(playbook("site.yml", env, *limit))
        assert first["labclient"]["failed"] == 0 and first["labclient"]["changed"] > 0
        assert first["controller"]["failed"] == 0 and first["controller"]["changed"] > 0
        assert "/dev/nbd0" in read_guest(guest, "cat /proc/swaps")
        assert read_guest(guest, "cat /proc/sys/vm/min_free_kbytes") == "1448"

        playbook("experiment.yml", env, "-e", "swapstress_run_id=t1", timeout=3600)
        results = state / "results" / "labclient" / "t1"
        for name in ("run.json", "vmstat.jsonl", "events.jsonl", "console.log"):
            assert (results / name).is_file(), f"{name} was not fetched into {results}"
        run_json = json.loads((results / "run.json").read_text())
        assert run_json["outcome"] == "completed", run_json["outcome_reason"]
        assert run_json["swapstress"]["corrupt_pages"] == 0
        assert run_json["vmstat_delta"]["pswpout"] > 0
        samples = [json.loads(line) for line in (results / "vmstat.jsonl").read_text().splitlines()]
        assert len(samples) >= 2 and "vmstat" in samples[-1]
        assert run_json["guest"]["settings"]["vm.min_free_kbytes"] == "1448"

        # Idempotence, after real use: nothing to change on either host.
        second = recap(playbook("site.yml", env, *limit))
        assert second["labclient"]["changed"] == 0, second
        assert second["controller"]["changed"] == 0, second

        playbook("teardown.yml", env, *limit, timeout=3600)
        assert "nbd0" not in read_guest(guest, "cat /proc/swaps")
        assert guest.ssh("nbd-client -c /dev/nbd0").returncode == 1
        assert read_guest(guest, "cat /sys/block/nbd0/size") == "0"
        assert read_guest(guest, "cat /proc/sys/vm/min_free_kbytes") == min_free_before
        assert not (state / "server" / "nbd-serve.pid").exists()
        assert not (state / "server" / "nbd-serve.toml").exists()
        log = (state / "server" / "nbd-serve.log").read_text()
        assert "Traceback" not in log, log
