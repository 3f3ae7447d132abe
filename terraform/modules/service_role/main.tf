# One IAM role that an AWS service assumes, with an optional inline policy and
# optional AWS-managed policies. Every role of the project is made here, so
# trust policies are written once.

variable "name" { type = string }
variable "service" {
  description = "Service principal allowed to assume the role, e.g. lambda.amazonaws.com."
  type        = string
}
variable "policy_json" {
  description = "Inline policy document (JSON), or null for none."
  type        = string
  default     = null
}
variable "managed_policy_arns" {
  description = "AWS-managed policies to attach."
  type        = list(string)
  default     = []
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = [var.service]
    }
  }
}

resource "aws_iam_role" "this" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "this" {
  count  = var.policy_json == null ? 0 : 1
  role   = aws_iam_role.this.id
  policy = var.policy_json
}

resource "aws_iam_role_policy_attachment" "this" {
  for_each   = toset(var.managed_policy_arns)
  role       = aws_iam_role.this.name
  policy_arn = each.value
}

output "arn" { value = aws_iam_role.this.arn }
output "name" { value = aws_iam_role.this.name }
