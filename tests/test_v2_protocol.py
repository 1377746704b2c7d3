"""Open Inference Protocol (KServe v2): unmodified tritonclient.grpc and tritonclient.http against the gateway."""
from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from tests.procs import GatewayProcess, run_gateway

MNIST_LABELS = [str(i) for i in range(10)]
RGB_LABELS = [f"class{i}" for i in range(10)]


def png(shape: tuple[int, ...], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


DIGITS = [png((28, 28), s) for s in range(3)]
PHOTOS = [png((80, 100, 3), s) for s in range(2)]  # not square, larger than the crop: the ten crops differ


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


@pytest.fixture(params=["grpc", "http"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(gateway: GatewayProcess, kind: str) -> Iterator[tgrpc.InferenceServerClient | thttp.InferenceServerClient]:
    if kind == "grpc":
        c = tgrpc.InferenceServerClient(gateway.grpc_target)
    else:
        c = thttp.InferenceServerClient(gateway.http_url.removeprefix("http://"))
    yield c
    c.close()


def module_of(kind: str) -> ModuleType:
    return tgrpc if kind == "grpc" else thttp


def image_input(kind: str, images: list[bytes]) -> tgrpc.InferInput | thttp.InferInput:
    inp = module_of(kind).InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    return inp


def v1_scores(gateway: GatewayProcess, model: str, images: list[bytes], ten_crop: bool | None = None) -> np.ndarray:
    """Full probability rows from imgserve.v1 Classify (top_k = all classes), for cross-checking."""
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        request = pb.ClassifyRequest(model=model, images=images, top_k=1000)
        if ten_crop is not None:
            request.ten_crop = ten_crop
        response = pb_grpc.ImageServiceStub(channel).Classify(request, timeout=60)
    out = np.zeros((len(images), 10), dtype=np.float32)
    for row, result in enumerate(response.results):
        for c in result.classes:
            out[row, c.index] = c.score
    return out


def test_server_and_model_health(client, kind: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("lenet5")
    assert client.is_model_ready("rgbnet", "1")
    assert not client.is_model_ready("rgbnet", "7")
    assert not client.is_model_ready("no-such-model")


def as_dict(kind: str, message: object) -> dict:
    if kind == "http":
        return message  # type: ignore[return-value]
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)  # type: ignore[arg-type]


def test_server_metadata(client, kind: str) -> None:
    meta = as_dict(kind, client.get_server_metadata())
    assert meta["name"] == "imgserve" and meta["version"]
    assert "classification" in meta["extensions"]


def test_model_metadata_and_config(client, kind: str) -> None:
    meta = as_dict(kind, client.get_model_metadata("lenet5"))
    assert meta["name"] == "lenet5" and meta["versions"] == ["1"]
    inputs, outputs = meta["inputs"], meta["outputs"]
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in inputs] == [("image", "BYTES", [-1])]
    assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in outputs] == \
        [("probabilities", "FP32", [-1, 10])]
    config = as_dict(kind, client.get_model_config("rgbnet"))
    config = config.get("config", config)  # grpc wraps it in ModelConfigResponse
    assert config["name"] == "rgbnet"
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert config["output"][0]["name"] == "probabilities"
    assert [int(d) for d in config["output"][0]["dims"]] == [10]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["imgserve.resize"] == "72" and params["imgserve.crop"] == "64"
    assert params["imgserve.channels"] == "3"


def test_infer_bytes_images_matches_v1(client, kind: str, gateway: GatewayProcess) -> None:
    result = client.infer("lenet5", [image_input(kind, DIGITS)],
                          outputs=[module_of(kind).InferRequestedOutput("probabilities")])
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(DIGITS), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, v1_scores(gateway, "lenet5", DIGITS), rtol=0, atol=1e-6)
    response = result.get_response()
    version = response.model_version if kind == "grpc" else response["model_version"]
    assert version == "1"


def test_infer_without_requested_outputs_returns_probabilities(client, kind: str) -> None:
    probs = client.infer("lenet5", [image_input(kind, DIGITS[:1])]).as_numpy("probabilities")
    assert probs.shape == (1, 10)


def test_classification_extension(client, kind: str) -> None:
    inp = image_input(kind, DIGITS)
    mod = module_of(kind)
    probs = client.infer("lenet5", [inp]).as_numpy("probabilities")
    classes = client.infer("lenet5", [inp], outputs=[mod.InferRequestedOutput("probabilities", class_count=3)])
    strings = classes.as_numpy("probabilities")
    assert strings.shape == (len(DIGITS), 3)
    for row, expected in zip(strings, probs):
        parsed = [s.decode().split(":") for s in row]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-expected, kind="stable")[:3])
        for score, index, label in parsed:
            assert np.float32(float(score)) == expected[int(index)]  # exact: the float32 round-trips
            assert label == MNIST_LABELS[int(index)]


def test_http_json_outputs_equal_binary_outputs(gateway: GatewayProcess) -> None:
    c = thttp.InferenceServerClient(gateway.http_url.removeprefix("http://"))
    inp = image_input("http", DIGITS)
    binary = c.infer("lenet5", [inp], outputs=[thttp.InferRequestedOutput("probabilities", binary_data=True)])
    as_json = c.infer("lenet5", [inp], outputs=[thttp.InferRequestedOutput("probabilities", binary_data=False)])
    assert "binary_data_size" not in json.dumps(as_json.get_response())
    np.testing.assert_allclose(binary.as_numpy("probabilities"), as_json.as_numpy("probabilities"), atol=1e-7)
    top = c.infer("lenet5", [inp], outputs=[thttp.InferRequestedOutput("probabilities", binary_data=False,
                                                                        class_count=2)])
    assert top.as_numpy("probabilities").shape == (len(DIGITS), 2)
    c.close()


def test_grpc_bytes_contents_equals_raw_input_contents(gateway: GatewayProcess) -> None:
    """The v2 gRPC request may carry BYTES in contents.bytes_contents instead of raw_input_contents."""
    request = service_pb2.ModelInferRequest(model_name="lenet5", id="req-7")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(DIGITS)])
    tensor.contents.bytes_contents.extend(DIGITS)
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "req-7"
    assert list(response.outputs[0].shape) == [len(DIGITS), 10]
    probs = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(DIGITS), 10)
    c = tgrpc.InferenceServerClient(gateway.grpc_target)
    expected = c.infer("lenet5", [image_input("grpc", DIGITS)]).as_numpy("probabilities")
    np.testing.assert_array_equal(probs, expected)


def test_ten_crop_parameter_changes_rgbnet_result(client, kind: str, gateway: GatewayProcess) -> None:
    inp = image_input(kind, PHOTOS)
    single = client.infer("rgbnet", [inp], parameters={"ten_crop": False}).as_numpy("probabilities")
    tta = client.infer("rgbnet", [inp], parameters={"ten_crop": True}).as_numpy("probabilities")
    default = client.infer("rgbnet", [inp]).as_numpy("probabilities")
    assert tta.shape == single.shape == (len(PHOTOS), 10)
    # random-weight rgbnet can be saturated on noise (top class ~1.0), so compare relatively:
    # the small probabilities still move by orders of magnitude between one crop and ten
    assert not np.allclose(tta, single, rtol=1e-3, atol=0), "10-crop averaging made no difference"
    np.testing.assert_array_equal(default, single)  # rgbnet's ten_crop_default is false
    np.testing.assert_allclose(tta, v1_scores(gateway, "rgbnet", PHOTOS, ten_crop=True), atol=1e-6)
    classes = client.infer("rgbnet", [inp], parameters={"ten_crop": True},
                           outputs=[module_of(kind).InferRequestedOutput("probabilities", class_count=1)])
    for s, row in zip(classes.as_numpy("probabilities")[:, 0], tta):
        assert s.decode().split(":")[2] == RGB_LABELS[int(np.argmax(row))]


def status_of(kind: str, exc: InferenceServerException) -> str:
    return str(exc.status())


def test_unknown_model_is_an_error(client, kind: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [image_input(kind, DIGITS[:1])])
    assert status_of(kind, info.value) in ("StatusCode.NOT_FOUND", "404")
    assert "no-such-model" in info.value.message()
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


def test_bad_inputs_are_errors(client, kind: str) -> None:
    mod = module_of(kind)
    with pytest.raises(InferenceServerException) as info:
        client.infer("lenet5", [image_input(kind, [b"not an image"])])
    assert status_of(kind, info.value) in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "image 0" in info.value.message()
    wrong_name = mod.InferInput("pixels", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array(DIGITS[:1], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("lenet5", [wrong_name])
    assert "image" in info.value.message()
    wrong_type = mod.InferInput("image", [1, 28, 28], "UINT8")
    wrong_type.set_data_from_numpy(np.zeros((1, 28, 28), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as info:
        client.infer("lenet5", [wrong_type])
    assert "BYTES" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("lenet5", [image_input(kind, DIGITS[:1])], outputs=[mod.InferRequestedOutput("logits")])
    assert "logits" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("lenet5", [image_input(kind, DIGITS[:1])], parameters={"ten_crop": "yes"})
    assert "ten_crop" in info.value.message()
    assert client.is_server_live()


def test_http_server_metadata_and_index_raw(gateway: GatewayProcess) -> None:
    with urllib.request.urlopen(f"{gateway.http_url}/v2", timeout=10) as resp:
        assert json.loads(resp.read())["name"] == "imgserve"
    request = urllib.request.Request(f"{gateway.http_url}/v2/repository/index", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        index = json.loads(resp.read())
    assert [(m["name"], m["state"]) for m in index] == [("lenet5", "READY"), ("rgbnet", "READY")]


def test_unoffered_parts_of_the_protocol_fail_cleanly(client, kind: str, gateway: GatewayProcess) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("lenet5")
    assert status_of(kind, info.value) in ("StatusCode.UNIMPLEMENTED", "404", "405")
    # The repository API exists, but only in --model-control-mode explicit (docs/reliability.md)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("lenet5")
    assert status_of(kind, info.value) in ("StatusCode.FAILED_PRECONDITION", "400")
    assert client.is_server_live()
    assert "Traceback" not in gateway.stderr(), gateway.stderr()[-3000:]
