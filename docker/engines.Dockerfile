# Engine builder: the Triton release that serves the engines plus what
# `python -m export csm --tensorrt` needs (the export extra and the pinned
# requirements/tensorrt.txt), so plans are built by the TensorRT that loads
# them. `make engines` builds it with TRITON_RELEASE from export/tensorrt.py
# and runs the export in it on a GPU (docs/csm.md).
ARG TRITON_RELEASE
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The project needs Python 3.11 (pyproject); the Ubuntu 22.04 base has it in
# universe. Unpinned: the image's release fixes the Ubuntu snapshot.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/converse
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY model_repository model_repository
COPY handler handler
COPY export export
COPY devtools devtools
# Editable: the exporter reads the templates of model_repository/ beside it.
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -e ".[export]" -r requirements/tensorrt.txt
ENV PATH=/opt/venv/bin:$PATH
