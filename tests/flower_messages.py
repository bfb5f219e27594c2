"""Real Flower Messages for calling handlers and strategies directly, without a SuperLink."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from flwr.app import Message, Metadata, RecordDict
from flwr.app.constants import DEFAULT_TTL

from imaging.failure_codes import parse_failure


def instruction(content: RecordDict, message_type: str, *, dst_node_id: int = 1, run_id: int = 1) -> Message:
    """An instruction as the SuperLink would deliver it (message id and metadata set)."""
    metadata = Metadata(
        run_id=run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
        src_task_id=1,
        dst_task_id=None,
    )
    return Message(content=content, metadata=metadata)


def coded_failure(reply: Message, code: str, audit_file: Path | None = None) -> dict:
    """The failure a ClientApp answered with: ``code`` and its ref, and (with ``audit_file``) the
    site's audit line for that ref, which keeps the full text. AssertionError otherwise."""
    assert reply.has_error(), f"expected a {code} error reply, got content {list(reply.content.keys())}"
    parsed = parse_failure(reply.error.reason)
    assert parsed is not None and parsed.code.code == code, reply.error.reason
    found: dict = {"sent": reply.error.reason, "ref": parsed.ref, **parsed.values}
    if audit_file is not None:
        lines = [json.loads(line) for line in Path(audit_file).read_text().splitlines()]
        (line,) = [r for r in lines if r.get("ref") == parsed.ref]
        assert line["code"] == code and line["sent"] == reply.error.reason, line
        found["audit"] = line
    return found
