"""The HTTP backend as a real uvicorn subprocess on 127.0.0.1 and a free port, with a bearer token."""
import http.client
import json
import secrets
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from CTReasonerLib.client import CallCancelledError, CTReasonerClient, ErrorCode, ServerError, encode_array
from CTReasonerLib.client.encoding import encode_mask
from CTReasonerLib.client.spec import NDJSON_CONTENT_TYPE, PROTOCOL_VERSION, SESSION_HEADER
from fixtures_server import (MODEL_ARGS, REPO, SERVE, SERVER_ENV, STARTUP_TIMEOUT_S, HttpServer, phantom_slice,
                             phantom_stack, wait_until)

pytestmark = pytest.mark.slow

MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("http") / "token"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(token_file):
    server = HttpServer(["--max-request-mb", "1", "--max-sessions", str(MAX_SESSIONS)], token_file=token_file)
    server.wait_for_model()
    yield server
    server.stop()


def new_client(server, token_file, **options) -> CTReasonerClient:
    options = dict(dict(timeout=120.0, connect_timeout=STARTUP_TIMEOUT_S, heartbeat_interval=0), **options)
    client = CTReasonerClient.http(server.url, token_file=str(token_file), **options)
    client.connect()
    return client


@pytest.fixture
def client(server, token_file):
    client = new_client(server, token_file)
    yield client
    client.close()


def post(server, body, token=None, session=None, accept="application/json"):
    """Raw POST /rpc -> (HTTP status, list of JSON lines)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/rpc", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": accept})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if session:
        request.add_header(SESSION_HEADER, session)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    return status, [json.loads(line) for line in text.splitlines() if line.strip()]


def rpc(method, params=None, request_id=1):
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def read_token(token_file):
    return token_file.read_text().strip()


def test_requests_without_or_with_a_wrong_token_are_refused(server, token_file):
    for token in (None, "wrong-" + read_token(token_file)):
        status, lines = post(server, rpc("initialize", {"protocol_version": PROTOCOL_VERSION}), token=token)
        assert status == 401 and lines[0]["error"]["code"] == ErrorCode.UNAUTHORIZED
    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with pytest.raises(ServerError) as caught:
        CTReasonerClient.http(server.url, token="not-the-token", heartbeat_interval=0).connect()
    assert caught.value.code == ErrorCode.UNAUTHORIZED


def test_binding_a_public_address_without_a_token_is_refused():
    environment = {k: v for k, v in SERVER_ENV.items() if k != "CTREASONER_TOKEN"}
    finished = subprocess.run(SERVE + ["--http", "--host", "0.0.0.0", "--port", "0", *MODEL_ARGS],
                              env=environment, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in finished.stderr


def test_handshake_and_every_slice_method(client):
    info = client.server_info
    assert info["transport"] == "http" and info["session_id"]
    assert info["model"]["segmenter"] and info["model"]["device"] == "cpu"
    assert info["model"]["neighbour_distance_mm"] is None and client.neighbour_distance_mm is None
    image_id = client.set_image(phantom_slice(48), k=3)
    reply = client.chat(image_id, "segment the spleen")
    assert all(m.mask.shape == (48, 48) for m in reply.result.masks)
    refined = client.refine(image_id, points=[[10, 12], [30, 30]], labels=[1, 0], organ="spleen")
    assert refined.mask.mask.shape == (48, 48)
    assert client.refine(image_id, points=[[11, 12]], labels=[1], use_previous_mask=True, organ="spleen").mask.mask.shape == (48, 48)
    assert client.closer_look(image_id, roi_xyxy=[4, 4, 30, 30], organ="spleen").result.closer_look.ran
    assert client.cancel("no-such-job") is False


def test_progress_streams_over_http_and_cancel_works(client):
    volume_id = client.set_volume(phantom_stack(4, 48))
    progress = []
    reply = client.propagate(volume_id, 1, organ="liver", seed_mask=np.ones((48, 48), bool), direction="up",
                             on_progress=lambda d, t, m: progress.append(d))
    assert 1 in reply.masks and progress and progress[-1] == 3
    long_volume = client.set_volume(phantom_stack(20, 48, first_seed=7000))   # fresh pixels: the model runs
    started = threading.Event()
    call = client.run_in_background(client.propagate, long_volume, 0, organ="liver",
                                    seed_mask=np.ones((48, 48), bool), direction="up",
                                    on_progress=lambda d, t, m: started.set())
    assert started.wait(60)
    call.cancel()
    with pytest.raises(CallCancelledError):
        call.result(timeout=60)


@pytest.mark.parametrize("accept", [NDJSON_CONTENT_TYPE, "application/json"])
def test_a_client_that_goes_away_cancels_its_job(server, token_file, accept):
    token = read_token(token_file)
    _, lines = post(server, rpc("initialize", {"protocol_version": PROTOCOL_VERSION}), token=token)
    session = lines[0]["result"]["session_id"]
    stack = phantom_stack(40, 48, first_seed=9000 if accept == NDJSON_CONTENT_TYPE else 9500)
    _, lines = post(server, rpc("set_volume", {"volume": encode_array(stack.astype(np.float32)),
                                               "geometry": {"ijk_to_ras": np.eye(4).tolist()}}),
                    token=token, session=session)
    volume_id = lines[-1]["result"]["volume_id"]
    job_id = f"walk-away-{accept.split('/')[-1]}"
    body = json.dumps(rpc("propagate", {"volume_id": volume_id, "seed_k": 0, "organ": "liver", "direction": "up",
                                        "seed_mask": encode_mask(np.ones((48, 48), bool)), "job_id": job_id}))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/rpc", body=body, headers={
        "Content-Type": "application/json", "Accept": accept, "Authorization": f"Bearer {token}",
        SESSION_HEADER: session})
    if accept == NDJSON_CONTENT_TYPE:
        response = connection.getresponse()
        assert json.loads(response.readline())["method"] == "progress"   # the job is running
    else:
        assert wait_until(lambda: post(server, rpc("ping"), token=token)[1][-1]["result"]["active_jobs"] == 1)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_until(lambda: any(f"cancelling job {job_id}" in line for line in server.log_lines))
    assert wait_until(lambda: post(server, rpc("ping"), token=token)[1][-1]["result"]["active_jobs"] == 0)
    post(server, rpc("shutdown"), token=token, session=session)


def test_plain_json_answer_without_ndjson_accept(server, token_file):
    status, lines = post(server, rpc("initialize", {"protocol_version": PROTOCOL_VERSION}), token=read_token(token_file))
    assert status == 200 and len(lines) == 1
    session = lines[0]["result"]["session_id"]
    status, lines = post(server, rpc("ping"), token=read_token(token_file), session=session, accept=NDJSON_CONTENT_TYPE)
    assert status == 200 and lines[-1]["result"]["model_state"] == "ready"
    post(server, rpc("shutdown"), token=read_token(token_file), session=session)


def test_malformed_requests_over_http(server, token_file):
    token = read_token(token_file)
    status, lines = post(server, rpc("initialize", {"protocol_version": PROTOCOL_VERSION}), token=token)
    session = lines[0]["result"]["session_id"]
    cases = [
        (b"{broken", ErrorCode.PARSE_ERROR),
        (b'"just a string"', ErrorCode.INVALID_REQUEST),
        (rpc("no_such_method"), ErrorCode.METHOD_NOT_FOUND),
        (rpc("set_image", {"image": {"dtype": "int16", "shape": [4, 4], "data": "AAAA"}}), ErrorCode.INVALID_PARAMS),
        (rpc("chat", {"image_id": "nope", "message": "liver"}), ErrorCode.UNKNOWN_IMAGE),
        (rpc("initialize", {"protocol_version": "7.0"}), ErrorCode.VERSION_MISMATCH),
    ]
    for body, code in cases:
        status, lines = post(server, body, token=token, session=session)
        assert status == 200 and lines[-1]["error"]["code"] == code, (body, lines)
    status, lines = post(server, rpc("ping"), token=token, session="forged-session")
    assert lines[-1]["result"]["model_state"] == "ready"     # ping needs no session
    status, lines = post(server, rpc("cancel", {"job_id": "x"}), token=token, session="forged-session")
    assert lines[-1]["error"]["code"] == ErrorCode.UNKNOWN_SESSION
    big = rpc("set_image", {"image": encode_array(np.zeros((1024, 1024), np.int16))})
    status, lines = post(server, big, token=token, session=session)
    assert status == 413 and lines[0]["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE
    status, lines = post(server, rpc("ping"), token=token, session=session)
    assert status == 200 and lines[0]["result"]["model_state"] == "ready"
    post(server, rpc("shutdown"), token=token, session=session)


def test_client_refuses_an_oversized_request_before_sending(client):
    with pytest.raises(ServerError) as caught:
        client.set_image(np.zeros((1024, 1024), np.int16))
    assert caught.value.code == ErrorCode.PAYLOAD_TOO_LARGE and "at most 1.0 MiB" in caught.value.message
    assert client.ping()["model_state"] == "ready"


def test_concurrent_clients_keep_their_own_state(server, token_file):
    clients = [new_client(server, token_file) for _ in range(2)]
    outcomes, errors = {}, []

    def work(index):
        try:
            client = clients[index]
            image_id = client.set_image(phantom_slice(48, seed=10 + index), k=index)
            for _ in range(3):
                client.refine(image_id, points=[[10 + index, 10]], labels=[1], organ="liver")
            outcomes[index] = (image_id, client.server_info["session_id"])
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    try:
        assert not errors and len(outcomes) == 2
        (image_a, session_a), (image_b, session_b) = outcomes[0], outcomes[1]
        assert session_a != session_b and image_a != image_b
        # B never uploaded A's image: the server must not serve it to B (and B cannot re-send it).
        with pytest.raises(ServerError) as caught:
            clients[1].call("refine", {"image_id": image_a, "points": [[5, 5]], "labels": [1]})
        assert caught.value.code == ErrorCode.UNKNOWN_IMAGE
        with pytest.raises(ServerError) as caught:   # B has no previous mask on its own image for 'spleen'
            clients[1].refine(image_b, use_previous_mask=True, organ="spleen")
        assert caught.value.code == ErrorCode.INVALID_PARAMS
    finally:
        for client in clients:
            client.close()


def test_session_cap(server, token_file):
    clients = []
    try:
        with pytest.raises(ServerError) as caught:
            for _ in range(MAX_SESSIONS + 1):
                clients.append(new_client(server, token_file, auto_reconnect=False))
        assert caught.value.code == ErrorCode.SESSION_LIMIT
        assert len(clients) <= MAX_SESSIONS
    finally:
        for client in clients:
            client.close()


def test_lost_session_is_renewed_and_the_image_re_sent(server, token_file, client):
    # with its neighbours: re-sent without them it would be another image, and the refine below would fail
    neighbours = phantom_stack(2, 48, first_seed=40)
    image_id = client.set_image(phantom_slice(48, seed=3), k=0, neighbours=neighbours)
    assert image_id != client.set_image(phantom_slice(48, seed=3), k=0)
    old_session = client.server_info["session_id"]
    # The server forgets the session (as after the idle timeout or a restart).
    post(server, rpc("shutdown"), token=read_token(token_file), session=old_session)
    reply = client.refine(image_id, points=[[20, 20]], labels=[1], organ="liver")
    assert reply.mask.mask.shape == (48, 48)
    assert client.server_info["session_id"] != old_session


def test_reconnect_after_the_server_is_killed(token_file, tmp_path):
    first = HttpServer(token_file=token_file)
    client = None
    try:
        first.wait_for_model()
        client = CTReasonerClient.http(first.url, token_file=str(token_file), heartbeat_interval=0,
                                       connect_timeout=STARTUP_TIMEOUT_S, reconnect_window=STARTUP_TIMEOUT_S)
        client.connect()
        image_id = client.set_image(phantom_slice(48, seed=4), k=0)
        port = first.port
        first.kill()
        second = HttpServer(token_file=token_file, port=port)
        try:
            second.wait_for_model()
            reply = client.refine(image_id, points=[[20, 20]], labels=[1], organ="liver")
            assert reply.mask.mask.shape == (48, 48)
        finally:
            second.stop()
    finally:
        if client is not None:
            client.close()
        first.stop()
