import subprocess
import sys

import pytest

from sd2_ray import cli


def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_lists_every_command():
    res = subprocess.run([sys.executable, "-m", "sd2_ray.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for name in cli.COMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: sd2 {name}" in out
    assert "--config" in out and "key=value" in out, "every command is built"


def test_missing_config_file_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(["kit", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "missing.yaml" in err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_bad_yaml_and_unknown_field(capsys, tmp_path, name):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    code, _, err = run_cli([name, "--config", str(bad)], capsys)
    assert code == 2 and "invalid YAML" in err and err.strip().count("\n") == 0
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("definitely_not_a_field: 1\n")
    code, _, err = run_cli([name, "--config", str(unknown)], capsys)
    assert code == 2 and "definitely_not_a_field" in err and "unknown field" in err


def test_cli_help_imports_no_heavy_stack():
    code = (
        "import sys, sd2_ray.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
