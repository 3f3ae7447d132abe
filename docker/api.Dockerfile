# Lambda image of the API: handler/ and its dependencies, no torch.
FROM public.ecr.aws/lambda/python:3.11
COPY pyproject.toml README.md ${LAMBDA_TASK_ROOT}/
COPY handler ${LAMBDA_TASK_ROOT}/handler
RUN pip install --no-cache-dir "${LAMBDA_TASK_ROOT}" --target "${LAMBDA_TASK_ROOT}" \
    && python -c "import sys, handler.app; assert 'torch' not in sys.modules"
CMD ["handler.lambda_function.handler"]
