# Live sessions: WebSocket sessions and SSE streams cannot run in Lambda (no
# WebSocket, 29 s cap), so the same API image runs here as a long-lived ECS
# service (Fargate, uvicorn) behind an internet-facing ALB, which passes
# WebSocket upgrades and keeps idle connections open for idle_timeout_s.
#
# TLS: with a domain, an ACM certificate (DNS-validated in the given Route 53
# zone) on the ALB's HTTPS listener. Without one, a CloudFront distribution
# terminates TLS on its own *.cloudfront.net name and forwards to the ALB,
# whose security group admits only CloudFront's origin-facing prefix list and
# whose listener forwards only requests carrying CloudFront's secret header.
# The service scales on active connections per task.

variable "name" { type = string }
variable "region" { type = string }
variable "vpc_id" { type = string }
variable "public_subnet_ids" { type = list(string) }
variable "private_subnet_ids" { type = list(string) }
variable "image" { type = string }
variable "environment" {
  description = "CONVERSE_* settings shared with the Lambda (storage, blobs, Triton, keys), plus Triton's gRPC endpoint."
  type        = map(string)
}
variable "sessions_table_name" { type = string }
variable "app_policy_arn" { type = string }
variable "ecr_repository_arn" { type = string }
variable "kms_key" { type = string }
variable "log_retention_days" { type = number }
variable "logs_bucket" { type = string }
variable "domain_name" {
  description = "Host name of the sessions endpoint (e.g. live.example.com), or null for CloudFront's own name."
  type        = string
}
variable "route53_zone_id" {
  description = "Route 53 zone of domain_name (certificate validation and the alias record)."
  type        = string
}
variable "idle_timeout_s" {
  description = "Seconds a session may stay silent before the service closes it."
  type        = number
}
variable "min_tasks" { type = number }
variable "max_tasks" { type = number }
variable "connections_per_task" {
  description = "Target concurrent client connections per task."
  type        = number
}
variable "max_live_per_task" {
  description = "Live session sockets one task serves (CONVERSE_SESSION_MAX_LIVE)."
  type        = number
}

locals {
  port          = 8080
  custom_domain = var.domain_name != null
  # The ALB must keep a silent connection open longer than the service does,
  # so the service (which can say why) closes idle sessions, not the ALB.
  alb_idle_timeout_s = var.idle_timeout_s + 60
  origin_header      = "X-Origin-Verify"
  host               = local.custom_domain ? var.domain_name : aws_cloudfront_distribution.this[0].domain_name
  # CachingDisabled and AllViewerExceptHostHeader: AWS-managed policies with
  # fixed IDs (every header but Host reaches the ALB, Sec-WebSocket-* included).
  cache_policy_caching_disabled      = "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"
  origin_request_all_viewer_not_host = "b689b0a8-53d0-40ab-baf2-68738e2966ac"
}

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_ec2_managed_prefix_list" "cloudfront" {
  name = "com.amazonaws.global.cloudfront.origin-facing"
}

# Shared secret between CloudFront and the ALB. Generated once: the random
# value is kept by terraform_data, so later plans do not rotate it.
data "aws_secretsmanager_random_password" "origin" {
  password_length     = 40
  exclude_punctuation = true
}

resource "terraform_data" "origin_secret" {
  input = data.aws_secretsmanager_random_password.origin.random_password
  lifecycle {
    ignore_changes = [input]
  }
}

resource "aws_security_group" "alb" {
  name        = "${var.name}-sessions-alb"
  description = "Sessions ALB: HTTPS from clients (own domain) or HTTP from CloudFront only"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  #checkov:skip=CKV_AWS_260:not port 80: HTTPS from the internet to a public API endpoint
  count             = local.custom_domain ? 1 : 0
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS and WSS from clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "alb_redirect" {
  #checkov:skip=CKV_AWS_260:port 80 answers only with a redirect to HTTPS (listener "redirect")
  count             = local.custom_domain ? 1 : 0
  security_group_id = aws_security_group.alb.id
  description       = "HTTP from clients, redirected to HTTPS"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "alb_from_cloudfront" {
  #checkov:skip=CKV_AWS_260:port 80 from CloudFront's origin-facing prefix list only, not 0.0.0.0/0; CloudFront terminates TLS for clients
  count             = local.custom_domain ? 0 : 1
  security_group_id = aws_security_group.alb.id
  description       = "HTTP from CloudFront's origin-facing addresses only"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  prefix_list_id    = data.aws_ec2_managed_prefix_list.cloudfront.id
}

resource "aws_vpc_security_group_egress_rule" "alb_to_tasks" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the sessions tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.tasks.id
}

resource "aws_security_group" "tasks" {
  name        = "${var.name}-sessions-tasks"
  description = "Sessions tasks: from the sessions ALB; to Triton and AWS APIs"
  vpc_id      = var.vpc_id
  ingress {
    description     = "uvicorn from the sessions ALB"
    from_port       = local.port
    to_port         = local.port
    protocol        = "tcp"
    security_groups = [aws_security_group.alb.id]
  }
  egress {
    description = "Triton HTTP on the internal ALB"
    from_port   = 8000
    to_port     = 8000
    protocol    = "tcp"
    cidr_blocks = [data.aws_vpc.this.cidr_block]
  }
  # The VPC's CIDR, not the Triton balancers' groups: those admit this group,
  # so naming them here would make a cycle.
  egress {
    description = "Triton gRPC on the internal NLB"
    from_port   = 8001
    to_port     = 8001
    protocol    = "tcp"
    cidr_blocks = [data.aws_vpc.this.cidr_block]
  }
  egress {
    description = "HTTPS to ECR, S3, DynamoDB, Secrets Manager and CloudWatch"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_150:deletion protection would block `terraform destroy` in docs/deploy.md's tear-down; the ALB holds no state
  #checkov:skip=CKV2_AWS_20:with a domain, port 80 redirects to HTTPS (listener "redirect"); without one, the HTTP listener serves CloudFront only, which terminates TLS
  #checkov:skip=CKV2_AWS_28:WAF is optional: every route but /health authenticates with an API key, and CloudFront fronts the ALB without a domain; attach a web ACL where needed
  name                       = "${var.name}-sessions"
  internal                   = false
  load_balancer_type         = "application"
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  drop_invalid_header_fields = true
  idle_timeout               = local.alb_idle_timeout_s
  access_logs {
    bucket  = var.logs_bucket
    prefix  = "alb"
    enabled = true
  }
}

resource "aws_lb_target_group" "this" {
  #checkov:skip=CKV_AWS_378:plain HTTP from the ALB to tasks in private subnets; TLS ends at the ALB or CloudFront
  name                 = "${var.name}-sessions"
  port                 = local.port
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = min(var.idle_timeout_s, 3600) # let open sessions finish on scale-in
  health_check {
    path                = "/health"
    matcher             = "200"
    interval            = 15
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

# Own domain: ACM certificate, validated in the Route 53 zone.
resource "aws_acm_certificate" "this" {
  count             = local.custom_domain ? 1 : 0
  domain_name       = var.domain_name
  validation_method = "DNS"
  lifecycle {
    create_before_destroy = true
    precondition {
      condition     = var.route53_zone_id != null
      error_message = "sessions_domain_name needs sessions_route53_zone_id (certificate validation and the alias record)."
    }
  }
}

resource "aws_route53_record" "validation" {
  count           = local.custom_domain ? 1 : 0
  zone_id         = var.route53_zone_id
  name            = one(aws_acm_certificate.this[0].domain_validation_options).resource_record_name
  type            = one(aws_acm_certificate.this[0].domain_validation_options).resource_record_type
  records         = [one(aws_acm_certificate.this[0].domain_validation_options).resource_record_value]
  ttl             = 300
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "this" {
  count                   = local.custom_domain ? 1 : 0
  certificate_arn         = aws_acm_certificate.this[0].arn
  validation_record_fqdns = [aws_route53_record.validation[0].fqdn]
}

resource "aws_route53_record" "alias" {
  count   = local.custom_domain ? 1 : 0
  zone_id = var.route53_zone_id
  name    = var.domain_name
  type    = "A"
  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }
}

resource "aws_lb_listener" "https" {
  count             = local.custom_domain ? 1 : 0
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = aws_acm_certificate_validation.this[0].certificate_arn
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}

resource "aws_lb_listener" "redirect" {
  count             = local.custom_domain ? 1 : 0
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"
  default_action {
    type = "redirect"
    redirect {
      port        = "443"
      protocol    = "HTTPS"
      status_code = "HTTP_301"
    }
  }
}

# No domain: CloudFront terminates TLS; the ALB listens on HTTP for
# CloudFront only and refuses requests without the secret header.
resource "aws_lb_listener" "from_cloudfront" {
  #checkov:skip=CKV_AWS_2:reachable only from CloudFront (prefix list + secret header), which terminates TLS for clients; an ALB DNS name cannot get an ACM certificate
  #checkov:skip=CKV_AWS_103:see CKV_AWS_2: HTTP between CloudFront and the ALB
  #checkov:skip=CKV2_AWS_74:see CKV_AWS_2: HTTP between CloudFront and the ALB
  count             = local.custom_domain ? 0 : 1
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"
  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "forbidden"
      status_code  = "403"
    }
  }
}

resource "aws_lb_listener_rule" "from_cloudfront" {
  count        = local.custom_domain ? 0 : 1
  listener_arn = aws_lb_listener.from_cloudfront[0].arn
  priority     = 1
  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
  condition {
    http_header {
      http_header_name = local.origin_header
      values           = [terraform_data.origin_secret.output]
    }
  }
}

resource "aws_cloudfront_distribution" "this" {
  #checkov:skip=CKV_AWS_68:WAF is optional (see the ALB); every route but /health authenticates with an API key
  #checkov:skip=CKV2_AWS_47:see CKV_AWS_68
  #checkov:skip=CKV_AWS_86:standard logging needs an ACL-enabled bucket; the ALB behind it writes access logs to the log bucket
  #checkov:skip=CKV_AWS_174:the default *.cloudfront.net certificate fixes the minimum protocol; set sessions_domain_name for TLS 1.2+ on your own certificate at the ALB
  #checkov:skip=CKV2_AWS_42:no domain was given (with one, the ALB serves it with an ACM certificate and this distribution is not created)
  #checkov:skip=CKV_AWS_310:one origin; failover to a second region is out of scope
  #checkov:skip=CKV_AWS_305:an API, not a website: there is no root object
  #checkov:skip=CKV2_AWS_32:API responses set their own headers; a response headers policy would alter WebSocket upgrades
  #checkov:skip=CKV_AWS_374:sessions are open to API-key holders everywhere
  count       = local.custom_domain ? 0 : 1
  enabled     = true
  comment     = "${var.name} live sessions"
  price_class = "PriceClass_100"
  origin {
    origin_id   = "sessions-alb"
    domain_name = aws_lb.this.dns_name
    custom_origin_config {
      http_port                = 80
      https_port               = 443
      origin_protocol_policy   = "http-only"
      origin_ssl_protocols     = ["TLSv1.2"]
      origin_read_timeout      = 60 # the most without a quota increase: streams send keep-alives more often
      origin_keepalive_timeout = 60
    }
    custom_header {
      name  = local.origin_header
      value = terraform_data.origin_secret.output
    }
  }
  default_cache_behavior {
    target_origin_id         = "sessions-alb"
    viewer_protocol_policy   = "https-only"
    allowed_methods          = ["GET", "HEAD", "OPTIONS", "PUT", "POST", "PATCH", "DELETE"]
    cached_methods           = ["GET", "HEAD"]
    cache_policy_id          = local.cache_policy_caching_disabled
    origin_request_policy_id = local.origin_request_all_viewer_not_host
    compress                 = false
  }
  restrictions {
    geo_restriction {
      restriction_type = "none"
    }
  }
  viewer_certificate {
    cloudfront_default_certificate = true
  }
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/${var.name}/sessions"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key
}

resource "aws_ecs_cluster" "this" {
  name = "${var.name}-sessions"
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

# Execution role: pull the API image from its repository, write the log group.
module "execution_role" {
  source             = "../ecs_execution_role"
  name               = "${var.name}-sessions-execution"
  ecr_repository_arn = var.ecr_repository_arn
  log_group_arn      = aws_cloudwatch_log_group.this.arn
  kms_key            = var.kms_key
}

# Task role: what the Lambda's application may do (one policy for both).
module "task_role" {
  source              = "../service_role"
  name                = "${var.name}-sessions-task"
  service             = "ecs-tasks.amazonaws.com"
  managed_policy_arns = [var.app_policy_arn]
}

locals {
  # CONVERSE_SESSION_MAX_MESSAGE_BYTES, where the environment sets it; else its default.
  max_message_bytes = tonumber(lookup(local.environment, "CONVERSE_SESSION_MAX_MESSAGE_BYTES", "262144"))
  stream_url        = "wss://${local.host}"
  environment = merge(var.environment, {
    CONVERSE_DYNAMODB_SESSIONS_TABLE = var.sessions_table_name
    CONVERSE_PUBLIC_STREAM_URL       = local.stream_url
    CONVERSE_SESSION_IDLE_TIMEOUT_S  = tostring(var.idle_timeout_s)
    CONVERSE_SESSION_MAX_LIVE        = tostring(var.max_live_per_task)
  })
}

resource "aws_ecs_task_definition" "this" {
  family                   = "${var.name}-sessions"
  network_mode             = "awsvpc"
  requires_compatibilities = ["FARGATE"]
  cpu                      = 1024
  memory                   = 2048
  execution_role_arn       = module.execution_role.arn
  task_role_arn            = module.task_role.arn
  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }
  container_definitions = jsonencode([{
    name       = "api"
    image      = var.image
    essential  = true
    entryPoint = ["python", "-m", "uvicorn"]
    command = [
      "handler.app:create_app", "--factory",
      "--host", "0.0.0.0", "--port", tostring(local.port),
      "--proxy-headers", "--forwarded-allow-ips", "*",
      "--ws-ping-interval", "20", "--ws-ping-timeout", "20",
      # A message over twice the app's limit is refused (1009) before it is held whole;
      # up to the limit x 2 the app answers 4413 itself (devtools/api_server.py, the same).
      "--ws-max-size", tostring(2 * local.max_message_bytes), "--ws-max-queue", "4",
    ]
    portMappings           = [{ containerPort = local.port, protocol = "tcp" }]
    environment            = [for key in sort(keys(local.environment)) : { name = key, value = local.environment[key] }]
    readonlyRootFilesystem = true
    stopTimeout            = 120 # SIGTERM first: sessions get two minutes to end cleanly
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.this.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "api"
      }
    }
  }])
}

resource "aws_ecs_service" "this" {
  name                              = "${var.name}-sessions"
  cluster                           = aws_ecs_cluster.this.id
  task_definition                   = aws_ecs_task_definition.this.arn
  desired_count                     = var.min_tasks
  launch_type                       = "FARGATE"
  health_check_grace_period_seconds = 60
  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.this.arn
    container_name   = "api"
    container_port   = local.port
  }
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
  lifecycle {
    ignore_changes = [desired_count]
  }
  depends_on = [aws_lb_listener.https, aws_lb_listener_rule.from_cloudfront]
}

resource "aws_appautoscaling_target" "this" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.this.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.min_tasks
  max_capacity       = var.max_tasks
}

# Sessions are long connections, not requests: track concurrent client
# connections per running task. ActiveConnectionCount counts both legs
# (client -> ALB and ALB -> target), hence the halving.
resource "aws_appautoscaling_policy" "connections" {
  name               = "${var.name}-sessions-connections"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.this.service_namespace
  resource_id        = aws_appautoscaling_target.this.resource_id
  scalable_dimension = aws_appautoscaling_target.this.scalable_dimension
  target_tracking_scaling_policy_configuration {
    target_value       = var.connections_per_task
    scale_in_cooldown  = 600
    scale_out_cooldown = 60
    customized_metric_specification {
      metrics {
        id          = "connections"
        return_data = false
        metric_stat {
          stat = "Sum"
          metric {
            namespace   = "AWS/ApplicationELB"
            metric_name = "ActiveConnectionCount"
            dimensions {
              name  = "LoadBalancer"
              value = aws_lb.this.arn_suffix
            }
          }
        }
      }
      metrics {
        id          = "tasks"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "ECS/ContainerInsights"
            metric_name = "RunningTaskCount"
            dimensions {
              name  = "ClusterName"
              value = aws_ecs_cluster.this.name
            }
            dimensions {
              name  = "ServiceName"
              value = aws_ecs_service.this.name
            }
          }
        }
      }
      metrics {
        id          = "per_task"
        expression  = "connections / 2 / IF(tasks > 0, tasks, 1)"
        label       = "client connections per task"
        return_data = true
      }
    }
  }
  lifecycle {
    # A task refusing sockets past its limit never reaches a higher target: no scale-out.
    precondition {
      condition     = var.connections_per_task < var.max_live_per_task
      error_message = "connections_per_session_task must be below max_live_sessions_per_task, or the sessions service never scales out."
    }
  }
}

output "stream_url" { value = local.stream_url }
output "https_url" { value = "https://${local.host}" }
output "security_group_id" { value = aws_security_group.tasks.id }
output "cluster_name" { value = aws_ecs_cluster.this.name }
output "service_name" { value = aws_ecs_service.this.name }
