# The API: a Lambda container image built from handler/ (no torch) in private
# subnets, fronted by an API Gateway HTTP API (TLS, throttling, access logs).
# It reaches Triton through the internal ALB and S3/DynamoDB/Secrets Manager
# through VPC endpoints. Timeouts: Triton client < Lambda < gateway.

variable "name" { type = string }
variable "region" { type = string }
variable "vpc_id" { type = string }
variable "private_subnet_ids" { type = list(string) }
variable "image" { type = string }
variable "environment" {
  description = "CONVERSE_* settings shared with the sessions service (storage, blobs, Triton, keys)."
  type        = map(string)
}
variable "triton_timeout_s" { type = number }
variable "lambda_timeout_s" { type = number }
variable "gateway_timeout_ms" { type = number }
variable "reserved_concurrency" {
  description = "Reserved concurrent executions; -1 reserves none (accounts with a quota of 10 cannot reserve any)."
  type        = number
}
variable "throttle_rate_limit" { type = number }
variable "throttle_burst_limit" { type = number }
variable "audio_bucket_arn" { type = string }
variable "voices_table_arn" { type = string }
variable "usage_table_arn" { type = string }
variable "rate_table_arn" { type = string }
variable "sessions_table_arn" { type = string }
variable "api_keys_secret_arn" { type = string }
variable "kms_key" { type = string }
variable "log_retention_days" { type = number }

resource "aws_ecr_repository" "api" {
  name                 = "${var.name}-api"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.kms_key
  }
}

resource "aws_security_group" "lambda" {
  name        = "${var.name}-api"
  description = "API Lambda: no inbound; outbound to Triton (VPC) and HTTPS endpoints"
  vpc_id      = var.vpc_id
  egress {
    description = "Triton HTTP on the internal ALB"
    from_port   = 8000
    to_port     = 8000
    protocol    = "tcp"
    cidr_blocks = [data.aws_vpc.this.cidr_block]
  }
  egress {
    description = "HTTPS to S3, DynamoDB and Secrets Manager endpoints"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

data "aws_vpc" "this" {
  id = var.vpc_id
}

resource "aws_cloudwatch_log_group" "lambda" {
  name              = "/aws/lambda/${var.name}-api"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key
}

resource "aws_cloudwatch_log_group" "gateway" {
  name              = "/${var.name}/api-gateway"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key
}

# What the application needs, wherever it runs (the Lambda here, the sessions
# service on ECS): objects under responses/ and uploads/ in the audio bucket
# and ListBucket on it (without ListBucket S3 answers a missing key with 403,
# not 404, and an unknown audio_id would become a 500); items in its tables and
# the voices index; the API key digests secret; the project KMS key.
data "aws_iam_policy_document" "app" {
  statement {
    sid       = "AudioObjects"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${var.audio_bucket_arn}/responses/*", "${var.audio_bucket_arn}/uploads/*"]
  }
  statement {
    sid       = "AudioBucketList"
    actions   = ["s3:ListBucket"]
    resources = [var.audio_bucket_arn]
  }
  statement {
    sid = "Tables"
    actions = [
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DeleteItem",
      "dynamodb:Query",
    ]
    resources = [
      var.voices_table_arn,
      "${var.voices_table_arn}/index/by_sort_key",
      var.usage_table_arn,
      var.rate_table_arn,
      var.sessions_table_arn,
    ]
  }
  statement {
    sid       = "ApiKeyDigests"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.api_keys_secret_arn]
  }
  statement {
    sid       = "ProjectKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key]
  }
}

resource "aws_iam_policy" "app" {
  name        = "${var.name}-app"
  description = "converse API: audio objects, tables, key digests, project key"
  policy      = data.aws_iam_policy_document.app.json
}

# Lambda role: the app policy, its own log group; managed VPC ENIs
# (AWSLambdaVPCAccessExecutionRole) and X-Ray (AWSXRayDaemonWriteAccess),
# whose EC2/X-Ray actions have no resource-level permissions.
data "aws_iam_policy_document" "lambda_logs" {
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.lambda.arn}:*"]
  }
}

module "lambda_role" {
  source          = "../service_role"
  name            = "${var.name}-api"
  service         = "lambda.amazonaws.com"
  inline_policies = { "logs" = data.aws_iam_policy_document.lambda_logs.json }
  managed_policy_arns = [
    aws_iam_policy.app.arn,
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
    "arn:aws:iam::aws:policy/AWSXRayDaemonWriteAccess",
  ]
}

resource "aws_lambda_function" "api" {
  #checkov:skip=CKV_AWS_116:synchronous API behind API Gateway; the caller gets the error, there is no async event to dead-letter
  #checkov:skip=CKV_AWS_272:images come from the project's own ECR repository with scan on push; Lambda code signing applies to zip packages only
  #checkov:skip=CKV_AWS_115:reserved concurrency is the variable lambda_reserved_concurrency; its default (-1, none) lets accounts with a concurrency quota of 10 deploy; the gateway's throttling caps load
  function_name                  = "${var.name}-api"
  role                           = module.lambda_role.arn
  package_type                   = "Image"
  image_uri                      = var.image
  memory_size                    = 2048
  timeout                        = var.lambda_timeout_s
  reserved_concurrent_executions = var.reserved_concurrency
  kms_key_arn                    = var.kms_key
  vpc_config {
    subnet_ids         = var.private_subnet_ids
    security_group_ids = [aws_security_group.lambda.id]
  }
  tracing_config {
    mode = "Active"
  }
  environment {
    variables = var.environment
  }
  depends_on = [aws_cloudwatch_log_group.lambda]
  lifecycle {
    # Fails `terraform plan`: the service, not the gateway, must answer slow requests.
    precondition {
      condition     = var.triton_timeout_s < var.lambda_timeout_s && var.lambda_timeout_s * 1000 < var.gateway_timeout_ms
      error_message = "Timeouts must be ordered: triton_client_timeout_s < lambda_timeout_s < gateway_timeout_ms / 1000."
    }
  }
}

# HTTP API rather than a REST API: lower latency and price, native Lambda
# proxy (payload v2), built-in TLS; the 30 s integration cap is above the
# Lambda timeout. Rate limits per key are enforced by the API itself.
resource "aws_apigatewayv2_api" "this" {
  name          = var.name
  protocol_type = "HTTP"
}

resource "aws_apigatewayv2_integration" "lambda" {
  api_id                 = aws_apigatewayv2_api.this.id
  integration_type       = "AWS_PROXY"
  integration_uri        = aws_lambda_function.api.invoke_arn
  payload_format_version = "2.0"
  timeout_milliseconds   = var.gateway_timeout_ms
}

resource "aws_apigatewayv2_route" "default" {
  #checkov:skip=CKV_AWS_309:the API authenticates every route but /health itself (API keys, constant-time digest comparison); a gateway authorizer would duplicate it and add latency
  api_id    = aws_apigatewayv2_api.this.id
  route_key = "$default"
  target    = "integrations/${aws_apigatewayv2_integration.lambda.id}"
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.this.id
  name        = "$default"
  auto_deploy = true
  default_route_settings {
    throttling_rate_limit  = var.throttle_rate_limit
    throttling_burst_limit = var.throttle_burst_limit
  }
  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.gateway.arn
    format = jsonencode({
      requestId = "$context.requestId"
      ip        = "$context.identity.sourceIp"
      route     = "$context.routeKey"
      status    = "$context.status"
      latencyMs = "$context.integrationLatency"
    })
  }
}

resource "aws_lambda_permission" "gateway" {
  statement_id  = "AllowHttpApi"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.api.function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.this.execution_arn}/*"
}

output "endpoint_url" { value = aws_apigatewayv2_api.this.api_endpoint }
output "security_group_id" { value = aws_security_group.lambda.id }
output "ecr_repository_url" { value = aws_ecr_repository.api.repository_url }
output "ecr_repository_arn" { value = aws_ecr_repository.api.arn }
output "app_policy_arn" { value = aws_iam_policy.app.arn }
