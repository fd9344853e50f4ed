"""One module per ``ctreasoner`` command (see ``CTReasonerLib/cli.py``), and the checks they share."""


def require_new_output_folder(out, what: str) -> None:
    """Refuse an output folder that already holds files, so a command never overwrites earlier work."""
    from pathlib import Path

    from ..errors import ConfigError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} is not empty", f"choose a new folder for the {what}")
