"""The SMTP downstream: pooled aiosmtplib connections, one downstream transaction per
client transaction.

Recipients are added one by one and the downstream's answer to each is mirrored to our
client at RCPT time (the same model as Postfix's before-queue proxy filter), so a 250
after DATA never covers a recipient the downstream refused; ``replies.py`` maps its
answers to ours. MAIL and RCPT go out as raw commands with the path exactly as our client
sent it; XFORWARD attributes are passed on when the downstream offers XFORWARD.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

import aiosmtplib

from relay.contracts import Transaction, XForward
from relay.delivery.replies import downstream_failure, status_of
from relay.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from relay.message import Message, to_crlf
from relay.reply import Reply

log = logging.getLogger("relay.delivery.smtp")

MAX_IDLE_SECONDS = 30.0  # reuse a pooled connection only if it idled less than this
# RFC 6531 3.2: a message that needs SMTPUTF8 is refused, never downgraded, when the next
# hop does not offer it.
NO_SMTPUTF8_TEXT = "Non-ASCII addresses not permitted: the next hop does not support SMTPUTF8"
DATA_CHUNK = 256 * 1024  # a message goes downstream this much at a time


class SmtpTransport:
    """Relays to a downstream SMTP server over pooled aiosmtplib connections."""

    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        hostname: str,
        timeout: float,
        starttls: bool = False,
        pool_size: int = 16,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.timeout = timeout
        self.starttls = starttls
        self.pool_size = pool_size
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self._closed = False

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.hostname,
            timeout=self.timeout,
            start_tls=self.starttls,
            use_tls=False,
        )
        try:
            await client.connect()
            await client.ehlo()
        except aiosmtplib.SMTPTimeoutError as exc:
            client.close()
            raise TemporaryDeliveryError(451, "4.4.2", "Downstream timed out") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise TemporaryDeliveryError(451, "4.4.1", "Downstream unavailable") from exc
        except BaseException:  # cancelled (a probe's time limit, shutdown): no open socket
            client.close()
            raise
        return client

    def _checkout(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            since, client = self._idle.pop()
            if now - since < MAX_IDLE_SECONDS and client.is_connected:
                return client
            client.close()
        return None

    def checkin(self, client: aiosmtplib.SMTP) -> None:
        if self._closed or len(self._idle) >= self.pool_size or not client.is_connected:
            client.close()
            return
        self._idle.append((time.monotonic(), client))

    async def begin(
        self, mail_from: str, options: Sequence[str] = (), xforward: XForward | None = None
    ) -> Transaction:
        return _SmtpTransaction(self, mail_from, tuple(options), dict(xforward or {}))

    async def open_mail(
        self, mail_from: str, options: Sequence[str], xforward: XForward | None = None
    ) -> aiosmtplib.SMTP:
        """A connection with MAIL FROM accepted; a stale pooled one is replaced once.

        The reverse-path goes out exactly as our client sent it (``mail_from`` is the text
        between the angle brackets): aiosmtplib's ``mail()`` would re-parse it with the
        lax ``email.utils.parseaddr``, and what we judged would not be what we deliver.
        XFORWARD attributes are passed on when the downstream offers XFORWARD (Postfix with
        smtpd_authorized_xforward_hosts), so its logs and checks see the original client."""
        client = self._checkout()
        reused = client is not None
        utf8 = any(o.upper() == "SMTPUTF8" for o in options)
        command = b"FROM:<" + mail_from.encode("utf-8") + b">"
        for _ in range(2):
            if client is None:
                client = await self._connect()
            if utf8 and not client.supports_extension("smtputf8"):
                self.checkin(client)  # nothing sent yet: the connection stays clean
                raise PermanentDeliveryError(553, "5.6.7", NO_SMTPUTF8_TEXT)
            try:
                if xforward and client.supports_extension("xforward"):
                    await _send_xforward(client, xforward)
                response = await client.execute_command(
                    b"MAIL", command, *(o.encode("ascii") for o in options)
                )
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                client.close()
                client = None
                if not reused:
                    raise TemporaryDeliveryError(
                        451, "4.4.2", "Downstream connection lost"
                    ) from exc
                reused = False
                continue
            except BaseException:
                client.close()  # whatever went wrong, no half-open transaction is pooled
                raise
            if response.code != 250:
                if client.is_connected:
                    self.checkin_after_reset(client)
                raise downstream_failure(response.code, response.message)
            return client
        raise TemporaryDeliveryError(451, "4.4.1", "Downstream unavailable")

    def checkin_after_reset(self, client: aiosmtplib.SMTP) -> None:
        """Reset in the background and pool the connection; close it if RSET fails."""

        async def reset() -> None:
            try:
                await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
                return
            self.checkin(client)

        task = asyncio.get_running_loop().create_task(reset())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def probe(self) -> bool:
        try:
            client = await asyncio.wait_for(self._connect(), timeout=min(self.timeout, 5.0))
        except (DeliveryError, TimeoutError):
            return False
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
        client.close()
        return True

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, client in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(client.quit(), timeout=1.0)
            client.close()


_BACKGROUND: set[asyncio.Task[None]] = set()  # keeps fire-and-forget RSETs referenced


def data_chunks(raw: bytes, size: int = DATA_CHUNK) -> Iterator[bytes]:
    """``raw`` as DATA carries it, about ``size`` bytes at a time: every line end CRLF
    (a lone CR or LF made one, as aiosmtplib does), dot-stuffed (RFC 5321 4.5.2), a last
    line ended, then the lone dot. The same bytes as aiosmtplib's ``data()``, which makes
    them with three whole copies of the message and 250 ms of the event loop at 25 MB.

    A chunk ends after a LF when one is near, and never inside a CRLF."""
    start, line_start = 0, True
    while start < len(raw):
        end = raw.find(b"\n", start + size, start + 2 * size) + 1 or min(start + size, len(raw))
        if end < len(raw) and raw[end - 1 : end + 1] == b"\r\n":  # keep a CRLF whole
            end += 1
        chunk = raw[start:end]
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:  # rare: bare CR or LF
            chunk = to_crlf(chunk)
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        line_start = chunk.endswith(b"\n")
        yield chunk
        start = end
    yield b".\r\n" if line_start else b"\r\n.\r\n"


async def send_data(client: aiosmtplib.SMTP, raw: bytes, seconds: float) -> aiosmtplib.SMTPResponse:
    """DATA with the message streamed (``data_chunks``), written as fast as the
    downstream reads it: never more than a chunk of it copied, and the loop free between
    chunks; ``seconds`` for each wait. Raises what aiosmtplib's ``data()`` raises
    (SMTPDataError for a refusal)."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # asyncio's FlowControlMixin wait (what StreamWriter.drain uses) is private: should a
    # later aiosmtplib lack it, send the whole message its own way rather than fail.
    drain = getattr(protocol, "_drain_helper", None)
    if drain is None:
        return await client.data(raw)
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    written = b""  # the last chunk waits: the reply is awaited right after it, none missed
    for chunk in data_chunks(raw):
        if written:
            protocol.write(written)
            try:
                async with asyncio.timeout(seconds):
                    await drain()
            except TimeoutError as exc:
                raise aiosmtplib.SMTPTimeoutError("Timed out sending message data") from exc
        written = chunk
    protocol.write(written)
    response = await protocol.read_response(timeout=seconds)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _xtext(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


async def _send_xforward(client: aiosmtplib.SMTP, xforward: XForward) -> None:
    offered = set(client.esmtp_extensions.get("xforward", "").upper().split())
    args = [
        f"{k}={_xtext(v)}".encode("ascii", "replace")
        for k, v in sorted(xforward.items())
        if k in offered  # send only the attributes the downstream named in its EHLO
    ]
    if not args:
        return
    response = await client.execute_command(b"XFORWARD", *args)
    if response.code != 250:  # the downstream refused it: deliver anyway, unannotated
        log.warning("downstream refused XFORWARD: %d", response.code)


class _SmtpTransaction:
    def __init__(
        self,
        transport: SmtpTransport,
        mail_from: str,
        options: tuple[str, ...],
        xforward: dict[str, str],
    ) -> None:
        self._t = transport
        self._mail_from = mail_from
        self._options = options
        self._xforward = xforward
        self._client: aiosmtplib.SMTP | None = None
        self._accepted = 0

    async def add_recipient(self, address: str) -> Reply:
        """Mirror one RCPT downstream; ``address`` goes out exactly as our client sent it."""
        try:
            if self._client is None:
                self._client = await self._t.open_mail(
                    self._mail_from, self._options, self._xforward
                )
            response = await self._client.execute_command(
                b"RCPT", b"TO:<" + address.encode("utf-8") + b">"
            )
        except DeliveryError as exc:
            return Reply(exc.code, exc.status, exc.text)
        except aiosmtplib.SMTPTimeoutError:
            self._drop()
            return Reply(451, "4.4.2", "Downstream timed out")
        except (aiosmtplib.SMTPException, OSError):
            self._drop()
            return Reply(451, "4.4.2", "Downstream connection lost")
        except Exception:
            # A bug or a library surprise: the connection is closed, never leaked, and the
            # client is told to retry.
            log.exception("downstream RCPT failed")
            self._drop()
            return Reply(451, "4.3.0", "Temporary local problem, try again later")
        if response.code not in (250, 251):
            if not self._client.is_connected:  # 421: aiosmtplib closed it
                self._client = None
            err = downstream_failure(response.code, response.message)
            if isinstance(err, TemporaryDeliveryError):
                return Reply(450, "4.2.0", "Recipient deferred by downstream, try again later")
            return Reply(err.code, err.status, err.text)
        self._accepted += 1
        return Reply(250, "2.1.5", "Ok")

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def send(self, message: Message) -> Reply:
        if self._client is None or not self._accepted:
            raise TemporaryDeliveryError(451, "4.4.2", "Downstream connection lost")
        client, self._client = self._client, None
        try:
            response = await send_data(client, message.raw, self._t.timeout)
        except aiosmtplib.SMTPDataError as exc:
            self._t.checkin_after_reset(client)
            raise downstream_failure(exc.code, exc.message) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            client.close()
            raise TemporaryDeliveryError(451, "4.4.2", "Downstream timed out") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise TemporaryDeliveryError(451, "4.4.2", "Downstream connection lost") from exc
        self._t.checkin(client)
        _, text = status_of(response.message, response.code)
        return Reply(250, "2.0.0", f"Ok: queued as {message.queue_id} ({text[:120]})")

    async def abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._t.checkin_after_reset(client)
