# converse on AWS: HTTPS (API Gateway HTTP API) -> Lambda (FastAPI + Mangum)
# for request/response routes, and an internet-facing ALB (behind CloudFront
# or with an ACM certificate) -> the same API image on ECS for live sessions;
# both reach Triton on ECS/EC2 GPU hosts through an internal ALB (HTTP), and
# the sessions service makes its inference calls (the chat LM's token stream
# included) through an internal NLB (gRPC), with S3 and DynamoDB behind VPC
# endpoints. Modules: network, data, model_store, triton, api, sessions.

locals {
  triton_port = 8000
  # Settings the Lambda and the sessions service share (handler/settings.py). The
  # timeouts are among them: settings refuse to load unless triton < lambda < gateway
  # timeouts, in the sessions service too.
  app_environment = {
    CONVERSE_TRITON_URL              = "${module.triton.alb_dns_name}:${local.triton_port}"
    CONVERSE_TRITON_TIMEOUT_S        = tostring(var.triton_client_timeout_s)
    CONVERSE_LAMBDA_TIMEOUT_S        = tostring(var.lambda_timeout_s)
    CONVERSE_GATEWAY_TIMEOUT_S       = tostring(var.gateway_timeout_ms / 1000)
    CONVERSE_STORAGE_BACKEND         = "dynamodb"
    CONVERSE_DYNAMODB_VOICES_TABLE   = module.data.voices_table_name
    CONVERSE_DYNAMODB_USAGE_TABLE    = module.data.usage_table_name
    CONVERSE_DYNAMODB_RATE_TABLE     = module.data.rate_table_name
    CONVERSE_DYNAMODB_SESSIONS_TABLE = module.data.sessions_table_name
    CONVERSE_BLOB_BACKEND            = "s3"
    CONVERSE_S3_BUCKET               = module.data.audio_bucket_name
    CONVERSE_API_KEYS_SECRET_ARN     = module.data.api_keys_secret_arn
  }
  # The sessions service also streams the chat LM and makes every inference call
  # over gRPC, so a cancelled call (barge-in, a client gone) stops inside Triton.
  sessions_environment = merge(local.app_environment, {
    CONVERSE_TRITON_GRPC_URL = module.triton.grpc_endpoint
    CONVERSE_TRITON_PROTOCOL = "grpc"
  })
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
  source                                 = "./modules/data"
  name                                   = var.name
  audio_expiry_days                      = var.audio_expiry_days
  kms_rotation_days                      = var.kms_key_rotation_days
  log_retention_days                     = var.log_retention_days
  create_autoscaling_service_linked_role = var.create_autoscaling_service_linked_role
}

module "model_store" {
  source      = "./modules/model_store"
  name        = var.name
  kms_key     = module.data.kms_key_arn
  logs_bucket = module.data.logs_bucket
}

module "triton" {
  source                    = "./modules/triton"
  name                      = var.name
  region                    = var.region
  vpc_id                    = module.network.vpc_id
  private_subnet_ids        = module.network.private_subnet_ids
  instance_type             = var.gpu_instance_type
  min_instances             = var.min_gpu_instances
  max_instances             = var.max_gpu_instances
  scale_from_zero           = var.min_gpu_instances == 0
  image                     = var.triton_image
  port                      = local.triton_port
  shm_size_mb               = var.triton_shm_size_mb
  model_bucket_arn          = module.model_store.bucket_arn
  model_bucket_name         = module.model_store.bucket_name
  client_security_group_ids = [module.api.security_group_id, module.sessions.security_group_id]
  # Only the sessions service streams the chat LM over gRPC.
  grpc_client_security_group_ids = [module.sessions.security_group_id]
  queue_time_target_us           = var.queue_time_target_us
  gpu_utilization_high           = var.gpu_utilization_high
  kms_key                        = module.data.kms_key_arn
  log_retention_days             = var.log_retention_days
  logs_bucket                    = module.data.logs_bucket
}

module "api" {
  source               = "./modules/api"
  name                 = var.name
  region               = var.region
  vpc_id               = module.network.vpc_id
  private_subnet_ids   = module.network.private_subnet_ids
  image                = var.api_image
  environment          = merge(local.app_environment, { CONVERSE_PUBLIC_STREAM_URL = module.sessions.stream_url })
  triton_timeout_s     = var.triton_client_timeout_s
  lambda_timeout_s     = var.lambda_timeout_s
  gateway_timeout_ms   = var.gateway_timeout_ms
  reserved_concurrency = var.lambda_reserved_concurrency
  throttle_rate_limit  = var.throttle_rate_limit
  throttle_burst_limit = var.throttle_burst_limit
  audio_bucket_arn     = module.data.audio_bucket_arn
  voices_table_arn     = module.data.voices_table_arn
  usage_table_arn      = module.data.usage_table_arn
  rate_table_arn       = module.data.rate_table_arn
  sessions_table_arn   = module.data.sessions_table_arn
  api_keys_secret_arn  = module.data.api_keys_secret_arn
  kms_key              = module.data.kms_key_arn
  log_retention_days   = var.log_retention_days
}

module "sessions" {
  source               = "./modules/sessions"
  name                 = var.name
  region               = var.region
  vpc_id               = module.network.vpc_id
  public_subnet_ids    = module.network.public_subnet_ids
  private_subnet_ids   = module.network.private_subnet_ids
  image                = var.api_image
  environment          = local.sessions_environment
  sessions_table_name  = module.data.sessions_table_name
  app_policy_arn       = module.api.app_policy_arn
  ecr_repository_arn   = module.api.ecr_repository_arn
  kms_key              = module.data.kms_key_arn
  log_retention_days   = var.log_retention_days
  logs_bucket          = module.data.logs_bucket
  domain_name          = var.sessions_domain_name
  route53_zone_id      = var.sessions_route53_zone_id
  idle_timeout_s       = var.session_idle_timeout_s
  min_tasks            = var.min_session_tasks
  max_tasks            = var.max_session_tasks
  connections_per_task = var.connections_per_session_task
  max_live_per_task    = var.max_live_sessions_per_task
}
