"""Client library behaviour against real stdio backends: version check, background calls, timeouts,
reconnect after the server is killed (re-sending the image), heartbeat, and ending the whole process tree."""
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import CTReasonerLib.client.client as client_module
from CTReasonerLib.client import (CallTimeoutError, CTReasonerClient, ServerConnectionError, VersionMismatchError)
from CTReasonerLib.client.spec import PROTOCOL_VERSION
from CTReasonerLib.client.transports import StdioTransport
from fixtures_server import (MODEL_ARGS, REPO, SERVE, SERVER_ENV, STARTUP_TIMEOUT_S, phantom_slice, phantom_stack,
                             pid_alive, stdio_client, wait_until)

pytestmark = pytest.mark.slow


def test_client_imports_without_torch():
    code = ("import sys, CTReasonerLib.client, CTReasonerLib.client.client; "
            "assert 'torch' not in sys.modules, 'the client must not import torch'")
    assert subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=SERVER_ENV, timeout=120).returncode == 0


def test_version_mismatch_names_both_versions(monkeypatch):
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", "99.0")
    client = stdio_client()
    try:
        with pytest.raises(VersionMismatchError) as caught:
            client.connect(wait_for_model=False)
        assert "99.0" in str(caught.value) and f"server speaks {PROTOCOL_VERSION}" in str(caught.value)
    finally:
        client.close()


def test_connecting_to_a_missing_executable_is_a_clear_error():
    client = CTReasonerClient.local(python="/nonexistent/python3", heartbeat_interval=0)
    with pytest.raises(ServerConnectionError, match="could not start the backend"):
        client.connect()
    client.close()


@pytest.fixture(scope="module")
def client():
    client = stdio_client()
    client.connect()
    yield client
    client.close()


def test_background_call_with_callback(client):
    image_id = client.set_image(phantom_slice(48), k=2)
    finished = threading.Event()
    outcome = {}

    def on_done(result, error):
        outcome.update(result=result, error=error, thread=threading.current_thread().name)
        finished.set()

    call = client.run_in_background(client.chat, image_id, "segment the liver", callback=on_done)
    assert finished.wait(120)
    assert outcome["error"] is None and outcome["result"].image_id == image_id
    assert outcome["thread"].startswith("ctreasoner-call") and call.done()


def test_timeout_gives_a_clear_message_and_cancels_the_job(client):
    volume_id = client.set_volume(phantom_stack(20, 48, first_seed=8000))   # fresh pixels: each slice takes time
    with pytest.raises(CallTimeoutError, match="did not answer 'propagate' within"):
        client.propagate(volume_id, 0, organ="liver", seed_mask=np.ones((48, 48), bool), direction="up",
                         timeout=0.2)
    assert wait_until(lambda: client.ping()["active_jobs"] == 0, timeout=60)


def test_reconnect_after_the_server_is_killed_re_sends_the_image():
    states = []
    client = stdio_client(on_state=lambda state, detail: states.append(state),
                          reconnect_window=STARTUP_TIMEOUT_S)
    try:
        client.connect()
        image_id = client.set_image(phantom_slice(48, seed=1), k=0)
        first_pid = client._transport.pid
        os.killpg(first_pid, signal.SIGKILL)
        assert wait_until(lambda: "lost" in states, timeout=30)
        reply = client.refine(image_id, points=[[20, 20]], labels=[1], organ="liver")
        assert reply.mask.mask.shape == (48, 48)
        assert client._transport.pid != first_pid and "reconnecting" in states
        assert not pid_alive(first_pid)
    finally:
        client.close()


def test_heartbeat_notices_a_dead_server_and_reconnects():
    states = []
    client = stdio_client(heartbeat_interval=0.3, ping_timeout=5.0, on_state=lambda s, d: states.append(s),
                          reconnect_window=STARTUP_TIMEOUT_S)
    try:
        client.connect(wait_for_model=False)
        first_pid = client._transport.pid
        os.killpg(first_pid, signal.SIGKILL)
        assert wait_until(lambda: states.count("ready") >= 2, timeout=STARTUP_TIMEOUT_S)
        assert client.connected and client._transport.pid != first_pid
    finally:
        client.close()


def test_close_ends_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "child.pid"
    # A launcher that leaves a grandchild behind (as a shell wrapper or conda run can) and then runs the server.
    launcher = ("import subprocess, sys, os; "
                f"child = subprocess.Popen(['sleep', '600']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
                f"os.execv(sys.executable, {[sys.executable] + SERVE[1:] + ['--stdio'] + MODEL_ARGS!r})")
    command = [sys.executable, "-c", launcher]
    client = CTReasonerClient(lambda: StdioTransport(command, env=SERVER_ENV, cwd=str(REPO)),
                              heartbeat_interval=0, connect_timeout=STARTUP_TIMEOUT_S)
    client.connect(wait_for_model=False)
    server_pid = client._transport.pid
    assert wait_until(pid_file.exists, timeout=30)
    child_pid = int(pid_file.read_text())
    assert pid_alive(child_pid)
    client.close()
    assert wait_until(lambda: not pid_alive(server_pid) and not pid_alive(child_pid), timeout=30)
