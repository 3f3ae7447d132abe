"""Request and response models per API family (the OpenAPI document's source)."""
