# The image of the multi-VM demo (docker-compose.yml): one image for the parent and the VMs.
#
# Build stage: the project and its dependencies (pinned in pyproject.toml) installed once into a venv by
# .ci/install-venv, the same step `make venv` runs. Final stage: that venv, Python, the Debian packages the VMs
# use at run time, and a user without privileges; no pip cache, no build tools, no source tree.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# The same path in both stages: a venv's scripts name their interpreter by absolute path.
ARG VENV=/opt/vmbus-emu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY .ci/install-venv .ci/install-venv
COPY vmbus_proto vmbus_proto
COPY parent_partition parent_partition
COPY child_partition child_partition
RUN .ci/install-venv ${VENV} .

FROM ${PYTHON_IMAGE}
ARG VENV=/opt/vmbus-emu
# fonts-dejavu-core: the guest console's font; iproute2, iputils-ping, iputils-arping: the TAP variant.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-dejavu-core iproute2 iputils-ping iputils-arping \
 && rm -rf /var/lib/apt/lists/*
# The disks' volume and the Unix socket's volume are created owned by vmbus (a new named volume takes the
# ownership of the directory it is mounted on).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/vmbus vmbus \
 && install -d -o vmbus -g vmbus /var/lib/vmbus /run/vmbus
COPY --from=build ${VENV} ${VENV}
ENV PATH=${VENV}/bin:${PATH} PYTHONUNBUFFERED=1
USER vmbus
WORKDIR /home/vmbus
# 6464: VMBus over TCP; 8080: the web console, JSON API and /metrics.
EXPOSE 6464 8080
CMD ["parent-partition", "serve", "--help"]
