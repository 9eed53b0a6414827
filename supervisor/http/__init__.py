"""HTTP: routes, errors as JSON, the API token, the OpenAPI document."""
