# The two commands a newcomer needs:
#   make demo   - set up the host and run the instance-level edit on the sample clip
#   make test   - set up the host (from nothing, if needed) and run the whole test suite
SHELL := /bin/bash
PYTEST_ARGS ?=

.PHONY: host test demo bench clean-host

host:
	@scripts/setup_host.sh >/dev/null

test:
	@eval "$$(scripts/setup_host.sh)" && scripts/setup_system.sh && \
	  $$HOST_PYTHON scripts/make_test_models.py --comfyui "$$COMFYUI_PATH" --which small small_cnet && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON -m pytest tests $(PYTEST_ARGS)

demo:
	@eval "$$(scripts/setup_host.sh)" && COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON scripts/demo.py $(DEMO_ARGS)

bench:
	@eval "$$(scripts/setup_host.sh)" && $$HOST_PYTHON bench/attention.py && \
	  $$HOST_PYTHON bench/cross_attention.py && \
	  $$HOST_PYTHON bench/gpu_memory.py --frames 16 30 64 && \
	  COMFYUI_PATH="$$COMFYUI_PATH" $$HOST_PYTHON bench/edit.py $(BENCH_EDIT_ARGS)

clean-host:
	rm -rf .host
