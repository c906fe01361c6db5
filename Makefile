# The two commands of the README: `make demo` and `make test`. Both create .venv when it is absent
# and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test test-gpu lint install install-dev clean mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[report]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/fastmeal demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

test-gpu: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m gpu

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# Mutation testing (not CI; docs/mutation.md): mutmut changes one operator, constant or argument at a time in
# the modules below and runs the tests that cover the changed function ([tool.mutmut] in pyproject.toml names
# the test files). One module at a time, niced; all seven take hours on 2 shared cores. A survivor is a bug the tests
# would miss, or an equivalent change (explained in docs/mutation.md). `make mutation MUTATION_MODULES=losses`
# runs one module; results accumulate in mutants/ (`mutmut show NAME` prints a mutant's diff).
MUTATION_MODULES ?= losses plan store build checkpoint config objectives
MUTANTS_losses := 'fastmeal.losses.*'
MUTANTS_plan := 'fastmeal.data.plan.*'
MUTANTS_store := 'fastmeal.bank.store.*'
MUTANTS_build := 'fastmeal.bank.build.*'
# checkpoint.py: the digest, the atomic writes, reading/validating and the manifest (not the RNG or export helpers)
MUTANTS_checkpoint := $(foreach f,state_digest _feed atomic_write_bytes atomic_torch_save *_HashingWriter* _fsync_dir \
	_disk_full* remove_temporaries load_checkpoint *CheckpointManager*publish *CheckpointManager*heal \
	*CheckpointManager*manifest *CheckpointManager*_export_current *CheckpointManager*_prune *CheckpointManager*_recover_best,'fastmeal.checkpoint.*$(f)__mutmut_*')
# config.py: the LR regime only
MUTANTS_config := 'fastmeal.config.*lr_at__mutmut_*' 'fastmeal.config.*ScheduleConfig*__post_init____mutmut_*'
MUTANTS_objectives := 'fastmeal.objectives.*'

mutation: $(VENV)/.installed-dev
	$(PIP) install -q 'mutmut==3.8.1'
	@for m in $(MUTATION_MODULES); do \
		case $$m in losses) names=$(MUTANTS_losses);; plan) names=$(MUTANTS_plan);; store) names=$(MUTANTS_store);; \
			build) names=$(MUTANTS_build);; checkpoint) names="$(MUTANTS_checkpoint)";; config) names="$(MUTANTS_config)";; \
			objectives) names=$(MUTANTS_objectives);; \
			*) echo "unknown module $$m"; exit 2;; esac; \
		echo "== mutation: $$m"; eval nice -n 15 $(BIN)/mutmut run --max-children 2 $$names || exit 1; \
	done
	$(BIN)/python tests/mutation_summary.py --survivors

clean:
	rm -rf $(VENV) demo_out .pytest_cache mutants
