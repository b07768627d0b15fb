# The two set-up commands of the README. Each installs what it needs first.
.PHONY: tiny test bootstrap

bootstrap:
	bash scripts/bootstrap.sh

# A tiny but complete study on this CPU.
tiny: bootstrap
	.venv/bin/malign study run

# The test suite (starts the local Slurm cluster the Slurm tests use).
test: bootstrap
	bash scripts/run_tests.sh
