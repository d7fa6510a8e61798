"""Schemathesis hooks for kamigate's spec.

The import route takes its upload as text under several media types; schemathesis knows
how to send `text/*` bodies, and the `application/*` names the gateway accepts for the
same text formats are sent the same way.
"""

import schemathesis

schemathesis.serializer.alias(
    [
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/csv",
    ],
    "text/plain",
)
