"""Secrets kept out of what cnnops records or says: MLflow params and artifacts, logs, messages.

A URL can carry a password (`https://user:pass@host`) or a token in its query, and a webhook's path
is its token (Slack, Teams, Discord). The params that hold such URLs are recorded, and the URLs
named, by scheme and host only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

REDACTED = "***"
# (section, key) of every param whose value is a URL that may carry a secret.
SECRET_URL_PARAMS = (("tracking", "uri"), ("orchestrate", "notify_webhook"))


def redact_url(url: str) -> str:
    """`scheme://host[:port]` of `url`, with `***` standing for its user and password and for its path,
    query and fragment. A local store (`sqlite:///mlflow.db`, a folder) has no host, and its path
    names a file, not a secret: only a query is cut from it."""
    parts = urlsplit(url)
    if not parts.netloc:
        return url.split("?", 1)[0] + (f"?{REDACTED}" if "?" in url else "")
    user = f"{REDACTED}@" if "@" in parts.netloc else ""
    host = parts.netloc.rpartition("@")[2]
    rest = f"/{REDACTED}" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{user}{host}{rest}"


def redact_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a params mapping (e.g. `Params.model_dump(by_alias=True)`) with the URLs of
    SECRET_URL_PARAMS redacted: what MLflow records as params and as the params file."""
    redacted = copy.deepcopy(dict(raw))
    for section, key in SECRET_URL_PARAMS:
        value = redacted.get(section, {}).get(key)
        if isinstance(value, str):
            redacted[section][key] = redact_url(value)
    return redacted
