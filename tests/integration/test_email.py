"""Mail through a real SMTP server (aiosmtpd on loopback) that refuses some recipients or
lacks an extension: what the caller and a mail task retried on ``TRANSIENT_MAIL_ERRORS``
see."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from backlane import Backlane, JobState
from backlane.email import (
    TRANSIENT_MAIL_ERRORS,
    MailNotAccepted,
    MailNotSupported,
    MailPartlyRefused,
    MailRefused,
    SmtpSettings,
    send_mail,
)
from backlane.testing import drain

pytestmark = pytest.mark.anyio

REFUSALS = {
    "nobody@example.com": "550 5.1.1 <nobody@example.com>: no such user",
    "gone@example.com": "551 5.1.6 <gone@example.com>: has moved",
    "busy@example.com": "450 4.2.1 <busy@example.com>: mailbox busy, try later",
}


@dataclass
class Picky:
    """aiosmtpd handler: refuses the recipients of ``REFUSALS`` with their reply, takes
    the others, and keeps every message it takes."""

    received: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in REFUSALS:
            return REFUSALS[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.received.append((list(envelope.rcpt_tos), content))
        return "250 Message accepted"


@dataclass
class Server:
    handler: Picky
    port: int

    def settings(self, **more: Any) -> SmtpSettings:
        return SmtpSettings(host="127.0.0.1", port=self.port, timeout=5.0, **more)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(**server_options: Any) -> Iterator[Server]:
    handler = Picky()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **server_options)
    controller.start()
    try:
        yield Server(handler, controller.port)
    finally:
        controller.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    """A real SMTP server that offers no STARTTLS and no SMTPUTF8."""
    yield from serve(enable_SMTPUTF8=False)


async def test_a_mail_refused_for_some_recipients_says_which(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The server took the mail for ann and refused nobody and busy: that was a success
    with the refusals lost."""
    caplog.set_level(logging.WARNING, logger="backlane.email")
    to = "ann@example.com, nobody@example.com, busy@example.com"
    with pytest.raises(MailPartlyRefused) as caught:
        await send_mail(server.settings(), to=to, subject="Hi", body="hello")
    error = caught.value
    assert error.accepted == ["ann@example.com"]
    assert sorted(error.refused) == ["busy@example.com", "nobody@example.com"]
    assert error.refused["nobody@example.com"].startswith("550 5.1.1")
    assert error.message_id.startswith("<") and error.message_id.endswith(">")
    text = str(error)
    assert "nobody@example.com (550 5.1.1" in text and "busy@example.com (450 4.2.1" in text
    assert "ann@example.com" in text and error.message_id in text
    assert [rcpts for rcpts, _ in server.handler.received] == [["ann@example.com"]]
    assert not isinstance(error, TRANSIENT_MAIL_ERRORS)  # a retry would mail ann again
    assert "nobody@example.com" in caplog.text and error.message_id in caplog.text


async def test_a_mail_every_recipient_refuses_for_good_is_not_retried(server: Server) -> None:
    with pytest.raises(MailRefused, match="nobody@example.com .550 5.1.1") as caught:
        await send_mail(
            server.settings(), to="nobody@example.com, gone@example.com", subject="s", body="b"
        )
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert isinstance(caught.value.__cause__, aiosmtplib.SMTPRecipientsRefused)
    assert server.handler.received == []


async def test_a_recipient_refused_for_now_is_retried(server: Server) -> None:
    """450 is a temporary refusal (a busy mailbox, greylisting): worth another try."""
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
        await send_mail(
            server.settings(), to="busy@example.com, nobody@example.com", subject="s", body="b"
        )
    assert isinstance(caught.value, TRANSIENT_MAIL_ERRORS)


async def test_starttls_required_but_not_offered_is_not_retried(server: Server) -> None:
    with pytest.raises(MailNotSupported, match="STARTTLS") as caught:
        await send_mail(server.settings(starttls=True), to="ann@example.com", subject="s", body="b")
    assert "BACKLANE_SMTP_STARTTLS" in str(caught.value)
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert server.handler.received == []


async def test_an_address_the_server_cannot_take_is_not_retried(server: Server) -> None:
    """A non-ASCII address needs SMTPUTF8, which this server does not offer
    (``aiosmtplib.SMTPNotSupported``): retrying cannot help."""
    with pytest.raises(MailNotSupported, match="SMTPUTF8") as caught:
        await send_mail(server.settings(), to="jörg@example.com", subject="s", body="b")
    assert isinstance(caught.value.__cause__, aiosmtplib.SMTPNotSupported)
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)


async def test_a_mail_to_accepted_recipients_still_returns_its_message_id(
    server: Server,
) -> None:
    message_id = await send_mail(
        server.settings(), to="ann@example.com, bob@example.com", subject="s", body="b"
    )
    assert message_id.startswith("<")
    assert [rcpts for rcpts, _ in server.handler.received] == [
        ["ann@example.com", "bob@example.com"]
    ]


# -- as a task, retried on TRANSIENT_MAIL_ERRORS ----------------------------------------


async def mail_task(port: int, to: str, starttls: bool = False) -> str:
    """Mail through the test server on ``port``."""
    settings = SmtpSettings(host="127.0.0.1", port=port, timeout=5.0, starttls=starttls)
    return await send_mail(settings, to=to, subject="from a task", body="hello")


@pytest.mark.parametrize(
    ("to", "starttls", "error_type", "in_message"),
    [
        ("ann@example.com, nobody@example.com", False, "MailPartlyRefused", "nobody@example.com"),
        ("ann@example.com", True, "MailNotSupported", "STARTTLS"),
    ],
)
async def test_a_mail_task_fails_at_once_where_a_retry_cannot_help(
    server: Server, to: str, starttls: bool, error_type: str, in_message: str
) -> None:
    lane = Backlane("memory://")
    task = lane.task(retries=3, backoff=0.01, retry_on=TRANSIENT_MAIL_ERRORS)(mail_task)
    async with lane:
        handle = await task.enqueue(server.port, to, starttls)
        await drain(lane)
        job = await lane.store.get(handle.id)
    assert job is not None and job.state is JobState.FAILED
    assert job.attempts == 1  # not retried
    assert job.error is not None and job.error["type"] == f"backlane.email.{error_type}"
    assert in_message in job.error["message"]
    assert len(server.handler.received) == (1 if error_type == "MailPartlyRefused" else 0)


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A real SMTP server offering STARTTLS (a self-signed certificate for 127.0.0.1 that
    the client trusts through ``SSL_CERT_FILE``) and AUTH for ann / secret."""
    yield from starttls_server(tmp_path, monkeypatch, trusted=True)


@pytest.fixture
def untrusted_tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """As ``tls_server``, its certificate trusted by nobody (a relay's snakeoil one)."""
    yield from starttls_server(tmp_path, monkeypatch, trusted=False)


@pytest.fixture
def untrusted_implicit_tls_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """A server that speaks TLS from the first byte (port 465 style), its certificate
    trusted by nobody."""
    yield from starttls_server(tmp_path, monkeypatch, trusted=False, implicit=True)


def starttls_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, trusted: bool, implicit: bool = False
) -> Iterator[Server]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*openssl, *subject, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticate(server: SMTP, session: Session, envelope: Envelope, *args: Any) -> Any:
        data = args[1]  # after the mechanism's name
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"ann", b"secret")
        return AuthResult(success=ok)

    if implicit:
        yield from serve(ssl_context=context, authenticator=authenticate, auth_require_tls=False)
    else:
        yield from serve(tls_context=context, require_starttls=True, authenticator=authenticate)


@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")  # aiosmtpd's own AUTH
async def test_starttls_and_login_when_offered(tls_server: Server) -> None:
    """The upgrade comes before the password, and the mail goes through."""
    settings = tls_server.settings(starttls=True, user="ann", password="secret")
    assert (await send_mail(settings, to="bob@example.com", subject="s", body="b")).startswith("<")
    assert [rcpts for rcpts, _ in tls_server.handler.received] == [["bob@example.com"]]


@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")  # aiosmtpd's own AUTH
async def test_by_default_the_session_is_upgraded_when_the_server_offers_starttls(
    tls_server: Server,
) -> None:
    """``starttls`` unset means "when offered": this server takes no AUTH and no mail
    before STARTTLS, so a session left in plain text would fail."""
    settings = tls_server.settings(user="ann", password="secret")
    assert settings.starttls is None
    assert (await send_mail(settings, to="bob@example.com", subject="s", body="b")).startswith("<")
    assert [rcpts for rcpts, _ in tls_server.handler.received] == [["bob@example.com"]]


@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")  # aiosmtpd's own AUTH
async def test_an_offered_starttls_goes_ahead_whatever_the_certificate(
    untrusted_tls_server: Server,
) -> None:
    """Unset, STARTTLS is opportunistic (Postfix's "may"): a relay's self-signed
    certificate is no reason to fail every mail (it was retried as an outage)."""
    settings = untrusted_tls_server.settings(user="ann", password="secret")
    assert (await send_mail(settings, to="bob@example.com", subject="s", body="b")).startswith("<")
    assert [rcpts for rcpts, _ in untrusted_tls_server.handler.received] == [["bob@example.com"]]


@pytest.mark.parametrize(
    ("server_fixture", "how", "hint"),
    [
        ("untrusted_tls_server", {"starttls": True}, "SSL_CERT_FILE"),
        ("untrusted_implicit_tls_server", {"tls": True}, "BACKLANE_SMTP_TLS=false"),
    ],
    ids=["required-starttls", "implicit-tls"],
)
async def test_required_tls_checks_the_certificate_and_is_not_retried(
    request: pytest.FixtureRequest, server_fixture: str, how: dict[str, bool], hint: str
) -> None:
    """A certificate that does not verify where TLS is required fails the mail for good
    (under implicit TLS it came wrapped as a connect error, retried like an outage)."""
    server: Server = request.getfixturevalue(server_fixture)
    settings = server.settings(**how, user="ann", password="secret")
    with pytest.raises(MailNotSupported, match="certificate that could not be verified") as caught:
        await send_mail(settings, to="bob@example.com", subject="s", body="b")
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert hint in str(caught.value)
    assert server.handler.received == []


async def test_starttls_false_never_upgrades(tls_server: Server) -> None:
    """``starttls=False`` keeps the session in plain text, even where STARTTLS is offered
    (this server then refuses the sender: 530, STARTTLS first)."""
    settings = tls_server.settings(starttls=False)
    with pytest.raises(MailNotAccepted, match="530"):
        await send_mail(settings, to="bob@example.com", subject="s", body="b")
    assert tls_server.handler.received == []


# -- refused at the sender, the message or the login ------------------------------------

SENDER_REFUSALS = {
    "blocked@example.com": "550 5.7.1 <blocked@example.com>: sender rejected",
    "slow@example.com": "451 4.7.1 <slow@example.com>: try again later",
}


@dataclass
class Strict(Picky):
    """As ``Picky``; also refuses the senders of ``SENDER_REFUSALS`` and any message whose
    subject says spam (554)."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in SENDER_REFUSALS:
            return SENDER_REFUSALS[address]
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        if b"Subject: spam" in content:
            return "554 5.6.0 message refused"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def strict_server() -> Iterator[Server]:
    handler = Strict()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield Server(handler, controller.port)
    finally:
        controller.stop()


@pytest.mark.parametrize(
    ("sender", "subject", "refused"),
    [("blocked@example.com", "hi", "the sender"), ("ann@example.com", "spam", "the message")],
)
async def test_a_sender_or_message_refused_for_good_is_not_retried(
    strict_server: Server, sender: str, subject: str, refused: str
) -> None:
    """A 5xx to MAIL FROM or DATA was an ``SMTPException`` like an outage, and retried."""
    settings = strict_server.settings(sender=sender)
    with pytest.raises(MailNotAccepted, match=f"refused {refused}.*5[0-9][0-9] ") as caught:
        await send_mail(settings, to="bob@example.com", subject=subject, body="b")
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert "nothing was sent" in str(caught.value)
    assert strict_server.handler.received == []


async def test_a_sender_refused_for_now_is_retried(strict_server: Server) -> None:
    settings = strict_server.settings(sender="slow@example.com")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
        await send_mail(settings, to="bob@example.com", subject="hi", body="b")
    assert isinstance(caught.value, TRANSIENT_MAIL_ERRORS)


async def test_a_user_name_for_a_server_without_auth_is_not_retried(server: Server) -> None:
    """``BACKLANE_SMTP_USER`` set, no AUTH offered: aiosmtplib's own error was an
    ``SMTPException``, retried however often it came back the same."""
    settings = server.settings(user="ann", password="secret")
    with pytest.raises(MailNotSupported, match="offers no AUTH") as caught:
        await send_mail(settings, to="bob@example.com", subject="s", body="b")
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert server.handler.received == []


class HeloOnly(SMTP):
    """An SMTP server from before ESMTP: it answers EHLO with 502, so a client falls back
    to HELO and learns of no extension (no AUTH, no STARTTLS)."""

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self.push("502 5.5.2 Error: command not recognized")


class HeloOnlyController(Controller):
    def factory(self) -> SMTP:
        return HeloOnly(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def helo_server() -> Iterator[Server]:
    handler = Picky()
    controller = HeloOnlyController(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield Server(handler, controller.port)
    finally:
        controller.stop()


async def test_a_server_that_speaks_only_helo_takes_mail(helo_server: Server) -> None:
    await send_mail(helo_server.settings(), to="bob@example.com", subject="s", body="b")
    assert [rcpts for rcpts, _ in helo_server.handler.received] == [["bob@example.com"]]


async def test_a_user_name_for_a_server_that_speaks_only_helo_is_not_retried(
    helo_server: Server,
) -> None:
    """The 502 to EHLO came out as ``SMTPHeloError``, an ``SMTPException`` like an
    outage, and was retried: the client never fell back to HELO to learn there is no AUTH."""
    settings = helo_server.settings(user="ann", password="secret")
    with pytest.raises(MailNotSupported, match="offers no AUTH") as caught:
        await send_mail(settings, to="bob@example.com", subject="s", body="b")
    assert not isinstance(caught.value, TRANSIENT_MAIL_ERRORS)
    assert helo_server.handler.received == []


async def login_task(port: int) -> str:
    """Mail with a user name through the test server on ``port``."""
    settings = SmtpSettings(host="127.0.0.1", port=port, timeout=5.0, user="ann", password="pw")
    return await send_mail(settings, to="bob@example.com", subject="s", body="b")


async def test_a_mail_task_with_a_user_name_for_a_helo_server_fails_at_once(
    helo_server: Server,
) -> None:
    lane = Backlane("memory://")
    task = lane.task(retries=3, backoff=0.01, retry_on=TRANSIENT_MAIL_ERRORS)(login_task)
    async with lane:
        handle = await task.enqueue(helo_server.port)
        await drain(lane)
        job = await lane.store.get(handle.id)
    assert job is not None and job.state is JobState.FAILED
    assert job.attempts == 1  # not retried
    assert job.error is not None and job.error["type"] == "backlane.email.MailNotSupported"
    assert helo_server.handler.received == []
