# The two commands a new user needs (README.md): `make demo` and `make test`.
# Both prepare the machine first (topologies/host-setup.sh is idempotent).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo mininet test test-fast test-container container coverage bench bench-quick bench-components clean

setup:
	@VENV=$(VENV) bash topologies/host-setup.sh

demo: setup
	$(VENV)/bin/mbvisor demo

# The same story on a Mininet topology (Mininet's module lives with the system Python).
# Options go through: make mininet MININET_ARGS="--middleboxes 3 --packets 500"
mininet: setup
	/usr/bin/python3 topologies/mininet_lab.py --python $(PYTHON) $(MININET_ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The container image (docs/container.md): podman, a debootstrapped Debian 12 base, a wheelhouse.
container: setup
	VENV=$(VENV) topologies/container-build.sh

# Builds both images and runs the demo and the fast tests inside (minutes; CI runs it too).
test-container: setup
	$(PYTHON) -m pytest -m container $(PYTEST_ARGS)

# Pure logic only (grammar, ring, channel): seconds, no root, no OVS.
test-fast:
	$(PYTHON) -m pytest -m "not host" $(PYTEST_ARGS)

# Line coverage of the shell (app, service, reconcilers, REST, agent) from the fast tests alone.
SHELL_MODULES := controller/app.py,controller/service.py,controller/reconciler.py,controller/switchlink.py,controller/rest.py,controller/requests.py,controller/ofmessages.py,controller/store.py,agents/agent.py,agents/controller_client.py,agents/inventory.py
coverage:
	$(PYTHON) -m coverage run --source=controller,agents -m pytest -m "not host" $(PYTEST_ARGS)
	$(PYTHON) -m coverage report --include='$(SHELL_MODULES)' --fail-under=85

# The suite (docs/benchmarks.md is written from its results; under 20 minutes on 2 cores).
bench: setup
	$(VENV)/bin/mbvisor bench all

bench-quick: setup
	$(VENV)/bin/mbvisor bench all --quick --results results/bench-quick --output results/bench-quick/benchmarks.md --plot results/bench-quick/benchmarks.png

# The per-component benchmarks (channel ring, controller, agent).
bench-components: setup
	$(PYTHON) bench/channel.py
	$(PYTHON) bench/controller.py
	$(PYTHON) bench/agent.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
