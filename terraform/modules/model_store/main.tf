# The Triton model repository in S3 (`make upload-models` syncs the
# `--target gpu` export here); Triton hosts read it with their task role.

variable "name" { type = string }
variable "kms_key" { type = string }
variable "logs_bucket" { type = string }

module "bucket" {
  source            = "../private_bucket"
  name_prefix       = "${var.name}-models-"
  kms_key_arn       = var.kms_key
  expiry_days       = 3650
  noncurrent_days   = 30
  access_log_bucket = var.logs_bucket
}

output "bucket_arn" { value = module.bucket.arn }
output "bucket_name" { value = module.bucket.id }
