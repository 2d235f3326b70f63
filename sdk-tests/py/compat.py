"""compat.py -- proves that the official Python SDK (qstash, pinned in requirements.txt)
works against a running kstash, unchanged, by base URL and token alone.

    KSTASH_URL=http://127.0.0.1:8080 [KSTASH_TOKEN=...] python sdk-tests/py/compat.py

KSTASH_TOKEN defaults to the QStash dev token that `kstash dev` accepts.

It starts a recording HTTP receiver on 127.0.0.1 (random port), publishes through the
SDK, waits (event-driven, bounded) for each delivery and checks what arrived. Output:
one `ok - name` / `not ok - name: reason` line per check, then `N passed, M failed` as
the last line; exit code 1 if any check failed. scripts/sdk-tests.sh runs it.
"""

import json
import os
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qstash import QStash, Receiver
from qstash.errors import QStashError, SignatureError
from qstash.message import FlowControl

DEV_TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="
DELIVERY_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 15.0

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
# Recording receiver: every request is stored; waiters are woken through a Condition.
# ---------------------------------------------------------------------------------------
deliveries = []  # dicts: method, url, path, headers (lower-case name -> value), body (bytes)
cond = threading.Condition()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        record = {
            "method": self.command,
            "url": self.path,
            "path": self.path.split("?", 1)[0],
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "received_at": time.time(),
        }
        with cond:
            deliveries.append(record)
            cond.notify_all()
        reply = b"received"
        self.send_response(200)
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


def wait_for_delivery(path, timeout=DELIVERY_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            for d in deliveries:
                if d["path"] == path:
                    return d
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = ", ".join(f"{d['method']} {d['url']}" for d in deliveries) or "none"
                raise CheckFailed(
                    f"delivery to {path}: none within {timeout:g} s (deliveries seen so far: {seen})"
                )
            cond.wait(remaining)


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

    # 4. Unsupported feature -> a client error (400), not a 5xx and not a hang.
    def flow_control_is_400():
        e = expect_raises(QStashError, lambda: bounded(lambda: client.message.publish(
            url=f"{receiver_base}/py/{run_id}/fc", body="x",
            flow_control=FlowControl(key="k", parallelism=1)), "publish(flow_control)"),
            "publish(flow_control)")
        if "status: 400," not in str(e):
            raise CheckFailed(f"got {type(e).__name__}: {e}, want status 400")
        body = str(e).split("body: ", 1)[-1]
        try:
            parsed = json.loads(body)
        except ValueError:
            raise CheckFailed(f"error body is not JSON: {body!r}")
        if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), str):
            raise CheckFailed(f'error body lacks "error": {body!r}')

    check("publish with flow_control (not supported yet) raises QStashError status 400",
          flow_control_is_400)

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
