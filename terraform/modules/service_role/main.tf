# One IAM role that an AWS service assumes, with inline policies and
# AWS-managed or project policies. Every role of the project is made here, so
# trust policies are written once. Inline policies are a map whose keys are
# written in the caller (known at plan time) and managed policies are counted
# by list length, so unknown policy documents or ARNs never decide how many
# resources exist.

variable "name" { type = string }
variable "service" {
  description = "Service principal allowed to assume the role, e.g. lambda.amazonaws.com."
  type        = string
}
variable "inline_policies" {
  description = "Inline policy documents (JSON) by policy name; {} for none."
  type        = map(string)
  default     = {}
}
variable "managed_policy_arns" {
  description = "Managed policies to attach (AWS-managed or the project's own)."
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
  for_each = var.inline_policies
  name     = each.key
  role     = aws_iam_role.this.id
  policy   = each.value
}

resource "aws_iam_role_policy_attachment" "this" {
  count      = length(var.managed_policy_arns)
  role       = aws_iam_role.this.name
  policy_arn = var.managed_policy_arns[count.index]
}

output "arn" { value = aws_iam_role.this.arn }
output "name" { value = aws_iam_role.this.name }
