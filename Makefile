# edgefleet developer entry points. `make demo` and `make test` work on a fresh machine:
# both create or refresh .venv (with the cloud and test extras) before doing anything else.
.PHONY: venv demo test models bench clean

venv:
	@bash tools/setup_venv.sh

demo: venv
	.venv/bin/python tools/demo.py

test: venv
	@bash tools/run_tests.sh

bench: venv
	.venv/bin/python bench/run.py

-include tools/models.mk

clean:
	rm -rf .venv build dist *.egg-info bench/out
