"""Security settings at load time: TLS flags and files, allow-lists, export-name rules, and
the startup warnings (non-loopback bind without protection, swap under TLS). Errors must
name what was wrong; the command line exits 2 on them."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from nbdserver.config import ExportConfig, ServerConfig, build_config
from nbdserver.errors import ConfigError
from nbdserver.exposure import is_loopback, startup_warnings
from nbdserver.negotiation import TlsMode
from nbdserver.tls import server_context
from server.nbdtest import NBD_SERVE
from server.tlscerts import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return {"config": str(path)}


MEM = {"memory": "1M"}


# --- TLS flags -----------------------------------------------------------------------
def test_tls_defaults_off() -> None:
    config = build_config(dict(MEM))
    assert config.tls is TlsMode.OFF and config.tls_cert is None


def test_tls_needs_cert_and_key() -> None:
    with pytest.raises(ConfigError, match=r"--tls require needs --tls-cert and --tls-key"):
        build_config({**MEM, "tls": "require"})
    with pytest.raises(ConfigError, match=r"--tls on needs --tls-key"):
        build_config({**MEM, "tls": "on", "tls_cert": "c.pem"})


def test_cert_flags_without_tls_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"--tls-ca given but TLS is off"):
        build_config({**MEM, "tls_ca": "ca.pem"})


def test_tls_in_toml(tmp_path: Path) -> None:
    config = build_config(
        toml(
            tmp_path,
            'tls = "on"\ntls_cert = "c.pem"\ntls_key = "k.pem"\ntls_ca = "ca.pem"\n'
            '[[exports]]\nsize = "1M"\n',
        )
    )
    assert (config.tls, config.tls_cert, config.tls_key, config.tls_ca) == (
        TlsMode.ON,
        "c.pem",
        "k.pem",
        "ca.pem",
    )
    # The flag overrides the file.
    assert build_config({**toml(tmp_path, 'tls = "on"\ntls_cert = "c"\ntls_key = "k"\n'
                                '[[exports]]\nsize = "1M"\n'), "tls": "require"}).tls is (
        TlsMode.REQUIRE
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"tls = 'yes'; choose one of off, on, require"):
        build_config(toml(tmp_path, 'tls = "yes"\n[[exports]]\nsize = "1M"\n'))


# --- certificate files -----------------------------------------------------------------
def test_server_context_from_good_files(pki: Pki) -> None:
    ctx = server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    assert ctx.verify_mode.name == "CERT_REQUIRED"
    assert ctx.minimum_version.name == "TLSv1_2"
    assert server_context(str(pki.server_cert), str(pki.server_key)).verify_mode.name == (
        "CERT_NONE"
    )


def test_bad_certificate_files_are_named(pki: Pki, tmp_path: Path) -> None:
    cert, key = str(pki.server_cert), str(pki.server_key)
    missing = str(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    other_key = str(pki.client_dir / "client-key.pem")
    cases = [
        ((missing, key, None), f"TLS certificate file '{missing}' does not exist"),
        ((cert, missing, None), f"TLS key file '{missing}' does not exist"),
        ((str(junk), key, None), f"TLS certificate file '{junk}' holds no PEM certificate"),
        ((cert, str(junk), None), f"TLS key file '{junk}' holds no PEM private key"),
        ((cert, other_key, None), f"cannot use TLS certificate '{cert}' with key '{other_key}'"),
        ((cert, key, missing), f"TLS CA file '{missing}' does not exist"),
        ((cert, key, str(junk)), f"TLS CA file '{junk}' holds no PEM certificate"),
        ((cert, str(tmp_path), None), f"TLS key file '{tmp_path}' is a directory"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError) as info:
            server_context(*args)
        assert message in str(info.value), (args, str(info.value))


def test_encrypted_key_is_refused_without_prompting(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "enc-key.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x",
         "-out", str(encrypted)],
        check=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="is encrypted"):
        server_context(str(pki.server_cert), str(encrypted))


def run_cli(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [NBD_SERVE, *args], capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL
    )


def test_cli_bad_key_path_exits_2_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing-key.pem"
    proc = run_cli(
        "--tls", "require", "--tls-cert", str(pki.server_cert), "--tls-key", str(missing),
        "--port", "0", "--memory", "1M",
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"nbd-serve: error: TLS key file '{missing}' does not exist" in proc.stderr.decode()


# --- allow-lists -------------------------------------------------------------------------
def test_allow_list_parsing(tmp_path: Path) -> None:
    config = build_config(
        toml(tmp_path, '[[exports]]\nsize = "1M"\nallow = ["127.0.0.1", "10.0.0.0/8", "::1"]\n')
    )
    assert config.exports[0].allow == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    cli = build_config({**MEM, "allow": ["127.0.0.1,127.0.0.3", "192.168.0.0/16"]})
    assert [str(n) for n in cli.exports[0].allow or ()] == [
        "127.0.0.1/32",
        "127.0.0.3/32",
        "192.168.0.0/16",
    ]
    assert build_config(dict(MEM)).exports[0].allow is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["10.1.2.3/8"]', r"'10.1.2.3/8' is not an IP .*did you mean 10.0.0.0/8\?"),
        ('["example.com"]', r"'example.com' is not an IP address"),
        ("[]", r"allow = \[\] admits no client"),
        ('"127.0.0.1"', r"allow = '127.0.0.1' is not a list"),
    ],
)  # fmt: skip
def test_allow_list_errors(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(toml(tmp_path, f'[[exports]]\nsize = "1M"\nallow = {value}\n'))


def test_allow_flag_needs_an_export() -> None:
    with pytest.raises(ConfigError, match="--allow describe the export"):
        build_config({"allow": ["127.0.0.1"]})


# --- export names --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ('"a\\u0000b"', "contains a NUL character"),
        ('"' + "x" * 4097 + '"', "4097 bytes long; the NBD protocol allows at most 4096"),
        ('"' + "é" * 2049 + '"', "4098 bytes long"),
    ],
)
def test_export_name_rules(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config(toml(tmp_path, f'[[exports]]\nname = {name}\nsize = "1M"\n'))
    assert "[[exports]] #1: export" in str(info.value)


def test_longest_legal_name_is_accepted(tmp_path: Path) -> None:
    config = build_config(toml(tmp_path, f'[[exports]]\nname = "{"x" * 4096}"\nsize = "1M"\n'))
    assert len(config.exports[0].name) == 4096


def test_cli_non_utf8_name_exits_2_naming_the_export() -> None:
    proc = run_cli(b"--name", b"disk\xff", b"--port", b"0", b"--memory", b"1M")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode()
    assert "command line: export 'disk\\udcff'" in err and "b'disk\\xff' is not valid UTF-8" in err


def test_description_rules_apply_too() -> None:
    with pytest.raises(ConfigError, match="description contains a NUL"):
        build_config({**MEM, "description": "a\0b"})


# --- startup warnings -------------------------------------------------------------------------
BASE = ServerConfig(exports=(ExportConfig(name="d", size=1),))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.2.15", False), ("example", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_bind_warning_only_when_exposed() -> None:
    exposed = replace(BASE, bind="0.0.0.0")
    (warning,) = startup_warnings(exposed)
    assert "'0.0.0.0', which is not loopback, without TLS" in warning and "['d']" in warning
    assert startup_warnings(BASE) == []  # loopback default
    assert startup_warnings(replace(exposed, tcp=False)) == []  # Unix socket only
    assert startup_warnings(replace(exposed, tls=TlsMode.REQUIRE)) == []
    guarded = ExportConfig(name="d", size=1, allow=(ipaddress.ip_network("10.0.0.0/8"),))
    assert startup_warnings(replace(exposed, exports=(guarded,))) == []


def test_swap_export_under_tls_warns() -> None:
    swap = replace(BASE, exports=(ExportConfig(name="s", size=1, swap=True),))
    assert startup_warnings(swap) == []  # no TLS, loopback: nothing to say
    (warning,) = startup_warnings(replace(swap, tls=TlsMode.ON))
    assert "'s' is marked swap = true and TLS is on" in warning and "deadlock" in warning


def test_swap_key_in_toml(tmp_path: Path) -> None:
    config = build_config(toml(tmp_path, '[[exports]]\nsize = "1M"\nswap = true\n'))
    assert config.exports[0].swap is True
    with pytest.raises(ConfigError, match="swap = 'yes' is not true or false"):
        build_config(toml(tmp_path, '[[exports]]\nsize = "1M"\nswap = "yes"\n'))
