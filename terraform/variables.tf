variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "converse"
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "vpc_cidr" {
  description = "CIDR of the VPC."
  type        = string
  default     = "10.40.0.0/16"
}

variable "gpu_instance_type" {
  description = "EC2 instance type of the Triton hosts."
  type        = string
  default     = "g5.xlarge"
}

variable "min_gpu_instances" {
  description = "Fewest Triton hosts (0 lets the service scale to zero)."
  type        = number
  default     = 1
}

variable "max_gpu_instances" {
  description = "Most Triton hosts."
  type        = number
  default     = 4
}

variable "triton_image" {
  description = "Triton container image (NGC base + the python models' dependencies), pushed by `make images`."
  type        = string
}

variable "api_image" {
  description = "Lambda container image of handler/ (no torch), pushed by `make images`."
  type        = string
}

variable "queue_time_target_us" {
  description = "Target Triton queue time per request (nv_inference_queue_duration_us / request), microseconds."
  type        = number
  default     = 50000
}

variable "gpu_utilization_high" {
  description = "GPU utilisation percent above which one more host is added."
  type        = number
  default     = 85
}

variable "triton_client_timeout_s" {
  description = "Deadline of the API's Triton calls, seconds (< lambda_timeout_s)."
  type        = number
  default     = 20
}

variable "lambda_timeout_s" {
  description = "Lambda timeout, seconds (< the 30 s HTTP API integration limit)."
  type        = number
  default     = 25
}

variable "gateway_timeout_ms" {
  description = "API Gateway integration timeout, milliseconds (HTTP API maximum 30000)."
  type        = number
  default     = 29000
}

variable "lambda_reserved_concurrency" {
  description = "Reserved concurrent executions of the API Lambda."
  type        = number
  default     = 50
}

variable "throttle_rate_limit" {
  description = "API Gateway steady-state requests per second."
  type        = number
  default     = 50
}

variable "throttle_burst_limit" {
  description = "API Gateway burst requests."
  type        = number
  default     = 100
}

variable "audio_expiry_days" {
  description = "Days after which large responses and uploads are deleted from S3."
  type        = number
  default     = 1
}

variable "log_retention_days" {
  description = "CloudWatch log retention, days."
  type        = number
  default     = 365
}

variable "kms_key_rotation_days" {
  description = "Rotation period of the project's KMS key, days."
  type        = number
  default     = 365
}
