# Triton image: the NGC server plus what the repository's python models import.
# numpy stays below 2 (the python backend returns empty tensors with numpy 2).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN pip install --no-cache-dir "numpy<2" "sanotts==0.5.0" "onnxruntime>=1.20"
