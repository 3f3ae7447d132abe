"""``terraform validate``, then ``apply`` and ``destroy`` of the whole configuration against moto.

moto's server mode stands in for AWS on 127.0.0.1 with fake credentials, so
wrong references, values unknown at plan time that decide ``count``, argument
combinations a service refuses and missing dependencies (destroy order
included) fail here instead of in an account. What this does not prove:
nothing runs (no instance boots, no container starts, no request is served),
IAM, KMS key and bucket policies are stored but not enforced, and moto accepts
some values AWS would refuse. docs/deploy.md says the same.

The provider comes from a local plugin directory (``terraform init
-plugin-dir``); the tests skip, saying why, where terraform or the provider is
absent. The configuration is copied to a temporary directory so nothing is
written into ``terraform/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.moto_shims import install_shims

pytestmark = pytest.mark.infra

TERRAFORM_SRC = Path(__file__).resolve().parent.parent / "terraform"
PROVIDER_GLOB = "registry.terraform.io/hashicorp/aws/*/*/terraform-provider-aws*"
PLUGIN_ROOTS = (
    os.environ.get("CONVERSE_TF_PLUGIN_DIR", ""),
    "/opt/tf-plugins",
    str(Path.home() / ".terraform.d/plugins"),
    "/usr/share/terraform/plugins",
    "/usr/local/share/terraform/plugins",
)
# Every endpoint the configuration's resources and data sources call.
ENDPOINTS = (
    "acm", "apigatewayv2", "appautoscaling", "autoscaling", "cloudfront", "cloudwatch", "dynamodb",
    "ec2", "ecr", "ecs", "elbv2", "iam", "kms", "lambda", "logs", "route53", "s3",
    "secretsmanager", "ssm", "sts",
)
APPLY_BUDGET_S = 600


def plugin_dir() -> Path | None:
    """The directory above ``registry.terraform.io`` that holds the AWS provider, if any."""
    for root in PLUGIN_ROOTS:
        if root and any(Path(root).glob(PROVIDER_GLOB)):
            return Path(root)
    return None


def _requirements() -> tuple[str, Path]:
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip("terraform is not installed on this machine")
    plugins = plugin_dir()
    if plugins is None:
        pytest.skip("the hashicorp/aws provider is not in a local plugin directory "
                    f"({', '.join(r for r in PLUGIN_ROOTS if r)}); set CONVERSE_TF_PLUGIN_DIR")
    return terraform, plugins


def _run(args: list[str], cwd: Path, env: dict[str, str],
         timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update({
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "TF_CLI_CONFIG_FILE": str(tmp / "terraformrc"),  # no user config, no network mirrors
        "CHECKPOINT_DISABLE": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    (tmp / "terraformrc").write_text("")
    return env


def _copy_config(tmp: Path) -> Path:
    work = tmp / "terraform"
    shutil.copytree(TERRAFORM_SRC, work,
                    ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*",
                                                  "terraform.tfvars"))
    return work


def _init(terraform: str, plugins: Path, work: Path, env: dict[str, str]) -> None:
    result = _run([terraform, "init", "-backend=false", f"-plugin-dir={plugins}", "-no-color"],
                  work, env, 120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_terraform_validate(tmp_path: Path) -> None:
    terraform, plugins = _requirements()
    env = _env(tmp_path)
    work = _copy_config(tmp_path)
    _init(terraform, plugins, work, env)
    result = _run([terraform, "validate", "-no-color"], work, env, 120)
    assert result.returncode == 0, result.stdout + result.stderr


def _provider_override(endpoint: str, region: str = "us-east-1") -> str:
    urls = "\n".join(f'    {name} = "{endpoint}"' for name in ENDPOINTS)
    return f"""
provider "aws" {{
  region                      = "{region}"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  skip_requesting_account_id  = false
  s3_use_path_style           = true
  endpoints {{
{urls}
  }}
}}
"""


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (a thread of this process), stopped at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (dev extra)")
    from moto.server import ThreadedMotoServer

    install_shims()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    threads_before = {t.ident for t in threading.enumerate()}
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            extra = [t for t in threading.enumerate()
                     if t.ident not in threads_before and t.is_alive()]
            if not extra:
                break
            time.sleep(0.1)
        assert not extra, f"emulator threads outlived the test: {extra}"


TFVARS = {
    "api_image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/converse-api:test",
    "triton_image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/converse-triton:test",
    "min_gpu_instances": 0,  # scale-from-zero path included
    # Ordered timeouts, none of them the settings' defaults (25 s / 29 s), which a
    # service left without them would fall back to and refuse to start with.
    "triton_client_timeout_s": 26,
    "lambda_timeout_s": 28,
    "gateway_timeout_ms": 29_500,
}


def test_apply_and_destroy_against_the_emulator(tmp_path: Path, emulator: str) -> None:
    terraform, plugins = _requirements()
    env = _env(tmp_path)
    work = _copy_config(tmp_path)
    (work / "emulator_override.tf").write_text(_provider_override(emulator))
    (work / "terraform.tfvars.json").write_text(json.dumps(TFVARS))
    _init(terraform, plugins, work, env)

    # Timeouts out of order fail the plan (the lambda function's precondition).
    bad = _run([terraform, "plan", "-no-color", "-var", "lambda_timeout_s=40"], work, env, 300)
    assert bad.returncode != 0
    assert "Timeouts must be ordered" in bad.stdout + bad.stderr
    # A scaling target a task never reaches (it refuses sockets past its limit) fails too.
    bad = _run([terraform, "plan", "-no-color", "-var", "connections_per_session_task=64"],
               work, env, 300)
    assert bad.returncode != 0
    assert "never scales out" in bad.stdout + bad.stderr

    started = time.monotonic()
    applied = _run([terraform, "apply", "-auto-approve", "-no-color", "-parallelism=20"],
                   work, env, APPLY_BUDGET_S)
    apply_s = time.monotonic() - started
    assert applied.returncode == 0, applied.stdout[-6000:] + applied.stderr[-6000:]

    state = json.loads(_run([terraform, "show", "-json"], work, env, 120).stdout)
    managed = _managed_resources(state["values"]["root_module"])
    outputs = state["values"]["outputs"]
    assert outputs["stream_url"]["value"].startswith("wss://")
    assert outputs["endpoint_url"]["value"]
    assert len(managed) > 100, len(managed)
    for needed in ("module.sessions.aws_ecs_service.this",
                   "module.sessions.aws_cloudfront_distribution.this[0]",
                   "module.triton.aws_appautoscaling_policy.from_zero[0]",
                   "module.data.aws_iam_service_linked_role.autoscaling[0]"):
        assert needed in managed, needed
    _check_triton_grpc(emulator)
    _check_alb_log_writers(emulator)

    # A second plan refreshes every resource without error. (It is not empty:
    # moto drops some attributes, e.g. capacity provider strategies.)
    again = _run([terraform, "plan", "-no-color", "-refresh=true"], work, env, 300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]

    # docs/deploy.md's tear-down: versioned buckets keep every version and
    # delete marker (the log bucket holds access logs); delete them all first.
    _empty_versioned_buckets(emulator)
    started = time.monotonic()
    destroyed = _run([terraform, "destroy", "-auto-approve", "-no-color", "-parallelism=20"],
                     work, env, APPLY_BUDGET_S)
    destroy_s = time.monotonic() - started
    assert destroyed.returncode == 0, destroyed.stdout[-6000:] + destroyed.stderr[-6000:]
    print(f"emulated apply: {len(managed)} resources in {apply_s:.0f} s, "
          f"destroy in {destroy_s:.0f} s")


def test_plan_in_a_region_opened_after_august_2022(tmp_path: Path, emulator: str) -> None:
    """me-central-1 has no Elastic Load Balancing account (aws_elb_service_account fails there)."""
    terraform, plugins = _requirements()
    env = _env(tmp_path)
    work = _copy_config(tmp_path)
    (work / "emulator_override.tf").write_text(_provider_override(emulator, "me-central-1"))
    (work / "terraform.tfvars.json").write_text(json.dumps({**TFVARS, "region": "me-central-1"}))
    _init(terraform, plugins, work, env)
    planned = _run([terraform, "plan", "-no-color", "-out=plan.bin"], work, env, 300)
    assert planned.returncode == 0, planned.stdout[-4000:] + planned.stderr[-4000:]
    plan = json.loads(_run([terraform, "show", "-json", "plan.bin"], work, env, 120).stdout)
    assert plan["variables"]["region"]["value"] == "me-central-1"
    read = _data_sources(plan["prior_state"]["values"]["root_module"])  # read while planning
    assert "module.data.module.logs_bucket.data.aws_caller_identity.current" in read
    assert not [address for address in read if ".aws_elb_service_account." in address]


def _check_alb_log_writers(endpoint: str) -> None:
    """ELB's log delivery service and us-east-1's ELB account may write ALB logs (under alb/)."""
    s3 = _client(endpoint, "s3")
    (bucket,) = [b["Name"] for b in s3.list_buckets()["Buckets"]
                 if b["Name"].startswith("converse-logs-")]
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    account = _client(endpoint, "sts").get_caller_identity()["Account"]
    writers = {json.dumps(s["Principal"]): s["Resource"] for s in policy["Statement"]
               if s["Effect"] == "Allow" and s["Action"] == "s3:PutObject"
               and "/alb/" in s["Resource"]}
    prefix = f"arn:aws:s3:::{bucket}/alb/AWSLogs/{account}/*"
    assert writers == {
        json.dumps({"Service": "logdelivery.elasticloadbalancing.amazonaws.com"}): prefix,
        json.dumps({"AWS": "arn:aws:iam::127311923021:root"}): prefix,
    }


def _client(endpoint: str, service: str) -> Any:
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _check_triton_grpc(endpoint: str) -> None:
    """The sessions service streams the chat LM from Triton over gRPC, on the internal NLB."""
    elbv2 = _client(endpoint, "elbv2")
    balancers = {b["LoadBalancerName"]: b for b in elbv2.describe_load_balancers()["LoadBalancers"]}
    nlb = balancers["converse-triton-grpc"]
    assert (nlb["Type"], nlb["Scheme"]) == ("network", "internal")
    ec2 = _client(endpoint, "ec2")
    (nlb_group,) = ec2.describe_security_groups(GroupIds=nlb["SecurityGroups"])["SecurityGroups"]
    sessions_group = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["converse-sessions-tasks"]}])["SecurityGroups"]
    assert [(r["FromPort"], [g["GroupId"] for g in r["UserIdGroupPairs"]], r["IpRanges"])
            for r in nlb_group["IpPermissions"]] == [(8001, [sessions_group[0]["GroupId"]], [])]
    listeners = elbv2.describe_listeners(LoadBalancerArn=nlb["LoadBalancerArn"])["Listeners"]
    assert [(x["Port"], x["Protocol"]) for x in listeners] == [(8001, "TCP")]

    ecs = _client(endpoint, "ecs")
    triton = ecs.describe_services(cluster="converse", services=["converse-triton"])
    attached = {(b["containerName"], b["containerPort"], b["targetGroupArn"])
                for b in triton["services"][0]["loadBalancers"]}
    groups = {g["TargetGroupArn"]: g for g in elbv2.describe_target_groups()["TargetGroups"]}
    assert {(port, groups[arn]["Protocol"], groups[arn]["Port"])
            for _, port, arn in attached} == {(8000, "HTTP", 8000), (8001, "TCP", 8001)}
    assert {name for name, _, _ in attached} == {"triton"}
    grpc_group = next(arn for _, port, arn in attached if port == 8001)
    assert groups[grpc_group]["LoadBalancerArns"] == [nlb["LoadBalancerArn"]]
    assert groups[grpc_group]["HealthCheckPath"] == "/v2/health/ready"
    triton_task = ecs.describe_task_definition(
        taskDefinition=triton["services"][0]["taskDefinition"])["taskDefinition"]
    container = next(c for c in triton_task["containerDefinitions"] if c["name"] == "triton")
    assert 8001 in {m["containerPort"] for m in container["portMappings"]}

    sessions = ecs.describe_services(cluster="converse-sessions", services=["converse-sessions"])
    task = ecs.describe_task_definition(
        taskDefinition=sessions["services"][0]["taskDefinition"])["taskDefinition"]
    environment = {e["name"]: e["value"] for e in task["containerDefinitions"][0]["environment"]}
    assert environment["CONVERSE_TRITON_GRPC_URL"] == f"{nlb['DNSName']}:8001"
    assert environment["CONVERSE_TRITON_PROTOCOL"] == "grpc"
    assert environment["CONVERSE_TRITON_URL"] == f"{balancers['converse-triton']['DNSName']}:8000"
    # The Lambda stays on HTTP.
    function = _client(endpoint, "lambda").get_function_configuration(FunctionName="converse-api")
    assert "CONVERSE_TRITON_GRPC_URL" not in function["Environment"]["Variables"]
    assert "CONVERSE_TRITON_PROTOCOL" not in function["Environment"]["Variables"]
    _check_both_services_load_their_settings(environment, function["Environment"]["Variables"])


def _check_both_services_load_their_settings(sessions: dict[str, str],
                                             function: dict[str, str]) -> None:
    """The settings each service gets from terraform load (they refuse unordered timeouts)."""
    from handler.settings import Settings

    def load(environment: dict[str, str]) -> Settings:
        return Settings(**{name.removeprefix("CONVERSE_").lower(): value
                           for name, value in environment.items()
                           if name.startswith("CONVERSE_")})

    for environment in (sessions, function):
        settings = load(environment)
        assert (settings.triton_timeout_s, settings.lambda_timeout_s,
                settings.gateway_timeout_s) == (26, 28, 29.5)
    # A task serves more sockets than the scaling target, so it can reach the target.
    assert load(sessions).session_max_live == 64 > 50


def _empty_versioned_buckets(endpoint: str) -> None:
    s3 = _client(endpoint, "s3")
    for bucket in s3.list_buckets()["Buckets"]:
        pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket["Name"])
        for page in pages:
            doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                      for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if doomed:
                s3.delete_objects(Bucket=bucket["Name"], Delete={"Objects": doomed, "Quiet": True})


def _data_sources(module: dict[str, Any]) -> set[str]:
    found = {r["address"] for r in module.get("resources", []) if r["mode"] == "data"}
    for child in module.get("child_modules", []):
        found |= _data_sources(child)
    return found


def _managed_resources(module: dict[str, object]) -> set[str]:
    found = {r["address"] for r in module.get("resources", []) if r["mode"] == "managed"}  # type: ignore[union-attr]
    for child in module.get("child_modules", []):  # type: ignore[union-attr]
        found |= _managed_resources(child)
    return found
