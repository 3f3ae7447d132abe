# API image: handler/ and its dependencies (no torch). One image, two runtimes:
#   Lambda (request/response routes): the default ENTRYPOINT/CMD, awslambdaric;
#   ECS sessions service (WebSockets, SSE): the task definition runs
#     python -m uvicorn handler.app:create_app --factory ...
# Debian bookworm (glibc 2.36), not the Lambda python:3.11 base (Amazon Linux
# 2, glibc 2.26): numpy, soxr and soundfile publish manylinux_2_28 wheels only.
# Python 3.11 exactly, as pyproject.toml requires. Build for linux/amd64.
FROM public.ecr.aws/docker/library/python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/src
COPY docker/api-requirements.txt pyproject.toml README.md ./
COPY handler ./handler
# Wheels only: a dependency without a wheel for this platform fails the build
# here (tests/test_image_wheels.py checks the same against PyPI).
RUN pip install --only-binary=:all: -r api-requirements.txt setuptools==84.2.1 \
    && pip install --no-build-isolation --only-binary=:all: --no-binary=converse . \
    && python -c "import sys, awslambdaric, uvicorn, websockets, mangum, handler.app; assert 'torch' not in sys.modules" \
    && rm -rf /tmp/src

WORKDIR /var/task
USER 65534:65534
ENTRYPOINT ["python", "-m", "awslambdaric"]
CMD ["handler.lambda_function.handler"]
