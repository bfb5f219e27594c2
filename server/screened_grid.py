"""A Grid that lets no site's free text into the coordinator: only fedseg failure codes pass.

Every reply the ServerApp receives comes through :class:`ScreenedGrid`. An error reply keeps its
reason only when it parses as one of :data:`imaging.failure_codes.FAILURE_CODES` (what a fedseg
site sends); any other reason (the exception text of an older or modified ClientApp, which may
name a patient's file) is replaced by Flower's error-code name and "reason withheld". Flower's
strategies log reply errors and fedseg's round reports, logs and journal carry them: all of them
only ever see the screened text. (The SuperLink's own database keeps what the site sent: the
site's edge, ``client.failures``, is what keeps that clean.)
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from imaging.failure_codes import parse_failure

__all__ = ["ScreenedGrid", "screen_error"]

_CODE_NAMES = {value: name for name, value in vars(ErrorCode).items()
               if name.isupper() and isinstance(value, int)}


def screen_error(error: Error) -> Error:
    """``error`` as it is when its reason is a fedseg failure code; its code name only otherwise."""
    if parse_failure(error.reason) is not None:
        return error
    name = _CODE_NAMES.get(error.code, f"code {error.code}")
    return Error(code=error.code, reason=f"Flower {name}: reason withheld (not a fedseg failure code)")


def _screened(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            reply.error = screen_error(reply.error)
    return replies


class ScreenedGrid(Grid):
    """Delegates to ``inner``; every reply's error reason is screened by :func:`screen_error`."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: ANN201 - Flower's NodeInfo
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return _screened(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return _screened(self.inner.send_and_receive(messages, timeout=timeout))
