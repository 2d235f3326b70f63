"""compat_async.py -- proves that the asyncio client of the official Python SDK (qstash,
pinned in requirements.txt), `AsyncQStash`, works against a running kstash, unchanged, by
base URL and token alone: every AsyncQStash method is called at least once.

    KSTASH_URL=http://127.0.0.1:8080 [KSTASH_TOKEN=...] [SDK_LLM_STUB_PORT=...] \
        python sdk-tests/py/compat_async.py

It reuses compat.py's recording receiver, waits and reporting (imported from the same
directory): one `ok - name` / `not ok - name: reason` line per check, then `N passed, M
failed` as the last line; exit code 1 if any check failed. scripts/sdk-tests.sh runs it
after compat.py. No cron firing is awaited (compat.py covers that), so it takes seconds.

`message.cancel_all()` cancels EVERY pending message on that kstash, and the last check
rotates the signing keys (`signing_key.rotate()`): run it only against a kstash of its own.
"""

import asyncio
import base64
import json
import os
import sys
import threading
import time
import traceback
from http.server import ThreadingHTTPServer

sys.dont_write_bytecode = True  # importing compat.py must not leave __pycache__ in the tree
import compat  # noqa: E402 -- after the line above
from compat import (  # noqa: E402
    CALL_TIMEOUT_S,
    POLL_INTERVAL_S,
    POLL_TIMEOUT_S,
    CheckFailed,
    Handler,
    LlmStub,
    expect_equal,
    expect_header,
    far_not_before,
    header_values,
    max_in_flight,
    not_ok,
    ok,
    plan_delay,
    plan_statuses,
    redacted_of,
    wait_for_deliveries,
    wait_for_delivery,
    wait_for_message,
)
from qstash import AsyncQStash, Receiver  # noqa: E402
from qstash.chat import custom  # noqa: E402
from qstash.errors import QStashError, SignatureError  # noqa: E402
from qstash.log import LogState  # noqa: E402
from qstash.message import FlowControl  # noqa: E402

BASE_URL = compat.BASE_URL
TOKEN = compat.TOKEN


# ---------------------------------------------------------------------------------------
# Async counterparts of compat.py's check / bounded / poll helpers
# ---------------------------------------------------------------------------------------
async def acheck(name, fn):
    """Runs one check: `await fn()` returns (pass) or raises (fail). Returns its value or None."""
    try:
        value = await fn()
    except Exception as e:  # noqa: BLE001 -- any exception is a failed check
        reason = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        not_ok(name, reason)
        return None
    ok(name)
    return True if value is None else value


async def call(awaitable, what, timeout=CALL_TIMEOUT_S):
    """Awaits an SDK call; raises CheckFailed if it has not returned within timeout."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise CheckFailed(f"{what}: no answer within {timeout:g} s") from None


async def blocking(fn, *args, **kwargs):
    """Runs one of compat.py's blocking (bounded) waits off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def apoll(what, fn, timeout=POLL_TIMEOUT_S):
    """Polls `await fn()` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = await call(fn(), what)
            if value is not None:
                return value
            last = None
        except Exception as e:  # noqa: BLE001 -- reported if the bound is reached
            last = e
        if time.monotonic() >= deadline:
            suffix = f" (last error: {type(last).__name__}: {last})" if last else ""
            raise CheckFailed(f"{what}: not within {timeout:g} s{suffix}")
        await asyncio.sleep(POLL_INTERVAL_S)


async def aexpect_status(fn, status, what):
    """`await fn()` must raise QStashError with the given HTTP status."""
    try:
        value = await call(fn(), what)
    except QStashError as e:
        if f"status: {status}," not in str(e):
            raise CheckFailed(f"{what}: got {type(e).__name__}: {e}, want status {status}")
        return e
    raise CheckFailed(f"{what} succeeded, want QStashError status {status} (got {value!r})")


async def apoll_until_404(what, fn):
    async def attempt():
        try:
            await fn()
        except QStashError as e:
            if "status: 404," in str(e):
                return True
            raise
        return None

    return await apoll(f"{what} raises status 404", attempt)


def verify(keys, delivery, url):
    Receiver(current_signing_key=keys.current, next_signing_key=keys.next).verify(
        signature=delivery["headers"].get("upstash-signature") or "",
        body=delivery["body"].decode("utf-8"), url=url)


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
async def run_suite(base):
    run_id = f"{os.getpid()}-{int(time.time() * 1000):x}"
    client = AsyncQStash(TOKEN, base_url=BASE_URL)
    ctx = {"client": client, "run_id": run_id, "base": base}

    async def get_keys():
        keys = await call(client.signing_key.get(), "signing_key.get")
        if not (keys.current.startswith("sig_") and keys.next.startswith("sig_")):
            raise CheckFailed(f"unexpected keys {keys!r}")
        return keys

    keys = await acheck("async signing_key.get() returns current and next sig_ keys", get_keys)
    await publish_checks(ctx, keys if keys is not True else None)
    await message_checks(ctx)
    await dlq_checks(ctx)
    await queue_checks(ctx)
    await batch_checks(ctx)
    await url_group_checks(ctx)
    await flow_control_checks(ctx)
    await schedule_checks(ctx)
    await redact_llm_checks(ctx)
    await rotation_checks(ctx)


async def publish_checks(ctx, keys):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/pya/{run_id}/publish?x=1"
    dest = f"{base}{path}"
    text = f"async hello ✓ {run_id}"

    async def publish():
        res = await call(client.message.publish(url=dest, body=text, method="PUT",
                                                content_type="text/plain; charset=utf-8",
                                                headers={"X-Async": run_id}), "message.publish")
        d = await blocking(wait_for_message, path.split("?")[0], res.message_id)
        expect_equal(d["body"], text.encode(), "body")
        expect_equal(d["method"], "PUT", "method")
        expect_equal(d["url"], path, "path+query")
        expect_equal(d["headers"].get("x-async"), run_id, "x-async")
        expect_equal(d["headers"].get("content-type"), "text/plain; charset=utf-8", "content-type")
        if keys:
            verify(keys, d, dest)
        return res.message_id

    mid = await acheck("async message.publish(text, PUT, header, query): delivered with body, "
                       "method, path+query, header; Receiver.verify accepts its signature", publish)

    async def logs():
        async def find():
            r = await client.log.list(filter={"message_id": mid})
            states = {log.state for log in r.logs}
            return r.logs if {LogState.CREATED, LogState.ACTIVE, LogState.DELIVERED} <= states else None

        entries = await apoll("CREATED, ACTIVE and DELIVERED in the log", find)
        for log in entries:
            expect_equal((log.message_id, log.url), (mid, dest), "(message_id, url)")
        times = [log.time for log in entries]
        if times != sorted(times, reverse=True):
            raise CheckFailed(f"times not newest first: {times}")
        page = await call(client.log.list(filter={"message_id": mid}, count=1), "log.list(count=1)")
        expect_equal(len(page.logs), 1, "entries with count=1")
        if not page.cursor:
            raise CheckFailed("no cursor after the first of several entries")
        rest = await call(client.log.list(filter={"message_id": mid}, cursor=page.cursor),
                          "log.list(cursor)")
        expect_equal([x.time for x in page.logs + rest.logs], times, "paged entries")

    if mid and mid is not True:
        await acheck("async log.list(filter={message_id}) has CREATED, ACTIVE, DELIVERED (url, "
                     "newest first); count=1 and the cursor page through them", logs)

    json_path = f"/pya/{run_id}/publish-json"
    payload = {"async": True, "n": 7, "run": run_id}

    async def publish_json():
        sent = time.time()
        res = await call(client.message.publish_json(url=f"{base}{json_path}", body=payload,
                                                     delay=1), "message.publish_json")
        d = await blocking(wait_for_message, json_path, res.message_id)
        expect_equal(json.loads(d["body"]), payload, "parsed body")
        expect_equal(d["headers"].get("content-type"), "application/json", "content-type")
        if d["received_at"] - sent < 1.0:
            raise CheckFailed(f"arrived {d['received_at'] - sent:.3f} s after the publish, want >= 1 s")

    await acheck("async message.publish_json(delay=1): the JSON body arrives, not before 1 s", publish_json)

    async def bad_flow_control():
        await aexpect_status(lambda: client.message.publish(
            url=f"{base}/pya/{run_id}/bad", body="x",
            flow_control=FlowControl(key=f"pya-{run_id}-bad", parallelism=1, period="banana")),
            400, "message.publish(flow_control period=banana)")

    await acheck("async message.publish with a malformed flow_control period raises QStashError "
                 "status 400", bad_flow_control)


async def message_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]

    async def publish_pending(name):
        res = await call(client.message.publish(url=f"{base}/pya/{run_id}/{name}", body=f"{name} body",
                                                method="PUT", retries=2, not_before=far_not_before(),
                                                headers={"X-Pending": "yes"}), "message.publish")
        await apoll("message.get", lambda: client.message.get(res.message_id))
        return res.message_id

    got = {}

    async def get():
        mid = got["one"] = await publish_pending("pending-get")
        m = await call(client.message.get(mid), "message.get")
        expect_equal(m.message_id, mid, "message_id")
        expect_equal(m.url, f"{base}/pya/{run_id}/pending-get", "url")
        expect_equal(m.method, "PUT", "method")
        expect_equal(m.body, "pending-get body", "body")
        expect_equal(m.max_retries, 2, "max_retries")
        expect_equal(header_values(m.headers, "X-Pending"), ["yes"], f"headers {m.headers!r}")
        if not isinstance(m.not_before, int) or m.not_before < (time.time() + 3000) * 1000:
            raise CheckFailed(f"not_before {m.not_before!r} is not about an hour ahead (ms)")

    await acheck("async message.get(id) of a pending message: url, method, body, max_retries, "
                 "headers, not_before", get)

    async def cancel():
        await call(client.message.cancel(got["one"]), "message.cancel")
        await apoll_until_404("message.get(cancelled)", lambda: client.message.get(got["one"]))
        await aexpect_status(lambda: client.message.cancel(got["one"]), 404, "message.cancel(again)")

    if got.get("one"):
        await acheck("async message.cancel(id): get then raises 404, a second cancel is a 404", cancel)

    async def cancel_many():
        ids = [await publish_pending("pending-many-a"), await publish_pending("pending-many-b")]
        n = await call(client.message.cancel_many(ids), "message.cancel_many")
        expect_equal(n, 2, "cancelled")
        for mid in ids:
            await apoll_until_404("message.get(cancelled)", lambda mid=mid: client.message.get(mid))

    await acheck("async message.cancel_many([a, b]) returns 2; both then raise 404", cancel_many)

    async def cancel_all():
        ids = [await publish_pending("pending-all-a"), await publish_pending("pending-all-b")]
        n = await call(client.message.cancel_all(), "message.cancel_all")
        if not isinstance(n, int) or n < 2:
            raise CheckFailed(f"cancel_all() returned {n!r}, want >= 2")
        for mid in ids:
            await apoll_until_404("message.get(cancelled)", lambda mid=mid: client.message.get(mid))

    await acheck("async message.cancel_all() returns a count covering the pending messages, which "
                 "then raise 404", cancel_all)


async def dlq_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/pya/{run_id}/dlq"
    dest = f"{base}{path}"
    plan_statuses(path, [], 500)
    entries = {}

    async def listed():
        ids = []
        for i in range(3):
            res = await call(client.message.publish(url=dest, body=f"dlq {i}", retries=0),
                             "message.publish")
            ids.append(res.message_id)

        async def find():
            r = await client.dlq.list(filter={"url": dest})
            return r.messages if len(r.messages) >= 3 else None

        found = await apoll("three DLQ entries", find)
        expect_equal(sorted(m.message_id for m in found), sorted(ids), "message ids")
        for m in found:
            expect_equal(m.response_status, 500, "response_status")
        entries["all"] = found

    if not await acheck("async dlq.list(filter={url}) lists three failed messages with "
                        "response_status 500", listed):
        return
    a, b, c = entries["all"]

    async def get():
        e = await call(client.dlq.get(a.dlq_id), "dlq.get")
        expect_equal(e.dlq_id, a.dlq_id, "dlq_id")
        expect_equal(e.message_id, a.message_id, "message_id")
        expect_equal(e.url, dest, "url")
        expect_equal(e.body, a.body, "body")
        expect_equal(e.response_body, "planned 500", "response_body")

    await acheck("async dlq.get(dlq_id) returns the entry (url, body, response_body)", get)

    async def delete():
        await call(client.dlq.delete(a.dlq_id), "dlq.delete")
        await apoll_until_404("dlq.get(deleted)", lambda: client.dlq.get(a.dlq_id))
        await aexpect_status(lambda: client.dlq.delete(a.dlq_id), 404, "dlq.delete(again)")

    await acheck("async dlq.delete(dlq_id): get then raises 404, a second delete is a 404", delete)

    async def delete_many():
        n = await call(client.dlq.delete_many([b.dlq_id, c.dlq_id]), "dlq.delete_many")
        expect_equal(n, 2, "deleted")

        async def empty():
            r = await client.dlq.list(filter={"url": dest})
            return True if not r.messages else None

        await apoll("the entries to go", empty)

    await acheck("async dlq.delete_many([b, c]) returns 2 and empties the DLQ of them", delete_many)


async def queue_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    name = f"pya-{run_id}-queue"
    path = f"/pya/{run_id}/queued"
    dest = f"{base}{path}"
    plan_delay(path, 0.15)

    async def upsert_get_list():
        await call(client.queue.upsert(name, parallelism=1), "queue.upsert")
        q = await apoll("queue.get", lambda: client.queue.get(name))
        expect_equal((q.name, q.parallelism, q.paused, q.lag), (name, 1, False, 0),
                     "(name, parallelism, paused, lag)")
        qs = await call(client.queue.list(), "queue.list")
        expect_equal(len([x for x in qs if x.name == name]), 1, "entries in queue.list()")

    if not await acheck("async queue.upsert(name, parallelism=1) → queue.get and queue.list show it",
                        upsert_get_list):
        return

    async def fifo():
        ids = []
        for i in range(4):
            if i % 2:
                res = await call(client.message.enqueue_json(queue=name, url=dest, body={"i": i}),
                                 "message.enqueue_json")
            else:
                res = await call(client.message.enqueue(queue=name, url=dest, body=f"item {i}"),
                                 "message.enqueue")
            ids.append(res.message_id)
        seen = await blocking(wait_for_deliveries, path, 4)
        expect_equal([d["headers"].get("upstash-message-id") for d in seen], ids, "delivery order")
        expect_equal([d["body"] for d in seen],
                     [b"item 0", json.dumps({"i": 1}).encode(), b"item 2", json.dumps({"i": 3}).encode()],
                     "bodies")
        if max_in_flight(path) > 1:
            raise CheckFailed(f"{max_in_flight(path)} in flight at once")

    await acheck("async message.enqueue / enqueue_json (alternating, 4 messages): delivered in "
                 "enqueue order, one at a time", fifo)

    async def pause_resume():
        await call(client.queue.pause(name), "queue.pause")
        await apoll("paused True", lambda: _pred(client.queue.get(name), lambda q: q.paused is True))
        res = await call(client.message.enqueue(queue=name, url=dest, body="while paused"),
                         "message.enqueue")
        await asyncio.sleep(compat.NO_MORE_GRACE_S)
        if any(d["headers"].get("upstash-message-id") == res.message_id for d in compat.deliveries_to(path)):
            raise CheckFailed("delivered while the queue was paused")
        await apoll("lag 1", lambda: _pred(client.queue.get(name), lambda q: q.lag >= 1))
        await call(client.queue.resume(name), "queue.resume")
        await apoll("paused False", lambda: _pred(client.queue.get(name), lambda q: q.paused is False))
        await blocking(wait_for_message, path, res.message_id)

    await acheck("async queue.pause(name) holds an enqueued message (lag >= 1); queue.resume(name) "
                 "delivers it", pause_resume)

    async def delete():
        await call(client.queue.delete(name), "queue.delete")
        await apoll_until_404("queue.get(deleted)", lambda: client.queue.get(name))
        qs = await call(client.queue.list(), "queue.list")
        if any(q.name == name for q in qs):
            raise CheckFailed(f"queue.list() still has {name}")

    await acheck("async queue.delete(name): get then raises 404 and list lacks it", delete)


async def _pred(awaitable, pred):
    value = await awaitable
    return value if pred(value) else None


async def batch_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    queue = f"pya-{run_id}-batch-queue"
    for variant, as_json in (("batch", False), ("batch_json", True)):
        url_path = f"/pya/{run_id}/{variant}-url"
        queued_path = f"/pya/{run_id}/{variant}-queued"
        bodies = ({"v": variant, "slot": 1}, {"v": variant, "slot": 2}) if as_json else \
            (f"{variant} 1", f"{variant} 2")

        async def run(variant=variant, as_json=as_json, url_path=url_path, queued_path=queued_path,
                      bodies=bodies):
            items = [
                {"url": f"{base}{url_path}", "body": bodies[0], "headers": {"X-Batch": variant}},
                {"queue": queue, "url": f"{base}{queued_path}", "body": bodies[1]},
            ]
            fn = client.message.batch_json if as_json else client.message.batch
            res = await call(fn(items), f"message.{variant}")
            if not isinstance(res, list) or len(res) != 2:
                raise CheckFailed(f"answer {res!r}")
            wire = [json.dumps(b).encode() if as_json else b.encode() for b in bodies]
            d0 = await blocking(wait_for_message, url_path, res[0].message_id)
            expect_equal(d0["body"], wire[0], "URL item body")
            expect_equal(d0["headers"].get("x-batch"), variant, "x-batch")
            d1 = await blocking(wait_for_message, queued_path, res[1].message_id)
            expect_equal(d1["body"], wire[1], "queue item body")
            if as_json:
                expect_equal(d0["headers"].get("content-type"), "application/json", "content-type")

        await acheck(f"async message.{variant}([url item with header, queue item]) answers in "
                     f"order; both deliveries arrive with their bodies", run)
    try:
        await call(client.queue.delete(queue), "clean-up")
    except Exception:  # noqa: BLE001
        pass


async def url_group_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    group = f"pya-{run_id}-group"
    urls = [f"{base}/pya/{run_id}/ep-first", f"{base}/pya/{run_id}/ep-second?q=2"]

    async def upsert():
        await call(client.url_group.upsert_endpoints(group, [{"name": "first", "url": urls[0]},
                                                             {"url": urls[1]}]),
                   "url_group.upsert_endpoints")
        g = await apoll("url_group.get", lambda: client.url_group.get(group))
        expect_equal(g.name, group, "name")
        expect_equal(sorted((e.name or "", e.url) for e in g.endpoints),
                     sorted([("first", urls[0]), ("", urls[1])]), "endpoints")
        groups = await call(client.url_group.list(), "url_group.list")
        expect_equal(len([x for x in groups if x.name == group]), 1, "entries in list()")

    if not await acheck("async url_group.upsert_endpoints → url_group.get and list show both "
                        "endpoints", upsert):
        return

    async def fan_out():
        res = await call(client.message.publish(url_group=group, body="fan out"), "message.publish")
        if not isinstance(res, list) or len(res) != 2:
            raise CheckFailed(f"answer {res!r}")
        by_url = {r.url: r.message_id for r in res}
        expect_equal(sorted(by_url), sorted(urls), "urls")
        for url in urls:
            d = await blocking(wait_for_message, url[len(base):].split("?")[0], by_url[url])
            expect_equal(d["body"], b"fan out", "body")
            expect_equal(d["headers"].get("upstash-topic-name"), group, "upstash-topic-name")

    await acheck("async message.publish(url_group=…) fans out to both endpoints (upstash-topic-name)",
                 fan_out)

    async def remove_delete():
        await call(client.url_group.remove_endpoints(group, [{"name": "first"}]),
                   "url_group.remove_endpoints")
        await apoll("one endpoint left", lambda: _pred(
            client.url_group.get(group), lambda g: [e.url for e in g.endpoints] == [urls[1]]))
        await call(client.url_group.delete(group), "url_group.delete")
        await apoll_until_404("url_group.get(deleted)", lambda: client.url_group.get(group))

    await acheck("async url_group.remove_endpoints leaves the other endpoint; url_group.delete → "
                 "get raises 404", remove_delete)


async def flow_control_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    key = f"pya-{run_id}-fc"
    path = f"/pya/{run_id}/fc"
    dest = f"{base}{path}"

    async def published():
        res = await call(client.message.publish(url=dest, body="fc 0",
                                                flow_control=FlowControl(key=key, parallelism=1)),
                         "message.publish(flow_control)")
        await blocking(wait_for_message, path, res.message_id)
        info = await apoll("flow_control.get", lambda: _pred(
            client.flow_control.get(key), lambda i: i.wait_list_size == 0 and i.parallelism_count == 0))
        expect_equal(info.key, key, "key")
        expect_equal(info.parallelism_max, 1, "parallelism_max")

    if not await acheck("async flow_control.get(key) after a flow-controlled publish: key, "
                        "parallelism_max 1, nothing waiting", published):
        return

    async def pause():
        await call(client.flow_control.pause(key), "flow_control.pause")
        await apoll("is_paused", lambda: _pred(client.flow_control.get(key), lambda i: i.is_paused))
        res = await call(client.message.publish(url=dest, body="fc paused",
                                                flow_control=FlowControl(key=key, parallelism=1)),
                         "message.publish(flow_control)")
        await apoll("wait_list_size 1", lambda: _pred(client.flow_control.get(key),
                                                      lambda i: i.wait_list_size == 1))
        if any(d["headers"].get("upstash-message-id") == res.message_id for d in compat.deliveries_to(path)):
            raise CheckFailed("delivered while the key was paused")
        ctx["fc_waiting"] = res.message_id

    await acheck("async flow_control.pause(key): is_paused, a new message waits (wait_list_size 1)",
                 pause)

    async def pin_unpin():
        await call(client.flow_control.pin(key, {"parallelism": 2, "rate": 10, "period": 30}),
                   "flow_control.pin")
        info = await apoll("pinned", lambda: _pred(
            client.flow_control.get(key), lambda i: i.is_pinned_parallelism and i.is_pinned_rate))
        expect_equal((info.parallelism_max, info.rate_max, info.rate_period), (2, 10, 30),
                     "(parallelism_max, rate_max, rate_period)")
        await call(client.flow_control.unpin(key, {"parallelism": True, "rate": True}),
                   "flow_control.unpin")
        await apoll("unpinned", lambda: _pred(
            client.flow_control.get(key),
            lambda i: not i.is_pinned_parallelism and not i.is_pinned_rate))

    await acheck("async flow_control.pin(key, {parallelism 2, rate 10, period 30}) and unpin(key, "
                 "{parallelism, rate})", pin_unpin)

    async def resume():
        await call(client.flow_control.resume(key), "flow_control.resume")
        await apoll("not paused", lambda: _pred(client.flow_control.get(key), lambda i: not i.is_paused))
        if ctx.get("fc_waiting"):
            await blocking(wait_for_message, path, ctx["fc_waiting"])

    await acheck("async flow_control.resume(key): not paused, the waiting message arrives", resume)

    rate_key = f"pya-{run_id}-rate"
    rate_path = f"/pya/{run_id}/rate"

    async def reset_rate():
        res = await call(client.message.publish(url=f"{base}{rate_path}", body="rate",
                                                flow_control=FlowControl(key=rate_key, rate=1, period=60)),
                         "message.publish(rate)")
        await blocking(wait_for_message, rate_path, res.message_id)
        await apoll("rate_count 1", lambda: _pred(client.flow_control.get(rate_key),
                                                  lambda i: i.rate_count == 1))
        await call(client.flow_control.reset_rate(rate_key), "flow_control.reset_rate")
        await apoll("rate_count 0", lambda: _pred(client.flow_control.get(rate_key),
                                                  lambda i: i.rate_count == 0))

    await acheck("async flow_control.reset_rate(key): rate_count 1 → 0", reset_rate)

    async def global_parallelism():
        g = await call(client.flow_control.get_global_parallelism(),
                       "flow_control.get_global_parallelism")
        if not isinstance(g.parallelism_max, int) or g.parallelism_max <= 0:
            raise CheckFailed(f"parallelism_max {g.parallelism_max!r}")
        if not isinstance(g.parallelism_count, int):
            raise CheckFailed(f"parallelism_count {g.parallelism_count!r}")

    await acheck("async flow_control.get_global_parallelism(): parallelism_max > 0, an int "
                 "parallelism_count", global_parallelism)

    await acheck("async flow_control.get(unknown key) raises QStashError status 404",
                 lambda: aexpect_status(lambda: client.flow_control.get(f"{key}-unknown"), 404,
                                        "flow_control.get(unknown)"))


async def schedule_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    sid = f"pya-{run_id}-sched"
    dest = f"{base}/pya/{run_id}/scheduled"

    async def create_get_list():
        got = await call(client.schedule.create(destination=dest, cron="0 4 * * *", schedule_id=sid,
                                                retries=2, method="PUT", body="sched body",
                                                headers={"X-Sched": "yes"}), "schedule.create")
        expect_equal(got, sid, "schedule id")
        s = await apoll("schedule.get", lambda: client.schedule.get(sid))
        expect_equal((s.cron, s.destination, s.method, s.retries, s.body, s.paused),
                     ("0 4 * * *", dest, "PUT", 2, "sched body", False),
                     "(cron, destination, method, retries, body, paused)")
        expect_equal(header_values(s.headers, "X-Sched"), ["yes"], f"headers {s.headers!r}")
        schedules = await call(client.schedule.list(), "schedule.list")
        expect_equal(len([x for x in schedules if x.schedule_id == sid]), 1, "entries in list()")

    if not await acheck("async schedule.create → schedule.get and list show cron, destination, "
                        "method, retries, body, header", create_get_list):
        return

    async def pause_resume():
        await call(client.schedule.pause(sid), "schedule.pause")
        await apoll("paused", lambda: _pred(client.schedule.get(sid), lambda s: s.paused is True))
        await call(client.schedule.resume(sid), "schedule.resume")
        await apoll("resumed", lambda: _pred(client.schedule.get(sid), lambda s: s.paused is False))

    await acheck("async schedule.pause / schedule.resume toggle paused", pause_resume)

    async def create_json():
        got = await call(client.schedule.create_json(destination=dest, cron="30 5 * * *",
                                                     schedule_id=sid, body={"json": run_id}),
                         "schedule.create_json")
        expect_equal(got, sid, "schedule id")
        s = await apoll("the new cron", lambda: _pred(client.schedule.get(sid),
                                                      lambda x: x.cron == "30 5 * * *"))
        expect_equal(json.loads(s.body), {"json": run_id}, "body")

    await acheck("async schedule.create_json with the same schedule_id updates cron and body",
                 create_json)

    async def invalid():
        await aexpect_status(lambda: client.schedule.create(destination=dest, cron="61 * * * *",
                                                            schedule_id=f"{sid}-bad"), 400,
                             "schedule.create(61 * * * *)")

    await acheck("async schedule.create with an invalid cron raises QStashError status 400", invalid)

    async def delete():
        await call(client.schedule.delete(sid), "schedule.delete")
        await apoll_until_404("schedule.get(deleted)", lambda: client.schedule.get(sid))

    await acheck("async schedule.delete: get then raises 404", delete)


async def redact_llm_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    secret = f"s3cret {run_id}"

    async def redacted():
        body = f"async redacted {run_id}"
        res = await call(client.message.publish(
            url=f"{base}/pya/{run_id}/redact", body=body, not_before=far_not_before(),
            redact={"body": True, "header": ["X-Secret"]},
            headers={"X-Secret": secret, "X-Plain": "plain"}), "message.publish(redact)")
        try:
            m = await apoll("message.get", lambda: client.message.get(res.message_id))
            expect_equal(m.body, redacted_of(body), "body")
            expect_header(m.headers, "X-Secret", redacted_of(secret), "message.get")
            expect_header(m.headers, "X-Plain", "plain", "message.get")
        finally:
            await call(client.message.cancel(res.message_id), "message.cancel")

    await acheck('async message.publish(redact={"body": True, "header": ["X-Secret"]}): '
                 'message.get shows REDACTED:<sha256> for the body and that header', redacted)

    # Redaction in the log: the delivered message's entries.
    path = f"/pya/{run_id}/redact-delivered"

    async def logs():
        body = f"async delivered {run_id}"
        res = await call(client.message.publish(url=f"{base}{path}", body=body,
                                                redact={"body": True}), "message.publish(redact)")
        d = await blocking(wait_for_message, path, res.message_id)
        expect_equal(d["body"], body.encode(), "delivered body")

        async def find():
            r = await client.log.list(filter={"message_id": res.message_id})
            return r.logs if any(log.state == LogState.DELIVERED for log in r.logs) else None

        entries = await apoll("DELIVERED in the log", find)
        want = base64.b64encode(redacted_of(body).encode()).decode()
        with_body = [log for log in entries if log.body_base64 is not None]
        if not with_body:
            raise CheckFailed(f"no entry has a body: {entries!r}")
        for log in with_body:
            expect_equal(log.body_base64, want, f"body_base64 of the {log.state} entry")

    await acheck('async message.publish(redact={"body": True}): the real body arrives; log.list '
                 'entries carry body_base64 = base64(REDACTED:<sha256>)', logs)

    port = int(os.environ.get("SDK_LLM_STUB_PORT") or 0)
    try:
        stub = LlmStub(port)
    except OSError as e:
        not_ok("async LLM stub listens", e)
        return
    try:
        tag = f"pya-{run_id}-llm"
        callback_path = f"/pya/{run_id}/llm-callback"
        body = {"model": "stub-model", "messages": [{"role": "user", "content": tag}]}
        got = {}

        async def llm():
            res = await call(client.message.publish_json(
                api={"name": "llm", "provider": custom(stub.base, "pya-token")}, body=body,
                callback=f"{base}{callback_path}"), "message.publish_json(api)")
            r = await blocking(stub.wait_for, tag)
            expect_equal(r["json"], body, "body at the stub")
            expect_equal(r["headers"].get("authorization"), "Bearer pya-token", "authorization")
            d = await blocking(wait_for_delivery, callback_path)
            payload = json.loads(d["body"])
            expect_equal(payload.get("status"), 200, "callback status")
            expect_equal(payload.get("sourceMessageId"), res.message_id, "sourceMessageId")
            expect_equal(base64.b64decode(payload.get("body") or "").decode(), r["response"],
                         "decoded callback body")
            got["ok"] = True

        await acheck("async message.publish_json(api=custom(stub, token)): the stub gets the body "
                     "and Authorization: Bearer <token>; the callback has status 200 and the "
                     "completion", llm)
    finally:
        stub.close()


async def rotation_checks(ctx):
    client, run_id, base = ctx["client"], ctx["run_id"], ctx["base"]
    path = f"/pya/{run_id}/rotated"
    dest = f"{base}{path}"
    got = {}

    async def rotate():
        before = got["before"] = await call(client.signing_key.get(), "signing_key.get")
        rotated = got["rotated"] = await call(client.signing_key.rotate(), "signing_key.rotate")
        expect_equal(rotated.current, before.next, "current")
        if not rotated.next.startswith("sig_") or rotated.next in (before.current, before.next):
            raise CheckFailed(f"next {rotated.next!r} (before: {before!r})")
        now = await call(client.signing_key.get(), "signing_key.get")
        expect_equal(now, rotated, "signing_key.get() after the rotation")

    if not await acheck("async signing_key.rotate(): current = the previous next, a fresh sig_ next; "
                        "signing_key.get() returns the same", rotate):
        return

    async def signed_with_new_current():
        await asyncio.sleep(1.5)
        res = await call(client.message.publish(url=dest, body="after rotation"), "message.publish")
        d = await blocking(wait_for_message, path, res.message_id)
        Receiver(current_signing_key=got["rotated"].current,
                 next_signing_key="sig_unrelatedunrelatedunrelated1").verify(
            signature=d["headers"].get("upstash-signature") or "", body="after rotation", url=dest)
        try:
            Receiver(current_signing_key=got["before"].current,
                     next_signing_key="sig_unrelatedunrelatedunrelated1").verify(
                signature=d["headers"].get("upstash-signature") or "", body="after rotation", url=dest)
        except SignatureError:
            return
        raise CheckFailed("the delivery also verifies with the old current key alone")

    await acheck("async rotation: a delivery published 1.5 s after the rotation is signed with the "
                 "new current key (not the old one)", signed_with_new_current)


def main():
    if not BASE_URL:
        print("compat_async.py: set KSTASH_URL to the kstash base URL, e.g. http://127.0.0.1:8080",
              file=sys.stderr)
        print("0 passed, 1 failed")
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver_base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        asyncio.run(run_suite(receiver_base))
    except Exception:  # noqa: BLE001
        not_ok("suite crashed", traceback.format_exc())
    finally:
        server.shutdown()
        server.server_close()
    print(f"{compat.passed} passed, {compat.failed} failed", flush=True)
    return 1 if compat.failed or not compat.passed else 0


if __name__ == "__main__":
    sys.exit(main())
