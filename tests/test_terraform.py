"""Offline checks of terraform/: fmt, python-hcl2 assertions, checkov (own venv).

``terraform validate`` and an emulated ``apply``/``destroy`` live in
tests/test_deploy_emulated.py; these read the configuration's text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from devtools.api_server import WS_MAX_QUEUE, WS_MAX_SIZE_FACTOR
from handler.settings import Settings

TERRAFORM = Path(__file__).resolve().parent.parent / "terraform"
CHECKOV = Path(os.environ.get("CONVERSE_CHECKOV", ".venv-checkov/bin/checkov"))


def _unquote(value: Any) -> Any:
    """python-hcl2 8 keeps HCL's quotes on keys and strings and marks blocks; drop both."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        return dict(_unquote(hcl2.load(handle)))


def resources(module: str, kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in parse(TERRAFORM / "modules" / module / "main.tf").get("resource", []):
        for name, body in block.get(kind, {}).items():
            found[name] = body
    return found


def variable_default(name: str) -> Any:
    for block in parse(TERRAFORM / "variables.tf")["variable"]:
        if name in block:
            return block[name]["default"]
    raise KeyError(name)


def test_terraform_fmt_is_clean() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed on this machine")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", str(TERRAFORM)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_timeouts_are_ordered() -> None:
    triton = variable_default("triton_client_timeout_s")
    lambda_s = variable_default("lambda_timeout_s")
    gateway_ms = variable_default("gateway_timeout_ms")
    assert triton < lambda_s < gateway_ms / 1000 <= 30
    function = resources("api", "aws_lambda_function")["api"]
    assert function["timeout"] == "${var.lambda_timeout_s}"
    integration = resources("api", "aws_apigatewayv2_integration")["lambda"]
    assert integration["timeout_milliseconds"] == "${var.gateway_timeout_ms}"


def test_buckets_block_public_access_and_use_kms() -> None:
    blocks = resources("private_bucket", "aws_s3_bucket_public_access_block")["this"]
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                 "restrict_public_buckets"):
        assert blocks[flag] is True
    encryption = resources("private_bucket", "aws_s3_bucket_server_side_encryption_configuration")
    rule = encryption["this"]["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert rule["sse_algorithm"] == '${var.kms_key_arn == null ? "AES256" : "aws:kms"}'
    # SSE-S3 only where access logs are written (they cannot be written SSE-KMS).
    calls = parse(TERRAFORM / "modules/data/main.tf")["module"]
    data = {n: b for block in calls for n, b in block.items()}
    assert data["logs_bucket"]["kms_key_arn"] is None
    assert data["logs_bucket"]["receives_access_logs"] is True
    assert data["audio_bucket"]["kms_key_arn"] == "${aws_kms_key.this.arn}"
    lifecycle = resources("private_bucket", "aws_s3_bucket_lifecycle_configuration")["this"]
    assert lifecycle["rule"][0]["expiration"][0]["days"] == "${var.expiry_days}"
    data = parse(TERRAFORM / "modules/data/main.tf")
    buckets = [m for block in data["module"] for m in block.values()]
    assert buckets and all(b["source"] == "../private_bucket" for b in buckets)


# Regions opened since August 2022: no Elastic Load Balancing account, so
# aws_elb_service_account fails the plan there ("unsupported AWS Region").
NEW_REGIONS = ("me-central-1", "ap-south-2", "eu-central-2", "eu-south-2", "ap-southeast-4",
               "il-central-1", "ca-west-1", "mx-central-1")
ELB_LOG_DELIVERY = "logdelivery.elasticloadbalancing.amazonaws.com"


def data_sources(module: str, kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in parse(TERRAFORM / "modules" / module / "main.tf").get("data", []):
        found.update(block.get(kind, {}))
    return found


def locals_of(module: str) -> dict[str, Any]:
    blocks = parse(TERRAFORM / "modules" / module / "main.tf")["locals"]
    return {k: v for block in blocks for k, v in block.items()}


def test_alb_access_logs_can_be_written_in_every_region() -> None:
    """ALB log writers: ELB's log delivery service everywhere, the Region's ELB account if any."""
    # Only the two ALBs log, under alb/ (an NLB logs TLS listeners only; the gRPC one is TCP).
    for module, name in (("sessions", "this"), ("triton", "triton")):
        balancer = resources(module, "aws_lb")[name]
        assert balancer["load_balancer_type"] == "application"
        assert balancer["access_logs"][0]["prefix"] == "alb"
    assert "access_logs" not in resources("triton", "aws_lb")["grpc"]

    policy = data_sources("private_bucket", "aws_iam_policy_document")["this"]
    dynamic = {block["statement"]["content"][0]["sid"]: block["statement"]
               for block in policy["dynamic"]}
    # The service principal in every Region the log bucket is in.
    service = dynamic["AlbAccessLogs"]
    assert service["for_each"] == '${var.receives_access_logs ? ["alb"] : []}'
    assert service["content"][0]["principals"] == [{"type": "Service",
                                                    "identifiers": [ELB_LOG_DELIVERY]}]
    assert service["content"][0]["actions"] == ["s3:PutObject"]
    assert service["content"][0]["resources"] == ["${local.alb_log_prefix}"]
    locals_ = locals_of("private_bucket")
    account_id = "${data.aws_caller_identity.current.account_id}"
    assert locals_["alb_log_prefix"] == f"${{aws_s3_bucket.this.arn}}/alb/AWSLogs/{account_id}/*"
    # The Region's ELB account only where the data source knows it: read nowhere else.
    count = data_sources("private_bucket", "aws_elb_service_account")["current"]["count"]
    assert "var.receives_access_logs" in count
    assert "contains(local.elb_account_regions, data.aws_region.current.name)" in count
    assert "us-east-1" in locals_["elb_account_regions"]
    assert not set(NEW_REGIONS) & set(locals_["elb_account_regions"])
    account = dynamic["AlbAccessLogsRegionAccount"]
    assert locals_["elb_account_arn"] == "${one(data.aws_elb_service_account.current[*].arn)}"
    assert account["for_each"] == "${local.elb_account_arn == null ? [] : [local.elb_account_arn]}"
    assert account["content"][0]["principals"] == [{"type": "AWS",
                                                    "identifiers": ["${statement.value}"]}]
    assert account["content"][0]["resources"] == ["${local.alb_log_prefix}"]


@pytest.mark.infra
def test_elb_account_regions_are_the_ones_the_provider_knows(tmp_path: Path) -> None:
    """Every listed Region resolves in aws_elb_service_account; the newer ones fail the plan."""
    from tests.test_deploy_emulated import plugin_dir

    terraform = shutil.which("terraform")
    plugins = plugin_dir()
    if terraform is None or plugins is None:
        pytest.skip("terraform or the hashicorp/aws provider (local plugin directory) is absent")
    (tmp_path / "terraformrc").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update({"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1",
                "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc")})
    # The data source only looks the Region up in the provider's map: no AWS call.
    (tmp_path / "main.tf").write_text("""
provider "aws" {
  region                      = "us-east-1"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  skip_requesting_account_id  = true
}
variable "regions" { type = list(string) }
data "aws_elb_service_account" "each" {
  for_each = toset(var.regions)
  region   = each.key
}
""")

    def plan(regions: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [terraform, "plan", "-no-color", "-var", f"regions={json.dumps(regions)}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)

    init = subprocess.run([terraform, "init", "-backend=false", f"-plugin-dir={plugins}",
                           "-no-color"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert init.returncode == 0, init.stdout + init.stderr
    known = plan(locals_of("private_bucket")["elb_account_regions"])
    assert known.returncode == 0, known.stdout + known.stderr
    unknown = plan(list(NEW_REGIONS))
    assert unknown.returncode != 0
    for region in NEW_REGIONS:
        assert f"unsupported AWS Region: {region}" in unknown.stdout + unknown.stderr, region


def _statements(module: str) -> list[dict[str, Any]]:
    found = []
    for block in parse(TERRAFORM / "modules" / module / "main.tf").get("data", []):
        for name, body in block.get("aws_iam_policy_document", {}).items():
            if name == "kms":  # a key policy: "*" means the key itself
                continue
            found.extend(body.get("statement", []))
    return found


@pytest.mark.parametrize("module", ["network", "triton", "api", "data", "service_role", "sessions",
                                    "ecs_execution_role"])
def test_no_wildcard_iam_actions(module: str) -> None:
    for statement in _statements(module):
        for action in statement.get("actions", []):
            assert action != "*" and not action.endswith(":*"), (module, action)


def test_wildcard_resources_only_where_aws_allows_no_other() -> None:
    allowed = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}
    for module in ("network", "triton", "api", "sessions", "ecs_execution_role"):
        for statement in _statements(module):
            if "*" in statement.get("resources", []):
                assert set(statement["actions"]) <= allowed, (module, statement["actions"])


def test_lambda_and_triton_run_in_private_subnets() -> None:
    function = resources("api", "aws_lambda_function")["api"]
    assert function["vpc_config"][0]["subnet_ids"] == "${var.private_subnet_ids}"
    service = resources("triton", "aws_ecs_service")["triton"]
    network = service["network_configuration"][0]
    assert network["subnets"] == "${var.private_subnet_ids}"
    assert network["assign_public_ip"] is False
    group = resources("triton", "aws_autoscaling_group")["gpu"]
    assert group["vpc_zone_identifier"] == "${var.private_subnet_ids}"
    root = parse(TERRAFORM / "main.tf")
    modules = {name: body for block in root["module"] for name, body in block.items()}
    for name in ("triton", "api", "sessions"):
        assert modules[name]["private_subnet_ids"] == "${module.network.private_subnet_ids}"
    sessions = resources("sessions", "aws_ecs_service")["this"]
    assert sessions["network_configuration"][0]["assign_public_ip"] is False


def test_triton_is_not_reachable_from_the_internet() -> None:
    balancers = resources("triton", "aws_lb")
    assert set(balancers) == {"triton", "grpc"}
    assert all(balancer["internal"] is True for balancer in balancers.values())
    clients = {"alb": "${var.client_security_group_ids}",
               "nlb": "${var.grpc_client_security_group_ids}"}
    groups = resources("triton", "aws_security_group")
    for name, group in groups.items():
        for rule in group.get("ingress", []):
            assert "cidr_blocks" not in rule, name
            assert rule["security_groups"] == clients[name]
    # The tasks admit the two balancers' groups only.
    rules = resources("triton", "aws_security_group_rule")
    assert {rule["source_security_group_id"] for rule in rules.values()} == {
        "${aws_security_group.alb.id}", "${aws_security_group.nlb.id}"}


def test_sessions_reach_triton_grpc_through_the_nlb() -> None:
    # An ALB forwards gRPC only from an HTTPS listener: plain TCP on an NLB.
    balancer = resources("triton", "aws_lb")["grpc"]
    assert balancer["load_balancer_type"] == "network"
    assert balancer["security_groups"] == ["${aws_security_group.nlb.id}"]
    listener = resources("triton", "aws_lb_listener")["grpc"]
    assert (listener["port"], listener["protocol"]) == ("${local.grpc_port}", "TCP")
    group = resources("triton", "aws_lb_target_group")["grpc"]
    assert (group["protocol"], group["target_type"]) == ("TCP", "ip")
    assert group["health_check"][0]["path"] == "/v2/health/ready"
    service = resources("triton", "aws_ecs_service")["triton"]
    ports = {(b["target_group_arn"], b["container_port"]) for b in service["load_balancer"]}
    assert ports == {("${aws_lb_target_group.triton.arn}", "${var.port}"),
                     ("${aws_lb_target_group.grpc.arn}", "${local.grpc_port}")}
    assert "${aws_lb_listener.grpc}" in service["depends_on"]
    # Only the sessions service gets the gRPC endpoint and may reach it.
    root = parse(TERRAFORM / "main.tf")
    modules = {name: body for block in root["module"] for name, body in block.items()}
    assert modules["triton"]["grpc_client_security_group_ids"] == [
        "${module.sessions.security_group_id}"]
    local = {k: v for block in root["locals"] for k, v in block.items()}
    assert modules["sessions"]["environment"] == "${local.sessions_environment}"
    assert "CONVERSE_TRITON_GRPC_URL = module.triton.grpc_endpoint" in local["sessions_environment"]
    assert 'CONVERSE_TRITON_PROTOCOL = "grpc"' in local["sessions_environment"]
    assert "GRPC" not in str(local["app_environment"])
    assert "GRPC" not in modules["api"]["environment"]


def test_triton_closes_grpc_connections_before_the_nlb_idles_them_out() -> None:
    """Clients keep one gRPC connection; a bounded age spreads them over new hosts too."""
    blocks = parse(TERRAFORM / "modules/triton/main.tf")["locals"]
    locals_ = {k: v for block in blocks for k, v in block.items()}
    age_ms = int(locals_["grpc_max_connection_age_ms"])
    nlb_tcp_idle_timeout_ms = 350_000  # AWS's default; the listener does not change it
    assert "tcp_idle_timeout_seconds" not in resources("triton", "aws_lb_listener")["grpc"]
    assert 0 < age_ms < nlb_tcp_idle_timeout_ms
    task = resources("triton", "aws_ecs_task_definition")["triton"]
    text = json.dumps(task["container_definitions"])
    assert "--grpc-max-connection-age=${local.grpc_max_connection_age_ms}" in text
    assert "--grpc-max-connection-age-grace=" in text


def test_the_sessions_websocket_layer_refuses_oversized_messages_before_holding_them() -> None:
    """uvicorn's limits match the local server's: twice the app's message limit, a short queue."""
    task = resources("sessions", "aws_ecs_task_definition")["this"]
    text = str(task["container_definitions"])
    assert (f'"--ws-max-size", tostring({WS_MAX_SIZE_FACTOR} * local.max_message_bytes), '
            f'"--ws-max-queue", "{WS_MAX_QUEUE}"') in text
    default = Settings.model_fields["session_max_message_bytes"].default
    assert locals_of("sessions")["max_message_bytes"] == (
        '${tonumber(lookup(local.environment, "CONVERSE_SESSION_MAX_MESSAGE_BYTES", '
        f'"{default}"))}}')


def test_every_log_group_has_retention_and_kms() -> None:
    count = 0
    for module in ("network", "triton", "api", "sessions"):
        for name, group in resources(module, "aws_cloudwatch_log_group").items():
            assert group["retention_in_days"] in ("${var.log_days}", "${var.log_retention_days}")
            assert "kms_key_id" in group, name
            count += 1
    assert count == 5


def test_sessions_alb_outlasts_the_session_idle_timeout() -> None:
    balancer = resources("sessions", "aws_lb")["this"]
    assert balancer["idle_timeout"] == "${local.alb_idle_timeout_s}"
    blocks = parse(TERRAFORM / "modules/sessions/main.tf")["locals"]
    locals_ = {k: v for block in blocks for k, v in block.items()}
    assert locals_["alb_idle_timeout_s"] == "${var.idle_timeout_s + 60}"
    # Without a domain, only CloudFront reaches the ALB: prefix list + secret header.
    ingress = resources("sessions", "aws_vpc_security_group_ingress_rule")["alb_from_cloudfront"]
    assert ingress["prefix_list_id"] == "${data.aws_ec2_managed_prefix_list.cloudfront.id}"
    listener = resources("sessions", "aws_lb_listener")["from_cloudfront"]
    assert listener["default_action"][0]["fixed_response"][0]["status_code"] == "403"


def test_scaling_reads_the_dimensions_the_agent_publishes() -> None:
    text = (TERRAFORM / "modules/triton/main.tf").read_text()
    assert 'dimensions = [["ClusterName"], ["ClusterName", "model"]]' in text
    alarm = resources("triton", "aws_cloudwatch_metric_alarm")["gpu_high"]
    assert alarm["dimensions"] == {"ClusterName": "${var.name}"}


@pytest.mark.infra
def test_checkov_has_no_failed_checks() -> None:
    assert CHECKOV.exists(), f"{CHECKOV} missing: `make test` installs it (.venv-checkov)"
    result = subprocess.run(
        [str(CHECKOV), "-d", str(TERRAFORM), "--framework", "terraform",
         "--output", "json", "--skip-download"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert summary["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    assert summary["passed"] > 100
    for skipped in report["results"]["skipped_checks"]:
        assert skipped["check_result"].get("suppress_comment"), skipped["check_id"]
