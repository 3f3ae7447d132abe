# The execution role of one ECS service: pull its image from its own ECR
# repository, write its own log group, decrypt with the project key.

variable "name" { type = string }
variable "ecr_repository_arn" { type = string }
variable "log_group_arn" { type = string }
variable "kms_key" { type = string }

data "aws_iam_policy_document" "this" {
  statement {
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions
  }
  statement {
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [var.ecr_repository_arn]
  }
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${var.log_group_arn}:*"]
  }
  statement {
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key]
  }
}

module "role" {
  source          = "../service_role"
  name            = var.name
  service         = "ecs-tasks.amazonaws.com"
  inline_policies = { "pull-and-log" = data.aws_iam_policy_document.this.json }
}

output "arn" { value = module.role.arn }
