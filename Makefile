# The two commands of the README. PYTHON must be Python 3.11 or newer.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test

# Install gatewayd into $(VENV) and run the demo (HIS simulator + gateway on loopback). Ctrl-C stops it.
demo:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	$(BIN)/gatewayd demo

# Install gatewayd with its test dependencies into $(VENV) and run the whole suite.
# pytest's exit 5 ("no tests collected", e.g. a -k that matches nothing) is reported, not turned into a failure.
test:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
