"""Schemathesis hooks of scripts/api-fuzz.sh: the check that every error answer of kstash is
JSON with a string `error` field (src/api/error.rs), as the official SDKs expect.

Loaded through SCHEMATHESIS_HOOKS; the check is selected by name with `--checks`.
"""

import json

import schemathesis

# The first status that is an error answer.
FIRST_ERROR_STATUS = 400


@schemathesis.check
def error_is_json_with_error_field(ctx, response, case):
    """A status >= 400 comes with a JSON body `{"error": "<string>", ...}`."""
    if response.status_code < FIRST_ERROR_STATUS:
        return None
    content_type = response.headers.get("content-type", [""])
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if not content_type.startswith("application/json"):
        raise AssertionError(
            f"error answer {response.status_code} is not JSON "
            f"(Content-Type {content_type!r}): {response.text[:200]!r}"
        )
    try:
        body = json.loads(response.text)
    except ValueError as e:
        raise AssertionError(
            f"error answer {response.status_code} does not parse as JSON ({e}): "
            f"{response.text[:200]!r}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        raise AssertionError(
            f"error answer {response.status_code} has no string `error` field: "
            f"{response.text[:200]!r}"
        )
    return None
