"""``--kernel 7.2``: sid's kernel on a bookworm host, through a sid chroot.

Pure parts with tables (package splits, renamed modules, the compiler a config names,
the headers Makefile rewrite, chroot keys and paths), the split .deb layout unpacked
with the real dpkg-deb and depmod, and sid's real apt asked inside the cached root
(marker ``kbuild``: the root is debootstrapped on first use).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vm.image import arms, chroot, image, kernel, kmod

REL = "7.2.13+deb14-cloud-amd64"

# --------------------------------------------------------------------------- pure


def test_image_parts_of_sids_split_package_and_none_for_bookworms() -> None:
    depends = (
        "linux-base (>= 4.12~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
        f"linux-base-{REL} (= 7.2.13-1), linux-binary-{REL} (= 7.2.13-1), "
        f"linux-modules-{REL} (= 7.2.13-1)"
    )
    assert kernel.parse_image_parts(depends) == [
        (f"linux-base-{REL}", "7.2.13-1"),
        (f"linux-binary-{REL}", "7.2.13-1"),
        (f"linux-modules-{REL}", "7.2.13-1"),
    ]
    bookworm = (
        "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"
    )
    assert kernel.parse_image_parts(bookworm) == []


def test_a_suite_that_moved_on_is_refused_by_name() -> None:
    kernel.check_series("7.2", kernel.KernelPackage(f"linux-image-{REL}", "7.2.13-1", "m"))
    moved = kernel.KernelPackage("linux-image-7.3.1+deb14-cloud-amd64", "7.3.1-1", "meta")
    with pytest.raises(kernel.KernelError) as caught:
        kernel.check_series("7.2", moved)
    assert str(caught.value) == (
        "meta now depends on linux-image-7.3.1+deb14-cloud-amd64 7.3.1-1, not a 7.2 kernel: "
        "the suite has moved on; pin an older snapshot or add the new series"
    )
    # 7.20 is not 7.2
    with pytest.raises(kernel.KernelError):
        kernel.check_series("7.2", kernel.KernelPackage("linux-image-7.20.1", "7.20.1-1", "m"))


def test_metapackage_and_suite_of_7_2() -> None:
    assert kernel.metapackage("7.2", "cloud") == "linux-image-cloud-amd64"
    assert kernel.SUITES == {"7.2": "sid"}
    assert arms.STOCK_SERIES == ("6.1", "6.12", "7.2")
    assert arms.HOST_SERIES == ("6.1", "6.12")


def test_a_renamed_module_is_loaded_under_its_new_name() -> None:
    """7.2 has crc32c-cryptoapi where 6.x had crc32c_generic; ext4 built in."""
    deps = {
        "kernel/crypto/crc32c-cryptoapi.ko.xz": [],
        "kernel/drivers/block/nbd.ko.xz": [],
        "kernel/drivers/block/virtio_blk.ko.xz": [],
    }
    order = kernel.module_load_order(
        deps, {"ext4"}, ("virtio_blk", "nbd", "crc32c_generic", "ext4")
    )
    assert order == [
        "kernel/drivers/block/virtio_blk.ko.xz",
        "kernel/drivers/block/nbd.ko.xz",
        "kernel/crypto/crc32c-cryptoapi.ko.xz",
    ]
    # The old name still wins where it exists (6.x), and a missing one is still named.
    old = {"kernel/crypto/crc32c_generic.ko": []}
    assert kernel.module_load_order(old, set(), ("crc32c_generic",)) == [
        "kernel/crypto/crc32c_generic.ko"
    ]
    with pytest.raises(kernel.KernelError, match="module 'crc32c_generic' is neither built in"):
        kernel.module_load_order({}, set(), ("crc32c_generic",))


@pytest.mark.parametrize(
    ("config", "compiler"),
    [
        (
            'CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0"\n',
            "x86_64-linux-gnu-gcc-16",
        ),
        ('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\n', "gcc-12"),
        ("CONFIG_CC_IS_GCC=y\n", "gcc-12"),
    ],
)
def test_the_compiler_comes_from_the_kernels_config(config: str, compiler: str) -> None:
    assert kmod.kernel_compiler(config) == compiler
    assert compiler in kmod.needed_tools(config)


def test_the_headers_makefile_points_into_the_unpacked_tree() -> None:
    sid = (
        f"KBUILD_OUTPUT=/usr/src/linux-headers-{REL}\n"
        "include /usr/src/linux-headers-7.2.13+deb14-common/Makefile\n"
    )
    assert kmod.rewrite_headers_makefile(sid, "/tmp/x/tree") == (
        f"KBUILD_OUTPUT=/tmp/x/tree/usr/src/linux-headers-{REL}\n"
        "include /tmp/x/tree/usr/src/linux-headers-7.2.13+deb14-common/Makefile\n"
    )
    bookworm = "include /usr/src/linux-headers-6.1.0-57-common/Makefile\n"
    assert kmod.rewrite_headers_makefile(bookworm, "/c") == (
        "include /c/usr/src/linux-headers-6.1.0-57-common/Makefile\n"
    )


def test_chroot_keys_paths_and_commands(tmp_path: Path) -> None:
    # The trixie interop root keeps its key (and so its cache) after the move.
    assert chroot.cache_key("trixie", ("libnbd-bin", "python3-libnbd", "qemu-utils")) == (
        "40b99f1b461d"
    )
    assert chroot.cache_key("sid", kmod.SID_PACKAGES) != chroot.cache_key(
        "sid", kmod.SID_PACKAGES[:-1]
    )
    root = chroot.DebianChroot(tmp_path / "root", "sid")
    assert root.inside(tmp_path / "root" / "tmp" / "w") == "/tmp/w"
    with pytest.raises(chroot.ChrootError, match="is not inside the sid root"):
        root.inside(tmp_path / "elsewhere")
    assert root.argv("make", "-C", "/x") == ["chroot", str(tmp_path / "root"), "make", "-C", "/x"]
    assert root.argv_with_proc("make")[:4] == [
        "unshare",
        "--fork",
        "--pid",
        f"--mount-proc={tmp_path / 'root'}/proc",
    ]
    assert root.env()["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


def test_a_missing_compiler_in_the_chroot_is_named_with_its_package(tmp_path: Path) -> None:
    root = chroot.DebianChroot(tmp_path, "sid")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "make").touch()
    config = 'CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0"\n'
    with pytest.raises(kmod.KmodError) as caught:
        kmod.check_tools(config, "the arm modules", root)
    assert str(caught.value) == (
        "cannot build the arm modules: x86_64-linux-gnu-gcc-16 is not installed "
        f"(apt-get install gcc-16-for-host) in the sid chroot {tmp_path}, needed for the "
        "compiler the kernel was built with"
    )
    (tmp_path / "usr" / "bin" / "x86_64-linux-gnu-gcc-16").touch()
    kmod.check_tools(config, "the arm modules", root)


# --------------------------------------------------------------------------- real tools


def _deb(tmp: Path, package: str, files: dict[str, bytes]) -> Path:
    """A real .deb made by dpkg-deb -b."""
    tree = tmp / f"{package}-tree"
    for rel, data in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 7.2.13-1\nArchitecture: amd64\n"
        "Maintainer: t <t@example.org>\nDescription: test\n"
    )
    out = tmp / f"{package}_7.2.13-1_amd64.deb"
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(tree), str(out)], check=True)
    return out


def test_a_split_merged_usr_kernel_unpacks_to_the_usual_layout(tmp_path: Path) -> None:
    """sid: vmlinuz and config beside the modules under usr/lib; depmod still finds them."""
    mods = f"usr/lib/modules/{REL}"
    debs = [
        _deb(tmp_path, f"linux-image-{REL}", {f"usr/share/doc/linux-image-{REL}/x": b""}),
        _deb(
            tmp_path,
            f"linux-base-{REL}",
            {
                f"{mods}/config": b"CONFIG_NBD=m\n",
                f"{mods}/modules.builtin": b"kernel/fs/ext4/ext4.ko\n",
            },
        ),
        _deb(tmp_path, f"linux-binary-{REL}", {f"{mods}/vmlinuz": b"MZ kernel"}),
        _deb(tmp_path, f"linux-modules-{REL}", {f"{mods}/kernel/drivers/block/.keep": b""}),
    ]
    unpacked = kernel.unpack_kernel(debs, tmp_path / "tree")
    assert unpacked.release == REL
    assert unpacked.vmlinuz.read_bytes() == b"MZ kernel"
    assert (tmp_path / "tree" / "boot" / f"config-{REL}").read_text() == "CONFIG_NBD=m\n"
    assert (unpacked.modules_dir / "modules.dep").is_file()
    assert (tmp_path / "tree" / "lib").readlink() == Path("usr/lib")
    # The image shell alone has no kernel: said so, by name.
    with pytest.raises(kernel.KernelError, match="has 0 module trees"):
        kernel.unpack_kernel(debs[:1], tmp_path / "alone")


@pytest.mark.kbuild  # root, and the sid chroot: debootstrap on first use, then apt
def test_sids_apt_in_the_chroot_resolves_7_2_and_the_host_stays_bookworm() -> None:
    """The cached sid root (made on first use) answers; nothing of sid lands on the host."""
    root = image.kernel_chroot(image.default_cache_dir(), "7.2", print)
    assert root is not None and root.suite == "sid"
    assert image.kernel_chroot(image.default_cache_dir(), "6.12") is None
    pkg = kernel.resolve_kernel("7.2", "cloud", root)
    assert pkg.name == f"linux-image-{REL}" and pkg.version == "7.2.13-1", pkg
    names = [name for name, _ in kernel.image_debs(pkg, root)]
    assert names == [pkg.name, f"linux-base-{REL}", f"linux-binary-{REL}", f"linux-modules-{REL}"]
    host = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\n", "*deb14*"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert host.stdout.strip() == "", f"sid packages installed on the host: {host.stdout}"
    release = Path("/etc/debian_version").read_text().strip()
    assert release.startswith("12."), release


# --------------------------------------------------------------------------- real guests


@pytest.mark.vm
@pytest.mark.parametrize("arm", arms.ARMS)
def test_7_2_runs_each_arm_with_the_arm_proven_inside_the_guest(arm: str, tmp_path: Path) -> None:
    """sid's stock 7.2 through the whole run path, as 6.1 and 6.12 in test_vanilla.py.

    vanilla: the known lockup setting (4x RAM, 2 loops), which 7.2 vanilla locked up in
    within a minute of swapping here. patched: lighter (256 MiB, one loop), so it completes
    on a loaded 2-core host. Both read their switches back inside the guest.
    """
    from peers import servers
    from vm.run import experiment

    from .test_vanilla import MIB, pressure_config

    if not servers.nbd_serve_available():
        pytest.fail("nbd-serve is not importable: pip install -e .")
    out = tmp_path / arm
    extra: dict[str, object] = {}
    if arm == "patched":
        extra = {
            "ratio": None,
            "total_bytes": 256 * MIB,
            "loops": 1,
            "lockup_after_s": 240.0,
            "timeout_s": 2400.0,
        }
    run = experiment.run_experiment(pressure_config(out, "7.2", arm, **extra), print)
    kern = run["kernel"]
    assert kern["release"] == REL and kern["version"] == "7.2.13-1"
    assert kern["arm_modules"] == "linux-source-7.2 7.2.13-1"
    assert kern["arm"] == arm
    assert kern["arm_check"]["ok"] is True, kern["arm_check"]
    switches = kern["in_guest"]["switches"]
    if arm == "vanilla":
        assert kern["arm_check"]["reason"] == (
            "vanilla in effect: nbd memalloc=N, throttle off (livepatch)"
        )
        assert switches["nbd.memalloc"] == "N"
        assert switches["livepatch.swapnbd_nothrottle"] == "1"
        assert any("never throttles" in line for line in kern["in_guest"]["dmesg"])
        assert run["outcome"] == "lockup", run.get("outcome_reason")
        assert run["evidence"]["signature"] == "memalloc-deadlock", run["evidence"].get("why")
        assert run["vmstat_delta"]["pgscan_direct_throttle"] == 0
    else:
        assert kern["arm_check"]["reason"] == "patched in effect: nbd memalloc Y"
        assert switches["nbd.memalloc"] == "Y"
        assert switches["livepatch.swapnbd_nothrottle"] is None
        assert run["outcome"] == "completed", run.get("outcome_reason")
        assert run["swapstress"]["corrupt_pages"] == 0
        assert run["vmstat_delta"]["pswpout"] > 0
