"""Bearer-token auth (health stays open) and TLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_testkit import ServerThread, text_request

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime import client


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    return path


def test_token_required_except_for_health(text_model_dir, token_file):
    with ServerThread(text_model_dir, "--token-file", str(token_file)) as server:
        stub = server.stub()
        req = text_request("news", "stocks rallied")
        for metadata, needle in [
            ((), "missing"),
            ((("authorization", "Bearer wrong"),), "invalid"),
            ((("authorization", "s3cret-token"),), "invalid"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(req, metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert needle in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ListTasks(pb.ListTasksRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret-token"),)
        assert len(stub.Predict(req, metadata=good, timeout=5).predictions) == 1
        health = health_pb2_grpc.HealthStub(server.channel())
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_client_cli_sends_token(text_model_dir, token_file, capsys):
    with ServerThread(text_model_dir, "--token-file", str(token_file)) as server:
        rc = client.main(
            [
                "--addr",
                server.addr,
                "--task",
                "*",
                "--text",
                "great food",
                "--top-k",
                "2",
                "--token-file",
                str(token_file),
            ]
        )
        out = capsys.readouterr().out
        assert rc == 0 and out.startswith("news: ") and "stars: " in out
        assert client.main(["--addr", server.addr, "--list"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.fixture
def tls_pair(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI makes the test cert")
def test_tls_round_trip(image_model_dir, tls_pair, capsys):
    cert, key = tls_pair
    with ServerThread(image_model_dir, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.addr, creds) as channel:
            resp = pb_grpc.InferenceStub(channel).ListTasks(pb.ListTasksRequest(), timeout=5)
        assert resp.modality == "image"
        with grpc.insecure_channel(server.addr) as channel:  # plaintext is refused
            with pytest.raises(grpc.RpcError):
                pb_grpc.InferenceStub(channel).ListTasks(pb.ListTasksRequest(), timeout=2)
        assert client.main(["--addr", server.addr, "--list", "--tls-ca", str(cert)]) == 0
        assert "digits (10)" in capsys.readouterr().out


@pytest.mark.parametrize("image", ["", "missing.png", "dir"])
def test_client_names_a_bad_image_path_before_connecting(tmp_path, capsys, image):
    path = tmp_path / "dir" if image == "dir" else Path(image) if image else Path("")
    if image == "dir":
        path.mkdir()
    # no server at this address: the path is checked before any connection is made
    rc = client.main(["--addr", "127.0.0.1:1", "--task", "t", "--image", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--image" in err and "give an image file" in err
    assert ("a directory" if image in ("", "dir") else "missing") in err
