# make run  : set up .venv if needed, then the main job (demo suite)
# make test : set up .venv if needed, then the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

DEMO_TEXT ?= the eagle rested happily on the ridge at dawn.

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m trainer.fit --out runs/demo
	HF_HUB_OFFLINE=1 $(BIN)/python -m export.onnx --tasks all --bundle runs/demo/bundle --out runs/demo/onnx --force
	$(BIN)/python -m runtime.demo --model runs/demo/onnx --text "$(DEMO_TEXT)"

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
