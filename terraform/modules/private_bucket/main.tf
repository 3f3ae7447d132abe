# One private S3 bucket: public access blocked, SSE-KMS, versioning, TLS-only
# policy, lifecycle expiry, and access logging into another bucket (unless it
# is the log bucket itself).

variable "name_prefix" { type = string }
variable "kms_key_arn" { type = string }
variable "expiry_days" { type = number }
variable "noncurrent_days" {
  type    = number
  default = 1
}
variable "access_log_bucket" {
  description = "Bucket receiving this bucket's access logs; null for the log bucket itself."
  type        = string
  default     = null
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:objects are expiring audio, logs or a model repository rebuilt by `make upload-models`; cross-region replication buys nothing
  #checkov:skip=CKV2_AWS_62:readers fetch objects by key; nothing reacts to new objects
  #checkov:skip=CKV_AWS_18:logging is configured by aws_s3_bucket_logging below, except on the log bucket itself (logging into itself would loop)
  bucket_prefix = var.name_prefix
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
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
  count         = var.access_log_bucket == null ? 0 : 1
  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = "s3/${aws_s3_bucket.this.id}/"
}

data "aws_iam_policy_document" "tls_only" {
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
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.tls_only.json
}

output "id" { value = aws_s3_bucket.this.id }
output "arn" { value = aws_s3_bucket.this.arn }
