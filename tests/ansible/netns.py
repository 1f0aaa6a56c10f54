"""Lab hosts made of network namespaces: each runs its own sshd on its own address.

The controller gets a namespace too, joined to every host's namespace by a veth pair with a
private /30 on it. All addresses live inside the namespaces, so no traffic touches this
machine's real interfaces. The hosts share this machine's file system (each works in its
own directory), which is what lets the test reuse the checkout's swapnbd.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(slots=True)
class NetnsLab:
    controller: str
    """The controller's namespace (run ansible-playbook in it)."""
    hosts: dict[str, str] = field(default_factory=dict)
    """{inventory name: address} of the hosts' sshd."""
    namespaces: list[str] = field(default_factory=list)
    sshd: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.controller, *argv]


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _wait_listening(ns: str, address: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "ss", "-Hltn", f"src {address}:{port}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.stdout.strip():
            return
        time.sleep(0.2)
    pytest.fail(f"sshd in {ns} did not listen on {address}:{port}")


@contextlib.contextmanager
def netns_lab(tmp: Path, names: list[str], public_key: str) -> Iterator[NetnsLab]:
    """Namespaces for a controller and ``names`` hosts, each host with sshd on port 22."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        pytest.fail("sshd is not installed: apt-get install openssh-server")
    tag = secrets.token_hex(2)
    octet = 64 + secrets.randbelow(128)
    lab = NetnsLab(controller=f"swapnbd-{tag}-ctl")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    (tmp / "authorized_keys").write_text(public_key)
    os.chmod(tmp / "authorized_keys", 0o600)
    try:
        ip("netns", "add", lab.controller)
        lab.namespaces.append(lab.controller)
        ip("-n", lab.controller, "link", "set", "lo", "up")
        for i, name in enumerate(names):
            ns = f"swapnbd-{tag}-{name}"
            ip("netns", "add", ns)
            lab.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ctl_if, host_if = f"snc{tag}{i}", f"snh{tag}{i}"
            ip("link", "add", ctl_if, "netns", lab.controller, "type", "veth", "peer", "name",
               host_if, "netns", ns)  # fmt: skip
            base = 4 * i
            ctl_addr, host_addr = f"10.231.{octet}.{base + 1}", f"10.231.{octet}.{base + 2}"
            ip("-n", lab.controller, "addr", "add", f"{ctl_addr}/30", "dev", ctl_if)
            ip("-n", ns, "addr", "add", f"{host_addr}/30", "dev", host_if)
            ip("-n", lab.controller, "link", "set", ctl_if, "up")
            ip("-n", ns, "link", "set", host_if, "up")
            hostkey = tmp / f"{name}_host_ed25519"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True
            )
            config = tmp / f"{name}_sshd_config"
            config.write_text(
                f"ListenAddress {host_addr}\nPort 22\nHostKey {hostkey}\n"
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                f"StrictModes no\nPidFile {tmp / (name + '_sshd.pid')}\n"
                "Subsystem sftp internal-sftp\n"
            )
            with open(tmp / f"{name}_sshd.log", "wb") as log:
                lab.sshd.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, sshd, "-D", "-e", "-f", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_listening(ns, host_addr, 22)
            lab.hosts[name] = host_addr
        yield lab
    finally:
        for proc in lab.sshd:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        for ns in reversed(lab.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
