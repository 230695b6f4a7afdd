"""Where each decoded server frame goes: to the stream of its request, the control request
waiting for it (``auth``, ``open``, ``close``), or the ping waiting for its pong."""

import asyncio
import logging
from decimal import InvalidOperation

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.client import wire
from farmesh_ws.client.errors import FarmeshClientError
from farmesh_ws.client.events import ContributionEvent, DoneEvent, TokenEvent
from farmesh_ws.client.resume import ResumePoint
from farmesh_ws.client.stream import ReplyStream, StreamItem

logger = logging.getLogger(__name__)


class FrameRouting:
    """The reader's routing, mixed into the client that owns these waiters."""

    _streams: dict[str, ReplyStream]
    _pongs: dict[str, "asyncio.Future[None]"]
    _control: "asyncio.Future[p.ServerMessage] | None"
    _resume: ResumePoint | None

    def _route(self, frame: str) -> None:
        try:
            envelope = wire.ENVELOPE.decode(frame)
        except msgspec.MsgspecError as exc:
            logger.warning("ignoring a frame without a message type: %s", exc)
            return
        if envelope.seq is not None and self._resume is not None:
            self._resume.last_seq = envelope.seq
        if envelope.type not in wire.KNOWN_TYPES:
            # protocol.md §10: a server may add message types within a version.
            logger.debug("ignoring a message of unknown type %r", envelope.type)
            return
        try:
            message = wire.DECODER.decode(frame)
            item: StreamItem | p.ServerMessage = (
                wire.decode_event(message)
                if isinstance(message, p.Token | p.Done | p.ContributionReport)
                else message
            )
        except (msgspec.MsgspecError, InvalidOperation) as exc:
            item = FarmeshClientError(
                "protocol_error",
                f"malformed {envelope.type!r} frame: {exc}",
                request_id=envelope.request_id,
            )
        if isinstance(item, p.Pong):
            pong = self._pongs.get(item.data or "")
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif isinstance(item, p.GoingAway):
            # it lets its sessions go as it stops: the chat resumes on another gateway (§2.3)
            logger.info("the server is going away in %.0f s", item.time_left_s)
        elif isinstance(item, p.Authenticated | p.Opened | p.Closed):
            if isinstance(item, p.Closed):
                self._resume = None
            if self._control is not None and not self._control.done():
                self._control.set_result(item)
        elif isinstance(item, p.Error | FarmeshClientError):
            self._route_error(item)
        elif isinstance(item, TokenEvent | DoneEvent | ContributionEvent):
            stream = self._streams.get(item.request_id)
            if stream is not None:
                stream._feed(item)

    def _route_error(self, error: p.Error | FarmeshClientError) -> None:
        """An error goes to its request; one without a request_id answers the pending
        ``auth``/``open``/``close`` or else concerns every running request."""
        if error.request_id is not None:
            stream = self._streams.get(error.request_id)
            if stream is not None:
                stream._feed(error)
            return
        if self._control is not None and not self._control.done():
            if isinstance(error, p.Error):
                self._control.set_result(error)
            else:
                self._control.set_exception(error)
            return
        if not self._streams:
            logger.warning("error from the server: %s", error)
        for stream in list(self._streams.values()):
            stream._feed(error)
