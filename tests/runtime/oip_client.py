"""An outside Open Inference Protocol client: tritonclient[grpc] in its own environment.

Run with the client environment's python (DEEPSURGERY_CLIENT_PYTHON, built by `make test`), not
the project's: it imports nothing of deepsurgery, as a Triton or KServe shop's client would not.

    python oip_client.py HOST:PORT SPEC.json   # prints one JSON report on stdout

SPEC: {"models": [names], "infer": [{"model", "input", "datatype", "rows": [...],
"encoding": "text" | "base64" | "fp32", "shape": [...] (sent instead of the data's),
"outputs": [...], "version": "..."}, ...]}. Each infer is answered by its outputs (name ->
datatype, shape, data) or its error (status code name, message).
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def array_of(case: dict) -> np.ndarray:
    if case["encoding"] == "text":
        return np.array([s.encode("utf-8") for s in case["rows"]], dtype=np.object_)
    if case["encoding"] == "base64":
        return np.array([base64.b64decode(s) for s in case["rows"]], dtype=np.object_)
    return np.asarray(case["rows"], dtype=np.float32)


def plain(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [b.decode("utf-8") for b in array.reshape(-1)]
    return array.tolist()


def infer(client: triton.InferenceServerClient, case: dict) -> dict:
    array = array_of(case)
    tensor = triton.InferInput(case["input"], list(array.shape), case["datatype"])
    tensor.set_data_from_numpy(array)
    if "shape" in case:  # after the data: tritonclient checks the data against the shape
        tensor.set_shape(case["shape"])
    outputs = [triton.InferRequestedOutput(n) for n in case.get("outputs", [])] or None
    try:
        result = client.infer(
            case["model"], [tensor], model_version=case.get("version", ""), outputs=outputs
        )
    except InferenceServerException as e:
        return {
            "error": {"code": str(e.status()).removeprefix("StatusCode."), "message": e.message()}
        }
    response = result.get_response(as_json=True)
    return {
        "model_version": response.get("model_version"),
        "outputs": {
            o["name"]: {
                "datatype": o["datatype"],
                "shape": [int(s) for s in o["shape"]],
                "data": plain(result.as_numpy(o["name"])),
            }
            for o in response["outputs"]
        },
    }


def main() -> int:
    address, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    client = triton.InferenceServerClient(address)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "models": {
            m: {
                "ready": client.is_model_ready(m),
                "metadata": client.get_model_metadata(m, as_json=True),
            }
            for m in spec["models"]
        },
        "unknown_ready": client.is_model_ready("no-such-model"),
        "results": [infer(client, case) for case in spec["infer"]],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
