"""'Set up local backend': create a virtual environment and install the backend with its pinned torch.

Pure Python (no slicer, no Qt), so the command building and the cancellable runner are unit tested; the
Widget runs :func:`run_setup` on a worker thread and shows its output lines and progress.

The steps mirror ``scripts/setup_env.sh``: torch/torchvision first as a pair that imports together, then
sam2 built against that torch without build isolation and without its CUDA extension, then CTReasonerLib
with the ``backend`` extra. The pins live in :data:`PINNED_TORCH` / :data:`PINNED_SAM2`; a test checks they
match ``pyproject.toml``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import ConfigError, CTReasonerError

PINNED_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
PINNED_SAM2 = "sam2==1.1.0"
DEFAULT_PACKAGE = "ctreasoner[backend]"


@dataclass
class SetupStep:
    description: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)    # added to the inherited environment


def venv_python(venv_dir: str) -> str:
    """The interpreter inside a virtual environment (Scripts\\python.exe on Windows)."""
    if os.name == "nt":
        return os.path.join(venv_dir, "Scripts", "python.exe")
    return os.path.join(venv_dir, "bin", "python")


def backend_setup_steps(venv_dir: str, base_python: Optional[str] = None, package: str = DEFAULT_PACKAGE,
                        torch_index_url: Optional[str] = None,
                        pip_options: Sequence[str] = ()) -> List[SetupStep]:
    """The commands that build a backend environment in ``venv_dir``.

    base_python: interpreter that creates the venv (Python >= 3.9; not Slicer's own, whose venv would be tied
        to the Slicer install); default: this interpreter.
    package: what to install with the backend extra: ``"ctreasoner[backend]"``, a wheel, or a source folder
        (a folder gets ``[backend]`` appended and is installed editable).
    torch_index_url: e.g. ``https://download.pytorch.org/whl/cu124`` to pick a CUDA build.
    """
    if not venv_dir:
        raise ConfigError("choose a folder for the backend environment", "e.g. ~/CTReasoner-backend")
    python = venv_python(venv_dir)
    pip = [python, "-m", "pip", "--disable-pip-version-check", *pip_options]
    torch_args = list(PINNED_TORCH) + (["--index-url", torch_index_url] if torch_index_url else [])
    if os.path.isdir(package):
        install = ["install", "-e", os.path.abspath(package) + "[backend]"]
    else:
        install = ["install", package]
    return [
        SetupStep("create the virtual environment", [base_python or sys.executable, "-m", "venv", venv_dir]),
        SetupStep("update pip", pip + ["install", "--upgrade", "pip>=24", "setuptools", "wheel"]),
        SetupStep("install torch and torchvision (large download)", pip + ["install", *torch_args]),
        SetupStep("install sam2 against that torch", pip + ["install", "--no-build-isolation", PINNED_SAM2],
                  env={"SAM2_BUILD_CUDA": "0"}),
        SetupStep("install the CTReasoner backend", pip + install),
        SetupStep("check the backend", [python, "-m", "CTReasonerLib.cli", "serve", "--check"]),
    ]


class SetupCancelled(CTReasonerError):
    def __init__(self):
        super().__init__("backend setup was cancelled", "run it again to continue; finished steps are reused by pip")


def run_setup(steps: Sequence[SetupStep], on_output: Callable[[str], None] = print,
              on_step: Optional[Callable[[int, int, str], None]] = None,
              cancel_event: Optional[threading.Event] = None, poll_seconds: float = 0.2) -> None:
    """Run the steps in order, streaming their output; stop the running process when cancelled.

    Raises :class:`SetupCancelled`, or a ``CTReasonerError`` naming the failed step and its last output.
    """
    cancel_event = cancel_event or threading.Event()
    for index, step in enumerate(steps):
        if cancel_event.is_set():
            raise SetupCancelled()
        if on_step is not None:
            on_step(index, len(steps), step.description)
        on_output(f"$ {' '.join(step.argv)}")
        tail: List[str] = []
        try:
            process = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, **step.env}, bufsize=1)
        except OSError as exc:
            raise CTReasonerError(f"could not {step.description}: {exc}",
                                  "check the Python executable chosen for the backend") from None
        reader = threading.Thread(target=_pump, args=(process, on_output, tail), daemon=True)
        reader.start()
        while process.poll() is None:
            if cancel_event.wait(poll_seconds):
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                reader.join(timeout=5)
                raise SetupCancelled()
        reader.join(timeout=5)
        if process.returncode != 0:
            raise CTReasonerError(f"could not {step.description} (exit code {process.returncode})",
                                  "last output: " + " | ".join(tail[-5:]))
    if on_step is not None:
        on_step(len(steps), len(steps), "done")


def _pump(process, on_output, tail: List[str]) -> None:
    for line in process.stdout:
        line = line.rstrip()
        tail.append(line)
        del tail[:-20]
        on_output(line)
