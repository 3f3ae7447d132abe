# Data: the project's KMS key, the S3 bucket for large responses and uploads
# (private, encrypted, expiring), an access-log bucket (SSE-S3: S3 and ELB
# access logging cannot write SSE-KMS), DynamoDB tables for saved voices,
# usage, rate-limit buckets and live sessions (with TTL), and the API key
# digests secret.

variable "name" { type = string }
variable "audio_expiry_days" { type = number }
variable "kms_rotation_days" { type = number }
variable "log_retention_days" { type = number }
variable "create_autoscaling_service_linked_role" {
  description = "Create AWSServiceRoleForAutoScaling (false where the account already has it)."
  type        = bool
}

# The Auto Scaling service-linked role launches the GPU hosts and so must use
# the key that encrypts their root volumes. KMS refuses a key policy naming a
# principal that does not exist, and a fresh account has no such role until
# its first Auto Scaling group: create it here unless it already exists.
resource "aws_iam_service_linked_role" "autoscaling" {
  count            = var.create_autoscaling_service_linked_role ? 1 : 0
  aws_service_name = "autoscaling.amazonaws.com"
}

locals {
  autoscaling_role_arn = (var.create_autoscaling_service_linked_role
    ? aws_iam_service_linked_role.autoscaling[0].arn
  : "arn:aws:iam::${data.aws_caller_identity.current.account_id}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:key policy; "*" resources mean this key only
  #checkov:skip=CKV_AWS_356:key policy; "*" resources mean this key only
  #checkov:skip=CKV_AWS_109:the account-root administration statement is AWS's default key policy, without which the key becomes unmanageable
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy "*" means this key
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"] # in a key policy "*" means this key
    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
    }
  }
  # EBS root volumes of instances that Auto Scaling launches (AWS's documented
  # key policy for a customer managed key on Auto Scaling volumes).
  statement {
    sid       = "AutoScalingUsesKeyForVolumes"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"] # in a key policy "*" means this key
    principals {
      type        = "AWS"
      identifiers = [local.autoscaling_role_arn]
    }
  }
  statement {
    sid       = "AutoScalingGrantsForVolumes"
    actions   = ["kms:CreateGrant"]
    resources = ["*"] # in a key policy "*" means this key
    principals {
      type        = "AWS"
      identifiers = [local.autoscaling_role_arn]
    }
    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: S3, DynamoDB, logs, secrets, Lambda environment"
  enable_key_rotation     = true
  rotation_period_in_days = var.kms_rotation_days
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

module "logs_bucket" {
  source               = "../private_bucket"
  name_prefix          = "${var.name}-logs-"
  kms_key_arn          = null # SSE-S3: the only encryption S3 and ELB access logging can write
  expiry_days          = var.log_retention_days
  noncurrent_days      = 30
  log_access           = false # logging into itself would loop
  receives_access_logs = true
  force_destroy        = true # logs keep arriving while the other buckets are deleted
}

module "audio_bucket" {
  source            = "../private_bucket"
  name_prefix       = "${var.name}-audio-"
  kms_key_arn       = aws_kms_key.this.arn
  expiry_days       = var.audio_expiry_days
  access_log_bucket = module.logs_bucket.id
}

locals {
  # Sessions: one item per live session (key_id = API key digest id, id =
  # session id); DynamoDB deletes it after `expires_at` (epoch seconds).
  tables = {
    voices      = { hash = "key_id", range = "id", extra = ["id", "sort_key"], ttl = null }
    usage       = { hash = "key_id", range = null, extra = [], ttl = null }
    rate-limits = { hash = "key_id", range = null, extra = [], ttl = null }
    sessions    = { hash = "key_id", range = "id", extra = ["id"], ttl = "expires_at" }
  }
}

resource "aws_dynamodb_table" "this" {
  for_each     = local.tables
  name         = "${var.name}-${each.key}"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = each.value.hash
  range_key    = each.value.range

  attribute {
    name = "key_id"
    type = "S"
  }

  dynamic "attribute" {
    for_each = each.value.extra
    content {
      name = attribute.value
      type = "S"
    }
  }

  dynamic "local_secondary_index" {
    for_each = each.key == "voices" ? ["by_sort_key"] : []
    content {
      name            = local_secondary_index.value
      range_key       = "sort_key"
      projection_type = "ALL"
    }
  }

  dynamic "ttl" {
    for_each = each.value.ttl == null ? [] : [each.value.ttl]
    content {
      attribute_name = ttl.value
      enabled        = true
    }
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.this.arn
  }
}

resource "aws_secretsmanager_secret" "api_keys" {
  #checkov:skip=CKV2_AWS_57:the secret holds key digests that operators rotate by hand (docs/deploy.md, "Rotate API keys"); there is no credential for a rotation Lambda to regenerate
  name_prefix = "${var.name}-api-key-sha256-"
  description = "Comma-separated SHA-256 digests of accepted API keys (CONVERSE_API_KEY_SHA256)"
  kms_key_id  = aws_kms_key.this.arn
}

output "kms_key_arn" { value = aws_kms_key.this.arn }
output "logs_bucket" { value = module.logs_bucket.id }
output "audio_bucket_arn" { value = module.audio_bucket.arn }
output "audio_bucket_name" { value = module.audio_bucket.id }
output "voices_table_arn" { value = aws_dynamodb_table.this["voices"].arn }
output "usage_table_arn" { value = aws_dynamodb_table.this["usage"].arn }
output "rate_table_arn" { value = aws_dynamodb_table.this["rate-limits"].arn }
output "voices_table_name" { value = aws_dynamodb_table.this["voices"].name }
output "usage_table_name" { value = aws_dynamodb_table.this["usage"].name }
output "rate_table_name" { value = aws_dynamodb_table.this["rate-limits"].name }
output "sessions_table_arn" { value = aws_dynamodb_table.this["sessions"].arn }
output "sessions_table_name" { value = aws_dynamodb_table.this["sessions"].name }
output "api_keys_secret_arn" { value = aws_secretsmanager_secret.api_keys.arn }
