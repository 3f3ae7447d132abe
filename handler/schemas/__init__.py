"""Request and response models per API family (the OpenAPI document's source)."""

from pydantic import ConfigDict

# Request bodies and client events: an unknown field or a value of the wrong JSON type is
# a 400. Pydantic's lax mode would read ``true`` as the integer 1 and ``"50"`` as 50, so a
# client's bug would pass unnoticed; a JSON number still fills a float field.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)
