"""A QEMU guest from vm/ that acts as a lab machine: sshd as PID 1's only job.

The project's initramfs runs ``swapnbd.init=CMD -- ARGS`` instead of guest_init.py, so the
guest's PID 1 here is a shell that mounts /dev/pts and /run, installs the test's public key
for root, brings up eth0 (10.0.2.15/24 via 10.0.2.2, QEMU user networking) and execs
``sshd -D``. QEMU forwards a free port on 127.0.0.1 to the guest's port 22, and the guest
reaches this machine's loopback (the NBD server) as 10.0.2.2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import servers
from vm.image import image
from vm.run import qemu

READY = "SWAPNBD-SSHD-READY"


@dataclass(frozen=True, slots=True)
class SshGuest:
    """A booted guest and how to reach it."""

    port: int
    key: Path
    known_hosts: Path
    console: Path
    proc: subprocess.Popen[bytes]

    def ssh_argv(self, command: str) -> list[str]:
        return [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            str(self.key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "BatchMode=yes",
            "root@127.0.0.1",
            command,
        ]

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ssh_argv(command), capture_output=True, text=True, timeout=timeout, check=False
        )


def make_key(directory: Path) -> Path:
    """A fresh ed25519 key pair without a passphrase; returns the private key's path."""
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "swapnbd-test", "-f", str(key)],
        check=True,
    )
    return key


def init_script(public_key: str) -> str:
    """PID 1 of the guest: the minimum sshd needs, then sshd in the foreground."""
    if '"' in public_key or "\n" in public_key.strip():
        raise ValueError("the public key must be one line without double quotes")
    steps = [
        "mkdir -p /dev/pts /run",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs -o mode=0755 run /run",
        "mkdir -p /run/sshd /root/.ssh",
        f"echo {public_key.strip()} > /root/.ssh/authorized_keys",
        "chmod 700 /root/.ssh",
        "chmod 600 /root/.ssh/authorized_keys",
        "ip link set lo up",
        "ip link set eth0 up",
        "ip addr add 10.0.2.15/24 dev eth0",
        "ip route add default via 10.0.2.2",
        f"echo {READY}",
        "exec /usr/sbin/sshd -D -e",
    ]
    return "; ".join(steps)


@contextlib.contextmanager
def ssh_guest(tmp: Path, memory_mib: int = 128, cpus: int = 2) -> Iterator[SshGuest]:
    """Boot the 6.1 guest with sshd on a forwarded port; yield once SSH answers."""
    for tool, package in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            pytest.fail(f"{tool} is not installed: apt-get install {package}")
    cache = image.default_cache_dir()
    img = image.build_guest("6.1", "cloud", cache, lambda line: print(line, flush=True))
    choice = qemu.resolve_accel("auto", img.kernel, cache)
    key = make_key(tmp)
    port = servers.free_port()
    init = init_script(key.with_suffix(".pub").read_text())
    cmdline = " ".join(
        [*qemu.BASE_CMDLINE, *img.cmdline_extra, f'swapnbd.init=/bin/sh -- -c "{init}"']
    )
    cfg = qemu.QemuConfig(
        kernel=img.kernel,
        initrd=img.initrd,
        rootfs=img.rootfs,
        memory_mib=memory_mib,
        cpus=cpus,
        accel=choice.accel,
        cpu=choice.cpu,
        cmdline=cmdline,
        console_path=tmp / "console.log",
        events_path=tmp / "events.jsonl",
        samples_path=tmp / "vmstat.jsonl",
    )
    argv = qemu.build_argv(cfg)
    net = argv.index("user,id=n0")
    argv[net] = f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"
    with open(tmp / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    guest = SshGuest(port, key, tmp / "known_hosts", tmp / "console.log", proc)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the guest exited ({proc.returncode}) before sshd answered; console:\n"
                    + guest.console.read_text(errors="replace")[-3000:]
                )
            if (
                READY in guest.console.read_text(errors="replace")
                if guest.console.exists()
                else False
            ):
                done = guest.ssh("true", timeout=60)
                if done.returncode == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    "sshd in the guest did not answer within 600 s; console:\n"
                    + guest.console.read_text(errors="replace")[-3000:]
                )
            time.sleep(3)
        yield guest
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
