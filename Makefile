# make run  : set up .venv if needed, then the main job (demo suite)
# make test : set up .venv if needed, then the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# An outside Open Inference Protocol client in its own environment, as a Triton/KServe shop has
# it: tritonclient pins protobuf < 7, this project >= 7.35, so they cannot share one venv.
CLIENT_VENV := .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed

.PHONY: run test setup lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

$(CLIENT_STAMP):
	test -x $(CLIENT_VENV)/bin/python || $(PY) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet "tritonclient[grpc]>=2.40" numpy
	touch $(CLIENT_STAMP)

setup: $(STAMP) $(CLIENT_STAMP)

DEMO_TEXT ?= the eagle rested happily on the ridge at dawn.

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m trainer.fit --out runs/demo
	HF_HUB_OFFLINE=1 $(BIN)/python -m export.onnx --tasks all --bundle runs/demo/bundle --out runs/demo/onnx --force
	$(BIN)/python -m runtime.demo --model runs/demo/onnx --text "$(DEMO_TEXT)"

test: $(STAMP) $(CLIENT_STAMP)
	HF_HUB_OFFLINE=1 DEEPSURGERY_CLIENT_PYTHON=$(CLIENT_VENV)/bin/python $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(CLIENT_VENV) runs
