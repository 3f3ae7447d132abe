# Triton image: the NGC server plus what the repository's python models import
# (model_repository/requirements.txt, the one list; numpy stays below 2 there).
# Build from the checkout root: docker build -f docker/triton.Dockerfile .
FROM nvcr.io/nvidia/tritonserver:24.10-py3
COPY model_repository/requirements.txt /opt/converse/requirements.txt
RUN pip install --no-cache-dir -r /opt/converse/requirements.txt
