"""Tell someone: on a failed run, a new champion or a cure, through what the user configured, or not at all.

Events (the webhook's `event`): `failure`, `warning` (bad incoming files), `champion`, and `cure` (a
retrain whose audit failed ran the cure, orchestrate.auto_cure: the body is its before/after table).

Two channels, both optional (orchestrate.notify_block, orchestrate.notify_webhook): a Prefect
notification block (Slack, Teams, email, a custom webhook... configured once in Prefect) or a plain
URL that receives a JSON POST. A channel that fails is logged as an error and never changes the run's
outcome: a Slack outage must not fail a good retrain. A webhook URL is its token: messages name its
scheme and host only.
"""

from __future__ import annotations

import httpx

from cnnops.config import OrchestrateParams
from cnnops.tracking.redact import redact_url
from pipelines import Logger


def send(
    orchestrate: OrchestrateParams,
    event: str,
    subject: str,
    body: str,
    logger: Logger,
) -> list[str]:
    """Send one message through every configured channel; returns the channels that took it."""
    delivered: list[str] = []
    if orchestrate.notify_block:
        try:
            _block(orchestrate.notify_block).notify(body=body, subject=subject)
            delivered.append(f"block {orchestrate.notify_block}")
        except Exception as exc:  # any failure of a third-party channel is reported, not raised
            logger.error(
                "notification block %r failed: %s: %s", orchestrate.notify_block, type(exc).__name__, exc
            )
    if orchestrate.notify_webhook:
        payload = {"event": event, "subject": subject, "text": f"{subject}\n{body}"}
        try:
            httpx.post(orchestrate.notify_webhook, json=payload, timeout=10).raise_for_status()
            delivered.append("webhook")
        except Exception as exc:  # reported, not raised: no traceback, whose text holds the URL
            logger.error("webhook %s failed: %s", redact_url(orchestrate.notify_webhook), _failure(exc))
    if delivered:
        logger.info("notified (%s): %s", ", ".join(delivered), subject)
    return delivered


def _failure(exc: Exception) -> str:
    """What went wrong with the webhook, without its text: httpx puts the URL, token and all, in it."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{type(exc).__name__}: HTTP {exc.response.status_code} {exc.response.reason_phrase}"
    return type(exc).__name__


def _block(name: str):  # -> prefect.blocks.abstract.NotificationBlock
    """Load `<block-type-slug>/<block-name>` (e.g. `slack-webhook/ops`) and check it can notify."""
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block

    if "/" not in name:
        raise ValueError(
            f"orchestrate.notify_block = {name!r}: write it as <block-type-slug>/<block-name>, "
            "e.g. slack-webhook/ops (see `prefect block ls`)"
        )
    block = Block.load(name)
    if not isinstance(block, NotificationBlock):
        raise ValueError(
            f"orchestrate.notify_block = {name!r} is a {type(block).__name__}, not a notification block"
        )
    return block
