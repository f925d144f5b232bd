# edgefleet developer entry points. `make demo` and `make test` work on a fresh machine:
# both create or refresh .venv (with the cloud, batch and test extras) before doing anything else.
.PHONY: venv demo test models bench fuzz clean package deb

# PYTHON=python3.12 picks the interpreter; VENV=.venv-3.12 keeps a second venv beside .venv.
VENV ?= .venv
export VENV
# Python caches bytecode as it imports (our own modules are not precompiled: the install is editable).
# An environment with PYTHONDONTWRITEBYTECODE set would recompile edge_agent in every agent and CLI
# process the demo and the tests start (~0.2 s of CPU each).
unexport PYTHONDONTWRITEBYTECODE

venv:
	@bash tools/setup_venv.sh

demo: venv
	$(VENV)/bin/python tools/demo.py

test: venv
	@bash tools/run_tests.sh

bench: venv
	$(VENV)/bin/python bench/run.py

# The CI fuzzers, run long (#15): property tests of the decoders and schemathesis against a real agent.
# FUZZ_EXAMPLES sets the length, so the suite's per-test timeout (600 s) is off here.
fuzz: venv
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(VENV)/bin/python -m pytest -q -p no:cacheprovider --timeout 0 \
		tests/test_fuzz_codecs.py tests/test_openapi.py

# The frozen one-folder agent (dist/edge-agent/, with VERSION and SHA256SUMS) and its Debian package (#11).
package: venv
	$(VENV)/bin/python tools/package.py --sizes

deb: package
	$(VENV)/bin/python tools/deb.py --folder dist/edge-agent --out dist

-include tools/models.mk

clean:
	rm -rf .venv .venv-3.* build dist *.egg-info bench/out
