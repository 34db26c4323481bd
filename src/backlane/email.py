"""Mail: sending through SMTP (aiosmtplib), and a local SMTP sink for development (aiosmtpd).

SMTP settings come only from the environment (``BACKLANE_SMTP_HOST``, ``_PORT``, ``_USER``,
``_PASSWORD``, ``_FROM``, ``_TLS``, ``_STARTTLS``, ``_TIMEOUT``), never from code::

    await send_mail(SmtpSettings(), to="ann@example.com", subject="Hello", body="...")

``MailSink`` is a real SMTP server on a loopback port that accepts every message and keeps
it as one JSON line in a mailbox file; ``read_mailbox`` reads them back.

Errors that another try may mend (the server down or slow, a recipient refused for now) are
the SMTP client's own (``aiosmtplib.SMTPException`` and ``OSError``), left to the caller so
that a task can be retried on them; ``TRANSIENT_MAIL_ERRORS`` names them. Errors that no
retry can mend are ``PermanentMailError``, outside that tuple::

    BacklaneError
    └── PermanentMailError      the same mail would fail the same way however often it is sent
        ├── MailRefused         every recipient refused for good (5xx); nothing was sent
        ├── MailPartlyRefused   sent to some recipients, refused by others; a retry would
        │                       mail the first ones twice
        ├── MailNotAccepted     the login, the sender or the message refused for good (5xx)
        └── MailNotSupported    the server lacks what the settings or the mail need
                                (STARTTLS, a certificate that verifies, AUTH, SMTPUTF8)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, make_msgid
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .exceptions import BacklaneError

__all__ = [
    "TRANSIENT_MAIL_ERRORS",
    "MailNotAccepted",
    "MailNotSupported",
    "MailPartlyRefused",
    "MailRefused",
    "MailSink",
    "PermanentMailError",
    "ReceivedMail",
    "SmtpSettings",
    "build_message",
    "read_mailbox",
    "send_mail",
]

log = logging.getLogger("backlane.email")

TRANSIENT_MAIL_ERRORS: tuple[type[BaseException], ...] = (aiosmtplib.SMTPException, OSError)
"""What ``send_mail`` raises when the SMTP exchange fails in a way another try may mend (the
server down, too slow, or refusing for now): the errors a mail task retries on. A
``PermanentMailError`` is none of them."""


class PermanentMailError(BacklaneError):
    """A mail that would fail the same way however often it is sent: do not retry it."""


class MailRefused(PermanentMailError):
    """Every recipient was refused for good (a 5xx reply); nothing was sent.

    ``refused`` maps each address to the server's reply (``"550 5.1.1 ..."``).
    """

    def __init__(self, refused: dict[str, str]) -> None:
        self.refused = refused
        super().__init__(
            f"the SMTP server refused every recipient for good: {_replies(refused)}; "
            "nothing was sent"
        )


class MailPartlyRefused(PermanentMailError):
    """The mail went to some recipients and was refused for others.

    ``message_id`` is the mail's Message-ID, ``accepted`` the addresses that took it,
    ``refused`` maps each other address to the server's reply. It is not retried, since a
    retry would send the mail to ``accepted`` a second time.
    """

    def __init__(self, message_id: str, accepted: list[str], refused: dict[str, str]) -> None:
        self.message_id = message_id
        self.accepted = accepted
        self.refused = refused
        super().__init__(
            f"mail {message_id} was sent to {', '.join(accepted)} but refused for "
            f"{_replies(refused)}; it is not retried (the others would get it twice): "
            "send it again to the refused addresses alone"
        )


class MailNotSupported(PermanentMailError):
    """The SMTP server lacks what the settings or the mail need: STARTTLS when
    ``BACKLANE_SMTP_STARTTLS=true``, AUTH when ``BACKLANE_SMTP_USER`` is set, SMTPUTF8 for
    an address that is not ASCII."""


class MailNotAccepted(PermanentMailError):
    """The SMTP server refused for good (a 5xx reply) the login, the sender or the
    message itself; nothing was sent. ``reply`` is the server's reply."""

    def __init__(self, step: str, reply: str, hint: str) -> None:
        self.reply = reply
        super().__init__(f"the SMTP server refused {step}: {reply}; {hint}; nothing was sent")


def _replies(refused: dict[str, str]) -> str:
    return ", ".join(f"{address} ({reply})" for address, reply in refused.items())


class SmtpSettings(BaseSettings):
    """Where mail goes: from ``BACKLANE_SMTP_*`` environment variables only."""

    model_config = SettingsConfigDict(
        env_prefix="BACKLANE_SMTP_", extra="ignore", populate_by_name=True
    )

    host: str | None = None
    """The SMTP server; None means no server is configured."""
    port: int | None = None
    """Default: 465 with ``tls``, 587 with ``starttls``, else 25."""
    user: str | None = None
    password: SecretStr | None = None
    sender: str = Field(default="backlane@localhost", validation_alias="BACKLANE_SMTP_FROM")
    """The ``From`` address (``BACKLANE_SMTP_FROM``)."""
    tls: bool = False
    """Connect with implicit TLS (port 465 style)."""
    starttls: bool | None = None
    """Upgrade with STARTTLS: True requires it (the certificate checked), False never, None
    when the server offers it (the certificate not checked, as a relay's is often
    self-signed)."""
    timeout: float = 10.0
    """Seconds for each network step."""

    def describe(self) -> str:
        """The server as ``host:port`` (never the password), for logs and pages."""
        return f"{self.host or '(none)'}:{self.port or 'default'}"


def build_message(*, sender: str, to: str, subject: str, body: str) -> EmailMessage:
    """A plain-text message. Raises ``ValueError`` for a header with a line break (no header
    injection)."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="backlane.local")
    message.set_content(body)
    return message


async def send_mail(settings: SmtpSettings, *, to: str, subject: str, body: str) -> str:
    """Send one plain-text message to ``to`` (one address, or several separated by commas)
    through the configured SMTP server; returns its Message-ID once every recipient has
    taken it.

    Raises ``ValueError`` when no server is configured; ``aiosmtplib.SMTPException`` or
    ``OSError`` when another try may succeed (the server unreachable or slow, every
    recipient refused with at least one refusal for now, a 4xx); ``MailRefused`` when every
    recipient is refused for good; ``MailPartlyRefused`` (logged as a warning too) when
    some took it and others refused it; ``MailNotAccepted`` when the server refuses the
    login, the sender or the message for good (a 5xx); ``MailNotSupported`` when the server
    does not offer STARTTLS that the settings require (before any password is sent), a
    certificate that verifies where the settings require TLS, AUTH
    that a user name asks for (a server that answers only HELO offers none), or SMTPUTF8
    that an address needs.
    """
    if not settings.host:
        raise ValueError("no SMTP server configured: set BACKLANE_SMTP_HOST (and _PORT)")
    message = build_message(sender=settings.sender, to=to, subject=subject, body=body)
    message_id = str(message["Message-ID"])
    recipients = [address for _, address in getaddresses([to]) if address]
    password = settings.password.get_secret_value() if settings.password else ""
    port = settings.port or (465 if settings.tls else 587 if settings.starttls else 25)
    # starttls None (the default): upgrade when offered, as Postfix's "may" level does,
    # without checking the certificate (relays often have self-signed ones, and whoever
    # could forge one could as well strip the offer); True: required (checked below),
    # with the certificate checked, as with implicit TLS
    opportunistic = settings.starttls is None and not settings.tls
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=port,
        use_tls=settings.tls,
        start_tls=False if settings.starttls is False else None,
        validate_certs=not opportunistic,
        timeout=settings.timeout,
    )
    try:
        async with client:
            if (
                settings.starttls
                and not settings.tls
                and client.get_transport_info("sslcontext") is None
            ):
                raise MailNotSupported(
                    f"the SMTP server {settings.describe()} does not offer STARTTLS, which "
                    "BACKLANE_SMTP_STARTTLS=true requires: use the server's STARTTLS port, "
                    "or BACKLANE_SMTP_TLS=true for implicit TLS; nothing was sent"
                )
            if settings.user:
                await _greet(client)
                if not client.supports_extension("auth"):
                    raise MailNotSupported(
                        f"the SMTP server {settings.describe()} offers no AUTH, which "
                        "BACKLANE_SMTP_USER asks for: unset it, or use the server's "
                        "submission port; nothing was sent"
                    )
                await client.login(settings.user, password)
            refusals, _ = await client.send_message(message, recipients=recipients)
    except ssl.SSLCertVerificationError as exc:  # a required STARTTLS's
        raise _unverified(settings, exc) from exc
    except aiosmtplib.SMTPConnectError as exc:  # implicit TLS's comes wrapped
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise _unverified(settings, exc.__cause__) from exc
        raise
    except aiosmtplib.SMTPResponseException as exc:
        not_accepted = _not_accepted(exc, settings)
        if not_accepted is None:
            raise
        raise not_accepted from exc
    except aiosmtplib.SMTPNotSupported as exc:
        raise MailNotSupported(
            f"the SMTP server {settings.describe()} cannot take this mail: {exc}; nothing was sent"
        ) from exc
    except aiosmtplib.SMTPRecipientsRefused as exc:
        if all(refusal.code >= 500 for refusal in exc.recipients):
            raise MailRefused(
                {r.recipient: f"{r.code} {r.message}" for r in exc.recipients}
            ) from exc
        raise
    if refusals:
        refused = {address: f"{r.code} {r.message}" for address, r in refusals.items()}
        accepted = [address for address in recipients if address not in refused]
        error = MailPartlyRefused(message_id, accepted, refused)
        log.warning("%s", error)
        raise error
    return message_id


def _unverified(settings: SmtpSettings, exc: ssl.SSLCertVerificationError) -> MailNotSupported:
    """The error for a server whose certificate does not verify where TLS is required."""
    other = (
        "or use STARTTLS (BACKLANE_SMTP_TLS=false) and leave BACKLANE_SMTP_STARTTLS unset to "
        "upgrade without checking it"
        if settings.tls
        else "or leave BACKLANE_SMTP_STARTTLS unset to upgrade without checking it"
    )
    return MailNotSupported(
        f"the SMTP server {settings.describe()} presented a certificate that could not be "
        f"verified ({exc.verify_message}): make its issuer trusted (SSL_CERT_FILE), {other}; "
        "nothing was sent"
    )


async def _greet(client: aiosmtplib.SMTP) -> None:
    """Greet the server unless this session already did (a session upgraded by STARTTLS
    has not): EHLO, or HELO where the server refuses EHLO, as aiosmtplib's own commands
    do. Afterwards ``client.supports_extension`` answers; a HELO-only server offers none."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


def _not_accepted(
    exc: aiosmtplib.SMTPResponseException, settings: SmtpSettings
) -> MailNotAccepted | None:
    """What a 5xx reply to the login, the sender or the message means for the caller; None
    for a reply another try may mend (a 4xx), or one to another command."""
    if exc.code < 500:
        return None
    reply = f"{exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return MailNotAccepted(
            f"the login of {settings.user!r}", reply, "check BACKLANE_SMTP_USER and _PASSWORD"
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return MailNotAccepted(f"the sender {exc.sender!r}", reply, "check BACKLANE_SMTP_FROM")
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return MailNotAccepted("the message", reply, "the server will not take this mail")
    return None


# -- the local sink ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """One message the sink accepted."""

    to: str
    """The envelope recipients, comma-separated."""
    subject: str
    body: str
    received_at: str
    """ISO 8601, UTC."""
    sender: str = ""


class _KeepEverything:
    """aiosmtpd handler: append every message to the mailbox file."""

    def __init__(self, mailbox: Path) -> None:
        self.mailbox = mailbox
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        mail = _parse(raw, sender=envelope.mail_from or "", recipients=envelope.rcpt_tos)
        line = json.dumps(asdict(mail), ensure_ascii=False) + "\n"
        await asyncio.to_thread(self._append, line)
        return "250 Message accepted for delivery"

    def _append(self, line: str) -> None:
        with self.lock, self.mailbox.open("a", encoding="utf-8") as out:
            out.write(line)


def _parse(raw: bytes, *, sender: str, recipients: list[str]) -> ReceivedMail:
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    part = parsed.get_body(preferencelist=("plain", "html"))
    body = ""
    if part is not None:
        with contextlib.suppress(LookupError, ValueError):
            body = str(part.get_content()).replace("\r\n", "\n")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return ReceivedMail(
        to=", ".join(recipients),
        subject=str(parsed.get("Subject", "")),
        body=body,
        received_at=f"{stamp}+00:00",
        sender=sender,
    )


def read_mailbox(mailbox: Path, *, limit: int = 200) -> list[ReceivedMail]:
    """The last ``limit`` messages a sink kept in ``mailbox``, oldest first (none if the
    file does not exist)."""
    try:
        with mailbox.open(encoding="utf-8") as lines:
            last = deque(lines, maxlen=limit)
    except FileNotFoundError:
        return []
    found = []
    for line in last:
        with contextlib.suppress(ValueError, TypeError):
            data: dict[str, Any] = json.loads(line)
            found.append(ReceivedMail(**data))
    return found


class MailSink:
    """A development SMTP server on ``host:port`` (port 0: a free one) that accepts every
    message up to ``max_bytes`` and keeps it in ``mailbox`` (JSON lines). It runs on a
    thread of its own, so it serves whatever event loop the caller has, or none.

    ``with MailSink(path) as sink:`` starts and stops it; ``sink.port`` is the bound port.
    """

    def __init__(
        self,
        mailbox: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_bytes: int = 1024 * 1024,
    ) -> None:
        self.mailbox = Path(mailbox)
        self.host = host
        self.port = port
        self.max_bytes = max_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<MailSink {self.host}:{self.port} -> {self.mailbox}>"

    def start(self, timeout: float = 10.0) -> MailSink:
        """Listen, and return once the server accepts connections. Raises ``OSError`` if
        the address cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("this sink is already running")
        self.mailbox.parent.mkdir(parents=True, exist_ok=True)
        ready = threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._serve, args=(ready, failure), name="backlane-mail-sink", daemon=True
        )
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the mail sink did not start within {timeout}s")
        if failure:
            thread.join()
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop listening and wait for the server thread to end (idempotent)."""
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)
        self._thread = None

    def messages(self, limit: int = 200) -> list[ReceivedMail]:
        """What the sink kept so far, oldest first."""
        return read_mailbox(self.mailbox, limit=limit)

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run(ready, failure))
        finally:
            loop.close()

    async def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.get_running_loop()
        handler = _KeepEverything(self.mailbox)
        self._stopped = asyncio.Event()
        try:
            server = await loop.create_server(
                lambda: SMTP(
                    handler,
                    hostname="localhost",
                    data_size_limit=self.max_bytes,
                    enable_SMTPUTF8=True,
                    loop=loop,
                ),
                host=self.host,
                port=self.port,
            )
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            await server.wait_closed()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for session in sessions:  # still connected: end them
                session.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
