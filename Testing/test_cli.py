"""The ``ctreasoner`` dispatcher: every command is reachable, ``--help`` shows its own options, errors stay clean."""
import pytest

from CTReasonerLib.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"ctreasoner {command}" in out
    # Each command adds at least one argument of its own beyond -h.
    assert out.count("\n  ") > 1 or "positional arguments" in out


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_user_error_is_one_clean_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err and "Traceback" not in err
