"""``--kernel-tree DIR [--patch FILE]``: a kernel engineer's own tree, built with the guest
configuration and booted. Pure checks first (version, fingerprint, the linked copy the
patch goes to, refusals), then the real thing: the 6.1 source with one of the project's
switch patches, built on the minimal configuration and run, its switch read back inside
the guest and the tree left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from vm import cli
from vm.image import arms, image, kbuild, owntree
from vm.run.config import RunConfig

from .test_arms import debian_tarball
from .test_experiment import guest_cache, require_nbd_serve  # noqa: F401  (a fixture)

MAKEFILE = "VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 158\nEXTRAVERSION = -rc1\nNAME = x\n"


def fake_tree(root: Path) -> Path:
    """The few files of a kernel tree that are read before make runs."""
    tree = root / "linux"
    (tree / "drivers" / "block").mkdir(parents=True)
    (tree / "Makefile").write_text(MAKEFILE)
    (tree / "Kconfig").write_text("mainmenu x\n")
    (tree / "drivers" / "block" / "nbd.c").write_text("one\ntwo\nthree\n")
    (tree / "README").write_text("readme\n")
    return tree


def nbd_patch(path: Path, old: str = "two", new: str = "TWO") -> Path:
    path.write_text(
        "--- a/drivers/block/nbd.c\n+++ b/drivers/block/nbd.c\n"
        f"@@ -1,3 +1,3 @@\n one\n-{old}\n+{new}\n three\n"
    )
    return path


def git(tree: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


# --------------------------------------------------------------------------- pure


def test_the_version_comes_from_the_top_makefile(tmp_path: Path) -> None:
    assert owntree.tree_version(fake_tree(tmp_path)) == "6.1.158-rc1"


def test_a_directory_that_is_no_kernel_tree_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(owntree.TreeError, match=r"not a kernel source tree \(no top Makefile"):
        owntree.check_tree(tmp_path)


@pytest.mark.parametrize("rel", [".config", "include/config", "arch/x86/include/generated"])
def test_a_tree_built_in_place_is_refused_with_what_to_do(tmp_path: Path, rel: str) -> None:
    tree = fake_tree(tmp_path)
    (tree / rel).parent.mkdir(parents=True, exist_ok=True)
    if rel == ".config":
        (tree / rel).write_text("CONFIG_X=y\n")
    else:
        (tree / rel).mkdir()
    with pytest.raises(owntree.TreeError, match=rf"built in place \({rel}\).*make mrproper"):
        owntree.check_tree(tree)


def test_a_missing_patch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(owntree.TreeError, match=r"--patch .*nope\.diff: no such file"):
        owntree.check_tree(fake_tree(tmp_path), tmp_path / "nope.diff")


def test_a_plain_trees_fingerprint_follows_every_edit(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    first = owntree.fingerprint(tree)
    assert first["kind"] == "files"
    assert owntree.fingerprint(tree) == first
    (tree / "README").write_text("readme, longer\n")
    second = owntree.fingerprint(tree)
    assert second != first
    (tree / "new.c").write_text("")
    assert owntree.fingerprint(tree) not in (first, second)


def test_a_plain_trees_fingerprint_survives_a_second_unpack(tmp_path: Path) -> None:
    """Unpacked twice, a tree with a symlink has one fingerprint (tar restores the files'
    mtimes, not the links'); a link pointed elsewhere changes it."""
    tree = fake_tree(tmp_path / "a")
    (tree / "link").symlink_to("README")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as out:
        out.add(tree, arcname="linux")
    prints = []
    for where in ("b", "c"):
        with tarfile.open(archive) as packed:
            packed.extractall(tmp_path / where, filter="tar")
        prints.append(owntree.fingerprint(tmp_path / where / "linux"))
    assert prints[0] == prints[1]
    moved = tmp_path / "c" / "linux" / "link"
    moved.unlink()
    moved.symlink_to("Makefile")
    assert owntree.fingerprint(tmp_path / "c" / "linux") != prints[0]


def test_a_git_trees_fingerprint_is_its_commit_plus_what_is_not_committed(
    tmp_path: Path,
) -> None:
    tree = fake_tree(tmp_path)
    git(tree, "init", "-q")
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "one")
    clean = owntree.fingerprint(tree)
    assert clean["kind"] == "git" and len(clean["head"]) == 40 and clean["dirty"] == ""
    (tree / "drivers" / "block" / "nbd.c").write_text("edited\n")
    edited = owntree.fingerprint(tree)
    assert edited["head"] == clean["head"] and edited["dirty"] != ""
    (tree / "untracked.c").write_text("x\n")
    both = owntree.fingerprint(tree)
    assert both["dirty"] not in ("", edited["dirty"])
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "two")
    moved = owntree.fingerprint(tree)
    assert moved["head"] != clean["head"] and moved["dirty"] == ""


def test_the_patch_goes_to_a_linked_copy_and_the_tree_is_untouched(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    before = owntree.fingerprint(tree)
    copy = tmp_path / "work" / "src"
    log = tmp_path / "work" / "build.log"
    owntree.linked_copy(tree, copy, log)
    owntree.apply_patch(copy, nbd_patch(tmp_path / "p.diff"), log)
    assert (copy / "drivers/block/nbd.c").read_text() == "one\nTWO\nthree\n"
    assert (tree / "drivers/block/nbd.c").read_text() == "one\ntwo\nthree\n"
    assert owntree.fingerprint(tree) == before
    # Unchanged files are the tree's own (same inode: make sees them unchanged).
    assert (copy / "README").stat().st_ino == (tree / "README").stat().st_ino
    assert (copy / "drivers/block/nbd.c").stat().st_ino != (
        tree / "drivers/block/nbd.c"
    ).stat().st_ino


def test_a_patch_that_does_not_apply_is_a_clear_error(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    copy = tmp_path / "src"
    log = tmp_path / "build.log"
    owntree.linked_copy(tree, copy, log)
    bad = nbd_patch(tmp_path / "bad.diff", old="zwei", new="ZWEI")
    with pytest.raises(owntree.TreeError, match=r"--patch .*bad.diff does not apply.*log: "):
        owntree.apply_patch(copy, bad, log)
    assert (tree / "drivers/block/nbd.c").read_text() == "one\ntwo\nthree\n"


def test_the_image_key_follows_tree_patch_and_configuration(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    fp = owntree.fingerprint(tree)
    patch = nbd_patch(tmp_path / "p.diff")
    keys = {
        owntree.image_key(fp, None, "full", "slub"),
        owntree.image_key(fp, patch, "full", "slub"),
        owntree.image_key(fp, patch, "minimal", "slub"),
        owntree.image_key(fp, patch, "minimal", "slab"),
        owntree.image_key({**fp, "sha256": "0"}, patch, "minimal", "slab"),
    }
    assert len(keys) == 5
    assert owntree.image_key(fp, patch, "full", "slub") == owntree.image_key(
        fp, patch, "full", "slub"
    )


def test_a_cached_image_is_recorded_as_the_tree_the_user_gave(tmp_path: Path) -> None:
    """The cache key is the tree's content: a second copy of the same source finds the
    image the first one built, and run.json names the copy it was asked for, with the
    builder as ``built_from`` (a fresh-clone suite on a machine that kept its cache once
    recorded an earlier session's tree)."""
    from shutil import copytree

    from vm.image.progress import Progress

    first = fake_tree(tmp_path / "a")
    second = copytree(first, tmp_path / "b" / "linux", symlinks=True)
    key = owntree.image_key(owntree.fingerprint(first), None, "minimal", "slub")
    assert owntree.image_key(owntree.fingerprint(second), None, "minimal", "slub") == key
    final = tmp_path / "cache" / "kbuild" / "images" / key
    final.mkdir(parents=True)
    (final / "bzImage").write_bytes(b"kernel")
    (final / "config").write_text("CONFIG_X=y\n")
    meta = {"tree": str(first), "source": f"tree {first}", "patch": None, "version": "6.1.158"}
    (final / "kbuild.json").write_text(json.dumps(meta))
    with Progress(1, lambda _line: None).step("kernel", None) as step:
        again = owntree.build_tree(first, tmp_path / "cache", step, base="minimal")
        other = owntree.build_tree(second, tmp_path / "cache", step, base="minimal")
    assert again.meta == meta and again.bzimage == final / "bzImage"
    assert other.bzimage == final / "bzImage"
    assert (other.meta["tree"], other.meta["source"], other.meta["built_from"]) == (
        str(second.resolve()),
        f"tree {second.resolve()}",
        str(first),
    )


def test_the_minimal_base_adds_its_fragment_before_the_guests() -> None:
    names = [p.name for p in kbuild.base_fragments("minimal", "slub")]
    assert names == ["minimal.config", "guest.config", "slub.config"]
    assert [p.name for p in kbuild.base_fragments("full", "slab")] == [
        "guest.config",
        "slab.config",
    ]
    wanted = kbuild.parse_config((arms.KCONFIG_DIR / "minimal.config").read_text())
    for symbol in ("CONFIG_64BIT", "CONFIG_SMP", "CONFIG_KALLSYMS", "CONFIG_SERIO_I8042"):
        assert wanted[symbol] == "y", symbol


def test_resolve_tree_is_an_own_kernel_with_slub_by_default(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    choice = arms.resolve_tree(tree, None, None, "vanilla", "minimal")
    assert (choice.route, choice.arm, choice.allocator) == ("tree", "vanilla", "slub")
    assert choice.cmdline == ("nbd.memalloc=0", "pfmemalloc_throttle=0")
    with pytest.raises(arms.ArmError, match="unknown kernel config 'tiny'"):
        arms.resolve_tree(tree, None, None, "patched", "tiny")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--patch", "{tmp}/p.diff"], "--patch needs --kernel-tree"),
        (["--kernel-tree", "{tmp}/nowhere"], "--kernel-tree {tmp}/nowhere: no such directory"),
        (["--kernel-tree", "{tmp}", "--patch", "{tmp}/no.diff"], "--patch {tmp}/no.diff: no such"),
    ],
)
def test_bad_tree_flags_are_usage_errors_that_abort_a_bisect(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    nbd_patch(tmp_path / "p.diff")
    argv = ["run", "--bisect", "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in extra]
    assert cli.main(argv) == cli.BISECT_ABORT
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_the_config_records_the_tree_patch_and_base(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    patch = nbd_patch(tmp_path / "p.diff")
    args = cli.build_parser().parse_args(
        ["run", "--kernel-tree", str(tree), "--patch", str(patch), "--kernel-config", "minimal"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.kernel_tree, cfg.kernel_patch, cfg.kernel_config) == (tree, patch, "minimal")
    assert RunConfig(out=tmp_path).kernel_config == "full"


# --------------------------------------------------------------------------- real build and run


@pytest.fixture(scope="module")
def linux_6_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's whole linux-source-6.1, unpacked as a kernel engineer's clean tree."""
    root = tmp_path_factory.mktemp("own-tree")
    with tarfile.open(debian_tarball("6.1"), "r:xz") as archive:
        archive.extractall(root, filter="tar")
    (tree,) = root.iterdir()
    return tree


@pytest.mark.vm
def test_an_own_tree_with_a_switch_patch_builds_small_runs_and_reads_its_switch_back(
    tmp_path: Path,
    linux_6_1: Path,
    guest_cache: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 6.1 source plus the project's nbd memalloc switch (one small real change),
    built on the minimal configuration, booted, swapped on: the guest reads the new
    ``nbd.memalloc`` parameter back as Y, which only the patched build has."""
    require_nbd_serve()
    patch = arms.patch_files("6.1", ("nbd-memalloc-switch.patch",))[0]
    before = owntree.fingerprint(linux_6_1)
    nbd_c = (linux_6_1 / "drivers/block/nbd.c").read_bytes()
    out = tmp_path / "run"
    rc = cli.main([
        "run", "--bisect", "--kernel-tree", str(linux_6_1), "--patch", str(patch),
        "--kernel-config", "minimal", "--arm", "patched",
        "--memory", "128M", "--cpus", "2", "--workers", "8", "--total", "128M", "--loops", "1",
        "--server", "nbd-serve", "--accel", "tcg", "--lockup-after", "120",
        "--timeout", "1800", "--cache", str(guest_cache), "--out", str(out),
    ])  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["outcome"] == "completed", run["outcome_reason"]
    assert rc == cli.EXIT_OK
    kernel = run["kernel"]
    assert kernel["route"] == "tree"
    assert kernel["name"] == f"tree {linux_6_1}"
    assert kernel["tree"] == str(linux_6_1.resolve())
    assert kernel["version"] == owntree.tree_version(linux_6_1)
    assert kernel["config_base"] == "minimal"
    assert kernel["patch"] == str(patch.resolve())
    assert kernel["patches"] == ["nbd-memalloc-switch.patch"]
    assert kernel["fingerprint"] == before
    check = kernel["arm_check"]
    assert check["ok"] is True
    assert check["reason"] == "patched in effect: nbd memalloc Y"
    assert kernel["in_guest"]["switches"]["nbd.memalloc"] == "Y"
    assert run["swapstress"]["corrupt_pages"] == 0
    assert run["vmstat_delta"]["pswpout"] > 0
    # The tree is as it was: no patch, no .config, nothing built in it.
    assert owntree.fingerprint(linux_6_1) == before
    assert (linux_6_1 / "drivers/block/nbd.c").read_bytes() == nbd_c
    assert not (linux_6_1 / ".config").exists()
    built = Path(kernel["bzimage"])
    meta = json.loads((built.parent / "kbuild.json").read_text())
    config = (built.parent / "config").read_text()
    assert "CONFIG_BLK_DEV_NBD=y" in config and "# CONFIG_MODULES is not set" in config
    # Asked again, the image comes from the cache: the same file, not rebuilt.
    stamp = os.stat(built).st_mtime_ns
    again = image.build_guest(
        "6.1",
        cache_dir=guest_cache,
        progress=print,
        tree=linux_6_1,
        patch=patch,
        config_base="minimal",
    )
    assert again.kernel == built
    assert os.stat(built).st_mtime_ns == stamp
    assert json.loads((built.parent / "kbuild.json").read_text()) == meta
