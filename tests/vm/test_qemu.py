"""vm.run.qemu: the QEMU argv, the kernel command line and the accelerator choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from vm.run import qemu


def make_config(
    tmp_path: Path, accel: qemu.Accel = "tcg", cpu: str | None = None
) -> qemu.QemuConfig:
    return qemu.QemuConfig(
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        rootfs=tmp_path / "root,fs.ext4",
        memory_mib=128,
        cpus=2,
        accel=accel,
        cmdline=qemu.kernel_cmdline({"cfg": "abc"}),
        console_path=tmp_path / "console.log",
        events_path=tmp_path / "events.jsonl",
        samples_path=tmp_path / "vmstat.jsonl",
        cpu=cpu,
    )


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_argv_boots_kernel_with_snapshot_root_and_user_networking(tmp_path: Path) -> None:
    argv = qemu.build_argv(make_config(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-cpu") == []
    assert option_values(argv, "-m") == ["128M"]
    assert option_values(argv, "-smp") == ["2"]
    assert option_values(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert option_values(argv, "-initrd") == [str(tmp_path / "initrd.img")]
    # the comma in the path is doubled so QEMU's option parser keeps it
    assert option_values(argv, "-drive") == [
        f"file={tmp_path}/root,,fs.ext4,if=virtio,format=raw,snapshot=on"
    ]
    assert option_values(argv, "-netdev") == ["user,id=n0"]
    assert "-no-reboot" in argv
    assert "hostfwd" not in " ".join(argv)
    assert "guestfwd" not in " ".join(argv)


def test_argv_sends_ports_and_console_to_files(tmp_path: Path) -> None:
    argv = qemu.build_argv(make_config(tmp_path))
    chardevs = option_values(argv, "-chardev")
    assert f"file,id=ev,path={tmp_path}/events.jsonl" in chardevs
    assert f"file,id=vs,path={tmp_path}/vmstat.jsonl" in chardevs
    assert f"file,id=con,path={tmp_path}/console.log" in chardevs
    devices = option_values(argv, "-device")
    assert "virtserialport,chardev=ev,name=swapnbd.events" in devices
    assert "virtserialport,chardev=vs,name=swapnbd.samples" in devices
    assert option_values(argv, "-serial") == ["chardev:con"]


def test_kvm_argv_uses_host_cpu(tmp_path: Path) -> None:
    argv = qemu.build_argv(make_config(tmp_path, accel="kvm"))
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_kernel_cmdline_has_base_then_swapnbd_params() -> None:
    line = qemu.kernel_cmdline({"cfg": "eyJ2IjoxfQ", "init": "/bin/sh"})
    words = line.split()
    assert words[:4] == [
        "console=ttyS0",
        "panic=-1",
        "transparent_hugepage=never",
        "zswap.enabled=0",
    ]
    assert words[4:] == ["swapnbd.cfg=eyJ2IjoxfQ", "swapnbd.init=/bin/sh"]


@pytest.mark.parametrize("value", ["a b", "x\ty", ""])
def test_kernel_cmdline_rejects_whitespace(value: str) -> None:
    params = {"cfg": value} if value else {"": "x"}
    with pytest.raises(ValueError, match="must not contain spaces"):
        qemu.kernel_cmdline(params)


def test_kernel_cmdline_rejects_overlong_line() -> None:
    with pytest.raises(ValueError, match="2047"):
        qemu.kernel_cmdline({"cfg": "x" * 2100})


def test_too_small_guest_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    small = qemu.QemuConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "memory_mib": 32})
    with pytest.raises(ValueError, match="at least 64M"):
        qemu.build_argv(small)


def test_tcg_request_is_taken_as_is(tmp_path: Path) -> None:
    choice = qemu.resolve_accel("tcg", tmp_path / "none", tmp_path)
    assert (choice.accel, choice.cached) == ("tcg", False)


def test_bad_accel_request_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    monkeypatch.setattr(qemu, "kvm_device_usable", lambda: True)
    with pytest.raises(qemu.QemuError, match="auto, tcg or kvm"):
        qemu.resolve_accel("hvf", kernel, tmp_path)  # type: ignore[arg-type]


def test_kvm_request_without_dev_kvm_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "kvm_device_usable", lambda: False)
    with pytest.raises(qemu.QemuError, match="--accel tcg"):
        qemu.resolve_accel("kvm", tmp_path / "vmlinuz", tmp_path)


def test_auto_probes_once_and_caches_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    monkeypatch.setattr(qemu, "kvm_device_usable", lambda: True)
    calls: list[Path] = []

    def hanging_probe(k: Path, _qemu: str, cpu: str) -> tuple[bool, str]:
        calls.append(k)
        return False, f"hung in SeaBIOS with {cpu}"

    first = qemu.resolve_accel("auto", kernel, tmp_path, probe=hanging_probe)
    second = qemu.resolve_accel("auto", kernel, tmp_path, probe=hanging_probe)
    assert (first.accel, first.cached, first.cpu) == ("tcg", False, None)
    assert first.reason == "hung in SeaBIOS with host; hung in SeaBIOS with qemu64"
    assert (second.accel, second.cached) == ("tcg", True)
    assert "hung in SeaBIOS with qemu64" in second.reason
    assert calls == [kernel, kernel]  # both CPU models tried once, then the cache answers
    # a different guest kernel is probed again
    other = tmp_path / "vmlinuz-2"
    other.write_bytes(b"another kernel")
    models: list[str] = []

    def second_model_works(_k: Path, _q: str, cpu: str) -> tuple[bool, str]:
        models.append(cpu)
        return cpu == "qemu64", cpu

    working = qemu.resolve_accel("auto", other, tmp_path, probe=second_model_works)
    assert (working.accel, working.cached, working.cpu) == ("kvm", False, "qemu64")
    again = qemu.resolve_accel("auto", other, tmp_path, probe=second_model_works)
    assert (again.accel, again.cached, again.cpu) == ("kvm", True, "qemu64")
    assert models == ["host", "qemu64"]
    argv = qemu.build_argv(make_config(tmp_path, accel="kvm", cpu=again.cpu))
    assert option_values(argv, "-cpu") == ["qemu64"]


def test_probe_without_a_bootable_kernel_reports_failure(tmp_path: Path) -> None:
    # With or without a usable /dev/kvm, a kernel that is not one never reaches the banner.
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\0" * 4096)
    works, reason = qemu.probe_kvm(bogus, timeout_s=20)
    assert works is False
    assert reason
