"""Kernel arms: resolution tables, the patches against the real Debian source, the
arm modules built against the real headers, and each switch proven inside a real guest."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vm.image import arms, image, initramfs, kbuild, kernel, kmod
from vm.image.progress import Progress

from .test_image import boot, vm_payload  # noqa: F401  (vm_payload is a fixture)

# --------------------------------------------------------------------------- resolve (pure)


@pytest.mark.parametrize(
    ("kernel", "allocator", "arm", "route", "series", "alloc", "variant"),
    [
        ("6.1", None, "patched", "stock", "6.1", "slub", None),
        ("6.1", "slub", "vanilla", "stock", "6.1", "slub", None),
        ("6.12", None, "vanilla", "stock", "6.12", "slub", None),
        ("7.2", None, "vanilla", "stock", "7.2", "slub", None),
        ("7.2", "slub", "patched", "stock", "7.2", "slub", None),
        ("6.1", "slab", "vanilla", "build", "6.1", "slab", "6.1-slab"),
        ("6.1", "slab", "patched", "build", "6.1", "slab", "6.1-slab"),
        ("6.1-slab", None, "patched", "build", "6.1", "slab", "6.1-slab"),
        ("6.1-build", "slub", "vanilla", "build", "6.1", "slub", "6.1-build"),
        ("6.12-build", None, "patched", "build", "6.12", "slub", "6.12-build"),
        ("6.1-slab-revert", None, "vanilla", "build", "6.1", "slab", "6.1-slab-revert"),
    ],
)
def test_resolve_routes(  # noqa: PLR0917
    kernel: str,
    allocator: str | None,
    arm: str,
    route: str,
    series: str,
    alloc: str,
    variant: str | None,
) -> None:
    choice = arms.resolve(kernel, allocator, arm)
    assert (choice.route, choice.series, choice.allocator, choice.arm) == (
        route,
        series,
        alloc,
        arm,
    )
    assert (choice.variant.name if choice.variant else None) == variant
    assert choice.cmdline == arms.arm_cmdline(arm)


def test_arm_switch_words() -> None:
    assert arms.arm_cmdline("patched") == ("nbd.memalloc=1", "pfmemalloc_throttle=1")
    assert arms.arm_cmdline("vanilla") == ("nbd.memalloc=0", "pfmemalloc_throttle=0")


@pytest.mark.parametrize(
    ("kernel", "allocator", "arm", "message"),
    [
        ("6.12", "slab", "patched", "kernel 6.12 has no SLAB (it was removed in 6.8)"),
        ("7.2", "slab", "vanilla", "kernel 7.2 has no SLAB (it was removed in 6.8)"),
        ("4.19", None, "patched", "unknown kernel '4.19': choose a stock series (6.1, 6.12, 7.2)"),
        ("6.1", "slob", "patched", "unknown allocator 'slob': choose one of slub, slab"),
        ("6.1", None, "half", "unknown arm 'half': choose one of patched, vanilla"),
        ("6.1-slab", "slub", "patched", "kernel 6.1-slab is built with slab, not slub"),
        ("6.1-slab-revert", None, "patched", "it can only run --arm vanilla"),
        ("/no/such/bzImage", None, "patched", "--kernel /no/such/bzImage: no such file"),
    ],
)
def test_resolve_refuses_with_a_clear_message(
    kernel: str, allocator: str | None, arm: str, message: str
) -> None:
    with pytest.raises(arms.ArmError) as caught:
        arms.resolve(kernel, allocator, arm)
    assert message in str(caught.value)


def test_resolve_a_bzimage_path(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"MZ")
    choice = arms.resolve(str(bz), None, "vanilla")
    assert (choice.route, choice.bzimage, choice.allocator) == ("bzimage", bz, None)
    with pytest.raises(arms.ArmError, match="--allocator cannot be chosen for a bzImage"):
        arms.resolve(str(bz), "slab", "patched")


def test_patch_hash_follows_every_byte(tmp_path: Path) -> None:
    a, b = tmp_path / "a.patch", tmp_path / "b.patch"
    a.write_text("one\n")
    b.write_text("two\n")
    first = arms.patches_hash([a, b])
    assert arms.patches_hash([b, a]) != first
    b.write_text("two!\n")
    assert arms.patches_hash([a, b]) != first


# --------------------------------------------------------------------------- config, depends


def test_expected_config_reads_both_fragments() -> None:
    wanted = kbuild.expected_config("slab")
    assert wanted["CONFIG_SLAB"] == "y"
    assert wanted["CONFIG_SLUB"] == "n"
    assert wanted["CONFIG_BLK_DEV_NBD"] == "y"
    assert wanted["CONFIG_MODULES"] == "n"
    assert kbuild.config_key("slab") != kbuild.config_key("slub")


def test_missing_config_names_what_olddefconfig_dropped() -> None:
    wanted = {"CONFIG_SLAB": "y", "CONFIG_SLUB": "n", "CONFIG_NUMA": "n", "CONFIG_HZ": "250"}
    config = "CONFIG_SLUB=y\n# CONFIG_SLAB is not set\nCONFIG_HZ=250\n"
    assert kbuild.missing_config(config, wanted) == ["CONFIG_SLAB=y", "CONFIG_SLUB=n"]
    good = "CONFIG_SLAB=y\n# CONFIG_SLUB is not set\nCONFIG_HZ=250\n"
    assert kbuild.missing_config(good, wanted) == []


def test_parse_depends_of_a_headers_package() -> None:
    text = (
        "linux-base (>= 4.12~), linux-headers-6.12.117+deb12-common (= 6.12.117-1~deb12u1), "
        "linux-image-6.12.117+deb12-cloud-amd64 (= 6.12.117-1~deb12u1) | "
        "linux-image-6.12.117+deb12-cloud-amd64-unsigned (= 6.12.117-1~deb12u1), "
        "linux-kbuild-6.12.117+deb12, gcc-12"
    )
    assert kmod.parse_depends(text) == [
        ("linux-base", ">=", "4.12~"),
        ("linux-headers-6.12.117+deb12-common", "=", "6.12.117-1~deb12u1"),
        ("linux-image-6.12.117+deb12-cloud-amd64", "=", "6.12.117-1~deb12u1"),
        ("linux-kbuild-6.12.117+deb12", None, None),
        ("gcc-12", None, None),
    ]


# --------------------------------------------------------------------------- the init script


def run_module_loop(tmp_path: Path, cmdline: str, optional: dict[str, str]) -> list[str]:
    """Run the init script's module loop in a real busybox sh, with insmod recorded."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        pytest.fail("busybox is missing: apt-get install busybox-static")
    modules = ["virtio_net.ko", "nbd.ko", "swapnbd_nothrottle.ko"]
    script = initramfs.init_script(modules, optional)
    start = script.index("cmdline=$(cat /proc/cmdline)")
    end = script.index("\ndone\n", start) + len("\ndone\n")
    loop = script[start:end].replace("/proc/cmdline", str(tmp_path / "cmdline"))
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    record = tmp_path / "insmod.log"
    prelude = f'insmod() {{ echo "$*" >> {record}; }}\nfail() {{ echo "FAIL $*"; exit 1; }}\n'
    done = subprocess.run(
        [busybox, "sh", "-c", prelude + loop], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.replace("/lib/modules/", "") for line in record.read_text().splitlines()]


def test_init_passes_module_params_and_gates_the_livepatch(tmp_path: Path) -> None:
    optional = {"swapnbd_nothrottle.ko": "pfmemalloc_throttle=0"}
    vanilla = run_module_loop(
        tmp_path, "console=ttyS0 nbd.memalloc=0 pfmemalloc_throttle=0 nbd.nbds_max=2", optional
    )
    assert vanilla == [
        "virtio_net.ko",
        "nbd.ko memalloc=0 nbds_max=2",
        "swapnbd_nothrottle.ko",
    ]
    (tmp_path / "insmod.log").unlink()
    patched = run_module_loop(tmp_path, "nbd.memalloc=1 pfmemalloc_throttle=1", optional)
    assert patched == ["virtio_net.ko", "nbd.ko memalloc=1"]


def test_optional_module_needs_a_plain_trigger() -> None:
    with pytest.raises(initramfs.InitramfsError, match="needs a plain trigger word"):
        initramfs.init_script(["a.ko"], {"a.ko": "x=1; reboot"})
    with pytest.raises(initramfs.InitramfsError, match="needs a plain trigger word"):
        initramfs.init_script(["a.ko"], {"b.ko": "x=1"})


# --------------------------------------------------------------------------- real Debian source


def debian_tarball(series: str) -> Path:
    path = Path(f"/usr/src/linux-source-{series}.tar.xz")
    if not path.is_file():
        pytest.fail(f"{path} is missing: apt-get install linux-source-{series} (./dev does)")
    return path


def sid_tarball(series: str) -> Path:
    """sid's linux-source of the version its cloud kernel has today (fetched in the sid root)."""
    cache = image.default_cache_dir()
    root = image.kernel_chroot(cache, series, print)
    assert root is not None, f"{series} is not a sid series"
    pkg = kernel.resolve_kernel(series, "cloud", root)
    job = Progress(1, lambda line: print(line, flush=True))
    with job.step(f"linux-source-{series} {pkg.version}", 60.0) as step:
        return kmod.source_tarball(series, pkg.version, cache / "sources", step, root)


class DebianSources:
    """nbd.c and vmscan.c of Debian's linux-source-6.1, -6.12 (bookworm) and -7.2 (sid).

    Each series is unpacked when a test first asks for it, so the 6.1 and 6.12 cases read
    only the tarballs under /usr/src and never make (or wait for) the sid chroot.
    """

    WANTED = frozenset({"drivers/block/nbd.c", "mm/vmscan.c"})

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees: dict[str, Path] = {}

    def __getitem__(self, series: str) -> Path:
        if series not in self.trees:
            tarball = debian_tarball(series) if series in arms.HOST_SERIES else sid_tarball(series)
            with tarfile.open(tarball, "r:xz") as archive:
                members = [m for m in archive if m.name.split("/", 1)[-1] in self.WANTED]
                archive.extractall(self.root / series, members=members, filter="tar")
            (top,) = (self.root / series).iterdir()
            self.trees[series] = top
        return self.trees[series]


@pytest.fixture(scope="module")
def debian_sources(tmp_path_factory: pytest.TempPathFactory) -> DebianSources:
    return DebianSources(tmp_path_factory.mktemp("debian-src"))


#: Every stock series; 7.2's case is marked kbuild, since its source comes through the sid
#: chroot (root, debootstrap on first use, then a download), which ``-m "not kbuild"``
#: leaves out. 6.1's and 6.12's come from /usr/src, installed by ./dev.
SOURCE_SERIES = [
    s if s in arms.HOST_SERIES else pytest.param(s, marks=pytest.mark.kbuild)
    for s in arms.STOCK_SERIES
]


@pytest.mark.parametrize("series", arms.HOST_SERIES)
@pytest.mark.parametrize(
    "patches", [arms.SWITCH_PATCHES, arms.REVERT_PATCHES], ids=["switches", "revert"]
)
def test_patches_apply_to_the_real_debian_source(
    series: str, patches: tuple[str, ...], debian_sources: DebianSources, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(debian_sources[series], tree)
    for patch in arms.patch_files(series, patches):
        # As the builders apply them: a point release's offsets pass, fuzz does not.
        done = subprocess.run(
            ["patch", "-p1", "--forward", "--fuzz=0", "-i", str(patch)],
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{patch} on linux-source-{series}:\n{done.stdout}"
        assert "fuzz" not in done.stdout, done.stdout
    nbd = (tree / "drivers/block/nbd.c").read_text()
    vmscan = (tree / "mm/vmscan.c").read_text()
    if patches == arms.SWITCH_PATCHES:
        assert "module_param(memalloc, bool, 0444);" in nbd
        assert nbd.count("nbd_sock_memalloc(nbd, ") == 2
        assert "core_param(pfmemalloc_throttle, pfmemalloc_throttle, bool, 0444);" in vmscan
        assert "\tif (!pfmemalloc_throttle)\n\t\treturn false;\n" in vmscan
    else:
        assert "sk_set_memalloc" not in nbd and "__GFP_MEMALLOC" not in nbd
        assert "memalloc_noreclaim_save" not in nbd
        assert "compile-time revert of the 2012 pfmemalloc throttle" in vmscan


@pytest.mark.kbuild  # sid's source, through the sid chroot
def test_the_module_patch_applies_to_sids_7_2_source(
    debian_sources: DebianSources, tmp_path: Path
) -> None:
    """7.2 is stock only: the nbd.ko switch is its one patch, and it applies exactly."""
    assert sorted(p.name for p in (arms.KPATCH_DIR / "7.2").glob("*.patch")) == [arms.MODULE_PATCH]
    tree = tmp_path / "tree"
    shutil.copytree(debian_sources["7.2"], tree)
    (patch,) = arms.patch_files("7.2", (arms.MODULE_PATCH,))
    done = subprocess.run(
        ["patch", "-p1", "--forward", "--fuzz=0", "-i", str(patch)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    assert "offset" not in done.stdout and "fuzz" not in done.stdout, done.stdout
    nbd = (tree / "drivers/block/nbd.c").read_text()
    assert "module_param(memalloc, bool, 0444);" in nbd
    assert nbd.count("nbd_sock_memalloc(nbd, ") == 2
    # The send loop moved into scoped_with_kernel_creds() (one tab deeper) in 7.x.
    assert (
        "\t\t\tsock->sk->sk_allocation = memalloc ? GFP_NOIO | __GFP_MEMALLOC : GFP_NOIO;\n"
    ) in nbd
    assert "\tif (memalloc)\n\t\tnoreclaim_flag = memalloc_noreclaim_save();\n" in nbd
    assert "\tif (memalloc)\n\t\tmemalloc_noreclaim_restore(noreclaim_flag);\n" in nbd
    # What issue 24 names as the change that matters under pressure: partial sends are
    # finished by nbd_pending_cmd_work, queued on the system workqueue.
    assert "static void nbd_pending_cmd_work(struct work_struct *work)" in nbd


@pytest.mark.parametrize("series", SOURCE_SERIES)
def test_make_patches_reproduces_every_committed_patch(
    series: str, debian_sources: DebianSources, tmp_path: Path
) -> None:
    """The generator (vm/image/kpatch/make_patches.py) still makes what is committed."""
    committed = sorted((arms.KPATCH_DIR / series).glob("*.patch"))
    copy = tmp_path / "kpatch"
    copy.mkdir()
    shutil.copy2(arms.KPATCH_DIR / "make_patches.py", copy / "make_patches.py")
    only = [p.name for p in committed] if series not in arms.HOST_SERIES else []
    done = subprocess.run(
        [sys.executable, str(copy / "make_patches.py"), str(debian_sources[series]), series, *only],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    made = sorted((copy / series).glob("*.patch"))
    assert [p.name for p in made] == [p.name for p in committed]

    def body(path: Path) -> list[str]:
        # Hunk positions aside: 6.12's patches were made on .117, the host has .118 (+2 lines).
        return [line for line in path.read_text().splitlines() if not line.startswith("@@")]

    for new, old in zip(made, committed, strict=True):
        assert body(new) == body(old), f"{old.name} of {series} differs"


def _nbd_c(debian_sources: DebianSources, series: str, tmp_path: Path) -> Path:
    target = tmp_path / "nbd.c"
    shutil.copy2(debian_sources[series] / "drivers/block/nbd.c", target)
    return target


@pytest.mark.parametrize("series", SOURCE_SERIES)
def test_a_point_release_offset_applies(
    series: str, debian_sources: DebianSources, tmp_path: Path
) -> None:
    """Debian's 6.12.117 -> .118 moved lines by two: the builders must still apply."""
    target = _nbd_c(debian_sources, series, tmp_path)
    target.write_text("/* moved */\n/* by a point release */\n" + target.read_text())
    log = tmp_path / "patch.log"
    patch = arms.patch_files(series, (arms.MODULE_PATCH,))[0]
    kmod.apply_patch(patch, target, log, source=f"linux-source-{series} test")
    assert "offset 2 lines" in log.read_text()
    assert "module_param(memalloc, bool, 0444);" in target.read_text()


@pytest.mark.parametrize("series", SOURCE_SERIES)
def test_changed_context_is_refused_not_fuzzed(
    series: str, debian_sources: DebianSources, tmp_path: Path
) -> None:
    """A hunk whose context changed could land in the wrong place: it fails, and says so."""
    target = _nbd_c(debian_sources, series, tmp_path)
    text = target.read_text()
    # One context line of the sk_set_memalloc hunk in nbd_start_device, changed.
    anchor = "\t\tsk_set_memalloc(config->socks[i]->sock->sk);\n"
    assert anchor in text
    at = text.index(anchor)
    before = text.rindex("\n", 0, at - 1) + 1  # the line before the call
    changed = text[:before] + "\t\t/* a point release changed this line */\n" + text[at:]
    target.write_text(changed)
    patch = arms.patch_files(series, (arms.MODULE_PATCH,))[0]
    version = f"linux-source-{series} 9.9.9-1"
    with pytest.raises(kmod.KmodError) as caught:
        kmod.apply_patch(patch, target, tmp_path / "patch.log", source=version)
    message = str(caught.value)
    assert f"{patch.name} does not apply to nbd.c of {version}: patch: Hunk #" in message
    assert "FAILED" in message and str(tmp_path / "patch.log") in message


def test_a_missing_build_tool_is_named_with_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pahole missing (no pahole package): the build stops before make, naming the package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "gcc-12"):
        found = shutil.which(tool)
        assert found, f"{tool} is missing: ./dev installs it"
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    config = "CONFIG_MODULES=y\nCONFIG_DEBUG_INFO_BTF_MODULES=y\n"
    what = "the arm modules for 6.12.118+deb12-cloud-amd64 (Debian 6.12.118-1~deb12u1)"
    with pytest.raises(kmod.KmodError) as caught:
        kmod.check_tools(config, what)
    assert str(caught.value) == (
        f"cannot build {what}: pahole is not installed (apt-get install pahole), "
        "needed for BTF for modules (CONFIG_DEBUG_INFO_BTF_MODULES=y)"
    )
    kmod.check_tools("# CONFIG_DEBUG_INFO_BTF_MODULES is not set\n", what)


@pytest.mark.kbuild
@pytest.mark.parametrize("series", arms.STOCK_SERIES)
def test_arm_modules_build_for_debians_current_kernel_from_a_fresh_cache(
    series: str, tmp_path: Path
) -> None:
    """What a new user's first run does, for whatever Debian ships today.

    Resolves the stock kernel apt offers now, then builds both arms' modules against its
    headers and source in an empty cache, and proves each switch is in the built object.
    A point release that moves the patch, or a build tool ./dev does not install, fails here.
    """
    root = image.kernel_chroot(image.default_cache_dir(), series, print)  # sid for 7.2
    pkg = kernel.resolve_kernel(series, "cloud", root)
    release = pkg.name.removeprefix("linux-image-")
    job = Progress(1, lambda line: print(line, flush=True))
    scratch = contextlib.ExitStack()
    work = tmp_path / "work"
    if root is not None:  # a chroot build works inside the root
        work = scratch.enter_context(root.scratch())[0] / "work"
    with scratch, job.step(f"arm modules for {release}", 120.0) as step:
        built = kmod.build_arm_modules(
            work, release, pkg.version, series, downloads=tmp_path / "src", step=step, chroot=root
        )
        shutil.copytree(work / "src", tmp_path / "built")
        log = (work / "build.log").read_text()
    built = kmod.ArmModules(
        nbd=tmp_path / "built" / "nbd.ko",
        livepatch=tmp_path / "built" / built.livepatch.name,
        release=built.release,
    )
    assert "with fuzz" not in log
    print(f"{release} (Debian {pkg.version}): {log.count('offset')} hunks moved")

    def modinfo(path: Path, field: str) -> str:
        return subprocess.run(
            ["modinfo", "-F", field, str(path)], capture_output=True, text=True, check=True
        ).stdout

    assert modinfo(built.nbd, "vermagic").split()[0] == release
    parms = modinfo(built.nbd, "parm")
    assert "memalloc:" in parms, parms
    assert modinfo(built.livepatch, "vermagic").split()[0] == release
    assert modinfo(built.livepatch, "livepatch").strip() == "Y"
    strings = subprocess.run(
        ["strings", str(built.nbd)], capture_output=True, text=True, check=True
    ).stdout
    assert "swapnbd switch memalloc=" in strings


# --------------------------------------------------------------------------- real guests


@pytest.mark.vm
@pytest.mark.parametrize("series", arms.STOCK_SERIES)
def test_each_switch_is_visible_inside_a_stock_guest(
    series: str,
    vm_payload: Path,  # noqa: F811
) -> None:
    """Both arms of one stock kernel, same vmlinuz, switches read back from the guest."""
    check = (
        "echo MEMALLOC=$(cat /sys/module/nbd/parameters/memalloc); "
        "echo LIVEPATCH=$(cat /sys/kernel/livepatch/swapnbd_nothrottle/enabled 2>/dev/null); "
        "dmesg | grep swapnbd; poweroff -f"
    )
    seen = {}
    for arm in arms.ARMS:
        img = image.build_guest(series, payload_dir=vm_payload, arm=arm)
        assert img.identity["route"] == "stock" and img.identity["arm"] == arm
        assert img.identity["patch_hash"] and img.identity["config_hash"]
        words = " ".join(img.cmdline_extra)
        console, _ = boot(img, f'quiet {words} swapnbd.init=/bin/sh -- -c "{check}"')
        seen[arm] = (img.kernel, console)
    assert seen["patched"][0] == seen["vanilla"][0], "both arms must boot the same vmlinuz"
    patched, vanilla = seen["patched"][1], seen["vanilla"][1]
    assert "MEMALLOC=Y" in patched and "LIVEPATCH=\n" in patched
    assert "swapnbd switch memalloc=1" in patched
    assert "throttle_direct_reclaim() never throttles" not in patched
    assert "MEMALLOC=N" in vanilla and "LIVEPATCH=1" in vanilla
    assert "swapnbd switch memalloc=0" in vanilla
    assert "swapnbd: pfmemalloc_throttle=0: throttle_direct_reclaim() never throttles" in vanilla


@pytest.mark.vm
def test_switch_patches_compile_in_the_real_6_1_tree() -> None:
    """The built-kernel route's mechanism in CI time: the patched objects compile.

    A full build takes 20+ minutes here; this compiles mm/vmscan.o and
    drivers/block/nbd.o of the 6.1 SLAB variant in its cached tree (the prepare
    stage plus two objects), and checks both switches are in the objects.
    """
    variant = arms.VARIANTS["6.1-slab"]
    version = kernel.resolve_kernel("6.1", "cloud").version
    cache = image.default_cache_dir()
    job = Progress(1, lambda line: print(line, flush=True))
    with job.step("compile the switched objects", 300.0) as step:
        out = kbuild.compile_objects(
            variant,
            version,
            cache,
            ["mm/vmscan.o", "drivers/block/nbd.o"],
            downloads=cache / "sources",
            step=step,
        )
    config = (out / ".config").read_text()
    assert "CONFIG_SLAB=y" in config and "CONFIG_BLK_DEV_NBD=y" in config
    nm = shutil.which("nm")
    assert nm is not None, "nm is missing: apt-get install binutils"
    vmscan = subprocess.run(
        [nm, str(out / "mm" / "vmscan.o")], capture_output=True, text=True, check=True
    ).stdout
    nbd = subprocess.run(
        [nm, str(out / "drivers" / "block" / "nbd.o")], capture_output=True, text=True, check=True
    ).stdout
    assert "__param_pfmemalloc_throttle" in vmscan
    assert "pfmemalloc_throttle_report" in vmscan
    assert "__param_memalloc" in nbd


@pytest.mark.parametrize(
    ("arm", "proof", "ok", "why"),
    [
        (
            "vanilla",
            {"nbd.memalloc": "N", "livepatch.swapnbd_nothrottle": "1"},
            True,
            "throttle off (livepatch)",
        ),
        ("vanilla", {"nbd.memalloc": "N", "pfmemalloc_throttle": "N"}, True, "=N)"),
        (
            "vanilla",
            {"nbd.memalloc": "Y", "livepatch.swapnbd_nothrottle": "1"},
            False,
            "memalloc reads 'Y'",
        ),
        (
            "vanilla",
            {"nbd.memalloc": None, "livepatch.swapnbd_nothrottle": None},
            False,
            "memalloc reads None",
        ),
        (
            "vanilla",
            {"nbd.memalloc": "N", "livepatch.swapnbd_nothrottle": None},
            False,
            "throttle is still on",
        ),
        (
            "patched",
            {"nbd.memalloc": "Y", "livepatch.swapnbd_nothrottle": None},
            True,
            "memalloc Y",
        ),
        ("patched", {"nbd.memalloc": "Y", "pfmemalloc_throttle": "Y"}, True, "memalloc Y"),
        ("patched", {}, True, "as shipped"),
        ("patched", {"nbd.memalloc": "N"}, False, "memalloc reads N"),
        (
            "patched",
            {"nbd.memalloc": "Y", "livepatch.swapnbd_nothrottle": "1"},
            False,
            "throttle is off",
        ),
        ("patched", None, False, "no arm proof"),
    ],
)
def test_arm_in_effect(arm: str, proof: dict[str, str | None] | None, ok: bool, why: str) -> None:
    verdict, reason = arms.arm_in_effect(arm, proof)
    assert verdict is ok
    assert why in reason
    # The guest nests the values under "switches", beside its cmdline words and dmesg lines.
    if proof is not None:
        nested = {"switches": proof, "cmdline": [], "dmesg": []}
        assert arms.arm_in_effect(arm, nested) == (verdict, reason)


def test_mirror_flag_reaches_the_image_builder_and_is_checked() -> None:
    """``--mirror`` overrides the host's apt sources; a bad one gets a clear error, exit 3."""
    done = subprocess.run(
        [sys.executable, "-m", "vm.cli", "image", "--kernel", "6.1", "--mirror", "mirror.invalid"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 3, done.stderr
    assert "mirror 'mirror.invalid' is not a URL; give one like http://HOST/debian" in done.stderr


def test_a_compile_time_revert_proves_itself_by_its_log_line() -> None:
    line = "[    1.9] nbd: swapnbd compile-time revert of the 2012 memalloc marking"
    proof = {"switches": {"nbd.memalloc": None}, "dmesg": [line]}
    assert arms.arm_in_effect("vanilla", proof, reverted=True) == (
        True,
        "vanilla in effect: the series is reverted at compile time",
    )
    ok, why = arms.arm_in_effect("vanilla", {"switches": {}, "dmesg": []}, reverted=True)
    assert not ok and "no revert line" in why
    ok, why = arms.arm_in_effect("patched", proof, reverted=True)
    assert not ok and "reverted at compile time" in why
    # Without the revert flag the same guest is not vanilla: it has no switches.
    assert arms.arm_in_effect("vanilla", proof)[0] is False


@pytest.mark.parametrize("arm", ["patched", "vanilla"])
def test_an_own_kernel_without_switches_runs_as_built_on_the_users_word(arm: str) -> None:
    """``--kernel PATH`` to a kernel that knows neither switch (a 6.1.192 built by hand
    with the series reverted was called "patched ... as shipped" and its vanilla run an
    error): either arm runs, and the reason says the arm is the user's word."""
    for proof in ({"switches": {}, "cmdline": [], "dmesg": []}, {"nbd.memalloc": None}):
        assert arms.arm_in_effect(arm, proof, own=True) == (
            True,
            f"{arm} as built: this kernel has neither switch, so the arm is the user's "
            f"word (--arm {arm}), not read back",
        )
    # An own kernel that has the switches is held to them like any other.
    ok, why = arms.arm_in_effect(arm, {"nbd.memalloc": "Y", "pfmemalloc_throttle": "Y"}, own=True)
    assert (ok, arm) in ((True, "patched"), (False, "vanilla"))
    assert ("memalloc Y" if arm == "patched" else "memalloc reads 'Y'") in why
    # Still no proof at all is an error: the guest failed before reading anything.
    assert arms.arm_in_effect(arm, None, own=True)[0] is False
