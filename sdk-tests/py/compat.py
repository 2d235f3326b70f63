"""compat.py -- proves that the official Python SDK (qstash, pinned in requirements.txt)
works against a running kstash, unchanged, by base URL and token alone.

    KSTASH_URL=http://127.0.0.1:8080 [KSTASH_TOKEN=...] python sdk-tests/py/compat.py

KSTASH_TOKEN defaults to the QStash dev token that `kstash dev` accepts.

It starts a recording HTTP receiver on 127.0.0.1 (random port), publishes through the
SDK, waits (event-driven, bounded) for each delivery and checks what arrived. Output:
one `ok - name` / `not ok - name: reason` line per check, then `N passed, M failed` as
the last line; exit code 1 if any check failed. scripts/sdk-tests.sh runs it.

The message checks call `client.message.cancel_all()`, which cancels EVERY pending message
on that kstash: run it only against a kstash of its own. The suite also creates per-run URL
groups, queues and schedules (one firing every minute, awaited for up to 75 s) and deletes
them again.
"""

import base64
import contextlib
import hashlib
import io
import json
import os
import sys
import threading
import time
import traceback
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from qstash import QStash, Receiver
from qstash.chat import custom, openai
from qstash.errors import QStashError, SignatureError
from qstash.log import LogState
from qstash.message import FlowControl
from qstash.schedule import ScheduleState

DEV_TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="
DELIVERY_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 15.0
POLL_TIMEOUT_S = 10.0  # bound for eventually consistent views (messages, logs, DLQ)
POLL_INTERVAL_S = 0.05
NO_MORE_GRACE_S = 1.0  # how long "no further request" is watched for
# Messages that the suite cancels are due this long after their publish (not_before), so that
# the end of the suite can watch that they never arrive.
PENDING_DUE_S = 5.0
# A `* * * * *` schedule fires within ~1 s after the next cron minute: its first delivery is
# awaited for at most this long after the schedule was created.
SCHEDULE_FIRE_TIMEOUT_S = 75.0

BASE_URL = os.environ.get("KSTASH_URL", "").rstrip("/")
TOKEN = os.environ.get("KSTASH_TOKEN") or DEV_TOKEN

# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
passed = 0
failed = 0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:400]


def ok(name: str) -> None:
    global passed
    passed += 1
    print(f"ok - {name}", flush=True)


def not_ok(name: str, reason: object) -> None:
    global failed
    failed += 1
    print(f"not ok - {name}: {_one_line(reason)}", flush=True)


class CheckFailed(Exception):
    pass


def check(name, fn):
    """Runs one check: fn returns normally (pass) or raises (fail). Returns fn's value or None."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 -- any exception is a failed check
        reason = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        not_ok(name, reason)
        return None
    ok(name)
    return True if value is None else value


def expect_equal(actual, expected, what="value"):
    if actual != expected:
        raise CheckFailed(f"{what}: got {actual!r}, want {expected!r}")


def bounded(fn, what, timeout=CALL_TIMEOUT_S):
    """Runs fn in a daemon thread; raises CheckFailed if it has not returned within timeout."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CheckFailed(f"{what}: no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def expect_raises(exc_type, fn, what, reason=None):
    """fn must raise exc_type; with reason, its message must also contain that text."""
    try:
        value = fn()
    except exc_type as e:
        if reason is not None and reason not in str(e):
            raise CheckFailed(f"{what} failed for another reason: {e}")
        return e
    raise CheckFailed(f"{what} succeeded, want {exc_type.__name__} (got {value!r})")


# ---------------------------------------------------------------------------------------
# Recording receiver: every request is stored; waiters are woken through a Condition. A path
# can be given a plan of statuses to answer with (in order), and a status for afterwards,
# and a delay before it answers (a slow destination); the receiver counts the requests to
# each path that are in flight (arrived, not yet answered).
# ---------------------------------------------------------------------------------------
deliveries = []  # dicts: method, url, path, headers (lower-case name -> value), body, status,
#                  in_flight (at arrival, including itself), answered_at
plans = {}  # path -> {"statuses": [status, ...], "then": status}
delays = {}  # path -> seconds to wait before answering
in_flight = {}  # path -> requests arrived and not yet answered
cond = threading.Condition()


def plan_statuses(path, statuses, then=200):
    """Answer the next requests to path with statuses in order, then always `then`."""
    with cond:
        plans[path] = {"statuses": list(statuses), "then": then}


def plan_delay(path, seconds):
    """Answer every request to path only `seconds` after it arrived."""
    with cond:
        delays[path] = seconds


def deliveries_to(path):
    with cond:
        return [d for d in deliveries if d["path"] == path]


def max_in_flight(path):
    """The most requests to path that were in flight at the receiver at the same time."""
    return max((d["in_flight"] for d in deliveries_to(path)), default=0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        path = self.path.split("?", 1)[0]
        with cond:
            plan = plans.get(path)
            if plan is None:
                status = 200
            elif plan["statuses"]:
                status = plan["statuses"].pop(0)
            else:
                status = plan["then"]
            in_flight[path] = in_flight.get(path, 0) + 1
            record = {
                "method": self.command,
                "url": self.path,
                "path": path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "received_at": time.time(),
                "status": status,
                "in_flight": in_flight[path],
                "answered_at": None,
            }
            deliveries.append(record)
            delay = delays.get(path)
            cond.notify_all()
        if delay:
            time.sleep(delay)
        with cond:
            in_flight[path] -= 1
            record["answered_at"] = time.time()
        reply = b"received" if 200 <= status < 300 else f"planned {status}".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _read_chunked(self):
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _record

    def log_message(self, format, *args):  # silence per-request logging
        pass


def wait_for_deliveries(path, n, timeout=DELIVERY_TIMEOUT_S):
    """Returns the first n requests to path (bounded wait)."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            seen = [d for d in deliveries if d["path"] == path]
            if len(seen) >= n:
                return seen[:n]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                others = ", ".join(f"{d['method']} {d['url']}" for d in deliveries) or "none"
                what = f"delivery to {path}" if n == 1 else f"{n} requests to {path}"
                raise CheckFailed(
                    f"{what}: none within {timeout:g} s (got {len(seen)}; deliveries seen so far: {others})"
                )
            cond.wait(remaining)


def wait_for_delivery(path, timeout=DELIVERY_TIMEOUT_S):
    return wait_for_deliveries(path, 1, timeout)[0]


def wait_for_message(path, message_id, timeout=DELIVERY_TIMEOUT_S):
    """Returns the request to path whose upstash-message-id is message_id (bounded wait)."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            seen = [d for d in deliveries if d["path"] == path]
            for d in seen:
                if d["headers"].get("upstash-message-id") == message_id:
                    return d
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ids = ", ".join(str(d["headers"].get("upstash-message-id")) for d in seen) or "none"
                raise CheckFailed(f"delivery of {message_id} to {path}: none within {timeout:g} s "
                                  f"(message ids seen there: {ids})")
            cond.wait(remaining)


def expect_no_more_deliveries(path, n, grace=NO_MORE_GRACE_S):
    """After the expected n requests to path, none more may arrive within grace seconds."""
    time.sleep(grace)
    seen = deliveries_to(path)
    if len(seen) != n:
        desc = ", ".join(f"{d['status']} at +{(d['received_at'] - seen[0]['received_at']) * 1000:.0f} ms"
                         for d in seen)
        raise CheckFailed(f"{len(seen)} requests to {path} (want exactly {n}): {desc}")


def poll(what, fn, timeout=POLL_TIMEOUT_S):
    """Polls fn (the views behind messages/logs/DLQ are eventually consistent) until it
    returns something other than None; raises with the last error after the bound."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = bounded(fn, what)
            if value is not None:
                return value
            last = None
        except Exception as e:  # noqa: BLE001 -- reported if the bound is reached
            last = e
        if time.monotonic() >= deadline:
            suffix = f" (last error: {type(last).__name__}: {last})" if last else ""
            raise CheckFailed(f"{what}: not within {timeout:g} s{suffix}")
        time.sleep(POLL_INTERVAL_S)


def expect_status(fn, status, what):
    """fn must raise QStashError with the given HTTP status."""
    e = expect_raises(QStashError, lambda: bounded(fn, what), what)
    if f"status: {status}," not in str(e):
        raise CheckFailed(f"{what}: got {type(e).__name__}: {e}, want status {status}")
    return e


def poll_until_404(what, fn):
    def attempt():
        try:
            fn()
        except QStashError as e:
            if "status: 404," in str(e):
                return True
            raise
        return None

    return poll(f"{what} raises status 404", attempt)


def quiet(fn):
    """Calls fn with stdout captured: qstash 3.4.0's LogApi.list() print()s the raw response,
    which would otherwise land between the `ok` lines."""
    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    return run


# ---------------------------------------------------------------------------------------
# Shared checks on one delivery
# ---------------------------------------------------------------------------------------
def check_delivery(label, receiver_base, *, path, destination, message_id, body, method,
                   content_type, forwarded=None):
    delivery = check(
        f"{label}: delivered within {DELIVERY_TIMEOUT_S:g} s", lambda: wait_for_delivery(path)
    )
    if not delivery:
        return None
    h = delivery["headers"]
    want_path_query = destination[len(receiver_base):]

    def body_unchanged():
        want = body.encode("utf-8")
        if delivery["body"] != want:
            raise CheckFailed(
                f"got {delivery['body']!r} ({len(delivery['body'])} bytes), want {want!r} ({len(want)} bytes)"
            )

    check(f"{label}: body bytes unchanged", body_unchanged)
    check(f"{label}: method {method}", lambda: expect_equal(delivery["method"], method, "method"))
    check(f"{label}: path and query unchanged",
          lambda: expect_equal(delivery["url"], want_path_query, "path+query"))
    check(f"{label}: content-type forwarded",
          lambda: expect_equal(h.get("content-type"), content_type, "content-type"))
    for name, value in (forwarded or {}).items():
        check(f"{label}: Upstash-Forward-{name} arrives as {name}",
              lambda name=name, value=value: expect_equal(h.get(name.lower()), value, name))

    def no_leaks():
        leaked = [k for k in h if k.startswith("upstash-forward-") or k.startswith("upstash-telemetry-")
                  or k in ("authorization", "upstash-method", "upstash-delay")]
        if leaked:
            raise CheckFailed(f"destination received {', '.join(leaked)}")

    check(f"{label}: no control or secret headers leak to the destination", no_leaks)
    check(f"{label}: upstash-message-id is the published id",
          lambda: expect_equal(h.get("upstash-message-id"), message_id, "upstash-message-id"))
    check(f"{label}: upstash-retried is 0",
          lambda: expect_equal(h.get("upstash-retried"), "0", "upstash-retried"))
    check(f"{label}: user-agent is Upstash-QStash",
          lambda: expect_equal(h.get("user-agent"), "Upstash-QStash", "user-agent"))
    return delivery


def check_signature(label, delivery, destination, keys):
    signature = delivery["headers"].get("upstash-signature")
    body = delivery["body"].decode("utf-8")

    def present():
        if not signature:
            raise CheckFailed("no upstash-signature header")

    if not check(f"{label}: upstash-signature present", present):
        return
    receiver = Receiver(current_signing_key=keys.current, next_signing_key=keys.next)

    check(f"{label}: Receiver.verify accepts signature (body + url)",
          lambda: receiver.verify(signature=signature, body=body, url=destination))
    # The negative checks also require the SDK's specific reason, so that they cannot pass
    # merely because verification fails for everything (e.g. a wrong key). The Python
    # Receiver reports the error of its LAST attempt (the next key), so the reason is read
    # from a Receiver whose both keys are the server's current (signing) key.
    single = Receiver(current_signing_key=keys.current, next_signing_key=keys.current)

    def rejects(what, reason, **kwargs):
        expect_raises(SignatureError, lambda: receiver.verify(signature=signature, **kwargs), what)
        expect_raises(SignatureError, lambda: single.verify(signature=signature, **kwargs), what,
                      reason=reason)

    check(f"{label}: Receiver.verify rejects a tampered body",
          lambda: rejects("verify(tampered body)", "Invalid body hash",
                          body=body + "tampered", url=destination))
    check(f"{label}: Receiver.verify rejects a wrong url",
          lambda: rejects("verify(wrong url)", "Invalid subject",
                          body=body, url=destination + "&wrong=1"))
    rotated = Receiver(current_signing_key="sig_wrongwrongwrongwrongwrongwrong",
                       next_signing_key=keys.current)
    check(f"{label}: Receiver falls back to the next key (current key wrong)",
          lambda: rotated.verify(signature=signature, body=body, url=destination))
    wrong = Receiver(current_signing_key="sig_wrongwrongwrongwrongwrongwrong",
                     next_signing_key="sig_alsowrongalsowrongalsowrong12")
    check(f"{label}: Receiver rejects when both keys are wrong",
          lambda: expect_raises(SignatureError, lambda: wrong.verify(
              signature=signature, body=body, url=destination),
              "verify(wrong keys)", reason="Signature verification failed"))


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
def run_suite(receiver_base):
    run_id = f"{os.getpid()}-{int(time.time() * 1000):x}"
    client = QStash(TOKEN, base_url=BASE_URL)

    def get_keys():
        keys = bounded(client.signing_key.get, "signing_key.get()")
        if not (keys.current.startswith("sig_") and keys.next.startswith("sig_")):
            raise CheckFailed(f"unexpected keys {keys!r}")
        return keys

    keys = check("signing_key.get() returns current and next sig_ keys", get_keys)

    # 1. publish: text body, custom header, PUT, destination with a query string.
    text_body = f"hello from qstash-py ✓ héllo {run_id}"
    text_path = f"/py/{run_id}/publish-text"
    text_dest = f"{receiver_base}{text_path}?alpha=1&beta=two%20words&gamma="

    def publish_text():
        res = bounded(lambda: client.message.publish(
            url=text_dest,
            body=text_body,
            content_type="text/plain; charset=utf-8",
            headers={"X-Compat-Test": f"value {run_id}"},
            method="PUT",
        ), "message.publish")
        if not getattr(res, "message_id", "").startswith("msg_"):
            raise CheckFailed(f"response {res!r}")
        return res.message_id

    text_id = check("message.publish(text, PUT, header) returns message_id msg_…", publish_text)

    # 2. publish_json
    json_payload = {"hello": "world", "n": 42, "nested": {"list": [1, 2, 3], "unicode": "ünïcödé"},
                    "runId": run_id}
    json_path = f"/py/{run_id}/publish-json"
    json_dest = f"{receiver_base}{json_path}"

    def publish_json():
        res = bounded(lambda: client.message.publish_json(url=json_dest, body=json_payload),
                      "message.publish_json")
        if not getattr(res, "message_id", "").startswith("msg_"):
            raise CheckFailed(f"response {res!r}")
        return res.message_id

    json_id = check("message.publish_json returns message_id msg_…", publish_json)

    if text_id:
        d = check_delivery(
            "publish text", receiver_base, path=text_path, destination=text_dest,
            message_id=text_id, body=text_body, method="PUT",
            content_type="text/plain; charset=utf-8",
            forwarded={"X-Compat-Test": f"value {run_id}"},
        )
        if d and keys:
            check_signature("publish text", d, text_dest, keys)
    if json_id:
        # The SDK serialises with json.dumps(body) (default separators).
        json_body = json.dumps(json_payload)
        d = check_delivery(
            "publish_json", receiver_base, path=json_path, destination=json_dest,
            message_id=json_id, body=json_body, method="POST", content_type="application/json",
        )
        if d:
            check("publish_json: body parses back to the same object",
                  lambda: expect_equal(json.loads(d["body"]), json_payload, "parsed body"))
            if keys:
                check_signature("publish_json", d, json_dest, keys)

    # 3. A delayed publish arrives, and not before its delay.
    def delay_is_honoured():
        path = f"/py/{run_id}/delayed"
        sent = time.time()
        bounded(lambda: client.message.publish(url=f"{receiver_base}{path}", body="later", delay=1),
                "publish(delay)")
        d = wait_for_delivery(path)
        waited = d["received_at"] - sent
        if waited < 1.0:
            raise CheckFailed(f"arrived after {waited:.3f} s, want >= 1 s")

    check("publish with delay=1 arrives no earlier than 1 s later", delay_is_honoured)

    # 4. A client mistake -> the SDK's error with status 400 and a JSON error body, not a 5xx
    # and not a hang. The SDK sends any `period` string as is, so a malformed flow-control
    # value reaches the server.
    def malformed_flow_control_is_400():
        e = expect_status(lambda: client.message.publish(
            url=f"{receiver_base}/py/{run_id}/fc-malformed", body="x",
            flow_control=FlowControl(key=f"py-{run_id}-bad", parallelism=1, period="banana")),
            400, "publish(flow_control period=banana)")
        body = str(e).split("body: ", 1)[-1]
        try:
            parsed = json.loads(body)
        except ValueError:
            raise CheckFailed(f"error body is not JSON: {body!r}")
        if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), str):
            raise CheckFailed(f'error body lacks "error": {body!r}')

    check("publish with a malformed flow_control period raises QStashError status 400",
          malformed_flow_control_is_400)

    # 4b. A callback: after the delivery, a JSON payload about it arrives at the callback URL.
    # callback_headers={"X": v} goes on the wire as Upstash-Callback-X; kstash forwards it.
    def callback_arrives():
        callback_path = f"/py/{run_id}/callback"
        res = bounded(lambda: client.message.publish(
            url=f"{receiver_base}/py/{run_id}/with-callback", body="x",
            callback=f"{receiver_base}{callback_path}",
            callback_headers={"X-Py-Callback": run_id}), "publish(callback)")
        d = wait_for_delivery(callback_path)
        try:
            payload = json.loads(d["body"])
        except ValueError:
            raise CheckFailed(f"callback body is not JSON: {d['body']!r}")
        expect_equal(payload.get("sourceMessageId"), res.message_id, "sourceMessageId")
        expect_equal(payload.get("status"), 200, "status")
        return d

    callback = check(
        "publish with callback: the callback arrives with sourceMessageId = the published id",
        callback_arrives)
    if callback:
        check("publish with callback: callback_headers arrive at the callback URL",
              lambda: expect_equal(callback["headers"].get("x-py-callback"), run_id,
                                   "x-py-callback"))

    # 5. A wrong token is rejected with 401.
    def bad_token_is_401():
        bad = QStash("not-the-token", base_url=BASE_URL)
        e = expect_raises(QStashError, lambda: bounded(lambda: bad.message.publish(
            url=f"{receiver_base}/py/{run_id}/unauth", body="x"), "publish(bad token)"),
            "publish(bad token)")
        if "status: 401," not in str(e):
            raise CheckFailed(f"got {type(e).__name__}: {e}, want status 401")

    check("publish with a wrong token raises QStashError status 401", bad_token_is_401)

    # 6. Delivery semantics and the management APIs (message, DLQ, log), SDK calls only.
    # The message checks come first: their cancel_all() runs while nothing else of the suite
    # is pending, and the wait for their cancelled messages overlaps the checks after them.
    ctx = {"client": client, "run_id": run_id, "base": receiver_base, "cancelled": []}
    message_checks(ctx)
    # A schedule firing every minute is created now (after the cancel_all() above, which could
    # otherwise cancel its message) and its first delivery is awaited near the end of the
    # suite, so that the wait for the next cron minute overlaps the checks in between.
    firing = start_schedule_firing(ctx)
    not_before_checks(ctx)
    retry_checks(ctx)
    dedup_checks(ctx)
    failure_callback_checks(ctx)
    dlq_checks(ctx)
    log_checks(ctx)
    queue_checks(ctx)
    flow_control_checks(ctx)
    url_group_checks(ctx, keys)
    batch_checks(ctx)
    schedule_checks(ctx)
    redact_checks(ctx)
    llm_checks(ctx)
    schedule_firing_checks(ctx, firing, keys)
    cancelled_never_delivered(ctx)
    # Key rotation under load, last: the checks above verify with the keys fetched at the start.
    rotation_checks(ctx)


# ---------------------------------------------------------------------------------------
# Delay & not-before
# ---------------------------------------------------------------------------------------
def not_before_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]

    def arrives_not_before():
        path = f"/py/{run_id}/not-before"
        not_before = int(time.time()) + 2
        bounded(lambda: client.message.publish(url=f"{base}{path}", body="not before",
                                               not_before=not_before), "publish(not_before)")
        d = wait_for_delivery(path)
        if d["received_at"] < not_before:
            raise CheckFailed(f"arrived {not_before - d['received_at']:.3f} s before not_before")

    check("publish with not_before (unix s) arrives no earlier than that time", arrives_not_before)


# ---------------------------------------------------------------------------------------
# Retries: 500, 500, 200 with retries=2 and a 200 ms retry_delay -> exactly 3 attempts.
# ---------------------------------------------------------------------------------------
def retry_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/py/{run_id}/retries"
    plan_statuses(path, [500, 500])

    def publish():
        res = bounded(lambda: client.message.publish(
            url=f"{base}{path}", body="retry me", retries=2, retry_delay="200"), "publish(retries)")
        if not res.message_id.startswith("msg_"):
            raise CheckFailed(f"response {res!r}")
        return res.message_id

    msg_id = check('publish with retries=2, retry_delay="200" returns message_id', publish)
    if not msg_id:
        return
    def three_attempts():
        seen = wait_for_deliveries(path, 3)
        expect_equal([d["status"] for d in seen], [500, 500, 200], "statuses answered")
        return seen

    attempts = check("retries: 3 attempts arrive (answered 500, 500, 200)", three_attempts)
    if not attempts:
        return
    check("retries: upstash-retried is 0, 1, 2",
          lambda: expect_equal([d["headers"].get("upstash-retried") for d in attempts],
                               ["0", "1", "2"], "upstash-retried"))
    check("retries: every attempt carries the same upstash-message-id",
          lambda: expect_equal([d["headers"].get("upstash-message-id") for d in attempts],
                               [msg_id] * 3, "upstash-message-id"))

    def gaps():
        g = [(b["received_at"] - a["received_at"]) * 1000 for a, b in zip(attempts, attempts[1:])]
        if any(x < 200 for x in g):
            raise CheckFailed(f"gaps {', '.join(f'{x:.0f}' for x in g)} ms")

    check("retries: attempts are at least the retry_delay (200 ms) apart", gaps)
    check("retries: no 4th attempt after the 200", lambda: expect_no_more_deliveries(path, 3))


# ---------------------------------------------------------------------------------------
# Deduplication
# ---------------------------------------------------------------------------------------
def dedup_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    variants = [
        ("deduplication_id", {"deduplication_id": f"dedup-{run_id}"}, f"/py/{run_id}/dedup-id"),
        ("content_based_deduplication", {"content_based_deduplication": True},
         f"/py/{run_id}/dedup-content"),
    ]
    for label, options, path in variants:
        def publish_twice(options=options, path=path, label=label):
            def once():
                return client.message.publish(url=f"{base}{path}", body=f"dedup body {label} {run_id}",
                                              **options)
            first = bounded(once, "publish #1")
            second = bounded(once, "publish #2")
            if not first.message_id.startswith("msg_"):
                raise CheckFailed(f"first response {first!r}")
            expect_equal(second.message_id, first.message_id, "second message_id")
            expect_equal(second.deduplicated, True, "second .deduplicated")
            expect_equal(first.deduplicated, False, "first .deduplicated")
            return first

        first = check(f"{label}: publishing twice gives the same message_id, the second "
                      f".deduplicated True", publish_twice)
        if not first:
            continue

        def exactly_one(path=path, first=first):
            d = wait_for_delivery(path)
            expect_equal(d["headers"].get("upstash-message-id"), first.message_id,
                         "upstash-message-id")
            expect_no_more_deliveries(path, 1)

        check(f"{label}: the receiver gets exactly one delivery", exactly_one)


# ---------------------------------------------------------------------------------------
# Failure callback: one request after the final failed attempt.
# ---------------------------------------------------------------------------------------
def failure_callback_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/py/{run_id}/always-fails"
    failure_path = f"/py/{run_id}/failure-callback"
    plan_statuses(path, [], then=500)

    def publish():
        res = bounded(lambda: client.message.publish(
            url=f"{base}{path}", body="doomed", retries=1, retry_delay="100",
            failure_callback=f"{base}{failure_path}"), "publish(failure_callback)")
        if not res.message_id.startswith("msg_"):
            raise CheckFailed(f"response {res!r}")
        return res.message_id

    msg_id = check("publish with failure_callback (retries=1) returns message_id", publish)
    if not msg_id:
        return

    # Values are kept in `got` as soon as they are read, so that a failed assertion in one
    # check does not hide the checks after it.
    got = {}

    def one_after_final():
        callback = got["callback"] = wait_for_delivery(failure_path)
        attempts = deliveries_to(path)
        expect_equal(len(attempts), 2, "attempts before the failure callback")
        if callback["received_at"] < attempts[1]["received_at"]:
            raise CheckFailed("failure callback arrived before the final attempt")
        expect_no_more_deliveries(failure_path, 1)
        expect_equal(len(deliveries_to(path)), 2, "attempts in total")

    check("failure_callback: one request arrives after the final (2nd) failed attempt",
          one_after_final)
    callback = got.get("callback")
    if not callback:
        return

    def payload_fields():
        try:
            payload = got["payload"] = json.loads(callback["body"])
        except ValueError:
            raise CheckFailed(f"body is not JSON: {callback['body']!r}")
        if not isinstance(payload.get("dlqId"), str) or not payload["dlqId"]:
            raise CheckFailed(f"no dlqId in {payload!r}")
        expect_equal(payload.get("sourceMessageId"), msg_id, "sourceMessageId")
        expect_equal(payload.get("status"), 500, "status")

    check("failure_callback: JSON body has dlqId, sourceMessageId and status 500", payload_fields)
    payload = got.get("payload")
    if not isinstance(payload, dict) or not payload.get("dlqId"):
        return

    def is_dlq_entry():
        entry = poll("dlq.get(dlqId of the failure callback)",
                     lambda: client.dlq.get(payload["dlqId"]))
        expect_equal(entry.message_id, msg_id, "message_id")
        bounded(lambda: client.dlq.delete(payload["dlqId"]), "dlq.delete")

    check("failure_callback: its dlqId is the message's DLQ entry (dlq.get)", is_dlq_entry)


# ---------------------------------------------------------------------------------------
# DLQ round trip (qstash 3.4.0 has no DLQ retry call: list, get, delete, delete_many)
# ---------------------------------------------------------------------------------------
def dlq_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/py/{run_id}/dlq"
    dest = f"{base}{path}"
    plan_statuses(path, [], then=500)

    def publish():
        res = bounded(lambda: client.message.publish(url=dest, body=f"dlq body {run_id}", retries=0),
                      "publish")
        wait_for_delivery(path)
        return res.message_id

    msg_id = check("DLQ: publish with retries=0 to a path answering 500", publish)
    if not msg_id:
        return

    got = {}  # see failure_callback_checks

    def listed():
        def find():
            r = client.dlq.list(filter={"message_id": msg_id})
            return r.messages[0] if r.messages else None

        entry = got["entry"] = poll("the DLQ entry", find)
        expect_equal(entry.message_id, msg_id, "message_id")
        expect_equal(entry.response_status, 500, "response_status")
        expect_equal(entry.url, dest, "url")
        expect_equal(entry.body, f"dlq body {run_id}", "body")
        expect_equal(entry.max_retries, 0, "max_retries")
        if not entry.dlq_id:
            raise CheckFailed(f"no dlq_id in {entry!r}")

    check("DLQ: dlq.list(filter={message_id}) lists it with response_status 500", listed)
    entry = got.get("entry")
    if not entry or not entry.dlq_id:
        return
    check("DLQ: the entry carries the destination's response body",
          lambda: expect_equal(entry.response_body, "planned 500", "response_body"))

    def get():
        got = bounded(lambda: client.dlq.get(entry.dlq_id), "dlq.get")
        expect_equal(got.dlq_id, entry.dlq_id, "dlq_id")
        expect_equal(got.message_id, msg_id, "message_id")
        expect_equal(got.response_status, 500, "response_status")
        expect_equal(got.body, f"dlq body {run_id}", "body")

    check("DLQ: dlq.get(dlq_id) returns the entry", get)

    # Two more failures: delete_many([]) deletes nothing, delete one, delete_many the rest.
    def three_listed():
        ids = [msg_id]
        for i in range(2):
            ids.append(bounded(lambda i=i: client.message.publish(
                url=dest, body=f"delete me {i}", retries=0), "publish").message_id)

        def all_three():
            r = client.dlq.list(filter={"url": dest})
            return r.messages if len(r.messages) >= 3 else None

        entries = poll("three DLQ entries", all_three)
        got["dlq_ids"] = [e.dlq_id for e in entries]
        expect_equal(sorted(e.message_id for e in entries), sorted(ids), "message_ids")

    check("DLQ: three failed messages are listed (dlq.list(filter={url}))", three_listed)
    if len(got.get("dlq_ids") or []) != 3:
        return
    a, b, c = got["dlq_ids"]

    def delete_many_empty():
        expect_equal(bounded(lambda: client.dlq.delete_many([]), "dlq.delete_many([])"), 0, "deleted")
        left = bounded(lambda: client.dlq.list(filter={"url": dest}), "dlq.list")
        expect_equal(len(left.messages), 3, "entries left")

    check("DLQ: dlq.delete_many([]) returns 0 and deletes nothing", delete_many_empty)

    def delete_one():
        bounded(lambda: client.dlq.delete(a), "dlq.delete")

        def only_b_c():
            left = client.dlq.list(filter={"url": dest}).messages
            return True if sorted(m.dlq_id for m in left) == sorted([b, c]) else None

        poll("the deleted entry to go", only_b_c)

    check("DLQ: dlq.delete(dlq_id) removes that entry only", delete_one)
    check("DLQ: dlq.get of a deleted dlq_id raises status 404",
          lambda: expect_status(lambda: client.dlq.get(a), 404, "dlq.get(deleted id)"))
    check("DLQ: dlq.delete of a deleted dlq_id raises status 404",
          lambda: expect_status(lambda: client.dlq.delete(a), 404, "dlq.delete(deleted id)"))

    def delete_many():
        expect_equal(bounded(lambda: client.dlq.delete_many([b, c]), "dlq.delete_many"), 2, "deleted")
        poll("the entries to go",
             lambda: True if not client.dlq.list(filter={"url": dest}).messages else None)

    check("DLQ: dlq.delete_many(dlq_ids) returns 2 and empties the DLQ of them", delete_many)


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------
def log_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/py/{run_id}/logged"
    dest = f"{base}{path}"

    def publish():
        res = bounded(lambda: client.message.publish(url=dest, body="log me"), "publish")
        wait_for_delivery(path)
        return res.message_id

    msg_id = check("log: a message to log is published and delivered", publish)
    if not msg_id:
        return
    want = {LogState.CREATED, LogState.ACTIVE, LogState.DELIVERED}

    def listed():
        def find():
            r = quiet(lambda: client.log.list(filter={"message_id": msg_id}))()
            return r.logs if want <= {log.state for log in r.logs} else None

        return poll("CREATED, ACTIVE and DELIVERED in the log", find)

    logs = check("log.list(filter={message_id}) has CREATED, ACTIVE and DELIVERED (LogState)", listed)
    if not logs:
        return

    def fields():
        now_ms = time.time() * 1000
        for log in logs:
            expect_equal(log.message_id, msg_id, "message_id")
            expect_equal(log.url, dest, "url")
            if not isinstance(log.state, LogState):
                raise CheckFailed(f"state {log.state!r} is not a LogState")
            if not isinstance(log.time, int) or abs(log.time - now_ms) > 600_000:
                raise CheckFailed(f"time {log.time!r} is not a recent ms timestamp")
        times = [log.time for log in logs]
        if times != sorted(times, reverse=True):
            raise CheckFailed(f"times not newest first: {times}")
        expect_equal(logs[0].state, LogState.DELIVERED, "newest state")

    check("log: every entry has the message_id, url, a LogState and a ms time, newest first", fields)

    def by_ids():
        r = bounded(quiet(lambda: client.log.list(filter={"message_ids": [msg_id]})),
                    "log.list(message_ids)")
        expect_equal([log.state for log in r.logs], [log.state for log in logs], "states")

    check("log.list(filter={message_ids: [id]}) returns the same entries", by_ids)

    def paging():
        pages = []
        cursor = None
        while True:
            r = bounded(quiet(lambda: client.log.list(
                filter={"message_id": msg_id}, count=1, cursor=cursor)), "log.list(count=1)")
            expect_equal(len(r.logs), 1, f"entries on page {len(pages) + 1}")
            pages.append(r.logs[0])
            cursor = r.cursor
            if len(pages) < len(logs) and not cursor:
                raise CheckFailed(f"no cursor after page {len(pages)} of {len(logs)}")
            if len(pages) > len(logs):
                raise CheckFailed(f"more pages than the {len(logs)} entries")
            if not cursor:
                break
        expect_equal([(p.state, p.time) for p in pages], [(log.state, log.time) for log in logs],
                     "paged entries")

    check("log paging: count=1 gives one entry and a cursor; following cursors walks all entries",
          paging)


# ---------------------------------------------------------------------------------------
# Queues (FIFO): upsert, get, list, enqueue/enqueue_json in order, pause/resume, a retry that
# holds the queue, client errors, delete. (qstash 3.4.0 sends neither a delay nor flow control
# on enqueue.)
# ---------------------------------------------------------------------------------------
def poll_queue(client, what, name, pred):
    """Polls queue.get(name) until pred(queue) holds; returns that queue."""
    def attempt():
        q = client.queue.get(name)
        return q if pred(q) else None

    return poll(what, attempt)


def arrivals(path):
    """(body, status, upstash-retried) of each request to path, in arrival order."""
    return [(d["body"].decode("utf-8"), d["status"], d["headers"].get("upstash-retried"))
            for d in deliveries_to(path)]


def queue_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    name = f"py-{run_id}-fifo"
    before_ms = time.time() * 1000

    def upsert_get():
        bounded(lambda: client.queue.upsert(name, parallelism=1), "queue.upsert")
        # qstash parses the queue with response["key"] for all six keys: a missing key raises.
        q = poll("queue.get", lambda: client.queue.get(name))
        expect_equal(q.name, name, "name")
        expect_equal(q.parallelism, 1, "parallelism")
        expect_equal(q.lag, 0, "lag")
        expect_equal(q.paused, False, "paused")
        if not isinstance(q.created_at, int) or abs(q.created_at - before_ms) > 5000:
            raise CheckFailed(f"created_at {q.created_at!r}, upserted at {before_ms:.0f} (ms)")
        if not isinstance(q.updated_at, int) or q.updated_at < q.created_at:
            raise CheckFailed(f"updated_at {q.updated_at!r} before created_at {q.created_at}")

    if not check("queue.upsert(parallelism=1) then queue.get() returns all six keys with their "
                 "values", upsert_get):
        return

    def listed():
        queues = bounded(client.queue.list, "queue.list")
        mine = [q for q in queues if q.name == name]
        expect_equal(len(mine), 1, f"entries named {name} in {queues!r}")
        expect_equal(mine[0].parallelism, 1, "parallelism")

    check("queue.list() contains the queue", listed)

    # FIFO: five messages (enqueue and enqueue_json alternating) to a slow destination, so that
    # four of them wait in the queue while the one before is being delivered.
    path = f"/py/{run_id}/fifo"
    dest = f"{base}{path}"
    plan_delay(path, 0.15)
    sent = {"bodies": [], "ids": []}

    def enqueue_five():
        for i in range(5):
            if i % 2 == 0:
                res = bounded(lambda i=i: client.message.enqueue(
                    queue=name, url=dest, body=f"fifo {i}"), "message.enqueue")
                sent["bodies"].append(f"fifo {i}")
            else:
                res = bounded(lambda i=i: client.message.enqueue_json(
                    queue=name, url=dest, body={"fifo": i}), "message.enqueue_json")
                sent["bodies"].append(json.dumps({"fifo": i}))
            if not res.message_id.startswith("msg_"):
                raise CheckFailed(f"response {res!r}")
            sent["ids"].append(res.message_id)

    enqueued = check("message.enqueue / message.enqueue_json: 5 messages (alternating) return "
                     "message_ids", enqueue_five)
    ids = sent["ids"]
    if enqueued:
        def in_order():
            got = wait_for_deliveries(path, 5)
            expect_equal([d["body"].decode("utf-8") for d in got], sent["bodies"],
                         "bodies in arrival order")
            expect_equal([d["headers"].get("upstash-message-id") for d in got], ids,
                         "upstash-message-id in arrival order")
            expect_equal(max_in_flight(path), 1, "most requests in flight at once")
            expect_no_more_deliveries(path, 5)

        check("queue (parallelism 1): the 5 messages arrive in enqueue order, one at a time",
              in_order)

    def logs_by_queue():
        def find():
            r = quiet(lambda: client.log.list(filter={"queue": name}))()
            delivered = any(log.message_id == ids[0] and log.state == LogState.DELIVERED
                            for log in r.logs)
            return r.logs if delivered else None

        logs = poll("DELIVERED of the first queued message in the queue's log", find)
        others = [log for log in logs if log.queue != name or log.message_id not in ids]
        if others:
            raise CheckFailed(f"entries of another queue or message: {others[0]!r}")

    if ids:
        check("log.list(filter={queue}) returns only entries of the queue, each with queue",
              logs_by_queue)

    # Pause: the queue accepts but delivers nothing; resume delivers, oldest first.
    paused_path = f"/py/{run_id}/fifo-paused"
    paused_dest = f"{base}{paused_path}"

    def pause():
        bounded(lambda: client.queue.pause(name), "queue.pause")
        poll_queue(client, "paused True", name, lambda q: q.paused is True)

    paused = check("queue.pause(): queue.get() shows paused True", pause)
    got = {}  # see failure_callback_checks

    def enqueue_paused():
        a = bounded(lambda: client.message.enqueue(queue=name, url=paused_dest, body="paused 0"),
                    "message.enqueue")
        b = bounded(lambda: client.message.enqueue_json(queue=name, url=paused_dest,
                                                        body={"paused": 1}),
                    "message.enqueue_json")
        got["ids"] = [a.message_id, b.message_id]
        expect_no_more_deliveries(paused_path, 0)
        poll_queue(client, "lag >= 2", name, lambda q: q.lag >= 2)

    if paused:
        check("paused queue: enqueued messages are accepted, not delivered, and counted in lag",
              enqueue_paused)
    if got.get("ids"):
        def get_queued():
            m = poll("message.get(queued)", lambda: client.message.get(got["ids"][0]))
            expect_equal(m.message_id, got["ids"][0], "message_id")
            expect_equal(m.queue, name, "queue")
            expect_equal(m.url, paused_dest, "url")

        check("message.get of a message waiting in the paused queue has queue", get_queued)
    if paused:
        def resume():
            bounded(lambda: client.queue.resume(name), "queue.resume")
            arrived = wait_for_deliveries(paused_path, 2)
            expect_equal([d["body"].decode("utf-8") for d in arrived],
                         ["paused 0", json.dumps({"paused": 1})], "bodies in arrival order")
            poll_queue(client, "paused False, lag 0", name,
                       lambda q: q.paused is False and q.lag == 0)

        check("queue.resume(): queue.get() shows paused False and the waiting messages arrive, "
              "oldest first", resume)

    # A retry holds the queue: A fails once (500), B waits until A's retry is delivered.
    retry_path = f"/py/{run_id}/fifo-retry"
    retry_dest = f"{base}{retry_path}"
    plan_statuses(retry_path, [500])

    def retry_holds():
        for body in ("A", "B"):
            bounded(lambda body=body: client.message.enqueue(
                queue=name, url=retry_dest, body=body, retries=1, retry_delay="500"),
                f"message.enqueue({body})")
        wait_for_deliveries(retry_path, 3)
        expect_equal(arrivals(retry_path), [("A", 500, "0"), ("A", 200, "1"), ("B", 200, "0")],
                     "requests (body, status, upstash-retried)")
        expect_no_more_deliveries(retry_path, 3)

    check("queue: a retried message holds its place (A 500, A retry 200, then B)", retry_holds)

    # Client mistakes surface as the SDK's error with the server's status.
    check("queue.upsert with an invalid name raises QStashError status 400",
          lambda: expect_status(lambda: client.queue.upsert("not a valid name!", parallelism=1),
                                400, "queue.upsert(bad name)"))

    def too_parallel():
        expect_status(lambda: client.queue.upsert(f"{name}-big", parallelism=101), 412,
                      "queue.upsert(parallelism=101)")
        expect_status(lambda: client.queue.get(f"{name}-big"), 404, "queue.get(not created)")

    check("queue.upsert with parallelism=101 raises QStashError status 412 and creates nothing",
          too_parallel)

    def delete():
        bounded(lambda: client.queue.delete(name), "queue.delete")
        poll_until_404("queue.get(deleted)", lambda: client.queue.get(name))
        if any(q.name == name for q in bounded(client.queue.list, "queue.list")):
            raise CheckFailed(f"list() still has {name}")

    check("queue.delete(): queue.get() then raises status 404 and list() lacks it", delete)


# ---------------------------------------------------------------------------------------
# Flow control: parallelism and rate limits at the receiver; flow_control.get/pause/resume/
# pin/unpin/reset_rate/get_global_parallelism. qstash parses FlowControlInfo with defaults
# (0 / False) for every field but flowControlKey, so presence shows only where a value differs.
# ---------------------------------------------------------------------------------------
def poll_flow_control(client, what, key, pred):
    """Polls flow_control.get(key) until pred(info) holds; returns that info."""
    last = {}

    def attempt():
        info = last["info"] = client.flow_control.get(key)
        return info if pred(info) else None

    try:
        return poll(what, attempt)
    except CheckFailed as e:
        raise CheckFailed(f"{e}; last flow_control.get: {last.get('info')!r}")


def flow_control_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    # Parallelism 1: three messages to a destination that answers after 400 ms.
    key = f"py-{run_id}-parallel"
    path = f"/py/{run_id}/fc-slow"
    dest = f"{base}{path}"
    plan_delay(path, 0.4)

    def publish_three():
        for i in range(3):
            res = bounded(lambda i=i: client.message.publish(
                url=dest, body=f"fc {i}", flow_control=FlowControl(key=key, parallelism=1)),
                "publish(flow_control)")
            if not res.message_id.startswith("msg_"):
                raise CheckFailed(f"response {res!r}")

    if not check("publish ×3 with flow_control=FlowControl(key, parallelism=1) returns message_ids",
                 publish_three):
        return
    check("flow_control.get(key) while one is in flight: parallelism_count 1, "
          "wait_list_size >= 1",
          lambda: poll_flow_control(client, "parallelism_count 1 with a waitlist", key,
                                    lambda i: i.parallelism_count == 1 and i.wait_list_size >= 1))

    def one_at_a_time():
        got = wait_for_deliveries(path, 3)
        expect_equal(max_in_flight(path), 1, "most requests in flight at once")
        for prev, cur in zip(got, got[1:]):
            if prev["answered_at"] is None or cur["received_at"] < prev["answered_at"]:
                raise CheckFailed(f"a request arrived at {cur['received_at']:.3f}, before the one "
                                  f"before it was answered ({prev['answered_at']})")
        expect_no_more_deliveries(path, 3)

    check("flow control (parallelism 1): all 3 arrive, never more than 1 in flight, each after "
          "the previous was answered", one_at_a_time)

    def info_after():
        info = poll_flow_control(client, "parallelism_count 0 and wait_list_size 0", key,
                                 lambda i: i.parallelism_count == 0 and i.wait_list_size == 0)
        expect_equal(info.key, key, "key")
        expect_equal(info.parallelism_max, 1, "parallelism_max")
        expect_equal(info.is_paused, False, "is_paused")
        expect_equal(info.is_pinned_parallelism, False, "is_pinned_parallelism")
        expect_equal(info.is_pinned_rate, False, "is_pinned_rate")
        for field in ("wait_list_size", "parallelism_max", "parallelism_count", "rate_max",
                      "rate_count", "rate_period", "rate_period_start"):
            if not isinstance(getattr(info, field), int):
                raise CheckFailed(f"{field}: {getattr(info, field)!r} is not an int in {info!r}")
        if abs(info.rate_period_start - time.time()) > 3600:
            raise CheckFailed(f"rate_period_start {info.rate_period_start} is not a recent unix "
                              f"time in seconds")

    check("flow_control.get(key) afterwards: FlowControlInfo with key, parallelism_max 1, "
          "nothing in flight or waiting", info_after)

    # Pause: a new message for the key waits; pin/unpin meanwhile; resume delivers it.
    paused_path = f"/py/{run_id}/fc-paused"
    paused_dest = f"{base}{paused_path}"

    def pause():
        bounded(lambda: client.flow_control.pause(key), "flow_control.pause")
        poll_flow_control(client, "is_paused True", key, lambda i: i.is_paused is True)

    paused = check("flow_control.pause(key): get shows is_paused True", pause)
    got = {}  # see failure_callback_checks

    def publish_paused():
        res = bounded(lambda: client.message.publish(
            url=paused_dest, body="fc paused", flow_control=FlowControl(key=key, parallelism=1)),
            "publish(flow_control)")
        got["id"] = res.message_id
        expect_no_more_deliveries(paused_path, 0)
        poll_flow_control(client, "wait_list_size 1", key, lambda i: i.wait_list_size == 1)

    if paused:
        check("paused key: a message published with it is not delivered and is on the waitlist",
              publish_paused)
    if got.get("id"):
        def get_waiting():
            m = poll("message.get(waiting)", lambda: client.message.get(got["id"]))
            if m.flow_control is None:
                raise CheckFailed(f"no flow_control in {m!r}")
            expect_equal(m.flow_control.key, key, "flow_control.key")
            expect_equal(m.flow_control.parallelism, 1, "flow_control.parallelism")
            expect_equal(m.queue, None, "queue")

        check("message.get of the waiting flow-controlled message has flow_control "
              "(key, parallelism 1)", get_waiting)

    def pin():
        bounded(lambda: client.flow_control.pin(key, {"parallelism": 2, "rate": 10, "period": 30}),
                "flow_control.pin")
        poll_flow_control(client, "pinned 2 / 10 per 30 s", key, lambda i: (
            i.is_pinned_parallelism is True and i.is_pinned_rate is True
            and i.parallelism_max == 2 and i.rate_max == 10 and i.rate_period == 30))

    check("flow_control.pin(key, {parallelism: 2, rate: 10, period: 30}): get shows both pinned "
          "with those values", pin)

    def unpin():
        bounded(lambda: client.flow_control.unpin(key, {"parallelism": True, "rate": True}),
                "flow_control.unpin")
        poll_flow_control(client, "unpinned", key, lambda i: (
            i.is_pinned_parallelism is False and i.is_pinned_rate is False))

    check("flow_control.unpin(key, {parallelism: True, rate: True}): get shows both unpinned",
          unpin)
    if paused:
        def resume():
            bounded(lambda: client.flow_control.resume(key), "flow_control.resume")
            d = wait_for_delivery(paused_path)
            expect_equal(d["headers"].get("upstash-message-id"), got.get("id"),
                         "upstash-message-id")
            poll_flow_control(client, "is_paused False, wait_list_size 0", key,
                              lambda i: i.is_paused is False and i.wait_list_size == 0)

        check("flow_control.resume(key): get shows is_paused False and the waiting message "
              "arrives", resume)
    if got.get("id"):
        def log_has_key():
            def find():
                r = quiet(lambda: client.log.list(filter={"message_id": got["id"]}))()
                delivered = any(log.state == LogState.DELIVERED for log in r.logs)
                return r.logs if delivered else None

            logs = poll("DELIVERED of the flow-controlled message in the log", find)
            keys = [log.flow_control.key if log.flow_control else None for log in logs]
            expect_equal(keys, [key] * len(logs), "flow_control.key of each entry")

        check("log.list of a flow-controlled message: every entry has flow_control.key",
              log_has_key)

    def global_parallelism():
        g = bounded(client.flow_control.get_global_parallelism,
                    "flow_control.get_global_parallelism")
        if not isinstance(g.parallelism_max, int) or g.parallelism_max <= 0:
            raise CheckFailed(f"parallelism_max in {g!r}")
        if not isinstance(g.parallelism_count, int) or g.parallelism_count < 0:
            raise CheckFailed(f"parallelism_count in {g!r}")

    check("flow_control.get_global_parallelism() returns parallelism_max > 0 and an int "
          "parallelism_count", global_parallelism)
    check("flow_control.get of an unknown key raises QStashError status 404",
          lambda: expect_status(lambda: client.flow_control.get(f"py-{run_id}-never-used"), 404,
                                "flow_control.get(unknown)"))

    # Rate: at most 1 start per 60 s period; reset_rate starts a new period at once.
    rate_key = f"py-{run_id}-rate"
    rate_path = f"/py/{run_id}/fc-rate"
    rate_dest = f"{base}{rate_path}"

    def publish_rated(i):
        res = bounded(lambda: client.message.publish(
            url=rate_dest, body=f"rate {i}",
            flow_control=FlowControl(key=rate_key, rate=1, period=60)),
            "publish(flow_control rate)")
        if not res.message_id.startswith("msg_"):
            raise CheckFailed(f"response {res!r}")

    def rated():
        publish_rated(0)
        wait_for_delivery(rate_path)
        poll_flow_control(client, "rate_count 1", rate_key, lambda i: (
            i.rate_max == 1 and i.rate_period == 60 and i.rate_count == 1))

    if not check("flow control rate=1, period=60: a message arrives; get shows rate_max 1, "
                 "rate_period 60, rate_count 1", rated):
        return

    def reset():
        reset_at = int(time.time())
        bounded(lambda: client.flow_control.reset_rate(rate_key), "flow_control.reset_rate")
        i = poll_flow_control(client, "rate_count 0", rate_key, lambda x: x.rate_count == 0)
        if not reset_at <= i.rate_period_start <= time.time() + 1:
            raise CheckFailed(f"rate_period_start {i.rate_period_start}, reset at {reset_at} "
                              f"(unix s)")

    check("flow_control.reset_rate(key): get shows rate_count 0 and a new rate_period_start",
          reset)

    def limited():
        publish_rated(1)
        publish_rated(2)
        wait_for_deliveries(rate_path, 2)
        expect_no_more_deliveries(rate_path, 2)
        poll_flow_control(client, "rate_count 1, wait_list_size 1", rate_key,
                          lambda i: i.rate_count == 1 and i.wait_list_size == 1)

    if check("flow control rate: of 2 more messages in the new period 1 arrives, the other waits "
             "(rate_count 1, wait_list_size 1)", limited):
        def reset_releases():
            bounded(lambda: client.flow_control.reset_rate(rate_key), "flow_control.reset_rate")
            wait_for_deliveries(rate_path, 3)
            poll_flow_control(client, "rate_count 1, wait_list_size 0", rate_key,
                              lambda i: i.rate_count == 1 and i.wait_list_size == 0)

        check("flow_control.reset_rate(key) lets the message waiting for the rate start "
              "(rate_count 1, wait_list_size 0)", reset_releases)


# ---------------------------------------------------------------------------------------
# Messages: get, cancel, cancel_many, cancel_all
# ---------------------------------------------------------------------------------------
def publish_pending(ctx, label, due=PENDING_DUE_S, watch=True):
    """Publishes a message due `due` seconds from now and waits until message.get sees it.
    With watch, the end of the suite checks that it is never delivered."""
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/py/{run_id}/pending-{label}"
    not_before_s = int(time.time() + due) + 1
    res = bounded(lambda: client.message.publish(url=f"{base}{path}", body=f"pending {label}",
                                                 not_before=not_before_s), "publish")
    if watch:
        ctx["cancelled"].append((path, not_before_s))
    poll(f"message.get({label})", lambda: client.message.get(res.message_id))
    return res.message_id


def message_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    dest = f"{base}/py/{run_id}/pending-get?q=1"
    sent_ms = time.time() * 1000

    def publish():
        res = bounded(lambda: client.message.publish(
            url=dest, body=f"pending body {run_id}", method="PUT", retries=2, delay=30,
            headers={"X-Pending": "yes"}), "publish(delay=30)")
        if not res.message_id.startswith("msg_"):
            raise CheckFailed(f"response {res!r}")
        return res.message_id

    msg_id = check("message: publish with delay=30 (PUT, retries=2, header) returns message_id",
                   publish)
    if msg_id:
        got = {}  # see failure_callback_checks

        def get():
            m = got["m"] = poll("message.get", lambda: client.message.get(msg_id))
            expect_equal(m.message_id, msg_id, "message_id")
            expect_equal(m.url, dest, "url")
            expect_equal(m.method, "PUT", "method")
            expect_equal(m.body, f"pending body {run_id}", "body")
            expect_equal(m.max_retries, 2, "max_retries")
            if not isinstance(m.created_at, int) or abs(m.created_at - sent_ms) > 5000:
                raise CheckFailed(f"created_at {m.created_at!r}, sent at {sent_ms:.0f} (ms)")
            delay = m.not_before - m.created_at
            if not 29_000 <= delay <= 31_000:
                raise CheckFailed(f"not_before {m.not_before} is {delay} ms after created_at, want ~30000")

        check("message.get(id) returns url, method, body, max_retries, not_before, created_at", get)
        m = got.get("m")
        if m:
            def header():
                values = {k.lower(): v for k, v in (m.headers or {}).items()}
                expect_equal(values.get("x-pending"), ["yes"], "headers['X-Pending']")
                if any(k.startswith("upstash-forward-") for k in values):
                    raise CheckFailed(f"headers {m.headers!r}")

            check("message.get(id): headers hold the forwarded header without its prefix", header)
        check("message.cancel(id) returns", lambda: bounded(lambda: client.message.cancel(msg_id),
                                                           "message.cancel"))
        check("message.get(id) after cancel raises status 404",
              lambda: poll_until_404("message.get(cancelled)", lambda: client.message.get(msg_id)))
        check("message.cancel(id) of a cancelled message raises status 404",
              lambda: expect_status(lambda: client.message.cancel(msg_id), 404,
                                    "message.cancel(cancelled)"))

    def cancel_many_empty():
        # Due later: it stays pending until cancel_all() below, however long that takes.
        pending = publish_pending(ctx, "empty-list", due=60, watch=False)
        expect_equal(bounded(lambda: client.message.cancel_many([]), "message.cancel_many([])"), 0,
                     "cancelled")
        got = bounded(lambda: client.message.get(pending), "message.get(still pending)")
        expect_equal(got.message_id, pending, "still pending message_id")
        return pending

    kept = check("message.cancel_many([]) returns 0 and cancels nothing", cancel_many_empty)

    def cancel_many():
        ids = [publish_pending(ctx, "bulk-a"), publish_pending(ctx, "bulk-b")]
        expect_equal(bounded(lambda: client.message.cancel_many(ids), "message.cancel_many"), 2,
                     "cancelled")
        for m in ids:
            poll_until_404(f"message.get({m})", lambda m=m: client.message.get(m))

    check("message.cancel_many([id, id]) returns 2 and the messages are gone", cancel_many)

    # All: nothing else of this suite is pending here but the kept one (these checks run
    # before the others).
    def cancel_all():
        ids = [publish_pending(ctx, "all-a"), publish_pending(ctx, "all-b")]
        ids += [kept] if isinstance(kept, str) else []
        n = bounded(client.message.cancel_all, "message.cancel_all")
        if not isinstance(n, int) or n < len(ids):
            raise CheckFailed(f"cancel_all() returned {n!r}, want >= {len(ids)}")
        for m in ids:
            poll_until_404(f"message.get({m})", lambda m=m: client.message.get(m))

    check("message.cancel_all() returns a count >= the pending ones and they are gone", cancel_all)


def cancelled_never_delivered(ctx):
    if not ctx["cancelled"]:
        return

    def none_arrived():
        until = max(nb for _, nb in ctx["cancelled"]) + 1.5
        if until > time.time():
            time.sleep(until - time.time())
        arrived = [p for p, _ in ctx["cancelled"] if deliveries_to(p)]
        if arrived:
            raise CheckFailed(f"delivered anyway: {', '.join(arrived)}")

    check("cancelled messages are not delivered (watched until 1.5 s past their not_before)",
          none_arrived)


# ---------------------------------------------------------------------------------------
# URL groups: upsert_endpoints/get/list, fan-out (publish, publish_json and enqueue_json with
# url_group), log.list by url_group, an unknown group, remove_endpoints, delete.
# ---------------------------------------------------------------------------------------
def poll_url_group(client, what, name, pred):
    """Polls url_group.get(name) until pred(group) holds; returns that group."""
    last = {}

    def attempt():
        group = last["group"] = client.url_group.get(name)
        return group if pred(group) else None

    try:
        return poll(what, attempt)
    except CheckFailed as e:
        raise CheckFailed(f"{e}; last url_group.get: {last.get('group')!r}")


def endpoint_keys(endpoints):
    """(name, url) of each endpoint (Endpoint objects or request dicts), sorted."""
    def key(e):
        if isinstance(e, dict):
            return (e.get("name") or "", e["url"])
        return (e.name or "", e.url)

    return sorted(key(e) for e in endpoints or [])


def expect_fan_out(res, urls, what):
    """A fan-out answer: a list with one response (message_id, url) per endpoint URL, in any
    order, with distinct msg_ ids. Returns a dict url -> message_id."""
    if not isinstance(res, list):
        raise CheckFailed(f"{what}: answer {res!r} is not a list")
    expect_equal(len(res), len(urls), f"{what}: entries in {res!r}")
    by_url = {}
    for r in res:
        if not getattr(r, "message_id", "").startswith("msg_"):
            raise CheckFailed(f"{what}: entry {r!r}")
        by_url[r.url] = r.message_id
    expect_equal(sorted(by_url), sorted(urls), f"{what}: urls")
    if len(set(by_url.values())) != len(urls):
        raise CheckFailed(f"{what}: message ids are not distinct: {res!r}")
    return by_url


def path_of(url):
    return urlsplit(url).path


def url_group_checks(ctx, keys):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    name = f"py-{run_id}-group"
    url_a = f"{base}/py/{run_id}/group-a"
    url_b = f"{base}/py/{run_id}/group-b?endpoint=b"
    urls = [url_a, url_b]
    endpoints = [{"name": "first", "url": url_a}, {"url": url_b}]
    before_ms = time.time() * 1000

    def added():
        bounded(lambda: client.url_group.upsert_endpoints(name, endpoints),
                "url_group.upsert_endpoints")
        # qstash parses name, createdAt, updatedAt, endpoints[].url with response["key"].
        g = poll_url_group(client, "both endpoints", name, lambda x: len(x.endpoints) == 2)
        expect_equal(g.name, name, "name")
        expect_equal(endpoint_keys(g.endpoints), endpoint_keys(endpoints), "endpoints (name, url)")
        if not isinstance(g.created_at, int) or abs(g.created_at - before_ms) > 5000:
            raise CheckFailed(f"created_at {g.created_at!r}, added at {before_ms:.0f} (ms)")
        if not isinstance(g.updated_at, int) or g.updated_at < g.created_at:
            raise CheckFailed(f"updated_at {g.updated_at!r} before created_at {g.created_at}")

    if not check("url_group.upsert_endpoints (one named, one not) then get() returns name, "
                 "created_at, updated_at and both endpoints", added):
        return

    def listed():
        groups = bounded(client.url_group.list, "url_group.list")
        mine = [g for g in groups if g.name == name]
        expect_equal(len(mine), 1, f"entries named {name} in {groups!r}")
        expect_equal(endpoint_keys(mine[0].endpoints), endpoint_keys(endpoints),
                     "endpoints (name, url)")

    check("url_group.list() contains the group once, with both endpoints", listed)

    # publish(url_group=...): one message per endpoint, each signed for its own URL.
    body = f"fan-out {run_id}"
    all_ids = []  # delivered fan-out messages
    cancelled_ids = []  # fan-out messages cancelled before their delivery
    got = {}  # see failure_callback_checks

    def publish():
        res = bounded(lambda: client.message.publish(
            url_group=name, body=body, content_type="text/plain",
            headers={"X-Group-Test": run_id}), "message.publish(url_group)")
        got["ids"] = expect_fan_out(res, urls, "publish(url_group)")
        all_ids.extend(got["ids"].values())

    check("message.publish(url_group) returns a list of 2 responses (message_id, url), one per "
          "endpoint", publish)
    ids = got.get("ids")
    if ids:
        for label, url, other in (("named endpoint", url_a, url_b),
                                  ("unnamed endpoint", url_b, url_a)):
            def arrives(url=url):
                d = got[url] = wait_for_message(path_of(url), ids[url])
                expect_equal(d["body"], body.encode(), "body")
                expect_equal(d["url"], url[len(base):], "path+query")
                expect_equal(d["headers"].get("x-group-test"), run_id, "x-group-test")
                expect_equal(d["headers"].get("upstash-topic-name"), name, "upstash-topic-name")

            check(f"publish(url_group), {label}: receives the body and header with its message_id "
                  f"and upstash-topic-name", arrives)
            d = got.get(url)
            if not d or not keys:
                continue

            def signed(d=d, url=url, other=other):
                signature = d["headers"].get("upstash-signature") or ""
                text = d["body"].decode("utf-8")
                Receiver(current_signing_key=keys.current, next_signing_key=keys.next).verify(
                    signature=signature, body=text, url=url)
                # Both keys the signing one, so that the reason is the subject (see
                # check_signature).
                single = Receiver(current_signing_key=keys.current, next_signing_key=keys.current)
                expect_raises(SignatureError, lambda: single.verify(
                    signature=signature, body=text, url=other),
                    "verify(the other endpoint's url)", reason="Invalid subject")

            check(f"publish(url_group), {label}: Receiver.verify accepts the signature for its own "
                  f"url and rejects the other endpoint's", signed)

    # publish_json and enqueue_json to the group fan out too.
    json_payload = {"fanOut": "json", "runId": run_id}

    def publish_json():
        res = bounded(lambda: client.message.publish_json(url_group=name, body=json_payload),
                      "message.publish_json(url_group)")
        json_ids = expect_fan_out(res, urls, "publish_json(url_group)")
        all_ids.extend(json_ids.values())
        for url in urls:
            d = wait_for_message(path_of(url), json_ids[url])
            expect_equal(d["body"], json.dumps(json_payload).encode(), f"body at {url}")
            expect_equal(d["headers"].get("content-type"), "application/json",
                         f"content-type at {url}")
            expect_equal(d["headers"].get("upstash-topic-name"), name,
                         f"upstash-topic-name at {url}")

    check("message.publish_json(url_group) returns 2 responses; both endpoints receive the JSON "
          "body with upstash-topic-name", publish_json)

    def enqueue_json():
        queue = f"py-{run_id}-group-q"
        res = bounded(lambda: client.message.enqueue_json(
            queue=queue, url_group=name, body={"enqueued": run_id}),
            "message.enqueue_json(url_group)")
        queued_ids = expect_fan_out(res, urls, "enqueue_json(url_group)")
        all_ids.extend(queued_ids.values())
        for url in urls:
            d = wait_for_message(path_of(url), queued_ids[url])
            expect_equal(d["body"], json.dumps({"enqueued": run_id}).encode(), f"body at {url}")
            expect_equal(d["headers"].get("upstash-topic-name"), name,
                         f"upstash-topic-name at {url}")
        bounded(lambda: client.queue.delete(queue), "queue.delete")

    check("message.enqueue_json(queue, url_group) returns 2 responses; both endpoints receive it "
          "with upstash-topic-name", enqueue_json)

    # A pending fan-out message: message.get shows its group (and endpoint name); cancelled.
    def pending():
        not_before = int(time.time() + 30) + 1
        res = bounded(lambda: client.message.publish(url_group=name, body="pending fan-out",
                                                     not_before=not_before),
                      "message.publish(url_group, not_before)")
        ids_pending = expect_fan_out(res, urls, "publish(url_group, not_before)")
        cancelled_ids.extend(ids_pending.values())
        a = poll("message.get(named endpoint's message)",
                 lambda: client.message.get(ids_pending[url_a]))
        b = poll("message.get(unnamed endpoint's message)",
                 lambda: client.message.get(ids_pending[url_b]))
        expect_equal(a.url, url_a, "url (named)")
        expect_equal(a.url_group, name, "url_group (named)")
        expect_equal(a.endpoint, "first", "endpoint (named)")
        expect_equal(b.url, url_b, "url (unnamed)")
        expect_equal(b.url_group, name, "url_group (unnamed)")
        expect_equal(b.endpoint, None, "endpoint (unnamed)")
        expect_equal(bounded(lambda: client.message.cancel_many(list(ids_pending.values())),
                             "message.cancel_many"), 2, "cancelled")

    check("message.get of a pending fan-out message has url_group and endpoint; "
          "message.cancel_many([both]) returns 2", pending)

    def exactly_once():
        expect_no_more_deliveries(path_of(url_a), len(all_ids) // 2)
        expect_no_more_deliveries(path_of(url_b), len(all_ids) // 2, grace=0)
        seen = [d["headers"].get("upstash-message-id")
                for d in deliveries_to(path_of(url_a)) + deliveries_to(path_of(url_b))]
        expect_equal(sorted(seen), sorted(all_ids), "upstash-message-id of the requests")

    check("URL group: each endpoint got exactly one request per fan-out message, nothing else",
          exactly_once)

    if ids:
        def logs_by_group():
            def find():
                r = quiet(lambda: client.log.list(filter={"url_group": name}))()
                delivered = {log.message_id for log in r.logs if log.state == LogState.DELIVERED}
                return r.logs if set(ids.values()) <= delivered else None

            logs = poll("DELIVERED of both publish(url_group) messages in the group's log", find)
            known = all_ids + cancelled_ids
            others = [log for log in logs if log.url_group != name or log.message_id not in known]
            if others:
                raise CheckFailed(f"entries of another group or message: {others[0]!r}")

        check("log.list(filter={url_group}) returns only the group's messages, each with url_group",
              logs_by_group)

    # A fan-out message that fails (retries=0) lands in the DLQ with its group.
    def dlq_by_group():
        failing = f"py-{run_id}-failing-group"
        fail_url = f"{base}/py/{run_id}/group-fails"
        plan_statuses(path_of(fail_url), [], then=500)
        bounded(lambda: client.url_group.upsert_endpoints(
            failing, [{"name": "failing", "url": fail_url}]), "url_group.upsert_endpoints")
        poll_url_group(client, "the failing group", failing, lambda g: len(g.endpoints) == 1)
        res = bounded(lambda: client.message.publish(url_group=failing, body="fails", retries=0),
                      "message.publish(url_group, retries=0)")
        failed_id = expect_fan_out(res, [fail_url], "publish(failing group)")[fail_url]
        wait_for_message(path_of(fail_url), failed_id)

        def find():
            r = client.dlq.list(filter={"url_group": failing})
            return r.messages or None

        entries = poll("the group's DLQ entry", find)
        expect_equal([e.message_id for e in entries], [failed_id], "message_ids")
        expect_equal(entries[0].url_group, failing, "url_group")
        expect_equal(entries[0].endpoint, "failing", "endpoint")
        expect_equal(entries[0].response_status, 500, "response_status")
        bounded(lambda: client.dlq.delete(entries[0].dlq_id), "dlq.delete")
        bounded(lambda: client.url_group.delete(failing), "url_group.delete")

    check("DLQ: a failed fan-out message is listed by dlq.list(filter={url_group}) with url_group "
          "and endpoint", dlq_by_group)

    def remove_named():
        bounded(lambda: client.url_group.remove_endpoints(name, [{"name": "first"}]),
                "url_group.remove_endpoints")
        poll_url_group(client, "only the unnamed endpoint left", name,
                       lambda g: endpoint_keys(g.endpoints) == endpoint_keys([{"url": url_b}]))

    check('url_group.remove_endpoints(name, [{"name": "first"}]): get() shows only the other '
          'endpoint', remove_named)

    def delete():
        bounded(lambda: client.url_group.delete(name), "url_group.delete")
        poll_until_404("url_group.get(deleted)", lambda: client.url_group.get(name))
        if any(g.name == name for g in bounded(client.url_group.list, "url_group.list")):
            raise CheckFailed(f"list() still has {name}")

    check("url_group.delete(name): get() then raises status 404 and list() lacks it", delete)

    def unknown():
        expect_status(lambda: client.message.publish(url_group=name, body="x"), 404,
                      "publish(deleted group)")
        expect_status(lambda: client.message.publish(url_group=f"py-{run_id}-no-such-group",
                                                     body="x"), 404, "publish(unknown group)")

    check("message.publish(url_group) to the deleted group, and to one that never existed, raises "
          "QStashError status 404", unknown)

    def remove_last():
        solo = f"py-{run_id}-solo"
        bounded(lambda: client.url_group.upsert_endpoints(solo, [{"url": url_a}]),
                "url_group.upsert_endpoints")
        poll_url_group(client, "the solo group", solo, lambda g: len(g.endpoints) == 1)
        bounded(lambda: client.url_group.remove_endpoints(solo, [{"url": url_a}]),
                "url_group.remove_endpoints")
        poll_until_404("url_group.get(emptied)", lambda: client.url_group.get(solo))

    check("url_group.remove_endpoints of the last endpoint (by url) deletes the group: get() "
          "raises status 404", remove_last)


# ---------------------------------------------------------------------------------------
# Batch: message.batch / batch_json with a URL item, a url_group item and a queue item. (A
# refused item answers {"error": …} in its slot, on which qstash 3.4.0 raises KeyError, so it
# is checked by the TypeScript suite only.)
# ---------------------------------------------------------------------------------------
def batch_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    group = f"py-{run_id}-batch-group"
    queue = f"py-{run_id}-batch-q"
    url_path = f"/py/{run_id}/batch-url"
    queued_path = f"/py/{run_id}/batch-queued"
    group_urls = [f"{base}/py/{run_id}/batch-g1", f"{base}/py/{run_id}/batch-g2"]

    def created():
        bounded(lambda: client.url_group.upsert_endpoints(group, [{"url": u} for u in group_urls]),
                "url_group.upsert_endpoints")
        poll_url_group(client, "both endpoints", group, lambda g: len(g.endpoints) == 2)

    if not check("batch: url_group.upsert_endpoints creates the batch's URL group with two "
                 "endpoints", created):
        return
    for variant in ("batch", "batch_json"):
        as_json = variant == "batch_json"
        if as_json:
            bodies = [{"item": "url", "runId": run_id}, {"item": "group", "runId": run_id},
                      {"item": "queue", "runId": run_id}]
            wire = [json.dumps(b).encode() for b in bodies]
            extra = {}
        else:
            bodies = [f"{variant} url {run_id}", f"{variant} group {run_id}",
                      f"{variant} queue {run_id}"]
            wire = [b.encode() for b in bodies]
            extra = {"content_type": "text/plain"}
        headers = {"X-Batch": variant}
        items = [
            {"url": f"{base}{url_path}", "body": bodies[0], "headers": headers, **extra},
            {"url_group": group, "body": bodies[1], "headers": headers, **extra},
            {"url": f"{base}{queued_path}", "body": bodies[2], "headers": headers, "queue": queue,
             **extra},
        ]
        got = {}  # see failure_callback_checks

        def answered(items=items, variant=variant, as_json=as_json):
            call = client.message.batch_json if as_json else client.message.batch
            res = got["res"] = bounded(lambda: call(items), f"message.{variant}")
            if not isinstance(res, list):
                raise CheckFailed(f"answer {res!r} is not a list")
            expect_equal(len(res), 3, f"entries in {res!r}")
            for slot in (0, 2):
                if isinstance(res[slot], list) or not res[slot].message_id.startswith("msg_"):
                    raise CheckFailed(f"slot {slot + 1} {res[slot]!r}")
            got["group"] = expect_fan_out(res[1], group_urls, "slot 2")

        check(f"message.{variant}([url, url_group, queue item]) answers in request order: a "
              f"response, a nested list of 2, a response", answered)
        if not got.get("group"):
            continue
        res, group_ids = got["res"], got["group"]

        def delivered(res=res, group_ids=group_ids, wire=wire, variant=variant, as_json=as_json):
            d0 = wait_for_message(url_path, res[0].message_id)
            expect_equal(d0["body"], wire[0], "URL item body")
            expect_equal(d0["headers"].get("x-batch"), variant, "URL item x-batch")
            expect_equal(d0["headers"].get("content-type"),
                         "application/json" if as_json else "text/plain", "URL item content-type")
            for url in group_urls:
                d = wait_for_message(path_of(url), group_ids[url])
                expect_equal(d["body"], wire[1], f"group item body at {url}")
                expect_equal(d["headers"].get("upstash-topic-name"), group,
                             f"upstash-topic-name at {url}")
                expect_equal(d["headers"].get("x-batch"), variant, f"x-batch at {url}")
            dq = wait_for_message(queued_path, res[2].message_id)
            expect_equal(dq["body"], wire[2], "queue item body")

        check(f"message.{variant}: all four deliveries arrive with their bodies and header (group "
              f"ones with upstash-topic-name)", delivered)

        def via_queue(res=res):
            def find():
                r = quiet(lambda: client.log.list(filter={"message_id": res[2].message_id}))()
                return r.logs if any(log.state == LogState.DELIVERED for log in r.logs) else None

            logs = poll("DELIVERED of the queue item in the log", find)
            without = [log for log in logs if log.queue != queue]
            if without:
                raise CheckFailed(f"entries without queue {queue}: {without[0]!r}")

        check(f"message.{variant}: the queue item went through its queue (its log entries carry "
              f"queue)", via_queue)

    # Clean-up (best effort; a failure here is not a finding of this section).
    for cleanup in (lambda: client.url_group.delete(group), lambda: client.queue.delete(queue)):
        try:
            bounded(cleanup, "clean-up")
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------
# Schedules: create (cron, id, retries, method, header, body), get, list, pause/resume,
# create_json with the same id (CRON_TZ), invalid cron, delete; one firing (see
# start_schedule_firing).
# ---------------------------------------------------------------------------------------
def poll_schedule(client, what, schedule_id, pred):
    """Polls schedule.get(schedule_id) until pred(schedule) holds; returns that schedule."""
    last = {}

    def attempt():
        s = last["schedule"] = client.schedule.get(schedule_id)
        return s if pred(s) else None

    try:
        return poll(what, attempt)
    except CheckFailed as e:
        raise CheckFailed(f"{e}; last schedule.get: {last.get('schedule')!r}")


def clock_in(ms, zone):
    """"HH:MM" of a ms timestamp in an IANA time zone."""
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(zone)).strftime("%H:%M")


def schedule_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    schedule_id = f"py-{run_id}-sched"
    dest = f"{base}/py/{run_id}/scheduled?s=1"
    body = f"scheduled body {run_id}"
    before_ms = time.time() * 1000

    def create():
        sid = bounded(lambda: client.schedule.create(
            destination=dest, cron="0 4 * * *", schedule_id=schedule_id, retries=2, method="PUT",
            content_type="text/plain", headers={"X-Sched": f"value {run_id}"}, body=body),
            "schedule.create")
        expect_equal(sid, schedule_id, "schedule id")

    if not check('schedule.create(cron="0 4 * * *", schedule_id, retries=2, PUT, header, body) '
                 'returns that schedule id', create):
        return
    got = {}  # see failure_callback_checks

    def get():
        # qstash parses scheduleId, destination, cron, createdAt, method, retries with
        # response["key"].
        s = got["first"] = poll("schedule.get", lambda: client.schedule.get(schedule_id))
        expect_equal(s.schedule_id, schedule_id, "schedule_id")
        expect_equal(s.cron, "0 4 * * *", "cron")
        expect_equal(s.destination, dest, "destination")
        expect_equal(s.method, "PUT", "method")
        expect_equal(s.retries, 2, "retries")
        expect_equal(s.body, body, "body")
        expect_equal(s.paused, False, "paused")
        values = {k.lower(): v for k, v in (s.headers or {}).items()}
        expect_equal(values.get("x-sched"), [f"value {run_id}"], f"headers['X-Sched'] in {s.headers!r}")
        if not isinstance(s.created_at, int) or abs(s.created_at - before_ms) > 5000:
            raise CheckFailed(f"created_at {s.created_at!r}, created at {before_ms:.0f} (ms)")
        now_ms = time.time() * 1000
        nxt = s.next_schedule_time
        if not isinstance(nxt, int) or not now_ms < nxt <= now_ms + 24 * 3_600_000:
            raise CheckFailed(f"next_schedule_time {nxt!r} is not within the next 24 h "
                              f"(now {now_ms:.0f})")
        expect_equal(clock_in(nxt, "UTC"), "04:00", "next_schedule_time (UTC clock)")

    check("schedule.get(id): cron, destination, method, retries, body, headers, paused False, "
          "created_at, next_schedule_time (next 04:00 UTC)", get)

    def listed():
        schedules = bounded(client.schedule.list, "schedule.list")
        mine = [s for s in schedules if s.schedule_id == schedule_id]
        expect_equal(len(mine), 1, f"entries with schedule_id {schedule_id}")
        expect_equal(mine[0].cron, "0 4 * * *", "cron")
        expect_equal(mine[0].destination, dest, "destination")

    check("schedule.list() contains the schedule once, with its cron and destination", listed)

    def pause():
        bounded(lambda: client.schedule.pause(schedule_id), "schedule.pause")
        poll_schedule(client, "paused True", schedule_id, lambda s: s.paused is True)

    check("schedule.pause(id): get shows paused True", pause)

    def resume():
        bounded(lambda: client.schedule.resume(schedule_id), "schedule.resume")
        poll_schedule(client, "paused False", schedule_id, lambda s: s.paused is False)

    check("schedule.resume(id): get shows paused False", resume)

    tz_cron = "CRON_TZ=America/New_York 30 12 * * *"
    json_body = {"scheduled": run_id}

    def upsert():
        sid = bounded(lambda: client.schedule.create_json(
            destination=dest, cron=tz_cron, schedule_id=schedule_id, retries=2, body=json_body),
            "schedule.create_json(upsert)")
        expect_equal(sid, schedule_id, "schedule id")
        s = poll_schedule(client, "the new cron", schedule_id, lambda x: x.cron == tz_cron)
        if got.get("first"):
            expect_equal(s.created_at, got["first"].created_at, "created_at")
        expect_equal(s.body, json.dumps(json_body), "body")
        nxt = s.next_schedule_time
        if not isinstance(nxt, int) or nxt <= time.time() * 1000:
            raise CheckFailed(f"next_schedule_time {nxt!r} is not in the future")
        expect_equal(clock_in(nxt, "America/New_York"), "12:30", "next_schedule_time (New York clock)")
        schedules = bounded(client.schedule.list, "schedule.list")
        expect_equal(len([x for x in schedules if x.schedule_id == schedule_id]), 1,
                     "entries with the id after the update")

    check(f'schedule.create_json with the same schedule_id and cron "{tz_cron}" updates it: new '
          f'cron and body, same created_at, next_schedule_time at 12:30 New York time', upsert)

    def invalid_cron():
        bad = f"{schedule_id}-bad"
        for cron in ("61 * * * *", "* * * *"):
            expect_status(lambda cron=cron: client.schedule.create(
                destination=dest, cron=cron, schedule_id=bad), 400, f'schedule.create(cron "{cron}")')
        expect_status(lambda: client.schedule.get(bad), 404, "schedule.get(not created)")

    check('schedule.create with an invalid cron ("61 * * * *", "* * * *") raises QStashError '
          'status 400 and creates nothing', invalid_cron)

    def delete():
        bounded(lambda: client.schedule.delete(schedule_id), "schedule.delete")
        poll_until_404("schedule.get(deleted)", lambda: client.schedule.get(schedule_id))
        if any(s.schedule_id == schedule_id for s in bounded(client.schedule.list, "schedule.list")):
            raise CheckFailed(f"list() still has {schedule_id}")
        expect_status(lambda: client.schedule.delete(schedule_id), 404, "schedule.delete(deleted)")

    check("schedule.delete(id): get() then raises status 404, list() lacks it, a second delete "
          "is a 404", delete)


def start_schedule_firing(ctx):
    """Creates a `* * * * *` schedule; schedule_firing_checks awaits its first delivery."""
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    firing = {"id": f"py-{run_id}-every-minute", "path": f"/py/{run_id}/schedule-fired",
              "body": f"fired {run_id}"}
    firing["dest"] = f"{base}{firing['path']}"

    def create():
        firing["created_at"] = time.time()
        sid = bounded(lambda: client.schedule.create(
            destination=firing["dest"], cron="* * * * *", schedule_id=firing["id"],
            body=firing["body"], content_type="text/plain"), "schedule.create(* * * * *)")
        expect_equal(sid, firing["id"], "schedule id")

    created = check('schedule.create(cron="* * * * *") for the firing check returns its schedule id',
                    create)
    return firing if created else None


def schedule_firing_checks(ctx, firing, keys):
    if not firing:
        return
    client = ctx["client"]
    got = {}  # see failure_callback_checks

    def fired():
        remaining = max(0.0, firing["created_at"] + SCHEDULE_FIRE_TIMEOUT_S - time.time())
        d = got["d"] = wait_for_delivery(firing["path"], timeout=remaining)
        expect_equal(d["headers"].get("upstash-schedule-id"), firing["id"], "upstash-schedule-id")
        expect_equal(d["body"], firing["body"].encode(), "body")
        if not (d["headers"].get("upstash-message-id") or "").startswith("msg_"):
            raise CheckFailed(f"upstash-message-id {d['headers'].get('upstash-message-id')!r}")

    check(f'schedule "* * * * *": its first delivery arrives within {SCHEDULE_FIRE_TIMEOUT_S:g} s '
          f'of its creation, with upstash-schedule-id = its id', fired)
    d = got.get("d")
    if d:
        message_id = d["headers"].get("upstash-message-id")
        if keys:
            check('schedule "* * * * *": Receiver.verify accepts the fired delivery\'s signature',
                  lambda: Receiver(current_signing_key=keys.current,
                                   next_signing_key=keys.next).verify(
                      signature=d["headers"].get("upstash-signature") or "",
                      body=d["body"].decode("utf-8"), url=firing["dest"]))

        def states():
            s = poll_schedule(client, "last_schedule_states with the fired message SUCCESS",
                              firing["id"], lambda x: (x.last_schedule_states or {}).get(message_id)
                              == ScheduleState.SUCCESS)
            last = s.last_schedule_time
            if not isinstance(last, int) or not (firing["created_at"] * 1000 <= last
                                                 <= d["received_at"] * 1000):
                raise CheckFailed(f"last_schedule_time {last!r}, created at "
                                  f"{firing['created_at'] * 1000:.0f}, delivered at "
                                  f"{d['received_at'] * 1000:.0f} (ms)")
            if not isinstance(s.next_schedule_time, int) or s.next_schedule_time <= last:
                raise CheckFailed(f"next_schedule_time {s.next_schedule_time!r} not after "
                                  f"last_schedule_time {last}")

        check('schedule "* * * * *": schedule.get shows last_schedule_time and '
              'last_schedule_states {message_id: ScheduleState.SUCCESS}', states)

        def logs_by_schedule():
            def find():
                r = quiet(lambda: client.log.list(filter={"schedule_id": firing["id"]}))()
                done = any(log.message_id == message_id and log.state == LogState.DELIVERED
                           for log in r.logs)
                return r.logs if done else None

            logs = poll("DELIVERED of the fired message in the schedule's log", find)
            others = [log for log in logs if log.schedule_id != firing["id"]]
            if others:
                raise CheckFailed(f"entries of another schedule: {others[0]!r}")

        check("log.list(filter={schedule_id}) has the fired message, every entry with that "
              "schedule_id", logs_by_schedule)

    def delete():
        bounded(lambda: client.schedule.delete(firing["id"]), "schedule.delete")
        poll_until_404("schedule.get(deleted)", lambda: client.schedule.get(firing["id"]))

    check('schedule.delete of the "* * * * *" schedule: get() then raises status 404', delete)


# ---------------------------------------------------------------------------------------
# Redaction (redact= / Upstash-Redact-Fields): every API view shows REDACTED:<sha256 hex>
# instead of the value; the delivery carries the real values.
# ---------------------------------------------------------------------------------------
def redacted_of(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return "REDACTED:" + hashlib.sha256(value).hexdigest()


def header_values(headers, name):
    """Case-insensitive lookup in an API header map; the values as a list (or None)."""
    for k, v in (headers or {}).items():
        if k.lower() == name.lower():
            return v if isinstance(v, list) else [v]
    return None


def expect_header(headers, name, want, what):
    expect_equal(header_values(headers, name), [want], f"{what} header {name} (all: {headers!r})")


def far_not_before():
    """A not_before that is never due during the run (the message stays pending)."""
    return int(time.time()) + 3600


def redact_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    secret, plain = f"s3cret {run_id}", f"plain {run_id}"
    pending = []

    def publish_and_get(name, body, **kwargs):
        res = bounded(lambda: client.message.publish(url=f"{base}/py/{run_id}/{name}", body=body,
                                                     not_before=far_not_before(), **kwargs),
                      f"message.publish({name})")
        pending.append(res.message_id)
        return poll("message.get", lambda: client.message.get(res.message_id))

    def body_and_one_header():
        body = f"redacted body {run_id}"
        m = publish_and_get("redact-get", body, redact={"body": True, "header": ["X-Secret"]},
                            headers={"X-Secret": secret, "X-Plain": plain})
        expect_equal(m.body, redacted_of(body), "body")
        expect_header(m.headers, "X-Secret", redacted_of(secret), "message.get")
        expect_header(m.headers, "X-Plain", plain, "message.get")

    check('redact={"body": True, "header": ["X-Secret"]}: message.get shows REDACTED:<sha256> for '
          'the body and that header only', body_and_one_header)

    def all_headers():
        m = publish_and_get("redact-all-headers", "kept body", redact={"header": True},
                            headers={"X-Secret": secret, "X-Plain": plain})
        expect_equal(m.body, "kept body", "body")
        expect_header(m.headers, "X-Secret", redacted_of(secret), "message.get")
        expect_header(m.headers, "X-Plain", redacted_of(plain), "message.get")

    check('redact={"header": True}: every header value is redacted, the body is not', all_headers)

    def unknown_token():
        # qstash prefixes every user header with Upstash-Forward-, so the raw header goes through
        # the SDK's own HTTP client.
        accepted = bounded(lambda: client.http.request(
            path=f"/v2/publish/{base}/py/{run_id}/redact-token-ok", method="POST", body="x",
            headers={"Upstash-Redact-Fields": "body", "Upstash-Not-Before": str(far_not_before())}),
            "publish(Upstash-Redact-Fields: body)")
        pending.append(accepted["messageId"])
        expect_status(lambda: client.http.request(
            path=f"/v2/publish/{base}/py/{run_id}/redact-bad", method="POST", body="x",
            headers={"Upstash-Redact-Fields": "bodyy"}), 400, "publish(Upstash-Redact-Fields: bodyy)")

    check('Upstash-Redact-Fields "bodyy" (unknown token) raises QStashError status 400, while '
          '"body" is accepted', unknown_token)

    if pending:
        check("redact: the far-future redacted messages are cancelled (cancel_many)",
              lambda: expect_equal(bounded(lambda: client.message.cancel_many(pending),
                                           "message.cancel_many"), len(pending), "cancelled"))

    path = f"/py/{run_id}/redact-delivered"
    body = f"delivered secret body {run_id}"
    got = {}

    def delivered():
        res = bounded(lambda: client.message.publish(
            url=f"{base}{path}", body=body, redact={"body": True, "header": ["X-Secret"]},
            headers={"X-Secret": secret}), "message.publish(redact)")
        got["id"] = res.message_id
        d = wait_for_message(path, res.message_id)
        expect_equal(d["body"], body.encode(), "delivered body")
        expect_equal(d["headers"].get("x-secret"), secret, "delivered X-Secret")

    check("redact: the delivery carries the real body and header", delivered)

    def logs_redacted():
        def find():
            r = quiet(lambda: client.log.list(filter={"message_id": got["id"]}))()
            return r.logs if any(log.state == LogState.DELIVERED for log in r.logs) else None

        logs = poll("DELIVERED in the log", find)
        want = base64.b64encode(redacted_of(body).encode()).decode()
        with_body = [log for log in logs if log.body_base64 is not None]
        if not with_body:
            raise CheckFailed(f"no entry has a body: {logs!r}")
        for log in with_body:
            expect_equal(log.body_base64, want, f"body_base64 of the {log.state} entry")
        with_header = [log for log in logs if header_values(log.headers, "X-Secret")]
        if not with_header:
            raise CheckFailed(f"no entry has the X-Secret header: {logs!r}")
        for log in with_header:
            expect_header(log.headers, "X-Secret", redacted_of(secret), f"{log.state} entry")
        text = repr(logs)
        if secret in text or base64.b64encode(body.encode()).decode() in text:
            raise CheckFailed(f"a log entry holds the real value: {text}")

    if got.get("id"):
        check("redact: log.list entries carry body_base64 = base64(REDACTED:<sha256>) and the "
              "redacted header, never the values", logs_redacted)

    dlq_path = f"/py/{run_id}/redact-dlq"
    dlq_body = f"dlq secret body {run_id}"
    plan_statuses(dlq_path, [500])

    def dlq_redacted():
        res = bounded(lambda: client.message.publish(
            url=f"{base}{dlq_path}", body=dlq_body, retries=0,
            redact={"body": True, "header": ["X-Secret"]}, headers={"X-Secret": secret}),
            "message.publish(redact, retries=0)")

        def find():
            r = client.dlq.list(filter={"message_id": res.message_id})
            return r.messages[0] if r.messages else None

        entry = poll("the DLQ entry", find)
        expect_equal(entry.body, redacted_of(dlq_body), "dlq.list: body")
        expect_header(entry.headers, "X-Secret", redacted_of(secret), "dlq.list")
        one = bounded(lambda: client.dlq.get(entry.dlq_id), "dlq.get")
        expect_equal(one.body, redacted_of(dlq_body), "dlq.get: body")
        expect_header(one.headers, "X-Secret", redacted_of(secret), "dlq.get")
        bounded(lambda: client.dlq.delete(entry.dlq_id), "dlq.delete")

    check("redact: the DLQ entry (dlq.list and dlq.get) shows the redacted body and header "
          "(qstash 3.4.0 has no DLQ retry)", dlq_redacted)

    schedule_id = f"py-{run_id}-redact"

    def schedule_redacted():
        s_body = f"schedule secret {run_id}"
        bounded(lambda: client.schedule.create(
            destination=f"{base}/py/{run_id}/redact-schedule", cron="0 4 * * *",
            schedule_id=schedule_id, body=s_body, headers={"X-Secret": secret, "X-Plain": plain},
            redact={"body": True, "header": ["X-Secret"]}), "schedule.create(redact)")
        s = poll("schedule.get", lambda: client.schedule.get(schedule_id))
        expect_equal(s.body, redacted_of(s_body), "get: body")
        expect_header(s.headers, "X-Secret", redacted_of(secret), "get")
        expect_header(s.headers, "X-Plain", plain, "get")
        listed = [x for x in bounded(client.schedule.list, "schedule.list")
                  if x.schedule_id == schedule_id]
        if not listed:
            raise CheckFailed("list() lacks the schedule")
        expect_equal(listed[0].body, redacted_of(s_body), "list: body")
        expect_header(listed[0].headers, "X-Secret", redacted_of(secret), "list")

    check("redact: schedule.create(redact=…) → schedule.get and list show the redacted body and "
          "header", schedule_redacted)
    try:
        bounded(lambda: client.schedule.delete(schedule_id), "clean-up")
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------
# api={"name": "llm", "provider": custom(...)}: a local OpenAI-compatible stub answers
# POST /v1/chat/completions; openai(...) at the wire level only.
# ---------------------------------------------------------------------------------------
class LlmStub:
    """An OpenAI-compatible stub: answers POST /v1/chat/completions with a chat.completion whose
    content names the last message's content (the tag), and records every request."""

    def __init__(self, port=0):
        self.requests = []
        self.cond = threading.Condition()
        stub = self

        class StubHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                text = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = None
                tag = ""
                if isinstance(parsed, dict) and parsed.get("messages"):
                    tag = str(parsed["messages"][-1].get("content", ""))
                good = self.path.split("?", 1)[0] == "/v1/chat/completions"
                response = json.dumps({
                    "id": "chatcmpl-" + "".join(c for c in tag if c.isalnum() or c == "-"),
                    "object": "chat.completion", "created": int(time.time()),
                    "model": (parsed or {}).get("model", "unknown") if isinstance(parsed, dict) else "unknown",
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": f"stub reply to {tag}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
                }) if good else "not found"
                record = {"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": text, "json": parsed, "tag": tag, "response": response}
                with stub.cond:
                    stub.requests.append(record)
                    stub.cond.notify_all()
                data = response.encode()
                self.send_response(200 if good else 404)
                self.send_header("Content-Type", "application/json" if good else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), StubHandler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, tag, timeout=DELIVERY_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.requests:
                    if r["tag"] == tag:
                        return r
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(f"{r['method']} {r['path']} {r['tag']}" for r in self.requests)
                    raise CheckFailed(f"LLM stub request {tag}: none within {timeout:g} s "
                                      f"(stub requests: {seen or 'none'})")
                self.cond.wait(remaining)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def llm_round_trip(label, publish, stub, callback_path, tag, body, want_auth):
    """publish(callback_url) -> message id; checks the stub request and the callback."""
    got = {}

    def reaches_stub():
        got["id"] = publish()
        r = got["request"] = stub.wait_for(tag)
        expect_equal(r["method"], "POST", "method")
        expect_equal(r["path"], "/v1/chat/completions", "path")
        expect_equal(r["json"], body, "body")
        expect_equal(r["headers"].get("authorization"), want_auth, "authorization")

    if not check(f"{label}: reaches the stub's POST /v1/chat/completions with the body and "
                 f"Authorization {want_auth}", reaches_stub):
        return

    def callback():
        d = wait_for_delivery(callback_path)
        payload = json.loads(d["body"])
        expect_equal(payload.get("status"), 200, "status")
        expect_equal(payload.get("sourceMessageId"), got["id"], "sourceMessageId")
        expect_equal(base64.b64decode(payload.get("body") or "").decode(), got["request"]["response"],
                     "decoded body")

    check(f"{label}: the callback arrives with status 200 and body = base64 of the stub's "
          f"completion", callback)


def llm_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    port = int(os.environ.get("SDK_LLM_STUB_PORT") or 0)
    stubs = []
    if not check(f"LLM stub listens on 127.0.0.1:{port or '<any port>'}",
                 lambda: stubs.append(LlmStub(port))):
        return
    stub = stubs[0]
    try:
        for label, variant, base_url, token in (
                ("publish_json(api=custom(base_url, token))", "json", stub.base, "py-custom-token"),
                ("publish(api=custom(base_url ending /v1/chat/completions, token))", "text",
                 f"{stub.base}/v1/chat/completions", "py-custom-token-2")):
            tag = f"py-{run_id}-llm-{variant}"
            callback_path = f"/py/{run_id}/llm-callback-{variant}"
            body = {"model": "stub-model", "messages": [{"role": "user", "content": tag}]}
            api = {"name": "llm", "provider": custom(base_url, token)}

            def publish(api=api, body=body, callback_path=callback_path, variant=variant):
                if variant == "json":
                    call = lambda: client.message.publish_json(  # noqa: E731
                        api=api, body=body, callback=f"{base}{callback_path}")
                else:
                    call = lambda: client.message.publish(  # noqa: E731
                        api=api, body=json.dumps(body), content_type="application/json",
                        callback=f"{base}{callback_path}")
                return bounded(call, "publish(api)").message_id

            llm_round_trip(label, publish, stub, callback_path, tag, body, f"Bearer {token}")
    finally:
        stub.close()

    def openai_wire():
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        res = bounded(lambda: client.message.publish_json(
            api={"name": "llm", "provider": openai("sk-openai-test")}, body=body,
            not_before=far_not_before(), callback=f"{base}/py/{run_id}/provider-callback"),
            "publish_json(api=openai)")
        try:
            m = poll("message.get", lambda: client.message.get(res.message_id))
            expect_equal(m.url, "https://api.openai.com/v1/chat/completions", "url")
            expect_header(m.headers, "Authorization", "Bearer sk-openai-test", "message.get")
            expect_equal(json.loads(m.body), body, "body")
        finally:
            bounded(lambda: client.message.cancel(res.message_id), "message.cancel")

    check("publish_json(api=openai(token)): message.get shows https://api.openai.com/v1/chat/"
          "completions and the forwarded Authorization; cancelled (wire level only)", openai_wire)


# ---------------------------------------------------------------------------------------
# Key rotation under load: signing_key.rotate() while publishing. Runs last.
# ---------------------------------------------------------------------------------------
def rotation_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    before = check("rotation: signing_key.get() before the rotation",
                   lambda: bounded(client.signing_key.get, "signing_key.get"))
    if not before:
        return
    path = f"/py/{run_id}/rotation"
    dest = f"{base}{path}"
    ids, late, got = [], [], {}

    def under_load():
        t0 = time.monotonic()
        rotation = None
        for i in range(40):
            due = t0 + i * 0.05
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            if i == 20:
                got["rotated_at"] = time.monotonic()

                def rotate():
                    try:
                        got["rotated"] = bounded(client.signing_key.rotate, "signing_key.rotate")
                    except Exception as e:  # noqa: BLE001 -- reported below
                        got["error"] = e

                rotation = threading.Thread(target=rotate, daemon=True)
                rotation.start()
            ids.append(bounded(lambda i=i: client.message.publish(url=dest, body=f"rotation {i}"),
                               "message.publish").message_id)
        rotation.join(CALL_TIMEOUT_S)
        if "error" in got:
            raise got["error"]
        if "rotated" not in got:
            raise CheckFailed("signing_key.rotate: no answer")
        wait = got["rotated_at"] + 1.5 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for i in range(5):
            late.append(bounded(lambda i=i: client.message.publish(
                url=dest, body=f"after rotation {i}"), "message.publish").message_id)

    loaded = check("rotation: 40 publishes over ~2 s with signing_key.rotate() in the middle, then 5 "
                   "more ≥ 1.5 s after it", under_load)
    rotated = got.get("rotated")
    if rotated:
        def answer():
            expect_equal(rotated.current, before.next, "current")
            if (not rotated.next.startswith("sig_")
                    or rotated.next in (before.current, before.next)):
                raise CheckFailed(f"next {rotated.next!r} (before: {before!r})")

        check("rotation: signing_key.rotate() returns current = the previous next and a fresh sig_ "
              "next", answer)
        check("rotation: signing_key.get() then returns the rotated keys",
              lambda: expect_equal(bounded(client.signing_key.get, "signing_key.get"), rotated,
                                   "keys"))
    if not loaded:
        return
    received = {}

    def all_delivered():
        for message_id in ids + late:
            received[message_id] = wait_for_message(path, message_id)

    check("rotation: all 45 messages are delivered", all_delivered)

    def verify_all():
        receiver = Receiver(current_signing_key=before.current, next_signing_key=before.next)
        rejected = []
        for message_id, d in received.items():
            try:
                receiver.verify(signature=d["headers"].get("upstash-signature") or "",
                                body=d["body"].decode("utf-8"), url=dest)
            except Exception as e:  # noqa: BLE001
                rejected.append(f"{message_id}: {e}")
        if len(received) != len(ids) + len(late):
            raise CheckFailed(f"only {len(received)} deliveries to verify")
        if rejected:
            raise CheckFailed(f"{len(rejected)} rejected: {'; '.join(rejected[:3])}")

    check("rotation: every delivery verifies with a Receiver built from the keys fetched before "
          "the rotation (0 rejected)", verify_all)
    if rotated:
        def late_signed_with_new_current():
            receiver = Receiver(current_signing_key=rotated.current,
                                next_signing_key="sig_unrelatedunrelatedunrelated1")
            for message_id in late:
                d = received.get(message_id) or wait_for_message(path, message_id)
                receiver.verify(signature=d["headers"].get("upstash-signature") or "",
                                body=d["body"].decode("utf-8"), url=dest)

        check("rotation: deliveries published ≥ 1.5 s after the rotation are signed with the new "
              "current key", late_signed_with_new_current)


def main():
    if not BASE_URL:
        print("compat.py: set KSTASH_URL to the kstash base URL, e.g. http://127.0.0.1:8080",
              file=sys.stderr)
        print("0 passed, 1 failed")
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver_base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run_suite(receiver_base)
    except Exception:  # noqa: BLE001
        not_ok("suite crashed", traceback.format_exc())
    finally:
        server.shutdown()
        server.server_close()
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
