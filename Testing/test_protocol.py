"""Protocol pieces without a server process: array/mask encodings, JSON-RPC framing and error mapping,
the dispatcher's answers before the model is loaded, sessions and jobs."""
import json
import threading
import time

import numpy as np
import pytest

from CTReasonerLib.client.encoding import (PayloadError, decode_array, decode_mask, decode_probability, encode_array,
                                           encode_mask, encode_probability)
from CTReasonerLib.client.geometry import SliceGeometry
from CTReasonerLib.client.spec import PROTOCOL_VERSION, ErrorCode, versions_compatible
from CTReasonerLib.errors import ModelError
from CTReasonerLib.server.engine import Engine, propagation_order
from CTReasonerLib.server.jobs import Job, JobManager
from CTReasonerLib.server.methods import registry
from CTReasonerLib.server.protocol import RpcError, encode_line, parse_message, rpc_error_from_exception, validate_request
from CTReasonerLib.server.service import Limits, Service
from CTReasonerLib.server.sessions import SessionManager
from fixtures_server import RecordingPipeline, ready_engine


# ------------------------------------------------------------------ encodings
@pytest.mark.parametrize("dtype", ["int16", "float32", "uint8"])
def test_dense_array_round_trip(dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(5, 7)) * 100).astype(dtype)
    payload = json.loads(json.dumps(encode_array(array)))
    assert payload["dtype"] == dtype and payload["byteorder"] == "little" and payload["shape"] == [5, 7]
    np.testing.assert_array_equal(decode_array(payload), array)


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(-6, 6, dtype=">i2").reshape(3, 4)
    decoded = decode_array(encode_array(array))
    assert decoded.dtype == np.int16 and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, array.astype(np.int16))


@pytest.mark.parametrize("encoding", ["bitpack", "rle"])
@pytest.mark.parametrize("pattern", ["random", "empty", "full", "starts_with_one", "odd_size"])
def test_mask_round_trip(encoding, pattern):
    rng = np.random.default_rng(1)
    shape = (13, 11) if pattern == "odd_size" else (16, 16)
    mask = {"random": rng.random(shape) > 0.5, "empty": np.zeros(shape, bool), "full": np.ones(shape, bool),
            "starts_with_one": np.eye(16, dtype=bool), "odd_size": rng.random(shape) > 0.3}[pattern]
    payload = json.loads(json.dumps(encode_mask(mask, encoding)))
    assert payload["encoding"] == encoding
    decoded = decode_mask(payload, shape=shape)
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)


def test_bitpacked_mask_is_compact():
    mask = np.zeros((512, 512), bool)
    mask[100:200, 50:300] = True
    assert len(json.dumps(encode_mask(mask))) < 512 * 512 / 8 * 1.4 + 100
    assert len(json.dumps(encode_mask(mask, "rle"))) < 2000


def test_probability_is_quantised_to_uint8():
    probability = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    payload = encode_probability(probability)
    assert payload["dtype"] == "uint8"
    np.testing.assert_allclose(decode_probability(payload), probability, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("mutate, needle", [
    (lambda p: p.update(dtype="float64"), "dtype"),
    (lambda p: p.update(shape=[4, 5]), "bytes of data"),
    (lambda p: p.update(shape="8x8"), "shape"),
    (lambda p: p.update(data="not base64!!"), "base64"),
    (lambda p: p.update(byteorder="big"), "byteorder"),
])
def test_decode_array_rejects_malformed_payloads(mutate, needle):
    payload = encode_array(np.zeros((8, 8), np.int16))
    mutate(payload)
    with pytest.raises(PayloadError, match=needle):
        decode_array(payload, dtypes=("int16", "float32"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decode_array_rejects_non_finite_pixels(bad):
    pixels = np.zeros((8, 8), np.float32)
    pixels[3, 4] = bad
    with pytest.raises(PayloadError, match="NaN or infinite"):
        decode_array(encode_array(pixels))


def test_decode_array_checks_dimensions():
    with pytest.raises(PayloadError, match="2-D"):
        decode_array(encode_array(np.zeros((2, 8, 8), np.int16)), ndim=2)


def test_decode_mask_rejects_wrong_shape_and_counts():
    payload = encode_mask(np.ones((4, 4), bool), "rle")
    with pytest.raises(PayloadError, match="does not match the image shape"):
        decode_mask(payload, shape=(4, 5))
    payload["counts"] = [3, 3]
    with pytest.raises(PayloadError, match="sum to 6"):
        decode_mask(payload)


def test_slice_geometry_maps_pixels_to_ras():
    matrix = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    geometry = SliceGeometry(matrix, k=4, shape=(10, 12))
    np.testing.assert_allclose(geometry.pixel_to_ras([[2, 3]]), [[100 - 1.6, 50 - 2.4, -30 + 10.0]])
    np.testing.assert_allclose(geometry.spacing, [0.8, 0.8, 2.5])
    again = SliceGeometry.from_wire(json.loads(json.dumps(geometry.to_wire())), (10, 12))
    np.testing.assert_allclose(again.ijk_to_ras, matrix)
    with pytest.raises(PayloadError, match="singular"):
        SliceGeometry.from_wire({"ijk_to_ras": np.zeros((4, 4)).tolist(), "k": 0}, (10, 12))


# ------------------------------------------------------------------ framing and errors
def test_versions_compatible_by_major():
    assert versions_compatible("1.0", "1.7")
    assert not versions_compatible("1.3", "2.0")
    with pytest.raises(ValueError):
        versions_compatible("one", "1.0")


@pytest.mark.parametrize("raw, code", [
    (b"{not json", ErrorCode.PARSE_ERROR),
    (b"\xff\xfe", ErrorCode.PARSE_ERROR),
])
def test_parse_errors(raw, code):
    with pytest.raises(RpcError) as caught:
        parse_message(raw)
    assert caught.value.code == code


@pytest.mark.parametrize("message", [
    [1, 2], "text", {"id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 1},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}, {"jsonrpc": "2.0", "id": [1], "method": "ping"},
])
def test_invalid_requests(message):
    with pytest.raises(RpcError) as caught:
        validate_request(message)
    assert caught.value.code == ErrorCode.INVALID_REQUEST


def test_exception_mapping():
    assert rpc_error_from_exception(PayloadError("bad")).code == ErrorCode.INVALID_PARAMS
    assert rpc_error_from_exception(ModelError("broken")).code == ErrorCode.MODEL_FAILURE
    assert rpc_error_from_exception(RuntimeError("CUDA out of memory")).code == ErrorCode.MODEL_FAILURE
    assert "still running" in rpc_error_from_exception(ValueError("x")).data["hint"]


def test_encode_line_refuses_nan():
    with pytest.raises(ValueError):
        encode_line({"result": float("nan")})
    assert encode_line({"a": 1}).endswith(b"\n")


# ------------------------------------------------------------------ dispatcher before the model is there
class _Collector:
    def __init__(self):
        self.messages = []
        self.event = threading.Event()

    def __call__(self, message):
        self.messages.append(message)
        self.event.set()

    def wait(self, timeout=10.0):
        assert self.event.wait(timeout), "no answer"
        return self.messages[-1]


@pytest.fixture
def service_without_model(tmp_path):
    engine = Engine(str(tmp_path / "missing-model"))
    engine.load()   # fails: the folder does not exist; the server must still answer
    service = Service(engine, registry, "http", SessionManager(max_sessions=2, idle_timeout_s=60),
                      Limits(max_request_bytes=4096))
    yield service
    service.close()


def _call(service, method, params=None, session_id=None, request_id=1):
    """The answer to one request (progress notifications, e.g. propagate's, are dropped)."""
    collector = _Collector()
    expects = service.handle({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}},
                             session_id, collector, lambda note: None)
    assert expects
    return collector.wait()


def test_dispatcher_reports_a_failed_model_and_keeps_serving(service_without_model):
    service = service_without_model
    info = _call(service, "initialize", {"protocol_version": PROTOCOL_VERSION})["result"]
    assert info["model_state"] == "failed"
    session = info["session_id"]
    ping = _call(service, "ping", session_id=session)["result"]
    assert ping["model_state"] == "failed" and "does not exist" in ping["model_error"]
    image = encode_array(np.zeros((16, 16), np.int16))
    image_id = _call(service, "set_image", {"image": image}, session)["result"]["image_id"]
    error = _call(service, "chat", {"image_id": image_id, "message": "segment the liver"}, session)["error"]
    assert error["code"] == ErrorCode.MODEL_NOT_LOADED and "could not be loaded" in error["message"]


def test_dispatcher_session_rules(service_without_model):
    service = service_without_model
    assert _call(service, "cancel", {"job_id": "x"})["error"]["code"] == ErrorCode.UNKNOWN_SESSION
    assert _call(service, "cancel", {"job_id": "x"}, "forged")["error"]["code"] == ErrorCode.UNKNOWN_SESSION
    first = _call(service, "initialize", {"protocol_version": "1.0"})["result"]["session_id"]
    _call(service, "initialize", {"protocol_version": "1.0"})
    third = _call(service, "initialize", {"protocol_version": "1.0"})["error"]
    assert third["code"] == ErrorCode.SESSION_LIMIT
    assert _call(service, "shutdown", {}, first)["result"] == {"session_closed": True}
    assert "result" in _call(service, "initialize", {"protocol_version": "1.0"})


def test_dispatcher_version_mismatch_names_both_versions(service_without_model):
    error = _call(service_without_model, "initialize", {"protocol_version": "9.1"})["error"]
    assert error["code"] == ErrorCode.VERSION_MISMATCH
    assert "9.1" in error["message"] and PROTOCOL_VERSION in error["message"]


def test_dispatcher_notifications_get_no_answer(service_without_model):
    collector = _Collector()
    assert not service_without_model.handle({"jsonrpc": "2.0", "method": "ping"}, None, collector, collector)
    assert collector.messages == []


def test_session_idle_expiry():
    sessions = SessionManager(max_sessions=1, idle_timeout_s=10)
    session = sessions.create("http")
    assert sessions.get(session.session_id) is session
    assert sessions.expire_idle(now=time.monotonic() + 11) == [session]
    with pytest.raises(RpcError) as caught:
        sessions.get(session.session_id)
    assert caught.value.code == ErrorCode.UNKNOWN_SESSION
    sessions.create("http")  # the slot is free again


def test_sessions_do_not_share_images():
    sessions = SessionManager()
    first, second = sessions.create("http"), sessions.create("http")
    from CTReasonerLib.server.sessions import ImageRecord
    first.add_image(ImageRecord("abc", np.zeros((8, 8), np.float32), SliceGeometry(np.eye(4), 0, (8, 8)), None))
    assert first.image("abc").image_id == "abc"
    with pytest.raises(RpcError) as caught:
        second.image("abc")
    assert caught.value.code == ErrorCode.UNKNOWN_IMAGE


# ------------------------------------------------------------------ jobs
def test_jobs_progress_cancel_running_and_queued():
    manager = JobManager()
    notes, answers = [], {}
    started, release = threading.Event(), threading.Event()

    def finish_for(name):
        return lambda result, error: answers.__setitem__(name, (result, error))

    def long_work(job):
        started.set()
        for step in range(200):
            job.progress(step, 200)
            if release.wait(0.01):
                pass
        return "finished"

    running = Job("a", "s1", "propagate", notes.append, finish_for("a"))
    queued = Job("b", "s1", "chat", notes.append, finish_for("b"))
    manager.submit(running, long_work)
    manager.submit(queued, lambda job: "never")
    assert started.wait(10)
    assert not manager.cancel("other-session", "a")     # sessions cannot cancel each other's jobs
    assert manager.cancel("s1", "b")
    assert answers["b"][1].code == ErrorCode.CANCELLED   # answered at once, while "a" still runs
    assert manager.cancel("s1", "a")
    deadline = time.monotonic() + 10
    while "a" not in answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers["a"][1].code == ErrorCode.CANCELLED
    assert notes and notes[0]["method"] == "progress" and notes[0]["params"]["job_id"] == "a"
    manager.shutdown()


def test_a_job_is_no_longer_active_once_its_answer_is_sent():
    manager = JobManager()
    active_when_answered, started, release = {}, threading.Event(), threading.Event()

    def answer(name):
        return lambda result, error: active_when_answered.__setitem__(name, manager.active("s1"))

    def blocking_work(job):
        started.set()
        release.wait(10)
        return "done"

    manager.submit(Job("running", "s1", "chat", lambda note: None, answer("running")), blocking_work)
    manager.submit(Job("queued", "s1", "chat", lambda note: None, answer("queued")), lambda job: "never")
    assert started.wait(10)
    assert manager.cancel("s1", "queued")
    assert active_when_answered["queued"] == 1          # answered at once; only the running job is left
    release.set()
    deadline = time.monotonic() + 10
    while "running" not in active_when_answered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active_when_answered["running"] == 0
    manager.shutdown()


def test_propagation_order():
    assert propagation_order(5, 2, 8, "up") == [[6, 7, 8]]
    assert propagation_order(5, 2, 8, "down") == [[4, 3, 2]]
    assert propagation_order(5, 5, 6, "both") == [[6], []]


def test_chat_result_round_trip_keeps_box_sources_the_presence_check_and_the_kept_round():
    from CTReasonerLib.client.client import decode_chat_result
    from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo
    from CTReasonerLib.server.methods import encode_chat_result

    result = ChatResult(text="found", routing_tokens=["[DET]"], target_organ="liver",
                        boxes=[BoxPrediction("liver", np.array([1, 2, 9, 8]), 0.97, "mask"),
                               BoxPrediction("liver", np.array([20, 20, 30, 31]), 0.3, "detection")],
                        presence=0.8, closer_look=CloserLookInfo(ran=True, organ="liver", kept_round=1))
    wire = json.loads(json.dumps(encode_chat_result(result, "bitpack", False)))
    decoded = decode_chat_result(wire, (40, 40))
    assert [(b.xyxy.tolist(), b.score, b.source) for b in decoded.boxes] == \
        [([1, 2, 9, 8], 0.97, "mask"), ([20, 20, 30, 31], 0.3, "detection")]
    assert decoded.presence == pytest.approx(0.8) and not decoded.presence_overruled
    assert decoded.closer_look.ran and decoded.closer_look.kept_round == 1
    overruled = ChatResult(text="The liver is not visible on this slice.", absent=True, presence=0.1,
                           presence_overruled=True)
    back = decode_chat_result(json.loads(json.dumps(encode_chat_result(overruled, "bitpack", False))), (40, 40))
    assert back.presence == pytest.approx(0.1) and back.presence_overruled and back.absent
    rescued = ChatResult(text="The liver is seen ...", routing_tokens=["[SEG]"], presence=0.9, presence_rescued=True)
    back = decode_chat_result(json.loads(json.dumps(encode_chat_result(rescued, "bitpack", False))), (40, 40))
    assert back.presence_rescued and not back.presence_overruled and not decoded.presence_rescued
    del wire["boxes"][1]["source"], wire["presence"], wire["presence_overruled"], wire["presence_rescued"]  # an older server
    del wire["closer_look"]["kept_round"]
    older = decode_chat_result(wire, (40, 40))
    assert older.boxes[1].source == "detection" and older.presence is None and not older.presence_overruled
    assert not older.presence_rescued
    assert older.closer_look.kept_round == 2


# ------------------------------------------------------------------ neighbouring slices through the service
@pytest.fixture
def recording_service():
    """make(neighbour_distance_mm) -> (a stdio Service whose engine runs a RecordingPipeline, that pipeline)."""
    services = []

    def make(neighbour_distance_mm):
        pipeline = RecordingPipeline(neighbour_distance_mm)
        services.append(Service(ready_engine(pipeline), registry, "stdio"))
        return services[-1], pipeline

    yield make
    for service in services:
        service.close()


def _oblique_ijk_to_ras(spacing=(0.7, 0.7, 2.5), degrees=60.0):
    """IJK -> RAS tilted about I: K's column norm is its spacing, its S entry is not (2.5 mm vs 1.25 mm)."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(spacing)
    return matrix


def test_spacing_along_k_is_the_norm_of_the_matrix_column():
    from CTReasonerLib.client import geometry

    np.testing.assert_allclose(geometry.ijk_spacing(_oblique_ijk_to_ras()), [0.7, 0.7, 2.5])


@pytest.mark.parametrize("distance", [5.0, None])
def test_initialize_and_ping_advertise_the_models_neighbour_distance(recording_service, distance):
    service, _ = recording_service(distance)
    info = _call(service, "initialize", {"protocol_version": PROTOCOL_VERSION})["result"]
    assert "neighbour_distance_mm" in info["model"] and info["model"]["neighbour_distance_mm"] == distance
    assert _call(service, "ping")["result"]["model"]["neighbour_distance_mm"] == distance


def test_chat_and_closer_look_give_the_model_the_neighbours_sent_with_the_image(recording_service):
    service, pipeline = recording_service(5.0)
    image = (np.arange(16 * 16).reshape(16, 16) % 50).astype(np.int16)
    neighbours = np.stack([image - 100, image + 100])
    other = np.stack([image + 7, image - 7])

    def upload(**extra):
        return _call(service, "set_image", {"image": encode_array(image), **extra})["result"]["image_id"]

    plain, with_neighbours = upload(), upload(neighbours=encode_array(neighbours))
    with_other = upload(neighbours=encode_array(other))
    assert len({plain, with_neighbours, with_other}) == 3          # other neighbours: another image
    assert upload(neighbours=encode_array(neighbours.astype(np.float32))) == with_neighbours
    for image_id in (with_neighbours, with_other, plain):
        assert "result" in _call(service, "chat", {"image_id": image_id, "message": "segment the liver"})
    # the same turn on the same pixels ran once per set of neighbours (not from the result cache), with them
    received = [sent for method, _, sent in pipeline.calls if method == "chat"]
    assert len(received) == 3 and received[2] is None
    assert np.array_equal(received[0], neighbours) and np.array_equal(received[1], other)
    assert "result" in _call(service, "closer_look", {"image_id": with_neighbours, "organ": "liver"})
    method, _, sent = pipeline.calls[-1]
    assert method == "closer_look" and np.array_equal(sent, neighbours)


@pytest.mark.parametrize("payload, needle", [
    (encode_array(np.zeros((3, 16, 16), np.int16)), "'neighbours' has shape [3, 16, 16]"),
    (encode_array(np.zeros((2, 16, 12), np.int16)), "needs [2, 16, 16]"),
    (encode_array(np.zeros((16, 16), np.int16)), "expected a 3-D array"),
    (encode_array(np.zeros((2, 16, 16), np.uint8)), "dtype 'uint8' is not accepted"),
    ([1, 2], "'neighbours' must be an object"),
])
def test_set_image_refuses_neighbours_that_do_not_fit_the_image(recording_service, payload, needle):
    service, pipeline = recording_service(5.0)
    error = _call(service, "set_image", {"image": encode_array(np.zeros((16, 16), np.int16)),
                                         "neighbours": payload})["error"]
    assert error["code"] == ErrorCode.INVALID_PARAMS and needle in error["message"], error
    assert "Traceback" not in json.dumps(error)
    if "needs" in needle:
        assert "below" in error["message"] and "or none" in error["data"]["hint"]


@pytest.mark.parametrize("distance, offset", [(5.0, 2), (None, None)])
def test_propagate_over_a_volume_reads_each_slices_neighbours_from_the_volume(recording_service, distance, offset):
    service, pipeline = recording_service(distance)
    volume = np.stack([np.full((16, 16), 10 * k, np.int16) for k in range(6)])     # slice k holds 10 k HU
    volume_id = _call(service, "set_volume", {"volume": encode_array(volume),
                                              "geometry": {"ijk_to_ras": _oblique_ijk_to_ras().tolist()}})
    result = _call(service, "propagate", {"volume_id": volume_id["result"]["volume_id"], "seed_k": 2,
                                          "organ": "liver"})["result"]
    assert [entry["k"] for entry in result["slices"]] == [0, 1, 2, 3, 4, 5]
    asked = {int(pixels[0, 0]) // 10: sent for method, pixels, sent in pipeline.calls}
    assert sorted(asked) == [0, 1, 2, 3, 4, 5]
    for k, sent in asked.items():
        if offset is None:
            assert sent is None, k                              # a model without neighbours gets none
        else:                                                    # 5 mm / 2.5 mm: two slices off, clamped
            assert np.array_equal(sent, volume[[max(k - offset, 0), min(k + offset, 5)]]), k


def test_propagate_over_uploaded_slices_gives_each_its_own_neighbours(recording_service):
    service, pipeline = recording_service(5.0)
    image_ids, sent_with = [], {}
    for index in range(3):
        image = np.full((16, 16), 10 * index, np.int16)
        sent_with[index] = np.stack([image - 1000, image + 1000])
        uploaded = _call(service, "set_image", {"image": encode_array(image), "geometry": {"k": 4 + index},
                                                "neighbours": encode_array(sent_with[index])})
        image_ids.append(uploaded["result"]["image_id"])
    result = _call(service, "propagate", {"image_ids": image_ids, "seed_k": 5, "organ": "liver"})["result"]
    assert [entry["k"] for entry in result["slices"]] == [4, 5, 6]
    assert len(pipeline.calls) == 3
    for _, pixels, sent in pipeline.calls:
        assert np.array_equal(sent, sent_with[int(pixels[0, 0]) // 10])
