#!/usr/bin/env bash
# Build and push the API and Triton images to the ECR repositories that
# terraform created: scripts/push_images.sh TAG
#
# linux/amd64 (Lambda and the GPU hosts are x86_64, whatever the build
# machine is) and --provenance=false: buildx otherwise pushes an image index
# with an attestation manifest, which Lambda refuses. Tags are immutable in
# ECR, so a tag that is already there is left alone (a re-run succeeds);
# push changed code under a new TAG.
set -euo pipefail
tag="${1:?usage: scripts/push_images.sh TAG}"
cd "$(dirname "$0")/.."
region=$(terraform -chdir=terraform output -raw region 2>/dev/null || true)
region="${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-}}}"
test -n "$region" || { echo "no region: terraform output region, AWS_REGION or AWS_DEFAULT_REGION" >&2; exit 1; }
repos=$(terraform -chdir=terraform output -json ecr_repositories)
api_repo=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["api"])' <<<"$repos")
triton_repo=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["triton"])' <<<"$repos")
registry="${api_repo%%/*}"
aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"

push() {  # push REPOSITORY_URL DOCKERFILE
  local repo="$1" dockerfile="$2" name="${1#*/}"
  if aws ecr describe-images --region "$region" --repository-name "$name" \
      --image-ids imageTag="$tag" >/dev/null 2>&1; then
    echo "$repo:$tag already exists (tags are immutable): kept; use a new TAG for new code" >&2
    return
  fi
  docker buildx build --platform linux/amd64 --provenance=false --sbom=false \
    -f "$dockerfile" -t "$repo:$tag" --push .
}
push "$api_repo" docker/api.Dockerfile
push "$triton_repo" docker/triton.Dockerfile
echo "api_image    = \"$api_repo:$tag\""
echo "triton_image = \"$triton_repo:$tag\""
