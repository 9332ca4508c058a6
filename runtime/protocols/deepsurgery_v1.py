"""deepsurgery.v1.Inference: Predict (one input, one task or "*") and ListTasks."""

from __future__ import annotations

from protos.deepsurgery.v1 import inference_pb2 as pb
from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
from runtime.api import Input, Prediction, Request, Tensor
from runtime.protocols.registry import Protocol, register

NAME = "deepsurgery.v1"


def to_input(message: pb.Input) -> Input:
    """The request's input oneof -> the core's Input (kind "" when unset: refused there)."""
    kind = message.WhichOneof("kind")
    if kind == "tensor":
        t = message.tensor
        return Input("tensor", Tensor(t.dtype, tuple(t.shape), t.data))
    return Input(kind or "", getattr(message, kind) if kind else b"")


def to_prediction(p: Prediction) -> pb.Prediction:
    return pb.Prediction(
        task=p.task,
        label=p.label,
        score=p.score,
        top=[pb.ScoredLabel(label=label, score=score) for label, score in p.top],
        logits=p.logits.tolist(),
    )


class DeepsurgeryV1:
    """The deepsurgery.v1 adapter of a core."""

    def __init__(self, core):
        self.core = core
        self._tasks: tuple[object, pb.ListTasksResponse] | None = None

    async def Predict(self, request: pb.PredictRequest, deadline) -> pb.PredictResponse:  # noqa: N802
        core_request = Request(request.task, (to_input(request.input),), request.top_k, NAME)
        (predictions,) = await self.core.infer(core_request, deadline)
        return pb.PredictResponse(predictions=[to_prediction(p) for p in predictions])

    async def ListTasks(self, request, deadline) -> pb.ListTasksResponse:  # noqa: N802
        model = self.core.model
        if self._tasks is None or self._tasks[0] is not model:  # built once per served model
            info = model.info()
            response = pb.ListTasksResponse(
                modality=info.modality,
                tasks=[pb.TaskInfo(name=t.name, classes=list(t.classes)) for t in info.tasks],
            )
            self._tasks = (model, response)
        return self._tasks[1]


register(
    Protocol(
        name=NAME,
        service=pb.DESCRIPTOR.services_by_name["Inference"].full_name,
        messages=pb,
        add_to_server=pb_grpc.add_InferenceServicer_to_server,
        adapter=DeepsurgeryV1,
    )
)
