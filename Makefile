# The two commands a newcomer needs:
#   make demo   - set up the host and run the instance-level edit on the sample clip
#   make test   - set up the test hosts (from nothing, if needed) and run the whole test
#                 suite on each: ComfyUI 0.3.75, then ComfyUI 0.8.0 (scripts/run_tests.sh)
SHELL := /bin/bash
PYTEST_ARGS ?=
# make test: the hosts to run the suite on (one leg each); demo/bench: the host they use.
TEST_HOSTS ?= 0.3.75 0.8.0
HOST_VERSION ?= 0.3.75

.PHONY: host test demo bench clean-host

host:
	@for h in $(TEST_HOSTS); do scripts/setup_host.sh $$h >/dev/null; rc=$$?; [[ $$rc -eq 0 || $$rc -eq 4 ]] || exit $$rc; done

test:
	@TEST_HOSTS="$(TEST_HOSTS)" scripts/run_tests.sh $(PYTEST_ARGS)

demo:
	@eval "$$(scripts/setup_host.sh $(HOST_VERSION))" && COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON scripts/demo.py $(DEMO_ARGS)

bench:
	@eval "$$(scripts/setup_host.sh $(HOST_VERSION))" && $$HOST_PYTHON bench/attention.py && \
	  $$HOST_PYTHON bench/cross_attention.py && \
	  $$HOST_PYTHON bench/trajectory_attention.py && \
	  $$HOST_PYTHON bench/gpu_memory.py --frames 16 30 64 && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/pnp.py && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/metrics.py && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/capture.py && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/tune.py && \
	  $$HOST_PYTHON bench/kmeans.py && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/edit.py $(BENCH_EDIT_ARGS)

clean-host:
	rm -rf .host
