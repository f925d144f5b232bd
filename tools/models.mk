# Included by the Makefile. `make models` rebuilds the shipped models in models/ (a registry
# directory) from scratch: deterministic from the seeds, ~30 s on 2 CPU cores, no download.
# Training reports land in models/<name>/1.eval/ (gitignored, see models/.gitignore).
.PHONY: models

models: venv
	rm -rf models/digits models/maintenance
	.venv/bin/cloud-batch train digits --registry models --version 1
	.venv/bin/cloud-batch train maintenance --registry models --version 1
