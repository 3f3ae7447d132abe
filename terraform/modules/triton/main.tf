# Triton on ECS with EC2 GPU hosts (Amazon Linux 2023 ECS GPU AMI) in private
# subnets, behind an internal ALB (HTTP) that only the API's security groups
# can reach, and an internal NLB (gRPC) that only the sessions service can
# reach. The model repository is read from S3 by the task role. A CloudWatch
# agent sidecar scrapes Triton's Prometheus metrics; the service scales on
# queue time per request, with GPU utilisation as a second signal, and from
# zero tasks on the first request the ALB receives.

variable "name" { type = string }
variable "region" { type = string }
variable "vpc_id" { type = string }
variable "private_subnet_ids" { type = list(string) }
variable "instance_type" { type = string }
variable "min_instances" { type = number }
variable "max_instances" { type = number }
variable "image" { type = string }
variable "port" { type = number }
variable "model_bucket_arn" { type = string }
variable "model_bucket_name" { type = string }
variable "client_security_group_ids" {
  description = "Security groups of the API (Lambda and the sessions service) allowed to reach Triton."
  type        = list(string)
}
variable "grpc_client_security_group_ids" {
  description = "Security groups allowed to reach Triton's gRPC endpoint (the sessions service; the Lambda uses HTTP only)."
  type        = list(string)
}
variable "shm_size_mb" {
  description = "/dev/shm of the Triton container, MiB (BLS passes KV caches through it; Docker's default is 64)."
  type        = number
}
variable "queue_time_target_us" { type = number }
variable "gpu_utilization_high" { type = number }
variable "kms_key" { type = string }
variable "log_retention_days" { type = number }
variable "logs_bucket" { type = string }
variable "scale_from_zero" {
  description = "min_instances is 0: add the scale-out path that starts the first task."
  type        = bool
}

locals {
  grpc_port = 8001 # tritonserver's default --grpc-port
  # Below the NLB's default 350 s TCP idle timeout (AWS docs, "Network Load Balancers").
  grpc_max_connection_age_ms = 300000
  metrics_port               = 8002
  metrics_namespace          = "${var.name}/Triton"
}

resource "aws_ecr_repository" "triton" {
  name                 = "${var.name}-triton"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.kms_key
  }
}

resource "aws_cloudwatch_log_group" "triton" {
  name              = "/${var.name}/triton"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key
}

resource "aws_ecs_cluster" "this" {
  name = var.name
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

data "aws_ssm_parameter" "gpu_ami" {
  name = "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"
}

# Instance role: the AWS-managed ECS container-instance policy (register with
# the cluster, pull from ECR, write container logs) and SSM Session Manager.
module "instance_role" {
  source  = "../service_role"
  name    = "${var.name}-triton-instance"
  service = "ec2.amazonaws.com"
  managed_policy_arns = [
    "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role",
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
  ]
}

resource "aws_iam_instance_profile" "instance" {
  name = "${var.name}-triton-instance"
  role = module.instance_role.name
}

resource "aws_security_group" "hosts" {
  name        = "${var.name}-triton-hosts"
  description = "Triton GPU hosts: no inbound; outbound HTTPS for ECS, ECR and S3"
  vpc_id      = var.vpc_id
  egress {
    description = "HTTPS to AWS APIs (ECS, ECR, S3 via endpoints and NAT)"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_launch_template" "gpu" {
  name_prefix   = "${var.name}-triton-"
  image_id      = data.aws_ssm_parameter.gpu_ami.value
  instance_type = var.instance_type
  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }
  vpc_security_group_ids = [aws_security_group.hosts.id]
  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    http_endpoint               = "enabled"
  }
  monitoring {
    enabled = true
  }
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size = 100
      volume_type = "gp3"
      encrypted   = true
      kms_key_id  = var.kms_key
    }
  }
  user_data = base64encode(<<-EOT
    #!/bin/bash
    echo ECS_CLUSTER=${aws_ecs_cluster.this.name} >> /etc/ecs/ecs.config
    echo ECS_ENABLE_GPU_SUPPORT=true >> /etc/ecs/ecs.config
  EOT
  )
}

resource "aws_autoscaling_group" "gpu" {
  name_prefix           = "${var.name}-triton-"
  min_size              = var.min_instances
  max_size              = var.max_instances
  vpc_zone_identifier   = var.private_subnet_ids
  protect_from_scale_in = true
  launch_template {
    id      = aws_launch_template.gpu.id
    version = "$Latest"
  }
  tag {
    key                 = "AmazonECSManaged"
    value               = "true"
    propagate_at_launch = true
  }
}

resource "aws_ecs_capacity_provider" "gpu" {
  name = "${var.name}-gpu"
  auto_scaling_group_provider {
    auto_scaling_group_arn         = aws_autoscaling_group.gpu.arn
    managed_termination_protection = "ENABLED"
    managed_scaling {
      status                    = "ENABLED"
      target_capacity           = 100
      minimum_scaling_step_size = 1
      maximum_scaling_step_size = 2
    }
  }
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = [aws_ecs_capacity_provider.gpu.name]
  default_capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.gpu.name
    weight            = 1
  }
}

# Task role: read the model repository; publish the sidecar's metrics into
# this project's CloudWatch namespace only.
data "aws_iam_policy_document" "task" {
  statement {
    actions   = ["s3:ListBucket"]
    resources = [var.model_bucket_arn]
  }
  statement {
    actions   = ["s3:GetObject"]
    resources = ["${var.model_bucket_arn}/*"]
  }
  statement {
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key]
  }
  statement {
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"] # PutMetricData has no resource-level permissions; the condition narrows it
    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [local.metrics_namespace]
    }
  }
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.triton.arn}:*"]
  }
}

locals {
  # CloudWatch agent: scrape Triton's Prometheus endpoint and publish the
  # counters the scaling policies read (embedded metric format).
  cw_agent_config = jsonencode({
    logs = {
      metrics_collected = {
        prometheus = {
          log_group_name         = aws_cloudwatch_log_group.triton.name
          prometheus_config_path = "env:PROMETHEUS_CONFIG_CONTENT"
          emf_processor = {
            metric_namespace = local.metrics_namespace
            metric_declaration = [{
              source_labels = ["job"]
              label_matcher = "^triton$"
              # [ClusterName] is what the scaling policies and the alarm read
              # (CloudWatch matches dimension sets exactly); [ClusterName,
              # model] keeps the per-model series for dashboards.
              dimensions = [["ClusterName"], ["ClusterName", "model"]]
              metric_selectors = [
                "^nv_inference_queue_duration_us$",
                "^nv_inference_request_success$",
                "^nv_gpu_utilization$",
              ]
            }]
          }
        }
      }
    }
  })
  prometheus_config = yamlencode({
    global = { scrape_interval = "15s" }
    scrape_configs = [{
      job_name       = "triton"
      static_configs = [{ targets = ["localhost:${local.metrics_port}"], labels = { ClusterName = var.name } }]
    }]
  })
}

# Execution role: pull the Triton image from its own repository and write to
# its own log group.
module "execution_role" {
  source             = "../ecs_execution_role"
  name               = "${var.name}-triton-execution"
  ecr_repository_arn = aws_ecr_repository.triton.arn
  log_group_arn      = aws_cloudwatch_log_group.triton.arn
  kms_key            = var.kms_key
}

module "task_role" {
  source          = "../service_role"
  name            = "${var.name}-triton-task"
  service         = "ecs-tasks.amazonaws.com"
  inline_policies = { "models-and-metrics" = data.aws_iam_policy_document.task.json }
}

resource "aws_ecs_task_definition" "triton" {
  family                   = "${var.name}-triton"
  network_mode             = "awsvpc"
  requires_compatibilities = ["EC2"]
  execution_role_arn       = module.execution_role.arn
  task_role_arn            = module.task_role.arn
  container_definitions = jsonencode([
    {
      name              = "triton"
      image             = var.image
      essential         = true
      memoryReservation = 12288
      command = [
        "tritonserver",
        "--model-repository=s3://${var.model_bucket_name}/model_repository",
        "--strict-readiness=true",
        "--allow-metrics=true",
        "--allow-gpu-metrics=true",
        # gRPC clients keep one connection, and the NLB balances connections: closing
        # each after 5 minutes (GOAWAY; calls in flight get a minute to end) lets
        # clients reconnect to hosts added since, and ends idle connections before
        # the NLB's 350 s TCP idle timeout drops them without a word.
        "--grpc-max-connection-age=${local.grpc_max_connection_age_ms}",
        "--grpc-max-connection-age-grace=60000",
      ]
      environment          = [{ name = "AWS_DEFAULT_REGION", value = var.region }]
      resourceRequirements = [{ type = "GPU", value = "1" }]
      # Docker's 64 MB /dev/shm is too small for the python backend's tensors
      # (BLS passes CSM KV caches through shared memory). EC2 launch type only.
      linuxParameters = { sharedMemorySize = var.shm_size_mb }
      portMappings = [
        { containerPort = var.port, protocol = "tcp" },
        { containerPort = local.grpc_port, protocol = "tcp" },
        { containerPort = local.metrics_port, protocol = "tcp" },
      ]
      healthCheck = {
        command     = ["CMD-SHELL", "curl -fsS localhost:${var.port}/v2/health/ready || exit 1"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 300
      }
      readonlyRootFilesystem = false
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.triton.name
          awslogs-region        = var.region
          awslogs-stream-prefix = "triton"
        }
      }
    },
    {
      name              = "metrics"
      image             = "public.ecr.aws/cloudwatch-agent/cloudwatch-agent:latest"
      essential         = false
      memoryReservation = 256
      # The agent writes its translated configuration and state under
      # /opt/aws/amazon-cloudwatch-agent at start; a read-only root stops it.
      readonlyRootFilesystem = false
      environment = [
        { name = "CW_CONFIG_CONTENT", value = local.cw_agent_config },
        { name = "PROMETHEUS_CONFIG_CONTENT", value = local.prometheus_config },
      ]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.triton.name
          awslogs-region        = var.region
          awslogs-stream-prefix = "metrics"
        }
      }
    },
  ])
}

resource "aws_security_group" "alb" {
  name        = "${var.name}-triton-alb"
  description = "Internal Triton ALB: HTTP from the API only"
  vpc_id      = var.vpc_id
  ingress {
    description     = "Triton HTTP from the API (Lambda and sessions service)"
    from_port       = var.port
    to_port         = var.port
    protocol        = "tcp"
    security_groups = var.client_security_group_ids
  }
  egress {
    description     = "To Triton tasks"
    from_port       = var.port
    to_port         = var.port
    protocol        = "tcp"
    security_groups = [aws_security_group.tasks.id]
  }
}

# Ingress: the rules below (HTTP from the ALB; gRPC and health checks from the
# NLB). The description predates the NLB: changing it would replace the group.
resource "aws_security_group" "tasks" {
  name        = "${var.name}-triton-tasks"
  description = "Triton tasks: HTTP from the internal ALB only"
  vpc_id      = var.vpc_id
  egress {
    description = "HTTPS to S3 (model repository) and CloudWatch"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group_rule" "tasks_from_alb" {
  description              = "Triton HTTP from the internal ALB"
  type                     = "ingress"
  security_group_id        = aws_security_group.tasks.id
  from_port                = var.port
  to_port                  = var.port
  protocol                 = "tcp"
  source_security_group_id = aws_security_group.alb.id
}

# gRPC (the sessions service's chat LM token stream) goes through an internal
# NLB, not the ALB: an ALB forwards gRPC only from an HTTPS listener, which
# needs a certificate this internal, plain-HTTP setup does not have (a private
# CA). The NLB passes TCP through unchanged, so HTTP/2 cleartext reaches
# tritonserver as the client sent it. The NLB has its own security group: it
# admits only the sessions tasks' group, and the Triton tasks admit only the
# NLB's group (tighter than the private subnets' CIDRs, which would also let
# the Lambda and the GPU hosts in).
resource "aws_security_group" "nlb" {
  name        = "${var.name}-triton-nlb"
  description = "Internal Triton NLB: gRPC from the sessions service only"
  vpc_id      = var.vpc_id
  ingress {
    description     = "Triton gRPC from the sessions service"
    from_port       = local.grpc_port
    to_port         = local.grpc_port
    protocol        = "tcp"
    security_groups = var.grpc_client_security_group_ids
  }
  egress {
    description     = "To Triton tasks: gRPC"
    from_port       = local.grpc_port
    to_port         = local.grpc_port
    protocol        = "tcp"
    security_groups = [aws_security_group.tasks.id]
  }
  egress {
    description     = "To Triton tasks: HTTP health checks (/v2/health/ready)"
    from_port       = var.port
    to_port         = var.port
    protocol        = "tcp"
    security_groups = [aws_security_group.tasks.id]
  }
}

resource "aws_security_group_rule" "tasks_grpc_from_nlb" {
  description              = "Triton gRPC from the internal NLB"
  type                     = "ingress"
  security_group_id        = aws_security_group.tasks.id
  from_port                = local.grpc_port
  to_port                  = local.grpc_port
  protocol                 = "tcp"
  source_security_group_id = aws_security_group.nlb.id
}

resource "aws_security_group_rule" "tasks_health_from_nlb" {
  description              = "Triton HTTP health checks from the internal NLB"
  type                     = "ingress"
  security_group_id        = aws_security_group.tasks.id
  from_port                = var.port
  to_port                  = var.port
  protocol                 = "tcp"
  source_security_group_id = aws_security_group.nlb.id
}

resource "aws_lb" "triton" {
  #checkov:skip=CKV_AWS_150:deletion protection would block `terraform destroy` in docs/deploy.md's tear-down; the ALB holds no state
  #checkov:skip=CKV2_AWS_28:the ALB is internal (no internet path); WAF does not apply
  #checkov:skip=CKV2_AWS_20:internal HTTP-only ALB (see the listener); there is no HTTPS listener to redirect to
  name                       = "${var.name}-triton"
  internal                   = true
  load_balancer_type         = "application"
  subnets                    = var.private_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  drop_invalid_header_fields = true
  idle_timeout               = 60
  access_logs {
    bucket  = var.logs_bucket
    prefix  = "alb"
    enabled = true
  }
}

resource "aws_lb_target_group" "triton" {
  #checkov:skip=CKV_AWS_378:see the listener: plain HTTP between the internal ALB and the tasks inside private subnets
  name        = "${var.name}-triton"
  port        = var.port
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = var.vpc_id
  health_check {
    path                = "/v2/health/ready"
    matcher             = "200"
    interval            = 15
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "triton" {
  #checkov:skip=CKV_AWS_2:internal listener inside private subnets reachable only from the API's security group; TLS would need a private CA
  #checkov:skip=CKV_AWS_103:see CKV_AWS_2: plain HTTP on the internal listener
  #checkov:skip=CKV2_AWS_74:see CKV_AWS_2: plain HTTP on the internal listener
  load_balancer_arn = aws_lb.triton.arn
  port              = var.port
  protocol          = "HTTP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.triton.arn
  }
}

resource "aws_lb" "grpc" {
  #checkov:skip=CKV_AWS_150:deletion protection would block `terraform destroy` in docs/deploy.md's tear-down; the NLB holds no state
  #checkov:skip=CKV_AWS_91:an NLB writes access logs only for TLS listeners; its only listener is plain TCP
  name                             = "${var.name}-triton-grpc"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.private_subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true # few GPU tasks: a client in one AZ must reach a task in the other
}

resource "aws_lb_target_group" "grpc" {
  name                 = "${var.name}-triton-grpc"
  port                 = local.grpc_port
  protocol             = "TCP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 60 # token streams are seconds long
  # Ready means every model loaded (--strict-readiness), as for the ALB; an
  # open gRPC port alone would not say so.
  health_check {
    protocol            = "HTTP"
    port                = tostring(var.port)
    path                = "/v2/health/ready"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "grpc" {
  load_balancer_arn = aws_lb.grpc.arn
  port              = local.grpc_port
  protocol          = "TCP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.grpc.arn
  }
}

resource "aws_ecs_service" "triton" {
  name                              = "${var.name}-triton"
  cluster                           = aws_ecs_cluster.this.id
  task_definition                   = aws_ecs_task_definition.triton.arn
  desired_count                     = var.min_instances
  health_check_grace_period_seconds = 300
  capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.gpu.name
    weight            = 1
  }
  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.triton.arn
    container_name   = "triton"
    container_port   = var.port
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.grpc.arn
    container_name   = "triton"
    container_port   = local.grpc_port
  }
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
  lifecycle {
    ignore_changes = [desired_count]
  }
  # The association must outlive the service: destroy removes the service
  # (and its tasks) before the capacity provider leaves the cluster.
  depends_on = [aws_lb_listener.triton, aws_lb_listener.grpc, aws_ecs_cluster_capacity_providers.this]
}

resource "aws_appautoscaling_target" "triton" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.triton.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.min_instances
  max_capacity       = var.max_instances
}

# Primary signal: Triton queue time per request (microseconds), i.e. the rate
# of nv_inference_queue_duration_us divided by the rate of
# nv_inference_request_success, across the cluster.
resource "aws_appautoscaling_policy" "queue_time" {
  name               = "${var.name}-triton-queue-time"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.triton.service_namespace
  resource_id        = aws_appautoscaling_target.triton.resource_id
  scalable_dimension = aws_appautoscaling_target.triton.scalable_dimension
  target_tracking_scaling_policy_configuration {
    target_value       = var.queue_time_target_us
    scale_in_cooldown  = 300
    scale_out_cooldown = 60
    customized_metric_specification {
      metrics {
        id          = "queue_us"
        return_data = false
        metric_stat {
          stat = "Sum"
          metric {
            namespace   = local.metrics_namespace
            metric_name = "nv_inference_queue_duration_us"
            dimensions {
              name  = "ClusterName"
              value = var.name
            }
          }
        }
      }
      metrics {
        id          = "requests"
        return_data = false
        metric_stat {
          stat = "Sum"
          metric {
            namespace   = local.metrics_namespace
            metric_name = "nv_inference_request_success"
            dimensions {
              name  = "ClusterName"
              value = var.name
            }
          }
        }
      }
      metrics {
        id          = "queue_us_per_request"
        expression  = "IF(requests > 0, queue_us / requests, 0)"
        label       = "Triton queue time per request (us)"
        return_data = true
      }
    }
  }
}

# Secondary signal: sustained GPU utilisation above the threshold adds a host.
resource "aws_appautoscaling_policy" "gpu_high" {
  name               = "${var.name}-triton-gpu-high"
  policy_type        = "StepScaling"
  service_namespace  = aws_appautoscaling_target.triton.service_namespace
  resource_id        = aws_appautoscaling_target.triton.resource_id
  scalable_dimension = aws_appautoscaling_target.triton.scalable_dimension
  step_scaling_policy_configuration {
    adjustment_type         = "ChangeInCapacity"
    cooldown                = 300
    metric_aggregation_type = "Average"
    step_adjustment {
      metric_interval_lower_bound = 0
      scaling_adjustment          = 1
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "gpu_high" {
  alarm_name          = "${var.name}-triton-gpu-high"
  namespace           = local.metrics_namespace
  metric_name         = "nv_gpu_utilization"
  dimensions          = { ClusterName = var.name }
  statistic           = "Average"
  period              = 60
  evaluation_periods  = 5
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.gpu_utilization_high / 100
  alarm_actions       = [aws_appautoscaling_policy.gpu_high.arn]
}

# Scale from zero: with no task there are no Triton metrics, so the queue-time
# policy reads 0 and never scales out. The internal ALB still counts the
# requests it answers with 503; while the service wants no task and requests
# arrive, add one. The NLB (gRPC) need not be watched: a session calls Triton
# over HTTP (voices, VAD, transcription) before it streams the chat LM.
resource "aws_appautoscaling_policy" "from_zero" {
  count              = var.scale_from_zero ? 1 : 0
  name               = "${var.name}-triton-from-zero"
  policy_type        = "StepScaling"
  service_namespace  = aws_appautoscaling_target.triton.service_namespace
  resource_id        = aws_appautoscaling_target.triton.resource_id
  scalable_dimension = aws_appautoscaling_target.triton.scalable_dimension
  step_scaling_policy_configuration {
    adjustment_type         = "ChangeInCapacity"
    cooldown                = 60
    metric_aggregation_type = "Maximum"
    step_adjustment {
      metric_interval_lower_bound = 0
      scaling_adjustment          = 1
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "from_zero" {
  count               = var.scale_from_zero ? 1 : 0
  alarm_name          = "${var.name}-triton-from-zero"
  alarm_description   = "Requests reach the Triton ALB while the service wants no task"
  evaluation_periods  = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_appautoscaling_policy.from_zero[0].arn]
  metric_query {
    id          = "wake"
    expression  = "IF(FILL(desired, 0) == 0 AND FILL(requests, 0) > 0, 1, 0)"
    label       = "requests while no task is wanted"
    return_data = true
  }
  metric_query {
    id = "requests"
    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "RequestCount"
      dimensions  = { LoadBalancer = aws_lb.triton.arn_suffix }
      stat        = "Sum"
      period      = 60
    }
  }
  metric_query {
    id = "desired"
    metric {
      namespace   = "ECS/ContainerInsights"
      metric_name = "DesiredTaskCount"
      dimensions  = { ClusterName = aws_ecs_cluster.this.name, ServiceName = aws_ecs_service.triton.name }
      stat        = "Maximum"
      period      = 60
    }
  }
}

output "alb_dns_name" { value = aws_lb.triton.dns_name }
output "grpc_endpoint" {
  description = "host:port of Triton's gRPC endpoint on the internal NLB (CONVERSE_TRITON_GRPC_URL)."
  value       = "${aws_lb.grpc.dns_name}:${local.grpc_port}"
}
output "ecr_repository_url" { value = aws_ecr_repository.triton.repository_url }
