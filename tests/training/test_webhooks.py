"""Webhook targets (SSRF refusal by default) and signatures, checked with the Standard
Webhooks reference library. Delivery itself runs in the reference job
(test_training_jobs)."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook

from atelier.training.config import TrainingEngineSettings
from atelier.training.webhooks import new_secret, signature, target_refusal

DEFAULT = TrainingEngineSettings().webhook_allowed_hosts


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:8080/hook", "loopback"), ("http://localhost/hook", "loopback"),
    ("http://[::1]/hook", "loopback"), ("http://10.0.0.7/hook", "private"),
    ("https://192.168.1.1/hook", "private"), ("http://169.254.169.254/", "link-local"),
    ("http://[fd00::1]/hook", "private"), ("http://0.0.0.0/", "unspecified"),
    ("file:///etc/passwd", "http"), ("gopher://example.com/", "http"),
    ("http://user:pw@93.184.216.34/", "credentials"), ("http:///nohost", "no host"),
    # IPv6 forms around a private IPv4 address, which Python may call global.
    ("http://[::7f00:1]/", "carries 127.0.0.1"), ("http://[::ffff:7f00:1]/", "127.0.0.1"),
    ("http://[64:ff9b::7f00:1]/", "carries 127.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "carries 169.254.169.254"),
    ("http://[64:ff9b:1:7f00:0:100::]/", "carries 127.0.0.1"),
    ("http://[2002:7f00:1::]/", "carries 127.0.0.1"),
    ("http://[2002:a9fe:a9fe::]/", "carries 169.254.169.254"),
    ("http://[2002:a00:1::]/", "carries 10.0.0.1"),
    # Other spellings of 127.0.0.1: decimal, octal, hex and short.
    ("http://2130706433/", "loopback"), ("http://0177.0.0.1/", "loopback"),
    ("http://0x7f.0.0.1/", "loopback"), ("http://0x7f000001/", "loopback"),
    ("http://127.1/", "loopback"), ("http://127.0.1/", "loopback"),
])
def test_the_default_refuses_loopback_private_and_odd_targets(url, why):
    refusal = target_refusal(url, DEFAULT)
    assert refusal is not None and why in refusal


def test_public_addresses_and_the_allow_list_pass():
    assert target_refusal("https://93.184.216.34/hooks", DEFAULT) is None
    # The same forms around a public IPv4 address are reachable, and so is plain IPv6.
    for host in ("64:ff9b::5db8:d822", "2002:5db8:d822::", "2606:4700::1111"):
        assert target_refusal(f"http://[{host}]/hooks", DEFAULT) is None, host
    assert target_refusal("http://127.0.0.1:9/hook", ["127.0.0.0/8"]) is None
    assert target_refusal("http://localhost:9/hook", ["localhost"]) is None
    assert target_refusal("http://10.1.2.3/", ["10.9.0.0/16"]) is not None


def test_signatures_verify_with_the_reference_library():
    secret, body, stamp = new_secret(), json.dumps({"type": "x"}).encode(), 1_900_000_000
    header = signature(secret, "job.1", stamp, body)
    assert header.startswith("v1,")
    # (verify() checks the timestamp against the clock; the reference job's deliveries
    # are verified with it. Here: the library's own signature of the same message.)
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(stamp, UTC)
    assert Webhook(secret).sign("job.1", when, body.decode()) == header
    assert Webhook(new_secret()).sign("job.1", when, body.decode()) != header


class _Receiver:
    """An HTTP receiver on loopback that answers 204 and keeps each request's Host."""

    def __init__(self) -> None:
        import http.server
        import threading

        hosts = self.hosts = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["content-length"]))
                hosts.append(self.headers["host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _deliver(url: str, resolve, allowed: list[str]) -> dict:
    import asyncio

    from atelier.training.webhooks import WebhookDispatcher

    config = TrainingEngineSettings(webhook_allowed_hosts=allowed, webhook_max_attempts=1)

    async def run():
        dispatcher = WebhookDispatcher(None, config, resolve=resolve)
        try:
            return await dispatcher._deliver(url, new_secret(), "job.1", 1, b"{}")
        finally:
            await dispatcher.close()
    return asyncio.run(run())


def test_delivery_connects_only_to_the_addresses_it_checked():
    """The host is resolved once per connection and checked on those addresses: a DNS
    answer that turns to loopback after the submission check (rebinding) is refused at
    connect time, and so is a host with any refused record."""
    import ipaddress

    receiver = _Receiver()
    loopback, public = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("93.184.216.34")
    url = f"http://hooks.test:{receiver.port}/hook"
    try:
        # Allowed by network: delivered to the resolved address, Host kept.
        record = _deliver(url, lambda host, port: [loopback], ["127.0.0.0/8"])
        assert record["delivered"] and receiver.hosts == [f"hooks.test:{receiver.port}"]

        answers = iter([[public], [loopback], [loopback]])  # the check sees a public one
        record = _deliver(url, lambda host, port: next(answers), DEFAULT)
        assert not record.get("delivered") and "127.0.0.1" in record["error"], record
        record = _deliver(url, lambda host, port: [public, loopback], DEFAULT)
        assert not record.get("delivered") and "127.0.0.1" in record["error"], record
        assert receiver.hosts == [f"hooks.test:{receiver.port}"]  # nothing more arrived
    finally:
        receiver.close()
