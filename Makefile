# The two README commands. Both install the project (and its test extra) into the current Python first,
# so they work on a fresh machine with nothing but Python and pip.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -e ".[test]"

.PHONY: install demo test test-all docs bench

install:
	$(PIP_INSTALL)

# Main job: quantize a real torchvision model and print the report.
demo: install
	$(PYTHON) -m fxquant.demo

# Lean test suite (CI); it builds the docs site too (tests/test_docs_build.py). pytest's exit code 5 ("no tests collected") is an error here, not a pass.
test: install
	@$(PYTHON) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; exit $$rc

# Everything, including the slow model-zoo tests.
test-all: install
	FXQUANT_SLOW=1 $(PYTHON) -m pytest -q -p no:cacheprovider

# fxquant vs torch.ao vs fp32 on torchvision models (= fxquant bench); options: python -m fxquant.bench --help
bench: install
	$(PYTHON) -m fxquant.bench

# The docs site (mkdocs.yml, docs/): warnings are errors; the site goes to site/ (not committed).
docs: install
	$(PYTHON) -m mkdocs build --strict -d site
