"""Tests of the guest image builder (vm/image/: image.py, kernel.py, initramfs.py, rootfs.py,
progress.py).

Layers: pure functions with tables; the cache, lock and progress machinery on
real files and processes; the real tools (cpio, mke2fs, e2fsck, debugfs,
apt-cache); and, marked ``vm``, the real image booted under QEMU TCG.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vm.image import image, initramfs, kernel, rootfs
from vm.image.progress import CommandError, Progress, format_duration, run_with_progress

REPO = Path(__file__).resolve().parents[2]


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None
    )
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package}")
    return path


# --------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0s"), (3.44, "3.4s"), (-2, "0.0s"), (42, "42s"), (75.2, "1m15s"), (3700, "1h01m40s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_have_step_count_elapsed_percent_and_eta() -> None:
    clock = FakeClock()
    lines: list[str] = []
    job = Progress(3, lines.append, interval=5.0, clock=clock)
    job.skip("kernel", "cached")
    with job.step("rootfs: debootstrap", estimate_s=100.0) as step:
        clock.now += 20
        step.update("10 packages")  # fraction unknown: ETA from the estimate
        clock.now += 1
        step.update("11 packages")  # within the interval: dropped
        clock.now += 9
        step.update("50 packages", 0.25)  # 30 s for 25 % -> 90 s left
    assert lines == [
        "[swapnbd] step 1/3 kernel: cached",
        "[swapnbd] step 2/3 rootfs: debootstrap: started (estimate 1m40s)",
        "[swapnbd] step 2/3 rootfs: debootstrap: 10 packages, elapsed 20s, ETA 1m20s",
        "[swapnbd] step 2/3 rootfs: debootstrap: 50 packages, 25%, elapsed 30s, ETA 1m30s",
        "[swapnbd] step 2/3 rootfs: debootstrap: done in 30s (total 30s)",
    ]
    assert step.duration == 30.0


def test_progress_reports_a_failed_step_and_reraises() -> None:
    lines: list[str] = []
    job = Progress(1, lines.append, clock=FakeClock())
    with pytest.raises(KeyError), job.step("kernel"):
        raise KeyError("boom")
    assert lines[-1] == "[swapnbd] step 1/1 kernel: FAILED after 0.0s"


def test_progress_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        Progress(0)


def test_run_with_progress_logs_output_and_parses_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    job = Progress(1, lines.append, interval=0.0)
    log = tmp_path / "cmd.log"
    with job.step("count") as step:
        run_with_progress(
            ["sh", "-c", "for i in 1 2 3; do echo item $i; done"],
            step,
            log=log,
            on_line=lambda line: (line, None) if line.startswith("item") else None,
        )
    assert "item 3" in log.read_text()
    assert any("count: item 3" in line for line in lines)


def test_run_with_progress_failure_names_status_log_and_tail(tmp_path: Path) -> None:
    job = Progress(1, lambda _line: None)
    log = tmp_path / "cmd.log"
    with pytest.raises(CommandError) as caught, job.step("fail") as step:
        run_with_progress(["sh", "-c", "echo first; echo last words >&2; exit 3"], step, log=log)
    assert caught.value.returncode == 3
    assert "last words" in caught.value.tail
    assert str(log) in str(caught.value)


# --------------------------------------------------------------------------- kernel


DEP = """\
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz \
kernel/drivers/virtio/virtio_ring.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz \
kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz \
kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/block/nbd.ko.xz:
kernel/drivers/some-thing.ko.zst:
"""


def test_parse_modules_dep_and_names() -> None:
    deps = kernel.parse_modules_dep(DEP)
    assert deps["kernel/drivers/net/net_failover.ko.xz"] == ["kernel/net/core/failover.ko.xz"]
    assert deps["kernel/drivers/block/nbd.ko.xz"] == []
    assert kernel.module_name("kernel/drivers/some-thing.ko.zst") == "some_thing"
    assert kernel.module_name("kernel/fs/ext4/ext4.ko") == "ext4"
    with pytest.raises(kernel.KernelError, match="not a kernel module"):
        kernel.module_name("kernel/fs/ext4/ext4.o")
    with pytest.raises(kernel.KernelError, match="line 1 has no ':'"):
        kernel.parse_modules_dep("kernel/a.ko\n")


def test_module_load_order_puts_dependencies_first_and_skips_builtins() -> None:
    deps = kernel.parse_modules_dep(DEP)
    order = kernel.module_load_order(
        deps,
        builtin={"virtio_pci", "ext4"},
        wanted=["virtio_pci", "virtio_blk", "virtio_net", "nbd"],
    )
    names = [kernel.module_name(p) for p in order]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "nbd",
    ]


def test_module_load_order_errors() -> None:
    deps = kernel.parse_modules_dep(DEP)
    with pytest.raises(kernel.KernelError, match=r"'zram' is neither built in nor in modules\.dep"):
        kernel.module_load_order(deps, set(), ["zram"])
    cyclic = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    with pytest.raises(kernel.KernelError, match="cycle"):
        kernel.module_load_order(cyclic, set(), ["a"])
    dangling = {"a.ko": ["gone.ko"]}
    with pytest.raises(kernel.KernelError, match=r"names gone.ko \(needed by a.ko\)"):
        kernel.module_load_order(dangling, set(), ["a"])


def test_parse_modules_builtin() -> None:
    text = "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio_pci.ko\n\n"
    assert kernel.parse_modules_builtin(text) == {"ext4", "virtio_pci"}


def test_metapackage_names_and_bad_input() -> None:
    assert kernel.metapackage("6.1", "cloud") == "linux-image-cloud-amd64"
    assert kernel.metapackage("6.12", "cloud") == "linux-image-6.12-cloud-amd64"
    assert kernel.metapackage("6.12", "generic") == "linux-image-6.12-amd64"
    unknown = r"unknown kernel '5.10': choose one of 6.1, 6.12, 7.2"
    with pytest.raises(kernel.KernelError, match=unknown):
        kernel.metapackage("5.10", "cloud")
    with pytest.raises(kernel.KernelError, match="unknown flavour 'rt'"):
        kernel.metapackage("6.1", "rt")


def test_parse_image_dependency() -> None:
    depends = "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    assert kernel.parse_image_dependency(depends) == (
        "linux-image-6.1.0-56-cloud-amd64",
        "6.1.192-2",
    )
    assert kernel.parse_image_dependency("foo, linux-image-x (>= 1)") == ("linux-image-x", None)
    assert kernel.parse_image_dependency("linux-image-y | foo") == ("linux-image-y", None)
    with pytest.raises(kernel.KernelError, match="no linux-image"):
        kernel.parse_image_dependency("linux-headers-x (= 1)")


@pytest.mark.parametrize(
    ("name", "prefix"), [("6.1", "linux-image-6.1.0-"), ("6.12", "linux-image-6.12.")]
)
def test_resolve_kernel_with_real_apt(name: str, prefix: str) -> None:
    need_tool("apt-cache", "apt")
    pkg = kernel.resolve_kernel(name, "cloud")
    assert pkg.name.startswith(prefix)
    assert pkg.name.endswith("-cloud-amd64")
    assert pkg.version.startswith(name + ".")
    assert pkg.metapackage == kernel.metapackage(name, "cloud")


# --------------------------------------------------------------------------- initramfs


def test_cpio_archive_extracts_with_real_cpio(tmp_path: Path) -> None:
    cpio = need_tool("cpio", "cpio")
    entries = [
        initramfs.CpioEntry("bin", stat.S_IFDIR | 0o755),
        initramfs.CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        initramfs.CpioEntry("bin/link", stat.S_IFLNK | 0o777, b"tool"),
        initramfs.CpioEntry("odd", stat.S_IFREG | 0o644, b"12345"),  # needs padding
        initramfs.CpioEntry("dev", stat.S_IFDIR | 0o755),
        initramfs.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    archive = initramfs.write_cpio(entries)
    assert len(archive) % 4 == 0
    listing = subprocess.run(
        [cpio, "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert [line.split()[-1] for line in listing.splitlines()][:4] == [
        "bin",
        "bin/tool",
        "tool",
        "odd",
    ]
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console or "5, 1" in console
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        [cpio, "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/*"],
        input=archive,
        cwd=out,
        check=True,
    )
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(out / "bin/link") == "tool"
    assert (out / "odd").read_bytes() == b"12345"
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755


def test_cpio_rejects_duplicate_and_absolute_names() -> None:
    with pytest.raises(initramfs.InitramfsError, match="duplicate"):
        initramfs.write_cpio(
            [initramfs.CpioEntry("a", stat.S_IFREG), initramfs.CpioEntry("a", stat.S_IFREG)]
        )
    with pytest.raises(initramfs.InitramfsError, match="'/abs'"):
        initramfs.write_cpio([initramfs.CpioEntry("/abs", stat.S_IFREG)])


def test_build_archive_is_reproducible_and_holds_payload() -> None:
    modules = [("virtio.ko", b"\x7fELF-virtio"), ("nbd.ko", b"\x7fELF-nbd")]
    payload = [("stress/__init__.py", b""), ("guest_init.py", b"print(1)\n")]
    first = initramfs.build_archive(b"BUSYBOX", modules, payload)
    assert first == initramfs.build_archive(b"BUSYBOX", modules, payload)
    raw = gzip.decompress(first)
    for name in (b"lib/modules/nbd.ko", b"payload/stress\0", b"payload/guest_init.py", b"init\0"):
        assert name in raw
    assert b"for m in virtio.ko nbd.ko; do" in raw


def test_init_script_contract() -> None:
    script = initramfs.init_script(["virtio.ko", "virtio_blk.ko"])
    assert script.startswith("#!/bin/busybox sh\n")
    assert "for m in virtio.ko virtio_blk.ko; do" in script
    assert "mount -t ext4 -o rw /dev/vda /newroot" in script
    assert "swapnbd.init=*)" in script
    assert 'exec switch_root /newroot "$@"' in script
    assert 'set -- /usr/bin/python3 /opt/swapnbd/guest_init.py "$@"' in script
    assert 'echo "SWAPNBD-INITRAMFS-ERROR: $*"' in script
    # The script must be valid shell: dash parses it without running it.
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)


def test_decompress_module_formats(tmp_path: Path) -> None:
    import lzma

    elf = b"\x7fELF" + b"\0" * 60
    (tmp_path / "a.ko").write_bytes(elf)
    (tmp_path / "b.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "d.ko.xz").write_bytes(b"not xz")
    (tmp_path / "e.ko").write_bytes(b"text")
    for name in ("a.ko", "b.ko.xz", "c.ko.gz"):
        assert initramfs.decompress_module(tmp_path / name) == elf
    if shutil.which("zstd"):
        subprocess.run(
            ["zstd", "-q", str(tmp_path / "a.ko"), "-o", str(tmp_path / "f.ko.zst")], check=True
        )
        assert initramfs.decompress_module(tmp_path / "f.ko.zst") == elf
    with pytest.raises(initramfs.InitramfsError, match=r"cannot decompress .*d\.ko\.xz"):
        initramfs.decompress_module(tmp_path / "d.ko.xz")
    with pytest.raises(initramfs.InitramfsError, match="not decompress to an ELF"):
        initramfs.decompress_module(tmp_path / "e.ko")


def make_payload(root: Path, token: str) -> Path:
    """A payload tree: the repository's stress/*.py and a guest_init.py that prints ``token``."""
    (root / "stress").mkdir(parents=True)
    (root / "vm" / "image").mkdir(parents=True)
    for src in sorted((REPO / "stress").glob("*.py")):
        shutil.copy2(src, root / "stress" / src.name)
    (root / "vm" / "image" / "guest_init.py").write_text(
        "import os, subprocess\n"
        f"print('{token} pid', os.getpid(), flush=True)\n"
        "subprocess.run(['poweroff', '-f'])\n"
    )
    return root


def test_payload_files_maps_paths_and_reports_what_is_missing(tmp_path: Path) -> None:
    root = make_payload(tmp_path / "p", "TOKEN")
    files = dict(initramfs.payload_files(root))
    assert files["guest_init.py"] == root / "vm" / "image" / "guest_init.py"
    assert files["stress/__init__.py"] == root / "stress" / "__init__.py"
    (root / "vm" / "image" / "guest_init.py").unlink()
    with pytest.raises(
        initramfs.InitramfsError, match=r"guest payload missing: .*vm/image/guest_init\.py"
    ):
        initramfs.payload_files(root)


# --------------------------------------------------------------------------- rootfs


DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_parse_deb822_and_one_line_sources() -> None:
    sources = rootfs.parse_deb822_sources(DEB822)
    assert [s.uris for s in sources] == [
        ("http://mirror.example/debian",),
        ("http://mirror.example/debian-security",),
    ]
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    disabled = rootfs.parse_deb822_sources(
        "Enabled: no\nTypes: deb\nURIs: http://x/\nSuites: bookworm\n"
    )
    assert disabled[0].enabled is False
    one = rootfs.parse_one_line_sources(
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main contrib\n"
        "deb-src http://m.example/debian bookworm main\n"
    )
    assert one[0] == rootfs.AptSource(
        uris=("http://m.example/debian/",), suites=("bookworm",), components=("main", "contrib")
    )
    assert one[1].types == ("deb-src",)


def test_debian_mirror_prefers_a_bookworm_deb_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb http://one-line.example/debian/ bookworm main\n")
    assert rootfs.debian_mirror(etc_apt=etc) == "http://one-line.example/debian"
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert rootfs.debian_mirror(etc_apt=etc) == "http://mirror.example/debian"
    (etc / "sources.list.d" / "debian.sources").write_text(
        DEB822.replace("bookworm bookworm-updates", "trixie")
    )
    assert rootfs.debian_mirror(etc_apt=etc) == "http://one-line.example/debian"
    # A deb822 file alone (no sources.list at all), as on a fresh bookworm host.
    (etc / "sources.list").unlink()
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert rootfs.debian_mirror(etc_apt=etc) == "http://mirror.example/debian"


def test_debian_mirror_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    monkeypatch.setenv(rootfs.MIRROR_ENV, "http://env-proxy.example:3142/debian/")
    assert rootfs.debian_mirror(etc_apt=etc) == "http://env-proxy.example:3142/debian"
    assert (
        rootfs.debian_mirror(etc_apt=etc, override="https://flag.example/debian")
        == "https://flag.example/debian"
    )
    with pytest.raises(rootfs.RootfsError, match=r"mirror 'flag\.example/debian' is not a URL"):
        rootfs.debian_mirror(etc_apt=etc, override="flag.example/debian")


def test_debian_mirror_without_sources_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    # Only sources that do not serve bookworm, and a disabled one that does.
    (etc / "sources.list").write_text("deb http://old.example/debian bullseye main\n")
    (etc / "sources.list.d" / "off.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
    )
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.debian_mirror(etc_apt=etc)
    message = str(info.value)
    assert "no enabled 'deb' source for bookworm" in message
    assert "(2 sources read)" in message
    assert f"name one with {rootfs.MIRROR_ENV}=URL" in message


def test_pick_version_from_madison() -> None:
    madison = (
        "   python3 | 3.11.2-1+b2 | http://other.example/debian bookworm/main amd64 Packages\n"
        "   python3 | 3.11.2-1+b1 | http://lab-mirror.example/debian bookworm/main amd64 Packages\n"
        "   python3 | 3.11.9-9 | http://lab-mirror.example/debian-security bookworm-security/main "
        "amd64 Packages\n"
    )
    assert (
        rootfs.pick_version(madison, "http://lab-mirror.example/debian/", "bookworm")
        == "3.11.2-1+b1"
    )
    assert rootfs.pick_version(madison, "http://elsewhere/debian", "bookworm") == "3.11.2-1+b2"
    assert rootfs.pick_version(madison, "http://lab-mirror.example/debian", "trixie") is None


def test_package_versions_with_real_apt() -> None:
    need_tool("apt-cache", "apt")
    mirror = rootfs.debian_mirror()
    versions = rootfs.package_versions(["python3", "nbd-client"], mirror)
    assert versions["python3"].startswith("3.11")
    assert versions["nbd-client"].startswith("1:3.")
    with pytest.raises(rootfs.RootfsError, match="no 'no-such-package-swapnbd' in bookworm"):
        rootfs.package_versions(["no-such-package-swapnbd"], mirror, update=False)


def test_debootstrap_progress_counts_packages_not_phases() -> None:
    parse = rootfs.DebootstrapProgress()
    log = [
        "I: Retrieving InRelease ",
        "I: Retrieving Packages ",
        "I: Retrieving adduser 3.134",
        "I: Validating adduser 3.134",
        "I: Retrieving bash 5.2.15-2+b13",
        "I: Extracting adduser...",
        "I: Installing core packages...",
        "I: Unpacking required packages...",
        "I: Unpacking adduser...",
        "I: Configuring required packages...",
        "I: Configuring adduser...",
        "I: Unpacking the base system...",
    ]
    results = [parse(line) for line in log]
    assert [i for i, r in enumerate(results) if r is None] == [0, 1, 6, 7, 9, 11]
    assert results[4] == (
        "2 packages fetched, 0 extracted, 0 unpacked, 0 configured",
        None,
    )
    detail, fraction = results[10] or ("", None)
    assert detail == "2 packages fetched, 1 extracted, 1 unpacked, 1 configured"
    assert fraction == pytest.approx(0.15 + 0.85 * 2 / 4)
    assert parse("I: Base system installed successfully.") == (
        "2 packages fetched, 1 extracted, 1 unpacked, 1 configured, base system installed",
        1.0,
    )


def test_debootstrap_refuses_to_run_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    job = Progress(1, lambda _line: None)
    with (
        pytest.raises(rootfs.RootfsError, match="debootstrap, which needs root"),
        job.step("x") as step,
    ):
        rootfs.debootstrap(
            tmp_path / "root",
            mirror="http://lab-mirror.example/debian",
            packages=rootfs.PACKAGES,
            step=step,
            log=tmp_path / "log",
            deb_cache=tmp_path / "debs",
        )
    assert not (tmp_path / "root").exists()


def fake_tree(root: Path) -> Path:
    for rel in (
        "etc",
        "usr/share/doc/python3",
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/bin",
    ):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "usr/share/doc/python3/copyright").write_text("x" * 5000)
    (root / "var/cache/apt/archives/big.deb").write_bytes(b"\0" * 100_000)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    return root


def test_customize_sets_guest_files_and_trims(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "root")
    rootfs.customize(root)
    assert (root / "etc/hostname").read_text() == "swapnbd-guest\n"
    assert "nameserver" not in (root / "etc/resolv.conf").read_text()
    assert (root / "etc/fstab").read_text().startswith("#")
    assert not (root / "usr/share/doc").exists()
    assert list((root / "var/cache/apt/archives").iterdir()) == [
        root / "var/cache/apt/archives/partial"
    ]
    assert (root / "opt/swapnbd").is_dir()
    poweroff = root / "usr/local/sbin/poweroff"
    assert poweroff.stat().st_mode & 0o111
    compile(poweroff.read_text(), str(poweroff), "exec")


def test_make_image_has_the_free_space_and_the_files(tmp_path: Path) -> None:
    debugfs = need_tool("debugfs", "e2fsprogs")
    need_tool("mke2fs", "e2fsprogs")
    root = fake_tree(tmp_path / "root")
    rootfs.customize(root)
    img = tmp_path / "root.ext4"
    info = rootfs.make_image(root, img, free_mib=8)
    assert info.free_bytes >= 8 * rootfs.MIB
    assert info.size_bytes == img.stat().st_size
    assert info.size_bytes < 64 * rootfs.MIB  # small tree, small image
    cat = subprocess.run(
        [debugfs, "-R", "cat /etc/hostname", str(img)], capture_output=True, text=True, check=True
    )
    assert cat.stdout == "swapnbd-guest\n"
    links = subprocess.run(
        [debugfs, "-R", "stat /usr/bin/tool", str(img)], capture_output=True, text=True, check=True
    )
    assert "Links: 2" in links.stdout  # the hard link survived mke2fs -d


# --------------------------------------------------------------------------- cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWAPNBD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SWAPNBD_CACHE")
    assert image.default_cache_dir() == tmp_path / "xdg" / "swapnbd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert image.default_cache_dir() == tmp_path / "home" / ".cache" / "swapnbd"


def test_input_key_is_stable_and_order_free() -> None:
    a = image.input_key({"x": 1, "y": ["a", "b"]})
    assert a == image.input_key({"y": ["a", "b"], "x": 1})
    assert a != image.input_key({"x": 2, "y": ["a", "b"]})
    assert len(a) == 20


def test_cache_step_builds_once_and_redoes_a_half_done_step(tmp_path: Path) -> None:
    lines: list[str] = []
    cache = image.Cache(root=tmp_path / "cache", emit=lines.append)
    calls: list[Path] = []

    def build(tmp: Path, _step: object) -> None:
        calls.append(tmp)
        (tmp / "out").write_text("done")

    def crash(tmp: Path, _step: object) -> None:
        (tmp / "partial").write_text("half")
        raise RuntimeError("interrupted")

    job = Progress(4, lines.append)
    with cache.locked():
        with pytest.raises(RuntimeError, match="interrupted"):
            cache.step(job, "thing", "k1", "make thing", crash)
        assert (tmp_path / "cache/thing/.tmp-k1/partial").exists()
        assert not (tmp_path / "cache/thing/k1").exists()
        first = cache.step(job, "thing", "k1", "make thing", build)
        again = cache.step(job, "thing", "k1", "make thing", build)
    assert first == again == tmp_path / "cache/thing/k1"
    assert len(calls) == 1
    assert (first / "out").read_text() == "done"
    assert not (first / "partial").exists()
    assert not (tmp_path / "cache/thing/.tmp-k1").exists()
    assert any("removing the half-done build" in line for line in lines)
    assert lines[-1].endswith(f"thing: cached ({first})")
    assert "thing" in json.loads((tmp_path / "cache/durations.json").read_text())


def test_cache_clean_removes_half_done_and_long_unused_entries(tmp_path: Path) -> None:
    cache = image.Cache(root=tmp_path, emit=lambda _line: None)
    fresh = tmp_path / "rootfs" / "fresh"
    old = tmp_path / "rootfs" / "old"
    half = tmp_path / "initramfs" / ".tmp-abc"
    for path in (fresh, old, half):
        path.mkdir(parents=True)
        (path / "file").write_text("x")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    notes: list[str] = []
    cache.clean(notes.append, max_age_days=30)
    assert fresh.is_dir()
    assert not old.exists()
    assert not half.exists()
    assert notes == [
        f"rootfs: removing {old}, unused for 30 days",
        f"initramfs: removing the half-done build {half}",
    ]


LOCK_PROBE = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy")
    else:
        print("free")
"""


def test_cache_lock_excludes_other_processes(tmp_path: Path) -> None:
    cache = image.Cache(root=tmp_path / "cache", emit=lambda _line: None)

    def probe() -> str:
        lock = str(tmp_path / "cache" / "lock")
        done = subprocess.run(
            [sys.executable, "-c", LOCK_PROBE, lock], check=False, capture_output=True, text=True
        )
        return done.stdout.strip()

    with cache.locked():
        assert probe() == "busy"
        assert (tmp_path / "cache/lock").read_text() == f"pid {os.getpid()}\n"
    assert probe() == "free"


def test_cache_lock_waits_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    lock = tmp_path / "cache" / "lock"
    script = (
        "import fcntl, sys\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid holder\\n'); f.flush()\nprint('held', flush=True)\nsys.stdin.readline()\n"
    )
    lines: list[str] = []
    said = threading.Event()
    entered = threading.Event()

    def emit(line: str) -> None:
        lines.append(line)
        said.set()

    def build() -> None:
        with image.Cache(root=tmp_path / "cache", emit=emit).locked():
            entered.set()

    with subprocess.Popen(
        [sys.executable, "-c", script, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "held\n"
        waiter = threading.Thread(target=build)
        waiter.start()
        try:
            assert said.wait(60), "the second builder never said it was waiting"
            assert lines == [f"[swapnbd] waiting for the cache lock {lock} (held by pid holder)"]
            assert not entered.is_set()
        finally:
            holder.stdin.write("release\n")
            holder.stdin.flush()
            holder.wait(timeout=60)
            waiter.join(timeout=60)
    assert entered.is_set()


def test_build_guest_rejects_bad_input_before_any_work(tmp_path: Path) -> None:
    payload = make_payload(tmp_path / "p", "X")
    with pytest.raises(image.ImageError, match=r"unknown kernel '4\.19'"):
        image.build_guest("4.19", cache_dir=tmp_path / "c", payload_dir=payload)
    with pytest.raises(image.ImageError, match="unknown flavour 'rt'"):
        image.build_guest("6.1", "rt", cache_dir=tmp_path / "c", payload_dir=payload)
    with pytest.raises(image.ImageError, match="guest payload missing"):
        image.build_guest(cache_dir=tmp_path / "c", payload_dir=tmp_path / "empty")
    assert not (tmp_path / "c").exists()


def test_cli_usage_and_missing_payload(tmp_path: Path) -> None:
    py = [sys.executable, "-m", "vm.image"]
    bad = subprocess.run(
        [*py, "--kernel", "9.9"], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2
    assert "unknown kernel '9.9': choose a stock series (6.1, 6.12, 7.2)" in bad.stderr
    missing = subprocess.run(
        [*py, "--cache-dir", str(tmp_path / "c"), "--payload-dir", str(tmp_path)],
        check=False, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "error: guest payload missing" in missing.stderr


# --------------------------------------------------------------------------- QEMU (vm)

QEMU_TIMEOUT_S = 300
CHECK_CMD = (
    "echo CMD-START; uname -r; lsmod; python3 --version; "
    "test -f /opt/swapnbd/guest_init.py && echo HAVE-GUEST-INIT; "
    "test -f /opt/swapnbd/stress/__init__.py && echo HAVE-STRESS; "
    "test -f /opt/swapnbd/stress/swapstress.py && echo HAVE-SWAPSTRESS; "
    "cat /opt/swapnbd/guest_init.py; cat /etc/hostname; findmnt -n -o FSTYPE /; "
    "echo CMD-END; poweroff -f"
)


def qemu_argv(img: image.GuestImage, append: str) -> list[str]:
    """The QEMU command line of these tests: TCG, no network, console on stdio."""
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    return [
        qemu, "-accel", "tcg", "-m", "256M", "-smp", "1", "-nographic", "-no-reboot",
        "-nodefaults", "-serial", "stdio", "-nic", "none",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd),
        "-drive", f"file={img.rootfs},if=virtio,format=raw,snapshot=on",
        "-device", "virtio-serial-pci",
        "-append", f"console=ttyS0 panic=-1 transparent_hugepage=never zswap.enabled=0 {append}",
    ]  # fmt: skip


def boot(img: image.GuestImage, append: str) -> tuple[str, float]:
    """Boot the guest once; (console text, seconds). Fails the test on a hang."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            qemu_argv(img, append),
            check=False,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=QEMU_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        console = (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"QEMU did not exit within {QEMU_TIMEOUT_S} s; console:\n{console[-4000:]}")
    console = done.stdout.decode(errors="replace").replace("\r", "")
    assert done.returncode == 0, f"QEMU exited {done.returncode}: {done.stderr.decode()}"
    return console, time.monotonic() - started


@pytest.fixture(scope="session")
def vm_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_payload(tmp_path_factory.mktemp("payload"), "SWAPNBD-TEST-GUEST-INIT")


@pytest.fixture(scope="session")
def guest_images(vm_payload: Path) -> Callable[[str], image.GuestImage]:
    built: dict[str, image.GuestImage] = {}

    def get(name: str) -> image.GuestImage:
        if name not in built:
            built[name] = image.build_guest(name, payload_dir=vm_payload)
        return built[name]

    return get


@pytest.mark.vm
@pytest.mark.parametrize("name", ["6.1", "6.12"])
def test_guest_boots_and_runs_a_command_in_the_root_fs(
    name: str, guest_images: Callable[[str], image.GuestImage]
) -> None:
    img = guest_images(name)
    assert img.kernel.is_file() and img.initrd.is_file() and img.rootfs.is_file()
    assert img.kernel_package.startswith(f"linux-image-{name}")
    rootfs_mtime = img.rootfs.stat().st_mtime_ns
    console, seconds = boot(img, f'quiet swapnbd.init=/bin/sh -- -c "{CHECK_CMD}"')
    assert "SWAPNBD-INITRAMFS-ERROR" not in console, console
    body = console.split("CMD-START\n", 1)[-1].split("CMD-END", 1)[0]
    lines = body.splitlines()
    assert lines[0] == img.kernel_release, console
    assert any(line.startswith("nbd ") for line in lines), body  # nbd is loaded (modular)
    assert any(line.startswith("virtio_blk ") for line in lines), body
    assert any(line.startswith("virtio_net ") for line in lines), body
    assert "Python 3.11." in body
    for marker in ("HAVE-GUEST-INIT", "HAVE-STRESS", "HAVE-SWAPSTRESS", "SWAPNBD-TEST-GUEST-INIT"):
        assert marker in lines or any(marker in line for line in lines), (marker, body)
    assert "swapnbd-guest" in lines
    assert "ext4" in lines
    assert "reboot: Power down" in console  # poweroff -f, not a panic
    assert img.rootfs.stat().st_mtime_ns == rootfs_mtime  # snapshot=on left it alone
    print(f"{name}: boot to poweroff {seconds:.1f} s under TCG")


@pytest.mark.vm
def test_guest_default_init_is_guest_init_py_as_pid_1(
    guest_images: Callable[[str], image.GuestImage],
) -> None:
    console, _ = boot(guest_images("6.1"), "quiet")
    assert "switch_root to /usr/bin/python3 /opt/swapnbd/guest_init.py" in console
    assert "SWAPNBD-TEST-GUEST-INIT pid 1" in console
    assert "reboot: Power down" in console


@pytest.mark.vm
def test_initramfs_failure_prints_the_marker_and_powers_off(
    guest_images: Callable[[str], image.GuestImage],
) -> None:
    console, _ = boot(guest_images("6.1"), "quiet swapnbd.init=/no/such/init")
    assert (
        "SWAPNBD-INITRAMFS-ERROR: swapnbd.init=/no/such/init is not executable in the root fs"
        in console
    )
    assert "reboot: Power down" in console
