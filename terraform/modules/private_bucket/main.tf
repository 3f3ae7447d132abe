# One private S3 bucket: public access blocked, encrypted at rest, versioning,
# TLS-only policy, lifecycle expiry, and access logging into another bucket.
#
# Encryption is SSE-KMS with the project key, except for the bucket that
# receives S3 server access logs and ALB access logs: neither service can
# write to an SSE-KMS bucket, so that one bucket uses SSE-S3 (kms_key_arn =
# null). Every count below is decided by a boolean the caller writes, never by
# a bucket name or key ARN that is only known after apply.

variable "name_prefix" { type = string }
variable "kms_key_arn" {
  description = "Project KMS key for SSE-KMS; null for SSE-S3 (only the log bucket)."
  type        = string
  default     = null
}
variable "expiry_days" { type = number }
variable "noncurrent_days" {
  type    = number
  default = 1
}
variable "log_access" {
  description = "Send this bucket's server access logs to access_log_bucket."
  type        = bool
  default     = true
}
variable "access_log_bucket" {
  description = "Bucket receiving this bucket's access logs (used when log_access)."
  type        = string
  default     = null
}
variable "receives_access_logs" {
  description = "This is the log bucket: let S3 server access logging and ELB access logging write to it."
  type        = bool
  default     = false
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket with its objects (the log bucket only: S3 keeps delivering access logs while the other buckets are deleted)."
  type        = bool
  default     = false
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

# Who may write ALB access logs (both ALBs log here; the gRPC NLB, whose
# principal would be delivery.logs.amazonaws.com, logs nothing: see its
# CKV_AWS_91 skip). AWS's "Enable access logs for your Application Load
# Balancer", step 2 "Attach a policy to your S3 bucket"
# (https://docs.aws.amazon.com/elasticloadbalancing/latest/application/enable-access-logging.html#attach-bucket-policy)
# grants s3:PutObject to the Region's Elastic Load Balancing account in the
# Regions available before August 2022, and to the service principal
# logdelivery.elasticloadbalancing.amazonaws.com in the Regions since
# (me-central-1, ap-south-2, eu-central-2, il-central-1, ca-west-1, ...),
# which have no such account; later revisions call the account policy legacy
# and recommend the service principal everywhere (as cited in
# terraform-aws-modules/terraform-aws-s3-bucket#405). So: the service
# principal in every Region, plus the account where hashicorp/aws's
# aws_elb_service_account knows one: its map (internal/service/elb/
# service_account_data_source.go; 5.100.0 checked) holds exactly the Regions
# below, and it fails the plan ("unsupported AWS Region") in any other. The
# same pair as terraform-aws-modules/s3-bucket's ELB log delivery policy
# (its PR #219).
locals {
  elb_account_regions = [
    "af-south-1", "ap-east-1", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3",
    "ap-south-1", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ca-central-1",
    "cn-north-1", "cn-northwest-1", "eu-central-1", "eu-north-1", "eu-south-1",
    "eu-west-1", "eu-west-2", "eu-west-3", "me-south-1", "sa-east-1",
    "us-east-1", "us-east-2", "us-gov-east-1", "us-gov-west-1", "us-west-1", "us-west-2",
  ]
  alb_log_prefix  = "${aws_s3_bucket.this.arn}/alb/AWSLogs/${data.aws_caller_identity.current.account_id}/*"
  elb_account_arn = one(data.aws_elb_service_account.current[*].arn)
}

data "aws_elb_service_account" "current" {
  count = var.receives_access_logs && contains(local.elb_account_regions, data.aws_region.current.name) ? 1 : 0
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:objects are expiring audio, logs or a model repository rebuilt by `make upload-models`; cross-region replication buys nothing
  #checkov:skip=CKV2_AWS_62:readers fetch objects by key; nothing reacts to new objects
  #checkov:skip=CKV_AWS_18:logging is configured by aws_s3_bucket_logging below, except on the log bucket itself (logging into itself would loop)
  #checkov:skip=CKV_AWS_145:SSE-KMS with the project key everywhere except the log bucket, which S3 and ELB access logging can only write with SSE-S3
  bucket_prefix = var.name_prefix
  force_destroy = var.force_destroy
  lifecycle {
    precondition {
      condition     = !var.log_access || var.access_log_bucket != null
      error_message = "log_access needs access_log_bucket."
    }
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    id     = "expire"
    status = "Enabled"
    filter {}
    expiration {
      days = var.expiry_days
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_s3_bucket_logging" "this" {
  count         = var.log_access ? 1 : 0
  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = "s3/${aws_s3_bucket.this.id}/"
}

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  dynamic "statement" {
    for_each = var.receives_access_logs ? ["s3"] : []
    content {
      sid       = "S3ServerAccessLogs"
      actions   = ["s3:PutObject"]
      resources = ["${aws_s3_bucket.this.arn}/s3/*"]
      principals {
        type        = "Service"
        identifiers = ["logging.s3.amazonaws.com"]
      }
      condition {
        test     = "StringEquals"
        variable = "aws:SourceAccount"
        values   = [data.aws_caller_identity.current.account_id]
      }
    }
  }
  dynamic "statement" {
    for_each = var.receives_access_logs ? ["alb"] : []
    content {
      sid       = "AlbAccessLogs"
      actions   = ["s3:PutObject"]
      resources = [local.alb_log_prefix]
      principals {
        type        = "Service"
        identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
      }
    }
  }
  dynamic "statement" {
    for_each = local.elb_account_arn == null ? [] : [local.elb_account_arn]
    content {
      sid       = "AlbAccessLogsRegionAccount"
      actions   = ["s3:PutObject"]
      resources = [local.alb_log_prefix]
      principals {
        type        = "AWS"
        identifiers = [statement.value]
      }
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.this.json
}

output "id" {
  description = "Bucket name, available once its policy is in place (log writers check it when configured)."
  value       = aws_s3_bucket.this.id
  depends_on  = [aws_s3_bucket_policy.this, aws_s3_bucket_ownership_controls.this]
}
output "arn" { value = aws_s3_bucket.this.arn }
