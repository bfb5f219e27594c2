"""Real Flower Messages for calling handlers and strategies directly, without a SuperLink."""

from __future__ import annotations

import time
import uuid

from flwr.app import Message, Metadata, RecordDict
from flwr.app.constants import DEFAULT_TTL


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
