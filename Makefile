# The two commands a new user needs:
#   make run    set up, import the demo model, and run the main job
#   make test   set up and run the tests (exactly what CI runs)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
CARGO := cd rust_service && cargo

export BENTOML_DO_NOT_TRACK := 1

.PHONY: setup system-deps rust rust-check lint images run test clean

setup: $(INSTALLED) rust

# Bytecode is compiled at install time: with PYTHONDONTWRITEBYTECODE set, every run
# would otherwise recompile torch from source (about 12 s).
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==0.13.9
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode --editable '.[test]'
	touch $@

# The Rust service links Debian's libjpeg-turbo statically (pixel-exact with Pillow).
system-deps:
	@dpkg -s libjpeg62-turbo-dev >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libjpeg62-turbo-dev; }

# The service and its in-process ceiling (for the benchmark).
rust: system-deps
	$(CARGO) build --release --locked --bin rust_service --example ceiling

rust-check: rust
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings
	$(CARGO) test --release --locked

# The three images weather-{torch,onnx,rust}-service:<version> and :latest (python -m containers.build --help).
# With no reachable registry it first builds a local Debian base image (mmdebstrap);
# LOCAL_BASE=1 forces that, ONLY=onnx,rust builds a subset.
images: setup
	$(BIN)/python -m containers.build $(if $(LOCAL_BASE),--local-base) $(if $(ONLY),--only $(ONLY))

# The main job: the demo model, the images (where a Docker engine runs), the side-by-side benchmark.
run: setup
	$(BIN)/python -m model_import demo
	if docker info >/dev/null 2>&1; then $(MAKE) images; else echo "no Docker engine: benchmarking local processes"; fi
	$(BIN)/python -m benchmark run --profile quick

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup rust-check lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) results rust_service/target
