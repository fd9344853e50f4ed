"""Helpers for the server/client tests: real backend subprocesses (stdio and HTTP) on a random tiny model.

Every wait is bounded by a deadline; every process started here is ended (with its process group).
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from CTReasonerLib.client import CTReasonerClient

REPO = Path(__file__).resolve().parents[1]
# One CPU thread per server process: the test machine is small and shared.
SERVER_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
SERVE = [sys.executable, "-m", "CTReasonerLib.cli", "serve"]
MODEL_ARGS = ["--model", "tiny-random", "--device", "cpu"]
STARTUP_TIMEOUT_S = 240.0


def phantom_slice(size: int = 64, seed: int = 0) -> np.ndarray:
    """(size, size) int16 HU: air, a soft-tissue body and a brighter 'organ' disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), -1000, np.int16)
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    image[body] = 40
    organ = (yy - 0.4 * size) ** 2 + (xx - 0.35 * size) ** 2 < (0.15 * size) ** 2
    image[organ] = 120
    return (image + rng.integers(-10, 10, image.shape)).astype(np.int16)


def phantom_stack(depth: int, size: int = 64, first_seed: int = 0) -> np.ndarray:
    """(depth, size, size) slices; distinct ``first_seed`` values give pixels no earlier call has seen
    (the server answers a repeated identical chat turn from its result cache, i.e. instantly)."""
    return np.stack([phantom_slice(size, seed=first_seed + k) for k in range(depth)])


class RecordingPipeline:
    """A stand-in for CTReasonerPipeline behind a real Engine (see ``ready_engine``): every chat finds a small
    liver, and every call is recorded as (method, (H, W) pixels, neighbours_hu), so a test sees exactly which
    neighbouring slices reached the model. ``neighbour_distance_mm`` None: a model that reads none."""

    def __init__(self, neighbour_distance_mm=None):
        self.neighbour_distance_mm = neighbour_distance_mm
        self.calls = []

    def encode_image(self, image_hu) -> bool:
        return False

    @staticmethod
    def _liver(image_hu, round_=1):
        from CTReasonerLib.results import MaskPrediction

        mask = np.zeros(np.shape(image_hu), bool)
        mask[2:6, 2:6] = True
        return MaskPrediction("liver", mask, 0.9, round=round_)

    def chat(self, image_hu, query, history=(), closer_look=None, score_threshold=None, return_probabilities=True,
             box_source=None, neighbours_hu=None):
        from CTReasonerLib.results import ChatResult

        self.calls.append(("chat", np.array(image_hu), neighbours_hu))
        return ChatResult(text="The liver is here.", routing_tokens=["[SEG]"], target_organ="liver",
                          masks=[self._liver(image_hu)])

    def closer_look(self, image_hu, roi_xyxy=None, mask=None, organ=None, query=None, neighbours_hu=None):
        from CTReasonerLib.results import ChatResult, CloserLookInfo

        self.calls.append(("closer_look", np.array(image_hu), neighbours_hu))
        return ChatResult(text="Closer.", target_organ=organ, masks=[self._liver(image_hu, 2)],
                          closer_look=CloserLookInfo(ran=True, roi_xyxy=np.array([0.0, 0.0, 8.0, 8.0]), organ=organ))


def ready_engine(pipeline):
    """A real server Engine, 'loaded' with ``pipeline`` (no model files, no torch model)."""
    from CTReasonerLib.server.engine import Engine

    engine = Engine("tiny-random")
    engine.pipeline, engine.state = pipeline, "ready"
    return engine


def stdio_client(extra_args=(), **client_options) -> CTReasonerClient:
    """A client that starts its own stdio backend (not yet connected)."""
    options = dict(timeout=120.0, connect_timeout=STARTUP_TIMEOUT_S, heartbeat_interval=0)
    options.update(client_options)
    command = SERVE + ["--stdio", *MODEL_ARGS, *extra_args]
    from CTReasonerLib.client.transports import StdioTransport
    return CTReasonerClient(lambda: StdioTransport(command, env=SERVER_ENV, cwd=str(REPO)), **options)


class HttpServer:
    """``ctreasoner serve --http`` on 127.0.0.1 and a free port, started in its own process group."""

    def __init__(self, extra_args=(), token_file=None, port=0, host="127.0.0.1"):
        command = SERVE + ["--http", "--host", host, "--port", str(port), *MODEL_ARGS, *extra_args]
        if token_file:
            command += ["--token-file", str(token_file)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=SERVER_ENV, cwd=str(REPO),
                                        start_new_session=True)
        self.log_lines = []
        self._address = threading.Event()
        self.url = None
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._address.wait(STARTUP_TIMEOUT_S):
            self.stop()
            raise RuntimeError("the HTTP server did not start:\n" + "\n".join(self.log_lines[-20:]))
        if self.url is None:
            raise RuntimeError("the HTTP server exited:\n" + "\n".join(self.log_lines[-20:]))

    def _read_log(self):
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.log_lines.append(line)
            match = re.search(r"listening on (http://\S+) ", line)
            if match:
                self.url = match.group(1)
                self._address.set()
        self._address.set()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_for_model(self, timeout=STARTUP_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("model ready" in line for line in self.log_lines):
                return
            if any("model load failed" in line for line in self.log_lines):
                raise RuntimeError("\n".join(self.log_lines[-20:]))
            time.sleep(0.1)
        raise RuntimeError("model did not load in time")

    def kill(self):
        """Simulate a crash: SIGKILL the whole group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_until(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
