"""ansible/ is lint-clean at the production profile, every playbook parses, units verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import ANSIBLE_DIR, PLAYBOOKS, ansible_env, run, tool

LAB_EXTRA = "pip install 'swapnbd[lab]' (./dev setup does)"


def test_yamllint_is_clean() -> None:
    done = run([tool("yamllint", LAB_EXTRA), "--strict", "."])
    assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_lint_passes_the_production_profile() -> None:
    done = run(
        [tool("ansible-lint", LAB_EXTRA), "--nocolor", "--profile", "production"], timeout=900
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Profile 'production' was required, and it passed" in out, out


@pytest.mark.parametrize("playbook", PLAYBOOKS)
@pytest.mark.parametrize("inventory", ["local", "lab"])
def test_playbook_syntax(playbook: str, inventory: str) -> None:
    done = run(
        [
            tool("ansible-playbook", LAB_EXTRA),
            "--syntax-check",
            "-i",
            f"inventories/{inventory}/hosts.yml",
            playbook,
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"playbook: {playbook}" in done.stdout


def test_every_role_declares_its_arguments() -> None:
    roles = sorted(p.name for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())
    assert roles == ["nbd_server", "nbd_swap_client", "swapnbd_runner", "swapstress"]
    for role in roles:
        specs = (ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml").read_text()
        defaults = (ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text()
        for line in defaults.splitlines():
            if line and not line.startswith(("#", " ", "-")) and ":" in line:
                name = line.split(":", 1)[0]
                assert name.startswith(role + "_"), f"{role}: variable {name} lacks the role prefix"
                assert f"      {name}:" in specs, (
                    f"{role}: {name} is not in meta/argument_specs.yml"
                )


def render(template: str, dest: Path, *extra_vars: str) -> None:
    """Render a role's template with the role's defaults and vars, through Ansible itself."""
    role = template.split("/")[1]
    done = run(
        [
            tool("ansible", LAB_EXTRA),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={template} dest={dest} mode=0644",
            "-e",
            f"@roles/{role}/defaults/main.yml",
            "-e",
            f"@roles/{role}/vars/main.yml",
            "-e",
            f"ansible_python_interpreter={tool('python', 'python3')}",
            *[w for v in extra_vars for w in ("-e", v)],
        ],
        env=ansible_env(SWAPNBD_LAB_STATE=str(dest.parent)),
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_shipped_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    nbd_serve = tool("nbd-serve", "pip install -e . (the swapnbd package)")
    tool("nbd-client", "apt-get install nbd-client")
    server = tmp_path / "nbd-serve.service"
    client = tmp_path / "swapnbd-nbd-swap.service"
    render("roles/nbd_server/templates/nbd-serve.service.j2", server, f"nbd_server_bin={nbd_serve}")
    render(
        "roles/nbd_swap_client/templates/swapnbd-nbd-swap.service.j2",
        client,
        "nbd_swap_client_server_host=192.0.2.1",
    )
    assert f"ExecStart={nbd_serve} --config /etc/swapnbd/nbd-serve.toml" in server.read_text()
    assert "swapnbd_nbdswap.py up --config /etc/swapnbd/nbd-swap-client.json" in client.read_text()
    done = run([analyze, "verify", str(server), str(client)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # verify is silent when the units are fine; anything it prints is a finding.
    assert (done.stdout + done.stderr).strip() == ""
