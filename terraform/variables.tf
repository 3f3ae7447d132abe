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

variable "triton_shm_size_mb" {
  description = "/dev/shm of the Triton container, MiB (the python backend and BLS pass tensors and KV caches through it)."
  type        = number
  default     = 4096
}

variable "create_autoscaling_service_linked_role" {
  description = "Create the AWSServiceRoleForAutoScaling role, which the project key's policy names; set false if `aws iam get-role --role-name AWSServiceRoleForAutoScaling` finds it."
  type        = bool
  default     = true
}

variable "triton_client_timeout_s" {
  description = "Deadline of the API's Triton calls, seconds (< lambda_timeout_s; plan fails otherwise)."
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
  validation {
    condition     = var.gateway_timeout_ms >= 50 && var.gateway_timeout_ms <= 30000
    error_message = "An HTTP API integration timeout lies between 50 and 30000 ms."
  }
}

variable "lambda_reserved_concurrency" {
  description = "Reserved concurrent executions of the API Lambda; -1 reserves none (new accounts with a quota of 10 cannot reserve any)."
  type        = number
  default     = -1
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

variable "sessions_domain_name" {
  description = "Host name for live sessions (e.g. live.example.com) with an ACM certificate on the ALB; null serves them on CloudFront's own *.cloudfront.net name."
  type        = string
  default     = null
}

variable "sessions_route53_zone_id" {
  description = "Route 53 hosted zone of sessions_domain_name (certificate validation and the alias record)."
  type        = string
  default     = null
}

variable "session_idle_timeout_s" {
  description = "Seconds a live session may stay silent before the service closes it (the ALB waits 60 s longer)."
  type        = number
  default     = 300
  validation {
    condition     = var.session_idle_timeout_s >= 30 && var.session_idle_timeout_s <= 3600
    error_message = "session_idle_timeout_s lies between 30 and 3600 (the ALB idle timeout is at most 4000 s)."
  }
}

variable "min_session_tasks" {
  description = "Fewest tasks of the sessions service (Fargate, 1 vCPU / 2 GB each)."
  type        = number
  default     = 1
}

variable "max_session_tasks" {
  description = "Most tasks of the sessions service."
  type        = number
  default     = 4
}

variable "connections_per_session_task" {
  description = "Target concurrent client connections per sessions task (scaling); below max_live_sessions_per_task."
  type        = number
  default     = 50
}

variable "max_live_sessions_per_task" {
  description = "Live session sockets one sessions task serves (CONVERSE_SESSION_MAX_LIVE); one more is closed with 4503."
  type        = number
  default     = 64
  validation {
    condition     = var.max_live_sessions_per_task >= 1
    error_message = "max_live_sessions_per_task must be at least 1."
  }
}
