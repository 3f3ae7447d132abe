# converse on AWS: HTTPS (API Gateway HTTP API) -> Lambda (FastAPI + Mangum)
# -> internal ALB -> Triton on ECS/EC2 GPU hosts, with S3 and DynamoDB behind
# VPC endpoints. Module boundaries: network, data, model_store, triton, api.

locals {
  triton_port = 8000
}

check "deadlines_ordered" {
  assert {
    condition     = var.triton_client_timeout_s < var.lambda_timeout_s && var.lambda_timeout_s * 1000 < var.gateway_timeout_ms
    error_message = "Timeouts must be ordered: Triton client < Lambda < API gateway."
  }
}

module "network" {
  source   = "./modules/network"
  name     = var.name
  region   = var.region
  vpc_cidr = var.vpc_cidr
  kms_key  = module.data.kms_key_arn
  log_days = var.log_retention_days
}

module "data" {
  source             = "./modules/data"
  name               = var.name
  audio_expiry_days  = var.audio_expiry_days
  kms_rotation_days  = var.kms_key_rotation_days
  log_retention_days = var.log_retention_days
  s3_vpc_endpoint_id = module.network.s3_endpoint_id
}

module "model_store" {
  source      = "./modules/model_store"
  name        = var.name
  kms_key     = module.data.kms_key_arn
  logs_bucket = module.data.logs_bucket
}

module "triton" {
  source                   = "./modules/triton"
  name                     = var.name
  region                   = var.region
  vpc_id                   = module.network.vpc_id
  private_subnet_ids       = module.network.private_subnet_ids
  instance_type            = var.gpu_instance_type
  min_instances            = var.min_gpu_instances
  max_instances            = var.max_gpu_instances
  image                    = var.triton_image
  port                     = local.triton_port
  model_bucket_arn         = module.model_store.bucket_arn
  model_bucket_name        = module.model_store.bucket_name
  client_security_group_id = module.api.security_group_id
  queue_time_target_us     = var.queue_time_target_us
  gpu_utilization_high     = var.gpu_utilization_high
  kms_key                  = module.data.kms_key_arn
  log_retention_days       = var.log_retention_days
  logs_bucket              = module.data.logs_bucket
}

module "api" {
  source               = "./modules/api"
  name                 = var.name
  region               = var.region
  vpc_id               = module.network.vpc_id
  private_subnet_ids   = module.network.private_subnet_ids
  image                = var.api_image
  triton_url           = "${module.triton.endpoint}:${local.triton_port}"
  triton_timeout_s     = var.triton_client_timeout_s
  lambda_timeout_s     = var.lambda_timeout_s
  gateway_timeout_ms   = var.gateway_timeout_ms
  reserved_concurrency = var.lambda_reserved_concurrency
  throttle_rate_limit  = var.throttle_rate_limit
  throttle_burst_limit = var.throttle_burst_limit
  audio_bucket_arn     = module.data.audio_bucket_arn
  audio_bucket_name    = module.data.audio_bucket_name
  voices_table_arn     = module.data.voices_table_arn
  usage_table_arn      = module.data.usage_table_arn
  rate_table_arn       = module.data.rate_table_arn
  voices_table_name    = module.data.voices_table_name
  usage_table_name     = module.data.usage_table_name
  rate_table_name      = module.data.rate_table_name
  api_keys_secret_arn  = module.data.api_keys_secret_arn
  kms_key              = module.data.kms_key_arn
  log_retention_days   = var.log_retention_days
}
