# The two README commands. Both install the project (and its test extra) into the current Python first,
# so they work on a fresh machine with nothing but Python and pip.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -e ".[test]"

.PHONY: install demo test test-all docs-check bench

install:
	$(PIP_INSTALL)

# Main job: quantize a real torchvision model and print the report.
demo: install
	$(PYTHON) -m fxquant.demo

# Lean test suite (CI). pytest's exit code 5 ("no tests collected") is an error here, not a pass.
test: install
	@$(PYTHON) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; exit $$rc

# Everything, including the slow model-zoo tests.
test-all: install
	FXQUANT_SLOW=1 $(PYTHON) -m pytest -q -p no:cacheprovider

bench: install
	$(PYTHON) -m fxquant.bench
