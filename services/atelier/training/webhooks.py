"""Job webhooks: signed JSON POSTs of a job's events, retried, with every outcome kept.

A job whose spec names ``webhook.url`` gets each wanted event of its event log
(``jobs.py``) POSTed in order, in the Standard Webhooks format:

* headers ``webhook-id`` (stable across retries of one event, so a receiver
  can drop duplicates), ``webhook-timestamp`` (Unix seconds of the attempt) and
  ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of
  ``"{id}.{timestamp}.{body}"``, keyed with the job's secret);
* body ``{"type": "training_job.state_changed", "timestamp": ..., "data": {...}}``
  where ``data`` holds the job's name and the event's fields.

The secret (``whsec_`` + base64 of 32 random bytes) is made at submission,
stored beside the job record and returned once by CreateTrainingJob.

The service delivers, not the training workers: it tails each job's event log
(so jobs of the standalone entrypoint are delivered too) and keeps a cursor and
the outcomes in ``jobs/<id>/webhook.json``. Delivery is at least once: a restart
resends the event that was in flight. A target must be http(s), and a host that
resolves to a loopback, private, link-local, reserved or multicast address, or
to an IPv6 address that carries one (IPv4-mapped or -compatible, NAT64, 6to4),
is refused unless ``training.webhook_allowed_hosts`` names the host or a
network holding the address. The check runs at submission, before every
attempt, and at connect time on the addresses the connection uses (every A and
AAAA record, then the connected peer), so a DNS answer that changes between
check and connect cannot reach a refused address. Redirects and proxy
variables are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from urllib.parse import urlsplit

import httpcore
from google.protobuf import json_format

from atelier.storage import ObjectNotFound
from atelier.training.config import TrainingEngineSettings
from atelier.training.jobs import TERMINAL, JobStore, job_key
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training.webhooks")
S = training_pb2
#: Delivery outcomes kept per job (the latest).
KEPT_DELIVERIES = 100
MAX_URL_CHARS = 2048
#: WatchTrainingJobResponse event field -> webhook event kind.
EVENT_KINDS = {
    "state_changed": S.WEBHOOK_EVENT_STATE_CHANGED,
    "checkpoint_saved": S.WEBHOOK_EVENT_CHECKPOINT_SAVED,
    "validation_image": S.WEBHOOK_EVENT_VALIDATION_IMAGE,
    "scores": S.WEBHOOK_EVENT_SCORES,
}


# -- targets --------------------------------------------------------------------------------
def target_refusal(url: str, allowed_hosts: list[str], resolve=None) -> str | None:
    """Why ``url`` may not receive webhooks, or None when it may. Resolves the host
    (``resolve(host, port)``: its addresses; default the system's resolver)."""
    if len(url) > MAX_URL_CHARS:
        return f"is longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    host = parts.hostname
    if not host:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials"
    if _allowed_name(host, allowed_hosts):
        return None
    try:
        addresses = (resolve or resolve_host)(host, port)
    except (OSError, UnicodeError):
        return f"host {host!r} does not resolve"
    return addresses_refusal(host, addresses, allowed_hosts)


def resolve_host(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every A and AAAA address of ``host`` (an address literal is itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0])
                              for info in infos))


def addresses_refusal(host: str, addresses, allowed_hosts: list[str]) -> str | None:
    """Why ``host`` at ``addresses`` may not be reached (the first refused address), or
    None when every one is globally routable unicast or inside an allowed network."""
    networks = [n for n in map(_network, allowed_hosts) if n is not None]
    for address in addresses:
        if any(address in network for network in networks):
            continue
        kind = address_refusal(address)
        if kind is not None:
            return (f"host {host!r} resolves to {address}, {kind}; "
                    "such targets need training.webhook_allowed_hosts")
    return None


def _allowed_name(host: str, allowed_hosts: list[str]) -> bool:
    return host.lower() in {entry.lower() for entry in allowed_hosts if _network(entry) is None}


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connections that go only where the address check allows, checked at connect time
    so a DNS answer that changes after the check (rebinding) cannot slip through: the
    host is resolved once, refused if any of its addresses is, the connection is made
    to a checked address, and the connected peer's address is checked again."""

    def __init__(self, allowed_hosts: list[str], resolve=None) -> None:
        self.allowed_hosts = allowed_hosts
        self.resolve = resolve or resolve_host
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None):
        try:
            addresses = await asyncio.to_thread(self.resolve, host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"host {host!r} does not resolve") from exc
        named = _allowed_name(host, self.allowed_hosts)
        refusal = None if named else addresses_refusal(host, addresses, self.allowed_hosts)
        if refusal is not None:
            raise httpcore.ConnectError(f"refused: {refusal}")
        failure: Exception = httpcore.ConnectError(f"host {host!r} has no address")
        for address in addresses:
            try:
                stream = await self.inner.connect_tcp(str(address), port, timeout,
                                                      local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            peer = ipaddress.ip_address(stream.get_extra_info("server_addr")[0].split("%")[0])
            refusal = None if named else addresses_refusal(host, [peer], self.allowed_hosts)
            if refusal is not None:
                await stream.aclose()
                raise httpcore.ConnectError(f"refused: the connection reached {peer}: {refusal}")
            return stream
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def pinned_transport(allowed_hosts: list[str], resolve=None):
    """An httpx transport whose connections go through ``PinnedBackend``. It ignores
    proxy variables: a proxy would make the connection, out of the check's reach."""
    import httpx

    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # the pool httpx builds, pinned
        ssl_context=httpx.create_ssl_context(trust_env=False),
        network_backend=PinnedBackend(allowed_hosts, resolve))
    return transport


#: IPv6 prefixes that carry an IPv4 address: NAT64 (RFC 6052 well-known, RFC 8215
#: local-use) and 6to4 (RFC 3056).
_NAT64_96 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_48 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, as a router would reach it: mapped
    (``::ffff:a.b.c.d``), compatible (``::a.b.c.d``), NAT64 and 6to4; else None."""
    packed = address.packed
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_96 or (packed[:12] == bytes(12) and int(address) > 1):
        return ipaddress.IPv4Address(packed[12:])
    if address in _NAT64_48:  # the IPv4 octets skip bits 64-71 (RFC 6052, section 2.2)
        return ipaddress.IPv4Address(packed[6:8] + packed[9:11])
    return None


def address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not go to ``address``, or None for a globally routable
    unicast address. An IPv6 address that carries an IPv4 one is judged by it too."""
    inner = embedded_ipv4(address) if address.version == 6 else None
    if inner is not None and (not inner.is_global or inner.is_multicast):
        return f"an address that carries {inner}, a {_address_kind(inner)} address"
    if not address.is_global or address.is_multicast:
        return f"a {_address_kind(address)} address"
    return None


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def _address_kind(address) -> str:
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


# -- signing --------------------------------------------------------------------------------
def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value of one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_body(job_name: str, event: S.WatchTrainingJobResponse) -> tuple[int, bytes]:
    """(the event's kind, the JSON body posted for it)."""
    field = event.WhichOneof("event")
    data = {"name": job_name, **json_format.MessageToDict(getattr(event, field))}
    body = {"type": f"training_job.{field}", "timestamp": event.event_time.ToJsonString(),
            "data": data}
    return EVENT_KINDS[field], json.dumps(body, separators=(",", ":")).encode()


# -- per-job state in the store -------------------------------------------------------------
def secret_key(job_id: str) -> str:
    return job_key(job_id, "webhook-secret")


def read_secret(jobs: JobStore, job_id: str) -> str:
    try:
        return jobs.store.get_bytes(secret_key(job_id)).decode()
    except ObjectNotFound:
        return ""


def _state_key(job_id: str) -> str:
    return job_key(job_id, "webhook.json")


def read_state(jobs: JobStore, job_id: str) -> dict:
    """``{"cursor": last handled event key, "deliveries": [...]}``."""
    try:
        return jobs.store.get_json(_state_key(job_id))
    except ObjectNotFound:
        return {"cursor": "", "deliveries": []}


def copy_deliveries(job: S.TrainingJob, state: dict) -> None:
    del job.webhook_deliveries[:]
    for record in state.get("deliveries", []):
        job.webhook_deliveries.append(json_format.ParseDict(record, S.WebhookDelivery()))


# -- delivery -------------------------------------------------------------------------------
class WebhookDispatcher:
    """One task per job with a webhook, delivering its events in order."""

    def __init__(self, jobs: JobStore, config: TrainingEngineSettings,
                 resolve=None) -> None:
        """``resolve(host, port)``: a host's addresses (default: the system's resolver)."""
        import httpx

        self.jobs = jobs
        self.config = config
        self.resolve = resolve
        self._client = httpx.AsyncClient(
            transport=pinned_transport(config.webhook_allowed_hosts, resolve),
            follow_redirects=False, trust_env=False, timeout=config.webhook_timeout_s)
        self._tasks: dict[str, asyncio.Task] = {}

    def follow(self, job: S.TrainingJob) -> None:
        """Deliver ``job``'s events (a no-op without a webhook or when already following)."""
        job_id = JobStore.id_of(job)
        if not job.spec.webhook.url or job_id in self._tasks:
            return
        task = asyncio.create_task(self._follow(job_id, job.spec.webhook),
                                   name=f"webhook-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.aclose()

    async def _follow(self, job_id: str, hook: S.Webhook) -> None:
        wanted = set(hook.events) or set(EVENT_KINDS.values())
        name = f"trainingJobs/{job_id}"
        secret, state = None, None
        while True:
            try:
                if state is None:  # at the start, and again after a failure
                    secret = await asyncio.to_thread(read_secret, self.jobs, job_id)
                    state = await asyncio.to_thread(read_state, self.jobs, job_id)
                events = await asyncio.to_thread(self.jobs.events_after, job_id,
                                                 state["cursor"])
                for key, event in events:
                    done = event.HasField("state_changed") and \
                        event.state_changed.state in TERMINAL
                    state["cursor"] = key
                    if EVENT_KINDS.get(event.WhichOneof("event")) in wanted:
                        kind, body = event_body(name, event)
                        record = await self._deliver(hook.url, secret, _event_id(key), kind,
                                                     body)
                        state["deliveries"] = [*state["deliveries"], record][-KEPT_DELIVERIES:]
                        await asyncio.to_thread(self._save, job_id, state)
                    if done:
                        await asyncio.to_thread(self._save, job_id, state)
                        return
                if events:  # the cursor passed events nobody asked for
                    await asyncio.to_thread(self._save, job_id, state)
                elif (await asyncio.to_thread(self.jobs.load, job_id)).state in TERMINAL:
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is down, or the job was deleted: try later
                log.warning("webhook delivery paused", extra={"job": job_id}, exc_info=True)
                state = None
                try:
                    gone = not await asyncio.to_thread(self.jobs.exists, job_id)
                except Exception:  # still down: keep the task, try at the next poll
                    gone = False
                if gone:
                    return
            await asyncio.sleep(self.config.poll_interval_s)

    def _save(self, job_id: str, state: dict) -> None:
        self.jobs.store.put_json(_state_key(job_id), state)

    async def _deliver(self, url: str, secret: str, event_id: str, kind: int,
                       body: bytes) -> dict:
        """POST one event until a 2xx or the last attempt; the outcome as a WebhookDelivery
        dict."""
        import httpx

        status, error = 0, ""
        attempts = 0
        for attempt in range(1, self.config.webhook_max_attempts + 1):
            attempts = attempt
            refusal = await asyncio.to_thread(target_refusal, url,
                                              self.config.webhook_allowed_hosts, self.resolve)
            status, error = 0, ""
            if refusal:
                error = f"url {refusal}"
            else:
                stamp = int(time.time())
                headers = {"content-type": "application/json", "webhook-id": event_id,
                           "webhook-timestamp": str(stamp),
                           "webhook-signature": signature(secret, event_id, stamp, body),
                           "user-agent": "atelier-webhooks/1"}
                try:
                    response = await self._client.post(url, content=body, headers=headers)
                    status = response.status_code
                    if 200 <= status < 300:
                        break
                    error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:500]
            if attempt < self.config.webhook_max_attempts:
                await asyncio.sleep(min(self.config.webhook_retry_max_s,
                                        self.config.webhook_retry_first_s * 2 ** (attempt - 1)))
        delivered = 200 <= status < 300
        if not delivered:
            log.warning("webhook event not delivered", extra={
                "event_id": event_id, "attempts": attempts, "error": error})
        record = S.WebhookDelivery(event_id=event_id, event=kind, attempts=attempts,
                                   status_code=status, delivered=delivered, error=error)
        record.time.GetCurrentTime()
        return json_format.MessageToDict(record)


def _event_id(event_key: str) -> str:
    """A job event's webhook-id: its log entry's name (unique, the same on every retry)."""
    job_id = event_key.split("/")[2]
    return f"{job_id}.{event_key.rsplit('/', 1)[-1].removesuffix('.json')}"
