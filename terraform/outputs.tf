output "endpoint_url" {
  description = "HTTPS endpoint of the API."
  value       = module.api.endpoint_url
}

output "stream_url" {
  description = "Base URL of live sessions and streams (wss://...; https:// for SSE on the same host)."
  value       = module.sessions.stream_url
}

output "sessions_url" {
  description = "HTTPS base URL of the sessions service."
  value       = module.sessions.https_url
}

output "audio_bucket" {
  description = "Bucket for large responses and uploads."
  value       = module.data.audio_bucket_name
}

output "model_bucket" {
  description = "Bucket that holds the Triton model repository (upload with `make upload-models`)."
  value       = module.model_store.bucket_name
}

output "api_keys_secret_arn" {
  description = "Secrets Manager secret holding the accepted API key SHA-256 digests."
  value       = module.data.api_keys_secret_arn
}

output "ecr_repositories" {
  description = "ECR repositories for the API and Triton images."
  value       = { api = module.api.ecr_repository_url, triton = module.triton.ecr_repository_url }
}

output "region" {
  description = "Region of the deployment (scripts/push_images.sh logs in to ECR there)."
  value       = var.region
}

output "logs_bucket" {
  description = "Bucket of S3 and ALB access logs (SSE-S3)."
  value       = module.data.logs_bucket
}
