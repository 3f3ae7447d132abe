"""Small fixes to moto 5 where it differs from AWS on calls the configuration makes.

Each shim names the AWS behaviour it restores; none makes moto more lenient
than AWS. They patch moto in this process, whose server runs in a thread.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

from botocore.exceptions import ClientError

_APPLIED = False
_SCALING_TAGS: dict[str, dict[str, str]] = {}


def install_shims() -> None:
    """Patch moto once; call before the server starts."""
    global _APPLIED
    if _APPLIED:
        return
    # The roles attach AWS-managed policies (AWSLambdaVPCAccessExecutionRole,
    # AmazonEC2ContainerServiceforEC2Role, ...), which moto loads on request.
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    _s3_logging_policy()
    _ecs_memory_reservation()
    _application_autoscaling_tags()
    _APPLIED = True


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _s3_logging_policy() -> None:
    """PutBucketLogging: AWS accepts any target-bucket statement letting logging.s3 PutObject.

    moto reads ``Principal`` as a dict (a ``"*"`` principal, as in a TLS-only
    deny, raises) and wants one exact ``Resource`` string.
    """
    from moto.s3 import models

    def permitted(target_bucket: Any, target_prefix: str | None) -> bool:
        if not target_bucket.policy:
            return False
        document = json.loads(target_bucket.policy.decode())
        key = f"arn:{target_bucket.partition}:s3:::{target_bucket.name}/{target_prefix or ''}x"
        for statement in _as_list(document.get("Statement", [])):
            principal = statement.get("Principal")
            services = principal.get("Service", []) if isinstance(principal, dict) else []
            allowed = statement.get("Effect") == "Allow"
            if not allowed or models.LOGGING_SERVICE_PRINCIPAL not in _as_list(services):
                continue
            if "s3:PutObject" not in _as_list(statement.get("Action", [])):
                continue
            patterns = _as_list(statement.get("Resource", []))
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns):
                return True
        return False

    models.FakeBucket._log_permissions_enabled_policy = staticmethod(permitted)


def _ecs_memory_reservation() -> None:
    """RegisterTaskDefinition: on EC2, a container may set only memoryReservation (soft limit)."""
    from moto.ecs import exceptions, models

    def validate(memory: str | None, container_definitions: list[dict[str, Any]],
                 requires_compatibilities: list[str] | None) -> None:
        for definition in container_definitions:
            if "name" not in definition and "Name" not in definition:
                raise exceptions.TaskDefinitionMissingPropertyError("name")
            if "image" not in definition and "Image" not in definition:
                raise exceptions.TaskDefinitionMissingPropertyError("image")
            limits = {"memory", "Memory", "memoryReservation", "MemoryReservation"}
            if not memory and not limits & definition.keys():
                raise exceptions.TaskDefinitionMemoryError(definition.get("name"))

    models.EC2ContainerServiceBackend._validate_container_defs = staticmethod(validate)


def _application_autoscaling_tags() -> None:
    """Application Auto Scaling keeps scalable targets' tags (TagResource, ListTagsForResource)."""
    from moto.applicationautoscaling.responses import ApplicationAutoScalingResponse as Response

    register = Response.register_scalable_target

    def register_scalable_target(self: Any) -> str:
        body = register(self)
        arn = json.loads(body)["ScalableTargetARN"]
        _SCALING_TAGS.setdefault(arn, {}).update(self._get_param("Tags") or {})
        return body

    def list_tags_for_resource(self: Any) -> str:
        return json.dumps({"Tags": _SCALING_TAGS.get(self._get_param("ResourceARN"), {})})

    def tag_resource(self: Any) -> str:
        tags = _SCALING_TAGS.setdefault(self._get_param("ResourceARN"), {})
        tags.update(self._get_param("Tags") or {})
        return "{}"

    def untag_resource(self: Any) -> str:
        tags = _SCALING_TAGS.get(self._get_param("ResourceARN"), {})
        for key in self._get_param("TagKeys") or []:
            tags.pop(key, None)
        return "{}"

    Response.register_scalable_target = register_scalable_target  # type: ignore[method-assign]
    Response.list_tags_for_resource = list_tags_for_resource  # type: ignore[attr-defined]
    Response.tag_resource = tag_resource  # type: ignore[attr-defined]
    Response.untag_resource = untag_resource  # type: ignore[attr-defined]


def refuse_long_sort_keys(params: dict[str, Any], model: Any, **_: Any) -> None:
    """A botocore hook: DynamoDB refuses a sort key over 1024 bytes on every call.

    moto checks the length only on PutItem.

    Register it on a DynamoDB client's ``provide-client-params.dynamodb.*`` event.

    Raises:
        ClientError: ``ValidationException``, AWS's answer, for a longer ``Key.id``.
    """
    sort_key = params.get("Key", {}).get("id", "")  # a Table passes plain values
    if isinstance(sort_key, dict):
        sort_key = sort_key.get("S", "")
    if len(sort_key.encode()) > 1024:
        raise ClientError({"Error": {"Code": "ValidationException", "Message": "Aggregated "
                           "size of all range keys has exceeded the size limit of 1024 bytes"}},
                          model.name)
