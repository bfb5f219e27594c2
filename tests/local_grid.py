"""An in-process Grid that delivers messages to a real ClientApp, one Context per node.

It stands in for the SuperLink in tests of the ServerApp's logic; the real SuperLink and
the Ray simulation engine are exercised by the end-to-end tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self.client_app = client_app
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(range(101, 101 + num_nodes))
        }
        self.delivered: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's signature
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001,ANN201
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            m = message.metadata
            delivered = Message(
                content=message.content,
                metadata=Metadata(
                    run_id=m.run_id, message_id=uuid.uuid4().hex, src_node_id=0,
                    dst_node_id=m.dst_node_id, reply_to_message_id="", group_id=m.group_id,
                    created_at=m.created_at, ttl=m.ttl, message_type=m.message_type,
                ),
            )
            self.delivered.append(delivered)
            try:
                reply = self.client_app(delivered, self.contexts[m.dst_node_id])
            except Exception as exc:  # what the SuperNode does: an error reply, not a crash
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            replies.append(reply)
        self.replies.extend(replies)
        return replies
