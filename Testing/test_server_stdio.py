"""The stdio backend as a real subprocess (``ctreasoner serve --stdio --model tiny-random``).

One server per module for the method tests (through the client library), and one raw-pipe server for
malformed requests, which the client library would never send.
"""
import base64
import json
import subprocess
import threading
import time

import numpy as np
import pytest

from CTReasonerLib.client import (CallCancelledError, ErrorCode, PayloadError, ServerError, encode_array,
                                  encode_mask)
from CTReasonerLib.client.spec import PROTOCOL_VERSION
from fixtures_server import (MODEL_ARGS, REPO, SERVE, SERVER_ENV, STARTUP_TIMEOUT_S, phantom_slice, phantom_stack,
                             stdio_client, wait_until)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    client = stdio_client()
    client.connect(wait_for_model=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image_id(client):
    return client.set_image(phantom_slice(64), ijk_to_ras=np.diag([0.8, 0.8, 2.5, 1.0]), k=7, window=(40, 400))


def test_handshake_describes_model_and_capabilities(client):
    info = client.server_info
    assert info["protocol_version"] == PROTOCOL_VERSION and info["transport"] == "stdio"
    model = info["model"]
    for key in ("model_id", "backbone", "segmenter", "device", "dtype"):
        assert model[key], key
    assert model["device"] == "cpu" and model["dtype"] == "float32"
    # the tiny model has no pixel network: it reads no neighbouring slices, so clients send none
    assert "neighbour_distance_mm" in model and model["neighbour_distance_mm"] is None
    assert client.neighbour_distance_mm is None
    assert set(info["capabilities"]["methods"]) >= {"initialize", "set_image", "chat", "refine", "closer_look",
                                                    "propagate", "cancel", "ping", "shutdown"}
    assert client.ping()["model_state"] == "ready"


def test_set_image_is_content_addressed_and_cached(client, image_id):
    geometry = {"ijk_to_ras": np.diag([0.8, 0.8, 2.5, 1.0]).tolist(), "k": 7}
    again = client.call("set_image", {"image": encode_array(phantom_slice(64)), "geometry": geometry})
    assert again["image_id"] == image_id and again["embedding"] == "cached"
    as_float = client.set_image(phantom_slice(64).astype(np.float32), ijk_to_ras=np.diag([0.8, 0.8, 2.5, 1.0]), k=7)
    assert as_float == image_id            # the same HU values whatever the dtype
    # the same pixels on another slice are another image (own geometry), sharing the cached embedding
    elsewhere = client.call("set_image", {"image": encode_array(phantom_slice(64)), "geometry": {"k": 8}})
    assert elsewhere["image_id"] != image_id and elsewhere["embedding"] == "cached"
    assert client.set_image(phantom_slice(64, seed=5), k=7) != image_id


def test_chat_returns_decoded_masks_boxes_and_timings(client, image_id):
    reply = client.chat(image_id, "segment the liver and detect the spleen", closer_look=True,
                        return_probabilities=True)
    result = reply.result
    assert isinstance(result.text, str) and isinstance(result.raw_text, str)
    assert reply.geometry.k == 7 and reply.geometry.shape == (64, 64)
    np.testing.assert_allclose(reply.geometry.spacing, [0.8, 0.8, 2.5])
    for mask in result.masks:
        assert mask.mask.shape == (64, 64) and mask.mask.dtype == bool
        assert mask.probability is None or mask.probability.shape == (64, 64)
    for box in result.boxes:
        assert box.xyxy.shape == (4,) and 0 <= box.score <= 1
    assert result.timings_ms and all(v >= 0 for v in result.timings_ms.values())
    # one single-organ turn per organ comes back for the client's dialogue history
    assert [question for question, _ in result.turns] == ["Segment the liver.", "Detect the spleen."]
    assert " ".join(answer for _, answer in result.turns) == result.raw_text


def test_chat_raw_result_states_its_mask_encoding(client, image_id):
    raw = client.call("chat", {"image_id": image_id, "message": "where is the liver?", "history": [["hi", "hello"]],
                               "options": {"mask_encoding": "rle", "closer_look": False}})
    assert set(raw) >= {"text", "raw_text", "routing_tokens", "target_organ", "absent", "masks", "boxes",
                        "closer_look", "timings_ms"}
    assert all(m["mask"]["encoding"] == "rle" for m in raw["masks"])
    again = client.call("chat", {"image_id": image_id, "message": "where is the liver?", "history": [["hi", "hello"]],
                                 "options": {"mask_encoding": "rle", "closer_look": False}})
    assert set(again["timings_ms"]) == {"result_cache"}       # the identical turn is answered from the cache
    assert {k: v for k, v in again.items() if k != "timings_ms"} == {k: v for k, v in raw.items() if k != "timings_ms"}


def test_refine_clicks_box_and_previous_mask(client, image_id):
    first = client.refine(image_id, points=[[22, 25]], labels=[1], organ="liver")
    assert first.mask.mask.shape == (64, 64) and first.mask.mask.dtype == bool
    assert "refine" in first.timings_ms
    second = client.refine(image_id, points=[[40, 40]], labels=[0], use_previous_mask=True, organ="liver")
    assert second.mask.mask.shape == (64, 64)
    boxed = client.refine(image_id, box=[10, 12, 35, 38], organ="liver")
    assert boxed.mask.mask.shape == (64, 64)


def test_closer_look_on_an_explicit_roi(client, image_id):
    reply = client.closer_look(image_id, roi_xyxy=[8, 8, 40, 40], organ="liver")
    assert reply.result.closer_look.ran
    np.testing.assert_array_equal(reply.result.closer_look.roi_xyxy, [8, 8, 40, 40])
    assert all(m.mask.shape == (64, 64) and m.round == 2 for m in reply.result.masks)
    # on an image without an earlier liver mask, nothing is pasted outside the ROI
    fresh = client.set_image(phantom_slice(64, seed=9), k=1)
    reply = client.closer_look(fresh, roi_xyxy=[8, 8, 40, 40], organ="liver")
    for mask in reply.result.masks:
        outside = mask.mask.copy()
        outside[8:40, 8:40] = False
        assert not outside.any()


def test_propagate_streams_progress_and_returns_per_slice_masks(client):
    volume_id = client.set_volume(phantom_stack(6), ijk_to_ras=np.diag([0.8, 0.8, 2.5, 1.0]))
    seed_mask = np.zeros((64, 64), bool)
    seed_mask[20:35, 15:30] = True
    progress = []
    reply = client.propagate(volume_id, 2, organ="liver", seed_mask=seed_mask, direction="both",
                             slice_range=(1, 4), on_progress=lambda d, t, m: progress.append((d, t, m)))
    assert 2 in reply.masks and reply.masks[2].sum() == seed_mask.sum()
    assert set(reply.masks) <= {1, 2, 3, 4}
    assert all(mask.shape == (64, 64) for mask in reply.masks.values())
    assert progress and progress[0][1] == 4 and progress[-1][0] == progress[-1][1]
    assert reply.stopped


def test_cancel_a_running_propagation(client):
    # Fresh pixels: each slice's chat runs the model (~0.5 s here), so the cancel lands mid-job and is
    # honoured at the next slice boundary.
    volume_id = client.set_volume(phantom_stack(20, first_seed=5000))
    started = threading.Event()
    call = client.run_in_background(client.propagate, volume_id, 0, organ="liver",
                                    seed_mask=np.ones((64, 64), bool), direction="up",
                                    on_progress=lambda d, t, m: started.set())
    assert started.wait(60), "no progress notification arrived"
    assert call.cancel()
    with pytest.raises(CallCancelledError):
        call.result(timeout=60)
    assert client.ping()["active_jobs"] == 0


def test_cancel_a_queued_call_is_answered_at_once(client):
    running_image = client.set_image(phantom_slice(64, seed=6000))
    queued_image = client.set_image(phantom_slice(64, seed=6001))
    running = client.run_in_background(client.chat, running_image, "segment the liver")
    queued = client.run_in_background(client.chat, queued_image, "segment the liver")
    assert wait_until(lambda: client.ping()["active_jobs"] == 2 or queued.done(), timeout=30)
    assert client.cancel(queued.job_id)
    with pytest.raises(CallCancelledError):
        queued.result(timeout=5)        # well before the running chat would have let it start
    assert running.result(timeout=120).result is not None


def test_neighbours_make_another_image_and_a_wrong_shape_is_refused(client, image_id):
    slice_ = phantom_slice(64)
    matrix = np.diag([0.8, 0.8, 2.5, 1.0])
    neighbours = np.stack([phantom_slice(64, seed=20), phantom_slice(64, seed=21)])
    with_neighbours = client.set_image(slice_, ijk_to_ras=matrix, k=7, neighbours=neighbours)
    assert with_neighbours != image_id                    # the same pixels with neighbours are another image
    assert client.set_image(slice_, ijk_to_ras=matrix, k=7, neighbours=neighbours.astype(np.float32)) == with_neighbours
    assert client.chat(with_neighbours, "segment the liver", closer_look=False).geometry.k == 7
    with pytest.raises(PayloadError, match=r"shape \[2, 64, 64\]"):      # refused before sending
        client.set_image(slice_, k=7, neighbours=neighbours[:, :32])
    with pytest.raises(ServerError) as caught:             # a raw request is refused by the server
        client.call("set_image", {"image": encode_array(slice_), "neighbours": encode_array(neighbours[:1])})
    assert caught.value.code == ErrorCode.INVALID_PARAMS
    assert "'neighbours' has shape [1, 64, 64]" in caught.value.message
    assert "or none" in caught.value.hint and client.ping()["model_state"] == "ready"


def test_unknown_image_and_empty_query_leave_the_server_usable(client, image_id):
    with pytest.raises(ServerError) as caught:
        client.call("chat", {"image_id": "0" * 40, "message": "segment the liver"})
    assert caught.value.code == ErrorCode.UNKNOWN_IMAGE
    with pytest.raises(ServerError) as caught:
        client.chat(image_id, "   ")
    assert caught.value.code == ErrorCode.INVALID_PARAMS and "empty" in caught.value.message
    assert client.ping()["model_state"] == "ready"


# ------------------------------------------------------------------ raw pipe: malformed requests
class RawServer:
    def __init__(self, *extra):
        self.process = subprocess.Popen(SERVE + ["--stdio", *MODEL_ARGS, *extra], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=SERVER_ENV,
                                        cwd=str(REPO), start_new_session=True)
        self.next_id = 100

    def send_raw(self, data: bytes) -> dict:
        self.process.stdin.write(data if data.endswith(b"\n") else data + b"\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the server closed stdout"
        return json.loads(line)

    def call(self, method, params=None, request_id=None):
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": request_id or self.next_id, "method": method, "params": params or {}}
        return self.send_raw(json.dumps(request).encode())

    def wait_ready(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.call("ping")["result"]["model_state"] == "ready":
                return
            time.sleep(0.2)
        raise AssertionError("model did not load")


@pytest.fixture(scope="module")
def raw_server():
    server = RawServer("--max-request-mb", "1")
    yield server
    server.process.stdin.close()
    try:
        server.process.wait(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.fixture
def ready_server(raw_server):
    raw_server.wait_ready()
    return raw_server


def test_requests_before_the_model_loaded(raw_server):
    # initialize and ping answer at once; a model method is refused with "model not loaded" while loading.
    info = raw_server.call("initialize", {"protocol_version": PROTOCOL_VERSION})["result"]
    chat = raw_server.call("chat", {"image_id": "x", "message": "segment the liver"})
    state = raw_server.call("ping")["result"]["model_state"]
    if info["model_state"] == "loading" and state == "loading":
        assert chat["error"]["code"] == ErrorCode.MODEL_NOT_LOADED
        assert "loading" in chat["error"]["message"]


def _nan_image():
    pixels = np.zeros((16, 16), np.float32)
    pixels[0, 0] = np.nan
    return encode_array(pixels)


MALFORMED = [
    ("not json", b"{this is not json", ErrorCode.PARSE_ERROR),
    ("array body", b"[1, 2, 3]", ErrorCode.INVALID_REQUEST),
    ("no method", b'{"jsonrpc": "2.0", "id": 5}', ErrorCode.INVALID_REQUEST),
    ("unknown method", {"method": "segment_everything"}, ErrorCode.METHOD_NOT_FOUND),
    ("3-D image", {"method": "set_image", "params": {"image": encode_array(np.zeros((2, 16, 16), np.int16))}},
     ErrorCode.INVALID_PARAMS),
    ("float64 image", {"method": "set_image", "params": {"image": {
        "encoding": "base64", "dtype": "float64", "shape": [16, 16],
        "data": base64.b64encode(np.zeros((16, 16)).tobytes()).decode()}}}, ErrorCode.INVALID_PARAMS),
    ("NaN pixels", {"method": "set_image", "params": {"image": _nan_image()}}, ErrorCode.INVALID_PARAMS),
    ("truncated data", {"method": "set_image", "params": {"image": dict(
        encode_array(np.zeros((16, 16), np.int16)), shape=[32, 32])}}, ErrorCode.INVALID_PARAMS),
    ("tiny image", {"method": "set_image", "params": {"image": encode_array(np.zeros((2, 2), np.int16))}},
     ErrorCode.INVALID_PARAMS),
    ("unknown image", {"method": "chat", "params": {"image_id": "f" * 40, "message": "liver"}},
     ErrorCode.UNKNOWN_IMAGE),
    ("unknown volume", {"method": "propagate", "params": {"volume_id": "v", "seed_k": 0, "organ": "liver"}},
     ErrorCode.UNKNOWN_IMAGE),
    ("missing params", {"method": "chat", "params": {}}, ErrorCode.INVALID_PARAMS),
    ("wrong param type", {"method": "cancel", "params": {"job_id": 5}}, ErrorCode.INVALID_PARAMS),
    ("old major version", {"method": "initialize", "params": {"protocol_version": "0.9"}}, ErrorCode.VERSION_MISMATCH),
]


@pytest.mark.parametrize("name, request_body, code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_the_right_error_and_the_server_stays_up(ready_server, name, request_body, code):
    if isinstance(request_body, bytes):
        answer = ready_server.send_raw(request_body)
    else:
        answer = ready_server.call(request_body["method"], request_body.get("params"))
    assert answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    assert ready_server.call("ping")["result"]["model_state"] == "ready"


def test_model_method_errors_on_a_real_image(ready_server):
    image = ready_server.call("set_image", {"image": encode_array(phantom_slice(32))})["result"]["image_id"]
    cases = [
        ({"image_id": image, "message": ""}, "chat"),
        ({"image_id": image, "points": [[5, 5]], "labels": [1, 0]}, "refine"),
        ({"image_id": image, "points": [[500, 5]], "labels": [1]}, "refine"),
        ({"image_id": image}, "refine"),
        ({"image_id": image, "use_previous_mask": True, "organ": "pancreas"}, "refine"),
        ({"image_id": image, "box": [20, 20, 10, 10]}, "refine"),
        ({"image_id": image, "organ": "liver"}, "closer_look"),
        ({"image_id": image, "roi_xyxy": [0, 0, 8, 8], "organ": "heartbeat"}, "closer_look"),
    ]
    for params, method in cases:
        answer = ready_server.call(method, params)
        assert answer["error"]["code"] == ErrorCode.INVALID_PARAMS, (method, params, answer)
    volume = ready_server.call("set_volume", {"volume": encode_array(phantom_stack(3, 32))})["result"]["volume_id"]
    for params in ({"seed_k": 5, "organ": "liver"}, {"seed_k": 1, "organ": "liver", "direction": "sideways"},
                   {"seed_k": 1}, {"seed_k": 1, "organ": "liver", "strategy": "magic"},
                   {"seed_k": 1, "organ": "liver", "seed_mask": encode_mask(np.ones((8, 8), bool))}):
        answer = ready_server.call("propagate", dict(params, volume_id=volume))
        assert answer["error"]["code"] == ErrorCode.INVALID_PARAMS, (params, answer)


def test_payload_over_the_limit_is_refused_with_its_id(ready_server):
    big = encode_array(np.zeros((1024, 1024), np.int16))   # 2 MiB of pixels > --max-request-mb 1
    answer = ready_server.call("set_image", {"image": big}, request_id=4242)
    assert answer["id"] == 4242 and answer["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE
    assert ready_server.call("ping")["result"]["model_state"] == "ready"


def test_shutdown_ends_the_process(ready_server):
    assert ready_server.call("shutdown")["result"] == {"shutting_down": True}
    assert ready_server.process.wait(timeout=30) == 0


def test_serve_check_reports_a_missing_model_and_exits_1(tmp_path):
    finished = subprocess.run(SERVE + ["--check", "--model", str(tmp_path / "no-model"), "--device", "cpu"],
                              env=SERVER_ENV, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1
    assert "PROBLEMS FOUND" in finished.stdout and "does not exist" in finished.stdout
    assert "ok    device cpu" in finished.stdout
