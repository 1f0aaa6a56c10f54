#!/usr/bin/python3
"""Swap over NBD on a lab client: connect, pin the settings, swapon; and undo all of it.

Why a helper rather than a list of shell steps: the same idempotent sequence runs from the
systemd unit at boot (``up`` / ``down``), from Ansible on hosts without systemd, and from
the teardown, and every run reports in one JSON line whether it changed anything, which
is what makes a second ``site.yml`` report ``changed=0``.

``up``: record the original sysctl/THP/zswap values once (``state_file``), pin the wanted
ones, connect the NBD device with nbd-client unless it is connected, run mkswap unless the
device (or swapfile) already carries a swap signature, swapon unless it is active.
``down``: swapoff, unmount the swapfile's file system, disconnect; ``--restore`` also writes
the recorded original values back and forgets them.

Standard library only: it runs on the client's system python3, with the guest tools'
``stress/nbdclient.py`` deployed beside it (the nbd-client command line, shared with the
QEMU guest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# stress/nbdclient.py is deployed beside this file (roles/nbd_swap_client/tasks/main.yml).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stress import nbdclient

SETTING_PATHS = {
    "transparent_hugepage": "/sys/kernel/mm/transparent_hugepage/enabled",
    "zswap": "/sys/module/zswap/parameters/enabled",
}
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What was looked at but needs no change (reported, never counted as a change).
NOTES: list[str] = []


class SwapError(Exception):
    """A step failed; the message says which and what to check."""


def sh(
    argv: list[str], what: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=PATH_ENV)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, env=env, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise SwapError(f"{what}: {argv[0]} is not installed") from exc
    if check and done.returncode != 0:
        err = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise SwapError(f"{what}: {' '.join(argv)} exited {done.returncode}: {err}")
    return done


def current(path: str) -> str | None:
    """The value in effect: the [selected] word of THP-style files, else the stripped text."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def wanted_settings(cfg: dict[str, Any]) -> dict[str, str]:
    """{path: value} to pin, from the config's sysctl, thp and zswap entries."""
    out: dict[str, str] = {}
    for key, value in (cfg.get("sysctl") or {}).items():
        if value is not None and value != "":
            out["/proc/sys/" + key.replace(".", "/")] = str(value)
    if cfg.get("thp"):
        out[SETTING_PATHS["transparent_hugepage"]] = str(cfg["thp"])
    if cfg.get("zswap") is not None:
        out[SETTING_PATHS["zswap"]] = "Y" if cfg["zswap"] else "N"
    return out


def pin(cfg: dict[str, Any], steps: list[str]) -> None:
    state_file = Path(cfg["state_file"])
    state: dict[str, str] = json.loads(state_file.read_text()) if state_file.exists() else {}
    recorded = False
    for path, value in wanted_settings(cfg).items():
        now = current(path)
        if now is None:
            NOTES.append(f"skipped {path} (not on this kernel)")
            continue
        if path not in state:
            state[path] = now
            recorded = True
        if now != value:
            try:
                Path(path).write_text(value + "\n")
            except OSError as exc:
                raise SwapError(f"cannot set {path} to {value}: {exc}") from exc
            steps.append(f"set {path}={value} (was {now})")
    if recorded:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


def restore(cfg: dict[str, Any], steps: list[str]) -> None:
    state_file = Path(cfg["state_file"])
    if not state_file.exists():
        return
    for path, value in json.loads(state_file.read_text()).items():
        if current(path) not in (None, value):
            Path(path).write_text(value + "\n")
            steps.append(f"restored {path}={value}")
    state_file.unlink()
    steps.append(f"removed {state_file}")


def connected(device: str) -> bool:
    return sh(["nbd-client", "-c", device], "nbd-client -c", check=False).returncode == 0


def nbd_client_argv(cfg: dict[str, Any]) -> list[str]:
    """The helper's config as nbd-client's command line (stress/nbdclient.py)."""
    return nbdclient.nbd_client_argv(
        str(cfg["host"]),
        cfg["port"],
        str(cfg["device"]),
        str(cfg["export"]),
        block_size=int(cfg.get("block_size", 4096)),
        timeout=int(cfg.get("timeout", 0)),
        connections=int(cfg.get("connections", 1)),
        swap=bool(cfg.get("swap_flag", True)),
    )


def swap_target(cfg: dict[str, Any]) -> str:
    if cfg.get("swap_mode", "device") == "file":
        return str(Path(cfg["swapfile_mount"]) / "swapfile")
    return str(cfg["device"])


def active_swaps() -> list[str]:
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    return [line.split()[0] for line in lines if line.split()]


def mounted(path: str) -> bool:
    return os.path.ismount(path)


def signature(path: str) -> str:
    done = sh(["blkid", "-p", "-o", "value", "-s", "TYPE", path], "blkid", check=False)
    return done.stdout.strip()


def up(cfg: dict[str, Any], steps: list[str]) -> None:
    pin(cfg, steps)
    device = cfg["device"]
    name = Path(device).name
    if not Path(device).exists():
        sh(["modprobe", "nbd"], "modprobe nbd", check=False)
        if not Path(device).exists():
            raise SwapError(f"{device} does not exist: load the nbd module (modprobe nbd)")
    if not connected(device):
        sh(nbd_client_argv(cfg), "nbd-client connect", timeout=120)
        steps.append("connected " + " ".join(nbd_client_argv(cfg)))
    size_file = Path(f"/sys/block/{name}/size")
    for _ in range(200):
        if int(size_file.read_text().strip() or 0) > 0:
            break
        time.sleep(0.1)
    else:
        raise SwapError(f"{device} is connected but has size 0")
    target = swap_target(cfg)
    if cfg.get("swap_mode", "device") == "file":
        mount = cfg["swapfile_mount"]
        if not mounted(mount):
            if signature(device) != "ext4":
                sh(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device], "mkfs.ext4")
                steps.append(f"mkfs.ext4 {device}")
            Path(mount).mkdir(parents=True, exist_ok=True)
            sh(["mount", "-t", "ext4", device, mount], "mount")
            steps.append(f"mounted {device} on {mount}")
        if not Path(target).exists():
            size = int(cfg.get("swapfile_bytes") or 0)
            if size <= 0:
                stat = os.statvfs(mount)
                size = stat.f_bavail * stat.f_frsize * 9 // 10
            size -= size % 4096
            sh(["fallocate", "-l", str(size), target], "fallocate")
            os.chmod(target, 0o600)
            steps.append(f"created {target} ({size} bytes)")
    if target not in active_swaps():
        if signature(target) != "swap":
            sh(["mkswap", target], "mkswap")
            steps.append(f"mkswap {target}")
        sh(["swapon", target], "swapon")
        steps.append(f"swapon {target}")


def down(cfg: dict[str, Any], steps: list[str], restore_settings: bool) -> None:
    device = cfg["device"]
    target = swap_target(cfg)
    if target in active_swaps():
        sh(["swapoff", target], "swapoff", timeout=3600)
        steps.append(f"swapoff {target}")
    mount = cfg.get("swapfile_mount")
    if cfg.get("swap_mode", "device") == "file" and mount and mounted(mount):
        sh(["umount", mount], "umount")
        steps.append(f"unmounted {mount}")
    if Path(device).exists() and connected(device):
        sh(["nbd-client", "-d", device], "nbd-client -d")
        for _ in range(100):
            if not connected(device):
                break
            time.sleep(0.1)
        steps.append(f"disconnected {device}")
    if restore_settings:
        restore(cfg, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--config", required=True, type=Path, help="the JSON the role writes")
    parser.add_argument("--restore", action="store_true", help="down: restore recorded settings")
    args = parser.parse_args(argv)
    try:
        cfg = json.loads(args.config.read_text())
    except (OSError, ValueError) as exc:
        print(json.dumps({"failed": True, "msg": f"cannot read {args.config}: {exc}"}))
        return 2
    steps: list[str] = []
    try:
        if args.action == "up":
            up(cfg, steps)
        elif args.action == "down":
            down(cfg, steps, args.restore)
        else:
            status = {
                "connected": Path(cfg["device"]).exists() and connected(cfg["device"]),
                "swap_active": swap_target(cfg) in active_swaps(),
            }
            print(json.dumps({"changed": False, **status}))
            return 0
    except SwapError as exc:
        print(json.dumps({"failed": True, "changed": bool(steps), "steps": steps, "msg": str(exc)}))
        return 1
    print(json.dumps({"changed": bool(steps), "steps": steps, "notes": NOTES}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
