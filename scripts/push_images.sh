#!/usr/bin/env bash
# Build and push the API and Triton images to the ECR repositories that
# terraform created: scripts/push_images.sh TAG
set -euo pipefail
tag="$1"
cd "$(dirname "$0")/.."
api_repo=$(terraform -chdir=terraform output -json ecr_repositories | python3 -c 'import json,sys; print(json.load(sys.stdin)["api"])')
triton_repo=$(terraform -chdir=terraform output -json ecr_repositories | python3 -c 'import json,sys; print(json.load(sys.stdin)["triton"])')
registry="${api_repo%%/*}"
aws ecr get-login-password | docker login --username AWS --password-stdin "$registry"
docker build -f docker/api.Dockerfile -t "$api_repo:$tag" .
docker build -f docker/triton.Dockerfile -t "$triton_repo:$tag" .
docker push "$api_repo:$tag"
docker push "$triton_repo:$tag"
echo "api_image    = \"$api_repo:$tag\""
echo "triton_image = \"$triton_repo:$tag\""
