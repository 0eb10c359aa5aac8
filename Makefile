# vmbus-emu: `make demo` runs the narrated multi-partition demo, `make test` the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# .installed-run: the project and its runtime dependencies, enough for the demo; .installed: plus the
# test and lint tools.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

# chromium: the web console tests; docker-compose (v1, Debian's): validates docker-compose.yml (no engine
# needed); arping: the compose file's TAP variant, run by its test; nft: cuts a network path (test_slow_peers);
# openssl and curl: the TLS tests' certificates and HTTPS client
SYSTOOLS := qemu-img qemu-io nbdcopy nbdinfo fio ip ping iperf3 chromium docker-compose arping nft openssl curl
SYSPKGS := qemu-utils libnbd-bin fio iproute2 iputils-ping iperf3 fonts-dejavu-core chromium docker-compose \
	iputils-arping nftables openssl curl
SYSFILES := /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf  # the guest console's font (fonts-dejavu-core)
.PHONY: venv sysdeps compose-secrets demo grade test lint typecheck unit integration integration-stream bench fuzz clean clean-disks distclean

# .ci/install-venv is the one install step, shared with the Dockerfile (tests/integration/test_compose.py checks).
$(RUN_STAMP): pyproject.toml .ci/install-venv
	.ci/install-venv $(VENV) -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	.ci/install-venv $(VENV) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The real client tools the tests drive (Debian packages); installed when missing and we are root.
sysdeps:
	@missing=""; for t in $(SYSTOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	for f in $(SYSFILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SYSPKGS) (missing:$$missing)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSPKGS) >/dev/null; \
	  else echo "missing:$$missing; run: sudo apt-get install -y $(SYSPKGS)" >&2; exit 1; fi; \
	fi

# docker-compose.yml's secrets (README "docker compose"), made once, never overwritten; needs only openssl. The
# directory is yours alone (0700), the files 0644: compose bind-mounts them with this mode, and the image's
# user (uid 10001) must read them.
SECRETS ?= secrets
compose-secrets:
	@mkdir -p $(SECRETS) && chmod 700 $(SECRETS)
	@for key in vmbus http; do f=$(SECRETS)/$$key.key; \
	  if [ -e $$f ]; then echo "$$f exists; kept"; \
	  else openssl rand -hex 32 > $$f.tmp && chmod 644 $$f.tmp && mv $$f.tmp $$f && echo "$$f made"; fi; done

demo: $(RUN_STAMP)
	$(VENV)/bin/parent-partition demo

# The teaching labs (labs/README.md): `make grade LAB=2` grades labs/02-*/starter, SOLUTION=1 the reference.
grade: $(STAMP)
	@test -n "$(LAB)" || { echo "usage: make grade LAB=N [SOLUTION=1]; the labs:"; $(PY) -m labs.grade --list; exit 2; }
	$(PY) -m labs.grade $(LAB) $(if $(SOLUTION),--solution)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict vmbus_proto parent_partition child_partition

# The suite runs in TEST_JOBS processes (pytest-xdist): most tests wait on real processes, not the CPU
# (2 cores: 3 processes 10.2 min; 4 processes 7-9 min, but a TAP ping test lost a frame in 2 of 7 runs).
TEST_JOBS ?= 3
PARALLEL := -n $(TEST_JOBS)

test: sysdeps lint typecheck
	$(VENV)/bin/pytest -q $(PARALLEL)

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

integration: $(STAMP) sysdeps
	$(VENV)/bin/pytest -q $(PARALLEL) tests/integration

# The integration tier with every child streaming, Unix sockets too (docs/protocol.md §14; by default a Unix
# child shares its memory, so `make test` runs Unix children in shared mode and TCP children streaming).
integration-stream: $(STAMP) sysdeps
	VMBUS_MEMORY_MODE=stream $(VENV)/bin/pytest -q $(PARALLEL) tests/integration

bench: $(STAMP) sysdeps
	$(PY) -m bench.run

# Coverage-guided fuzzing of every decoder (atheris, the `fuzz` extra), one process, targets in turn:
# `make fuzz FUZZ_SECONDS=1200 FUZZ_TARGET=frame`; FUZZ_ARGS=--save keeps new coverage in tests/fuzz/corpus.
FUZZ_TARGET ?= all
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	.ci/install-venv $(VENV) -e '.[fuzz]'
	$(PY) -m tests.fuzz --target $(FUZZ_TARGET) --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# The soak test (bench/soak.py, docs/reliability.md "Soak"): SOAK_SECONDS of mixed load over SOAK_PARTITIONS
# partitions with seeded kill -9s, pauses and a parent restart; then every acknowledged write is verified and the
# idle parent's tasks, fds and RSS are checked. The suite runs a bounded one (VMBUS_SOAK_SECONDS, default 60).
.PHONY: soak
SOAK_SECONDS ?= 600
SOAK_PARTITIONS ?= 32
SOAK_SEED ?= 1
soak: $(RUN_STAMP)
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) --partitions $(SOAK_PARTITIONS) --seed $(SOAK_SEED) $(SOAK_ARGS)

# `clean` keeps ./var, where the VMs' disks live; `clean-disks` (or `distclean`) deletes them, and says so.
clean:
	rm -rf $(VENV) run .mypy_cache .ruff_cache .pytest_cache .hypothesis var/fuzz
	@if [ -d var ]; then echo "kept ./var (the VMs' disk images); 'make clean-disks' deletes it"; fi

clean-disks:
	@if [ -d var ]; then echo "deleting the VMs' disk images in ./var:"; find var -name '*.img' -printf '  %p\n'; \
	  rm -rf var; else echo "no ./var: no disk images to delete"; fi

distclean: clean clean-disks
