// compat.mjs -- proves that the official TypeScript SDK (@upstash/qstash, pinned in
// package.json) works against a running kstash, unchanged, by base URL and token alone.
//
//   KSTASH_URL=http://127.0.0.1:8080 [KSTASH_TOKEN=...] node sdk-tests/ts/compat.mjs
//
// KSTASH_TOKEN defaults to the QStash dev token that `kstash dev` accepts. The dev-mode
// check (QSTASH_DEV=true) needs KSTASH_URL to be http://127.0.0.1:<port> of a `kstash dev`.
//
// It starts a recording HTTP receiver on 127.0.0.1 (random port), publishes through the
// SDK, waits (event-driven, bounded) for each delivery and checks what arrived. Output:
// one `ok - name` / `not ok - name: reason` line per check, then `N passed, M failed` as
// the last line; exit code 1 if any check failed. scripts/sdk-tests.sh runs it.
//
// The messages checks call `messages.cancel({all: true})`, which cancels EVERY pending
// message on that kstash: run it only against a kstash of its own. The suite also creates
// per-run URL groups, queues and schedules (one firing every minute, awaited for up to 75 s)
// and deletes them again.
//
// Internal: `node compat.mjs --dev-mode-child <url>` is the child process of the
// dev-mode check (a fresh process, so the SDK sees QSTASH_DEV from its environment).

import http from "node:http";
import os from "node:os";
import fs from "node:fs";
import path from "node:path";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { Client, Receiver, QstashError, custom, upstash, openai, anthropic, resend } from "@upstash/qstash";

const DEV_TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0=";
const DELIVERY_TIMEOUT_MS = 15_000;
const CALL_TIMEOUT_MS = 15_000;
const CHILD_TIMEOUT_MS = 30_000;
const POLL_TIMEOUT_MS = 10_000; // bound for eventually consistent views (messages, logs, DLQ)
const POLL_INTERVAL_MS = 50;
const NO_MORE_GRACE_MS = 1_000; // how long "no further request" is watched for
// Messages that the suite cancels are due this long after their publish (notBefore), so that
// the end of the suite can watch that they never arrive.
const PENDING_DUE_MS = 5_000;
// A `* * * * *` schedule fires within ~1 s after the next cron minute: its first delivery is
// awaited for at most this long after the schedule was created.
const SCHEDULE_FIRE_TIMEOUT_MS = 75_000;

// ---------------------------------------------------------------------------------------
// Child mode: a bare `new Client()` that only sees QSTASH_DEV / QSTASH_DEV_PORT.
// ---------------------------------------------------------------------------------------
if (process.argv[2] === "--dev-mode-child") {
  const url = process.argv[3];
  try {
    const client = new Client();
    const res = await client.publish({
      url,
      body: "dev-mode body",
      headers: { "Content-Type": "text/plain" },
    });
    process.stdout.write(`DEV_MODE_RESULT ${JSON.stringify(res)}\n`);
    process.exit(0);
  } catch (error) {
    process.stdout.write(`DEV_MODE_ERROR ${String(error?.stack ?? error)}\n`);
    process.exit(2);
  }
}

// ---------------------------------------------------------------------------------------
// Configuration. SDK-relevant variables are removed so that nothing but the explicit
// config below decides where the SDK goes and which keys the Receiver uses.
// ---------------------------------------------------------------------------------------
const BASE_URL = (process.env.KSTASH_URL ?? "").replace(/\/$/, "");
const TOKEN = process.env.KSTASH_TOKEN || DEV_TOKEN;
if (!BASE_URL) {
  console.error("compat.mjs: set KSTASH_URL to the kstash base URL, e.g. http://127.0.0.1:8080");
  console.log("0 passed, 1 failed");
  process.exit(1);
}
const SDK_ENV_VARS = [
  "QSTASH_DEV", "QSTASH_DEV_PORT", "QSTASH_REGION", "QSTASH_URL", "QSTASH_TOKEN",
  "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY", "UPSTASH_DISABLE_TELEMETRY",
  "NODE_ENV", "NEXT_PHASE",
];
for (const name of Object.keys(process.env)) {
  if (SDK_ENV_VARS.includes(name) || /_QSTASH_/.test(name)) delete process.env[name];
}

// The SDK logs its own diagnostics (e.g. "[Upstash QStash] POST … failed with status 400"
// for the expected errors) via console.warn/error. Keep them, as `# ` comment lines on
// stdout, so that they stay in order and the summary stays the last line.
for (const level of ["warn", "error"]) {
  console[level] = (...args) => {
    const text = args.map((a) => (typeof a === "string" ? a : a?.stack ?? JSON.stringify(a))).join(" ");
    for (const line of text.split("\n")) process.stdout.write(`# ${line}\n`);
  };
}

// ---------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------
let passed = 0;
let failed = 0;
const oneLine = (s) => String(s).replace(/\s+/g, " ").trim().slice(0, 400);
function ok(name) {
  passed++;
  console.log(`ok - ${name}`);
}
function notOk(name, reason) {
  failed++;
  console.log(`not ok - ${name}: ${oneLine(reason)}`);
}
/** Runs one check: fn returns normally (pass) or throws (fail, message = reason). */
async function check(name, fn) {
  try {
    await fn();
    ok(name);
    return true;
  } catch (error) {
    notOk(name, error?.message ?? error);
    return false;
  }
}
function expectEqual(actual, expected, what = "value") {
  if (actual !== expected) {
    throw new Error(`${what}: got ${JSON.stringify(actual)}, want ${JSON.stringify(expected)}`);
  }
}
function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
/** Awaits a promise that must reject; returns the error, throws if it resolved. */
async function expectReject(promise, what) {
  try {
    const value = await promise;
    throw Object.assign(new Error(`${what} succeeded, want an error (got ${oneLine(JSON.stringify(value))})`), {
      unexpectedSuccess: true,
    });
  } catch (error) {
    if (error?.unexpectedSuccess) throw error;
    return error;
  }
}

// ---------------------------------------------------------------------------------------
// Recording receiver: every request is stored; waiters are woken on each request. A path
// can be given a plan of statuses to answer with (in order), and a status for afterwards,
// and a delay before it answers (a slow destination); the receiver counts the requests to
// each path that are in flight (arrived, not yet answered).
// ---------------------------------------------------------------------------------------
const deliveries = []; // {method, url, pathname, headers, rawHeaders, body: Buffer, status, inFlight, answeredAt}
let waiters = []; // {pathname, n, resolve}
const plans = new Map(); // pathname -> {statuses: [status…], then: status}
const delays = new Map(); // pathname -> ms to wait before answering
const inFlight = new Map(); // pathname -> requests arrived and not yet answered
/** Answer the next requests to `pathname` with `statuses` in order, then always `then`. */
function planStatuses(pathname, statuses, then = 200) {
  plans.set(pathname, { statuses: [...statuses], then });
}
/** Answer every request to `pathname` only `ms` after it arrived. */
function planDelay(pathname, ms) {
  delays.set(pathname, ms);
}
const deliveriesTo = (pathname) => deliveries.filter((d) => d.pathname === pathname);
/** The most requests to pathname that were in flight at the receiver at the same time. */
const maxInFlight = (pathname) => Math.max(0, ...deliveriesTo(pathname).map((d) => d.inFlight));
const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const pathname = req.url.split("?")[0];
    const plan = plans.get(pathname);
    const status = plan ? (plan.statuses.length ? plan.statuses.shift() : plan.then) : 200;
    inFlight.set(pathname, (inFlight.get(pathname) ?? 0) + 1);
    const record = {
      method: req.method,
      url: req.url,
      pathname,
      headers: req.headers,
      rawHeaders: req.rawHeaders,
      body: Buffer.concat(chunks),
      receivedAt: Date.now(),
      status,
      inFlight: inFlight.get(pathname), // including this one
      answeredAt: undefined,
    };
    deliveries.push(record);
    const answer = () => {
      inFlight.set(pathname, inFlight.get(pathname) - 1);
      record.answeredAt = Date.now();
      res.writeHead(status, { "content-type": "text/plain" });
      res.end(status >= 200 && status < 300 ? "received" : `planned ${status}`);
    };
    const delay = delays.get(pathname);
    if (delay) setTimeout(answer, delay);
    else answer();
    const seen = deliveriesTo(pathname);
    waiters = waiters.filter((w) => {
      if (w.pathname !== pathname) return true;
      if (w.messageId !== undefined) {
        const match = seen.find((d) => d.headers["upstash-message-id"] === w.messageId);
        if (!match) return true;
        w.resolve(match);
        return false;
      }
      if (seen.length < w.n) return true;
      w.resolve(seen.slice(0, w.n));
      return false;
    });
  });
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const RECEIVER = `http://127.0.0.1:${server.address().port}`;

/** Resolves with the first n requests to pathname (bounded wait). */
function waitForDeliveries(pathname, n, ms = DELIVERY_TIMEOUT_MS) {
  const seen = deliveriesTo(pathname);
  if (seen.length >= n) return Promise.resolve(seen.slice(0, n));
  let waiter;
  return withTimeout(
    new Promise((resolve) => {
      waiter = { pathname, n, resolve };
      waiters.push(waiter);
    }),
    ms,
    n === 1 ? `delivery to ${pathname}` : `${n} requests to ${pathname}`,
  ).catch((error) => {
    waiters = waiters.filter((w) => w !== waiter);
    const others = deliveries.map((d) => `${d.method} ${d.url}`).join(", ") || "none";
    throw new Error(`${error.message} (got ${deliveriesTo(pathname).length}; deliveries seen so far: ${others})`);
  });
}
async function waitForDelivery(pathname, ms = DELIVERY_TIMEOUT_MS) {
  return (await waitForDeliveries(pathname, 1, ms))[0];
}
/** Resolves with the request to pathname whose upstash-message-id is messageId (bounded wait). */
function waitForMessage(pathname, messageId, ms = DELIVERY_TIMEOUT_MS) {
  const found = deliveriesTo(pathname).find((d) => d.headers["upstash-message-id"] === messageId);
  if (found) return Promise.resolve(found);
  let waiter;
  return withTimeout(
    new Promise((resolve) => {
      waiter = { pathname, messageId, resolve };
      waiters.push(waiter);
    }),
    ms,
    `delivery of ${messageId} to ${pathname}`,
  ).catch((error) => {
    waiters = waiters.filter((w) => w !== waiter);
    const ids = deliveriesTo(pathname).map((d) => d.headers["upstash-message-id"]).join(", ") || "none";
    throw new Error(`${error.message} (message ids seen there: ${ids})`);
  });
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** After the expected n requests to pathname, none more may arrive within graceMs. */
async function expectNoMoreDeliveries(pathname, n, graceMs = NO_MORE_GRACE_MS) {
  await sleep(graceMs);
  const seen = deliveriesTo(pathname);
  if (seen.length !== n) {
    throw new Error(`${seen.length} requests to ${pathname} (want exactly ${n}): ${seen.map((d) => `${d.status} at +${d.receivedAt - seen[0].receivedAt} ms`).join(", ")}`);
  }
}
/**
 * Polls fn (the views behind messages/logs/DLQ are eventually consistent) until it returns
 * something other than undefined; throws with the last error or `what` after the bound.
 */
async function poll(what, fn, ms = POLL_TIMEOUT_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await withTimeout(Promise.resolve().then(fn), CALL_TIMEOUT_MS, what);
      if (value !== undefined) return value;
      last = undefined;
    } catch (error) {
      last = error;
    }
    if (Date.now() >= deadline) {
      throw new Error(`${what}: not within ${ms} ms${last ? ` (last error: ${last?.message ?? last})` : ""}`);
    }
    await sleep(POLL_INTERVAL_MS);
  }
}
/** fn must reject with a QstashError of the given status. */
async function expectStatus(promise, status, what) {
  const error = await expectReject(withTimeout(promise, CALL_TIMEOUT_MS, what), what);
  if (!(error instanceof QstashError)) throw new Error(`${what}: got ${error?.name}: ${error?.message}, want QstashError`);
  expectEqual(error.status, status, `${what}: status (message ${error.message})`);
  return error;
}
/** Polls until `get()` rejects with QstashError status 404. */
async function pollUntil404(what, get) {
  return poll(`${what} answers 404`, async () => {
    try {
      await get();
    } catch (error) {
      if (error instanceof QstashError && error.status === 404) return true;
      throw error;
    }
    return undefined;
  });
}

// ---------------------------------------------------------------------------------------
// Shared checks on one delivery
// ---------------------------------------------------------------------------------------
async function checkDelivery(label, { pathname, destination, messageId, body, method, contentType, forwarded }) {
  let delivery;
  const arrived = await check(`${label}: delivered within ${DELIVERY_TIMEOUT_MS / 1000} s`, async () => {
    delivery = await waitForDelivery(pathname);
  });
  if (!arrived) return undefined;
  const h = delivery.headers;
  const wantPathQuery = destination.slice(RECEIVER.length);

  await check(`${label}: body bytes unchanged`, () => {
    const want = Buffer.from(body, "utf8");
    if (!delivery.body.equals(want)) {
      throw new Error(`got ${JSON.stringify(delivery.body.toString("utf8"))} (${delivery.body.length} bytes), want ${JSON.stringify(body)} (${want.length} bytes)`);
    }
  });
  await check(`${label}: method ${method}`, () => expectEqual(delivery.method, method, "method"));
  await check(`${label}: path and query unchanged`, () => expectEqual(delivery.url, wantPathQuery, "path+query"));
  await check(`${label}: content-type forwarded`, () => expectEqual(h["content-type"], contentType, "content-type"));
  for (const [name, value] of Object.entries(forwarded ?? {})) {
    await check(`${label}: Upstash-Forward-${name} arrives as ${name}`, () =>
      expectEqual(h[name.toLowerCase()], value, name),
    );
  }
  await check(`${label}: no control or secret headers leak to the destination`, () => {
    const leaked = Object.keys(h).filter(
      (k) => k.startsWith("upstash-forward-") || k.startsWith("upstash-telemetry-") || k === "authorization" ||
        k === "upstash-method" || k === "upstash-delay",
    );
    if (leaked.length) throw new Error(`destination received ${leaked.join(", ")}`);
  });
  await check(`${label}: upstash-message-id is the published id`, () =>
    expectEqual(h["upstash-message-id"], messageId, "upstash-message-id"),
  );
  await check(`${label}: upstash-retried is 0`, () => expectEqual(h["upstash-retried"], "0", "upstash-retried"));
  await check(`${label}: user-agent is Upstash-QStash`, () => expectEqual(h["user-agent"], "Upstash-QStash", "user-agent"));
  return delivery;
}

async function checkSignature(label, delivery, destination, keys) {
  const signature = delivery.headers["upstash-signature"];
  const body = delivery.body.toString("utf8");
  const present = await check(`${label}: upstash-signature present`, () => {
    if (!signature) throw new Error("no upstash-signature header");
  });
  if (!present) return;
  const receiver = new Receiver({ currentSigningKey: keys.current, nextSigningKey: keys.next });

  await check(`${label}: Receiver.verify accepts signature (body + url)`, async () => {
    expectEqual(await receiver.verify({ signature, body, url: destination }), true, "verify()");
  });
  // The negative checks also require the SDK's specific reason, so that they cannot pass
  // merely because verification fails for everything (e.g. a wrong key).
  await check(`${label}: Receiver.verify rejects a tampered body`, async () => {
    const error = await expectReject(receiver.verify({ signature, body: `${body}tampered`, url: destination }), "verify(tampered body)");
    if (!/body hash does not match/.test(error?.message)) throw new Error(`rejected for another reason: ${error?.message}`);
  });
  await check(`${label}: Receiver.verify rejects a wrong url`, async () => {
    const error = await expectReject(receiver.verify({ signature, body, url: `${destination}&wrong=1` }), "verify(wrong url)");
    if (!/invalid subject/.test(error?.message)) throw new Error(`rejected for another reason: ${error?.message}`);
  });
  await check(`${label}: Receiver falls back to the next key (current key wrong)`, async () => {
    const rotated = new Receiver({ currentSigningKey: "sig_wrongwrongwrongwrongwrongwrong", nextSigningKey: keys.current });
    expectEqual(await rotated.verify({ signature, body, url: destination }), true, "verify()");
  });
  await check(`${label}: Receiver rejects when both keys are wrong`, async () => {
    const wrong = new Receiver({
      currentSigningKey: "sig_wrongwrongwrongwrongwrongwrong",
      nextSigningKey: "sig_alsowrongalsowrongalsowrong12",
    });
    const error = await expectReject(wrong.verify({ signature, body, url: destination }), "verify(wrong keys)");
    if (!/signature verification failed/.test(error?.message)) throw new Error(`rejected for another reason: ${error?.message}`);
  });
}

// ---------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------
const runId = `${process.pid}-${Date.now().toString(36)}`;
const client = new Client({ baseUrl: BASE_URL, token: TOKEN });
// Log states of the SDK's `State` type that a server may emit (IN_PROGRESS is filter-only).
const STATES = ["CREATED", "ACTIVE", "DELIVERED", "ERROR", "RETRY", "FAILED", "CANCEL_REQUESTED", "CANCELED"];
// Messages the suite cancelled, {path, notBefore (ms)}: none of them may ever be delivered.
const cancelledPaths = []; // {path, notBefore (ms)}: must never be delivered

try {
  // Signing keys (the TS SDK has no keys API; this is the same call the Python SDK makes).
  let keys;
  await check("GET /v2/keys returns current and next sig_ keys", async () => {
    const res = await withTimeout(
      fetch(`${BASE_URL}/v2/keys`, { headers: { Authorization: `Bearer ${TOKEN}` } }),
      CALL_TIMEOUT_MS,
      "GET /v2/keys",
    );
    const text = await res.text();
    expectEqual(res.status, 200, `status (body ${text})`);
    const json = JSON.parse(text);
    if (!/^sig_/.test(json.current ?? "") || !/^sig_/.test(json.next ?? "")) {
      throw new Error(`unexpected body ${text}`);
    }
    keys = json;
  });

  // 1. publish: text body, custom header, PUT, destination with a query string.
  const textBody = `hello from @upstash/qstash ✓ héllo ${runId}`;
  const textPath = `/ts/${runId}/publish-text`;
  const textDest = `${RECEIVER}${textPath}?alpha=1&beta=two%20words&gamma=`;
  let textId;
  await check("publish(text, PUT, header) returns messageId msg_…", async () => {
    const res = await withTimeout(
      client.publish({
        url: textDest,
        body: textBody,
        method: "PUT",
        headers: { "Content-Type": "text/plain; charset=utf-8", "X-Compat-Test": `value ${runId}` },
      }),
      CALL_TIMEOUT_MS,
      "publish",
    );
    if (typeof res?.messageId !== "string" || !res.messageId.startsWith("msg_")) {
      throw new Error(`response ${JSON.stringify(res)}`);
    }
    textId = res.messageId;
  });

  // 2. publishJSON
  const jsonPayload = { hello: "world", n: 42, nested: { list: [1, 2, 3], unicode: "ünïcödé" }, runId };
  const jsonBody = JSON.stringify(jsonPayload);
  const jsonPath = `/ts/${runId}/publish-json`;
  const jsonDest = `${RECEIVER}${jsonPath}`;
  let jsonId;
  await check("publishJSON returns messageId msg_…", async () => {
    const res = await withTimeout(client.publishJSON({ url: jsonDest, body: jsonPayload }), CALL_TIMEOUT_MS, "publishJSON");
    if (typeof res?.messageId !== "string" || !res.messageId.startsWith("msg_")) {
      throw new Error(`response ${JSON.stringify(res)}`);
    }
    jsonId = res.messageId;
  });

  if (textId) {
    const d = await checkDelivery("publish text", {
      pathname: textPath,
      destination: textDest,
      messageId: textId,
      body: textBody,
      method: "PUT",
      contentType: "text/plain; charset=utf-8",
      forwarded: { "X-Compat-Test": `value ${runId}` },
    });
    if (d && keys) await checkSignature("publish text", d, textDest, keys);
  }
  if (jsonId) {
    const d = await checkDelivery("publishJSON", {
      pathname: jsonPath,
      destination: jsonDest,
      messageId: jsonId,
      body: jsonBody,
      method: "POST",
      contentType: "application/json",
    });
    if (d) {
      await check("publishJSON: body parses back to the same object", () =>
        expectEqual(JSON.stringify(JSON.parse(d.body.toString("utf8"))), jsonBody, "parsed body"),
      );
      if (keys) await checkSignature("publishJSON", d, jsonDest, keys);
    }
  }

  // 3. A delayed publish arrives, and not before its delay.
  await check("publish with delay: 1 arrives no earlier than 1 s later", async () => {
    const path = `/ts/${runId}/delayed`;
    const sent = Date.now();
    await withTimeout(client.publish({ url: `${RECEIVER}${path}`, body: "later", delay: 1 }), CALL_TIMEOUT_MS, "publish(delay)");
    const d = await waitForDelivery(path);
    if (d.receivedAt - sent < 1000) throw new Error(`arrived after ${d.receivedAt - sent} ms, want >= 1000`);
  });

  // 4. A client mistake -> the SDK's error with status 400 and a JSON error body, not a 5xx
  // and not a hang. The SDK sends any `period` string as is (it only checks that parallelism
  // or rate is given), so a malformed flow-control value reaches the server.
  await check("publish with a malformed flowControl period throws QstashError status 400", async () => {
    const error = await expectStatus(
      client.publish({ url: `${RECEIVER}/ts/${runId}/fc-malformed`, body: "x", flowControl: { key: `ts-${runId}-bad`, parallelism: 1, period: "banana" } }),
      400,
      "publish(flowControl period: banana)",
    );
    let parsed;
    try {
      parsed = JSON.parse(error.message);
    } catch {
      throw new Error(`error body is not JSON: ${error.message}`);
    }
    if (typeof parsed?.error !== "string") throw new Error(`error body lacks "error": ${error.message}`);
  });

  // 4b. A callback: after the delivery, a JSON payload about it arrives at the callback URL.
  await check("publish with callback: the callback arrives with sourceMessageId = the published id", async () => {
    const callbackPath = `/ts/${runId}/callback`;
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}/ts/${runId}/with-callback`, body: "x", callback: `${RECEIVER}${callbackPath}` }),
      CALL_TIMEOUT_MS,
      "publish(callback)",
    );
    const d = await waitForDelivery(callbackPath);
    let payload;
    try {
      payload = JSON.parse(d.body.toString("utf8"));
    } catch {
      throw new Error(`callback body is not JSON: ${d.body.toString("utf8")}`);
    }
    expectEqual(payload.sourceMessageId, res.messageId, "sourceMessageId");
    expectEqual(payload.status, 200, "status");
  });

  // 5. A wrong token is rejected with 401.
  await check("publish with a wrong token throws QstashError status 401", async () => {
    const bad = new Client({ baseUrl: BASE_URL, token: "not-the-token" });
    const error = await expectReject(
      withTimeout(bad.publish({ url: `${RECEIVER}/ts/${runId}/unauth`, body: "x" }), CALL_TIMEOUT_MS, "publish(bad token)"),
      "publish(bad token)",
    );
    if (!(error instanceof QstashError)) throw new Error(`got ${error?.name}: ${error?.message}, want QstashError`);
    expectEqual(error.status, 401, `status (message ${error.message})`);
  });

  // 6. Delivery semantics and the management APIs (messages, DLQ, logs), SDK calls only.
  // The messages checks come first: their cancel-all runs while nothing else of the suite is
  // pending, and the wait for their cancelled messages (item 8) overlaps the checks after them.
  await messagesChecks();
  await deprecatedMessagesChecks();
  // A schedule firing every minute is created now (after the cancel-all above, which could
  // otherwise cancel its message) and its first delivery is awaited near the end of the suite,
  // so that the wait for the next cron minute overlaps the checks in between.
  const firing = await startScheduleFiring();
  await notBeforeChecks();
  await retryChecks();
  await dedupChecks();
  await failureCallbackChecks();
  await dlqChecks();
  await dlqBulkChecks();
  await logsChecks();
  await queueChecks();
  await flowControlChecks();
  await urlGroupChecks(keys);
  await topicsAliasChecks();
  await batchChecks();
  await scheduleChecks();
  await redactChecks();
  await llmChecks();
  await providerWireChecks();

  // 7. Dev-mode hook: QSTASH_DEV=true + QSTASH_DEV_PORT, no baseUrl/token.
  await devModeChecks();

  // 7b. The every-minute schedule created after the messages checks has fired.
  await scheduleFiringChecks(firing, keys);

  // 8. Cancelled messages (published with a near notBefore) never arrive.
  await cancelledNeverDelivered();

  // 9. Key rotation under load, last (see rotationChecks).
  await rotationChecks();
} catch (error) {
  notOk("suite crashed", error?.stack ?? error);
} finally {
  server.close();
  server.closeAllConnections?.();
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);

// ---------------------------------------------------------------------------------------
async function devModeChecks() {
  const base = new URL(BASE_URL);
  if (base.protocol !== "http:" || base.hostname !== "127.0.0.1" || !base.port || base.pathname !== "/") {
    notOk("dev mode: QSTASH_DEV=true client publishes", `KSTASH_URL ${BASE_URL} is not http://127.0.0.1:<port>; the SDK's dev mode only targets that`);
    return;
  }
  const devPath = `/ts/${runId}/dev-mode`;
  const devDest = `${RECEIVER}${devPath}`;
  // A fresh HOME: an earlier real dev-server download cached in ~/.cache/upstash must not
  // be what makes this pass, and anything the SDK would download lands in a temp dir.
  const home = fs.mkdtempSync(path.join(os.tmpdir(), "kstash-devmode-home-"));
  const env = { ...process.env, HOME: home, QSTASH_DEV: "true", QSTASH_DEV_PORT: base.port };
  let output = "";
  let code;
  try {
    code = await new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [new URL(import.meta.url).pathname, "--dev-mode-child", devDest], {
        env,
        cwd: path.dirname(new URL(import.meta.url).pathname),
        stdio: ["ignore", "pipe", "pipe"],
      });
      child.stdout.on("data", (d) => (output += d));
      child.stderr.on("data", (d) => (output += d));
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`dev-mode child did not finish within ${CHILD_TIMEOUT_MS} ms; output: ${output}`));
      }, CHILD_TIMEOUT_MS);
      child.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      child.on("close", (c) => {
        clearTimeout(timer);
        resolve(c);
      });
    });
  } catch (error) {
    notOk("dev mode: QSTASH_DEV=true client publishes", error.message);
    return;
  }
  const plain = output.replace(/\u001B\[[\d;]*m/g, "");
  const cacheDir = path.join(home, ".cache", "upstash", "qstash-dev");
  // The SDK creates this directory only on its download path (ensureBinary).
  const downloaded = fs.existsSync(cacheDir);
  fs.rmSync(home, { recursive: true, force: true });

  await check("dev mode: SDK does not download its own dev server", () => {
    if (downloaded || /Downloading dev server|Failed to fetch latest version|No stable versions|Failed to download binary|artifacts\.upstash\.com|amazonaws\.com/i.test(plain)) {
      throw new Error(`the SDK tried to download/start the Upstash dev server binary: ${plain}`);
    }
  });
  await check("dev mode: SDK recognises kstash as the running dev server", () => {
    if (!plain.includes(`Server already running at http://127.0.0.1:${base.port}`)) {
      throw new Error(`SDK did not report "Server already running" (so /v2/keys did not answer with the dev keys); output: ${plain}`);
    }
  });
  let devId;
  await check("dev mode: QSTASH_DEV=true client publishes", () => {
    const m = /DEV_MODE_RESULT (.*)/.exec(plain);
    if (code !== 0 || !m) throw new Error(`child exit ${code}; output: ${plain}`);
    const res = JSON.parse(m[1]);
    if (typeof res?.messageId !== "string" || !res.messageId.startsWith("msg_")) throw new Error(`response ${m[1]}`);
    devId = res.messageId;
  });
  if (!devId) return;
  let delivery;
  await check(`dev mode: delivered within ${DELIVERY_TIMEOUT_MS / 1000} s`, async () => {
    delivery = await waitForDelivery(devPath);
    expectEqual(delivery.headers["upstash-message-id"], devId, "upstash-message-id");
    expectEqual(delivery.body.toString("utf8"), "dev-mode body", "body");
  });
  if (!delivery) return;
  await check("dev mode: Receiver({devMode: true}) verifies with the built-in dev keys", async () => {
    const receiver = new Receiver({ devMode: true });
    const verified = await receiver.verify({
      signature: delivery.headers["upstash-signature"] ?? "",
      body: delivery.body.toString("utf8"),
      url: devDest,
    });
    expectEqual(verified, true, "verify()");
  });
}

// ---------------------------------------------------------------------------------------
// Delay & not-before
// ---------------------------------------------------------------------------------------
async function notBeforeChecks() {
  await check("publish with notBefore (unix s) arrives no earlier than that time", async () => {
    const path = `/ts/${runId}/not-before`;
    const notBefore = Math.floor(Date.now() / 1000) + 2;
    await withTimeout(client.publish({ url: `${RECEIVER}${path}`, body: "not before", notBefore }), CALL_TIMEOUT_MS, "publish(notBefore)");
    const d = await waitForDelivery(path);
    if (d.receivedAt < notBefore * 1000) {
      throw new Error(`arrived ${notBefore * 1000 - d.receivedAt} ms before notBefore`);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Retries: 500, 500, 200 with retries: 2 and a 200 ms retryDelay -> exactly 3 attempts.
// ---------------------------------------------------------------------------------------
async function retryChecks() {
  const path = `/ts/${runId}/retries`;
  planStatuses(path, [500, 500]);
  let id;
  const published = await check('publish with retries: 2, retryDelay: "200" returns messageId', async () => {
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}${path}`, body: "retry me", retries: 2, retryDelay: "200" }),
      CALL_TIMEOUT_MS,
      "publish(retries)",
    );
    if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
    id = res.messageId;
  });
  if (!published) return;
  let attempts;
  await check("retries: 3 attempts arrive (answered 500, 500, 200)", async () => {
    attempts = await waitForDeliveries(path, 3);
    expectEqual(attempts.map((d) => d.status).join(","), "500,500,200", "statuses answered");
  });
  if (!attempts) return;
  await check("retries: upstash-retried is 0, 1, 2", () =>
    expectEqual(attempts.map((d) => d.headers["upstash-retried"]).join(","), "0,1,2", "upstash-retried"),
  );
  await check("retries: every attempt carries the same upstash-message-id", () =>
    expectEqual(attempts.map((d) => d.headers["upstash-message-id"]).join(","), [id, id, id].join(","), "upstash-message-id"),
  );
  await check("retries: attempts are at least the retryDelay (200 ms) apart", () => {
    const gaps = attempts.slice(1).map((d, i) => d.receivedAt - attempts[i].receivedAt);
    if (gaps.some((g) => g < 200)) throw new Error(`gaps ${gaps.join(", ")} ms`);
  });
  await check("retries: no 4th attempt after the 200", () => expectNoMoreDeliveries(path, 3));
}

// ---------------------------------------------------------------------------------------
// Deduplication
// ---------------------------------------------------------------------------------------
async function dedupChecks() {
  const variants = [
    ["deduplicationId", { deduplicationId: `dedup-${runId}` }, `/ts/${runId}/dedup-id`],
    ["contentBasedDeduplication", { contentBasedDeduplication: true }, `/ts/${runId}/dedup-content`],
  ];
  for (const [label, options, path] of variants) {
    let first;
    let second;
    const published = await check(`${label}: publishing twice gives the same messageId, the second deduplicated: true`, async () => {
      const request = { url: `${RECEIVER}${path}`, body: `dedup body ${label} ${runId}`, ...options };
      first = await withTimeout(client.publish(request), CALL_TIMEOUT_MS, "publish #1");
      second = await withTimeout(client.publish(request), CALL_TIMEOUT_MS, "publish #2");
      if (!first?.messageId?.startsWith("msg_")) throw new Error(`first response ${JSON.stringify(first)}`);
      expectEqual(second?.messageId, first.messageId, "second messageId");
      expectEqual(second?.deduplicated, true, "second deduplicated");
      if (first.deduplicated) throw new Error(`first response is deduplicated: ${JSON.stringify(first)}`);
    });
    if (!published) continue;
    await check(`${label}: the receiver gets exactly one delivery`, async () => {
      const [d] = await waitForDeliveries(path, 1);
      expectEqual(d.headers["upstash-message-id"], first.messageId, "upstash-message-id");
      await expectNoMoreDeliveries(path, 1);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Failure callback: one request after the final failed attempt.
// ---------------------------------------------------------------------------------------
async function failureCallbackChecks() {
  const path = `/ts/${runId}/always-fails`;
  const failurePath = `/ts/${runId}/failure-callback`;
  planStatuses(path, [], 500);
  let id;
  const published = await check("publish with failureCallback (retries: 1) returns messageId", async () => {
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}${path}`, body: "doomed", retries: 1, retryDelay: "100", failureCallback: `${RECEIVER}${failurePath}` }),
      CALL_TIMEOUT_MS,
      "publish(failureCallback)",
    );
    id = res?.messageId;
    if (!id?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
  });
  if (!published) return;
  let callback;
  let payload;
  await check("failureCallback: one request arrives after the final (2nd) failed attempt", async () => {
    [callback] = await waitForDeliveries(failurePath, 1);
    const attempts = deliveriesTo(path);
    expectEqual(attempts.length, 2, "attempts before the failure callback");
    if (callback.receivedAt < attempts[1].receivedAt) throw new Error("failure callback arrived before the final attempt");
    await expectNoMoreDeliveries(failurePath, 1);
    expectEqual(deliveriesTo(path).length, 2, "attempts in total");
  });
  if (!callback) return;
  await check("failureCallback: JSON body has dlqId, sourceMessageId and status 500", () => {
    try {
      payload = JSON.parse(callback.body.toString("utf8"));
    } catch {
      throw new Error(`body is not JSON: ${callback.body.toString("utf8")}`);
    }
    if (typeof payload.dlqId !== "string" || !payload.dlqId) throw new Error(`no dlqId in ${JSON.stringify(payload)}`);
    expectEqual(payload.sourceMessageId, id, "sourceMessageId");
    expectEqual(payload.status, 500, "status");
  });
  if (!payload?.dlqId) return;
  await check("failureCallback: its dlqId is the message's DLQ entry (dlq.listMessages({dlqIds}))", async () => {
    const res = await poll("DLQ entry of the failure callback's dlqId", async () => {
      const r = await client.dlq.listMessages({ dlqIds: [payload.dlqId] });
      return r.messages.length ? r : undefined;
    });
    expectEqual(res.messages.length, 1, "entries");
    expectEqual(res.messages[0].messageId, id, "messageId");
    await client.dlq.delete(payload.dlqId);
  });
}

// ---------------------------------------------------------------------------------------
// DLQ round trip
// ---------------------------------------------------------------------------------------
async function dlqChecks() {
  // One message fails (retries: 0) and is retried from the DLQ; the retry is answered 200.
  const path = `/ts/${runId}/dlq-retry`;
  const dest = `${RECEIVER}${path}`;
  planStatuses(path, [500]);
  let id;
  const published = await check("DLQ: publish with retries: 0 to a path answering 500", async () => {
    const res = await withTimeout(client.publish({ url: dest, body: `dlq body ${runId}`, retries: 0 }), CALL_TIMEOUT_MS, "publish");
    id = res?.messageId;
    if (!id?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
    await waitForDelivery(path);
  });
  if (!published) return;
  let entry;
  await check("DLQ: dlq.listMessages({filter: {messageId}}) lists it with responseStatus 500", async () => {
    entry = await poll("the DLQ entry", async () => {
      const r = await client.dlq.listMessages({ filter: { messageId: id } });
      return r.messages[0];
    });
    expectEqual(entry.messageId, id, "messageId");
    expectEqual(entry.responseStatus, 500, "responseStatus");
    expectEqual(entry.url, dest, "url");
    expectEqual(entry.body, `dlq body ${runId}`, "body");
    expectEqual(entry.maxRetries, 0, "maxRetries");
    if (typeof entry.dlqId !== "string" || !entry.dlqId) throw new Error(`no dlqId in ${JSON.stringify(entry)}`);
  });
  if (!entry?.dlqId) return;
  await check("DLQ: the entry carries the destination's response body", () =>
    expectEqual(entry.responseBody, "planned 500", "responseBody"),
  );
  await check("DLQ: dlq.listMessages({dlqIds: [dlqId]}) returns exactly that entry", async () => {
    const r = await withTimeout(client.dlq.listMessages({ dlqIds: [entry.dlqId] }), CALL_TIMEOUT_MS, "listMessages(dlqIds)");
    expectEqual(r.messages.map((m) => `${m.dlqId}/${m.messageId}`).join(","), `${entry.dlqId}/${id}`, "entries");
  });
  let retriedId;
  await check("DLQ: dlq.retry(dlqId) returns one new messageId", async () => {
    const r = await withTimeout(client.dlq.retry(entry.dlqId), CALL_TIMEOUT_MS, "dlq.retry");
    expectEqual(r?.responses?.length, 1, `responses (${JSON.stringify(r)})`);
    retriedId = r.responses[0].messageId;
    if (!retriedId?.startsWith("msg_") || retriedId === id) throw new Error(`messageId ${retriedId}, original ${id}`);
  });
  if (retriedId) {
    await check("DLQ: the retried message arrives with the new id and the original body", async () => {
      const [, d] = await waitForDeliveries(path, 2);
      expectEqual(d.headers["upstash-message-id"], retriedId, "upstash-message-id");
      expectEqual(d.body.toString("utf8"), `dlq body ${runId}`, "body");
    });
    await check("DLQ: after the retry the entry is gone", () =>
      poll("the retried entry to leave the DLQ", async () => {
        const r = await client.dlq.listMessages({ dlqIds: [entry.dlqId] });
        return r.messages.length === 0 ? true : undefined;
      }),
    );
  }

  // Three more failures: delete one, then deleteMany the other two.
  const delPath = `/ts/${runId}/dlq-delete`;
  const delDest = `${RECEIVER}${delPath}`;
  planStatuses(delPath, [], 500);
  let entries;
  await check("DLQ: three failed messages are listed (dlq.listMessages({filter: {url}}))", async () => {
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const res = await withTimeout(client.publish({ url: delDest, body: `delete me ${i}`, retries: 0 }), CALL_TIMEOUT_MS, "publish");
      ids.push(res.messageId);
    }
    entries = await poll("three DLQ entries", async () => {
      const r = await client.dlq.listMessages({ filter: { url: delDest } });
      return r.messages.length >= 3 ? r.messages : undefined;
    });
    expectEqual(entries.map((e) => e.messageId).sort().join(","), [...ids].sort().join(","), "messageIds");
  });
  if (!entries) return;
  const [a, b, c] = entries.map((e) => e.dlqId);
  await check("DLQ: dlq.delete(dlqId) removes that entry only", async () => {
    await withTimeout(client.dlq.delete(a), CALL_TIMEOUT_MS, "dlq.delete");
    await poll("the deleted entry to go", async () => {
      const r = await client.dlq.listMessages({ filter: { url: delDest } });
      const left = r.messages.map((m) => m.dlqId).sort().join(",");
      return left === [b, c].sort().join(",") ? true : undefined;
    });
  });
  await check("DLQ: dlq.delete of an unknown dlqId throws QstashError status 404", () =>
    expectStatus(client.dlq.delete(a), 404, "dlq.delete(deleted id)"),
  );
  await check("DLQ: dlq.deleteMany({dlqIds}) returns deleted: 2 and empties the DLQ of them", async () => {
    const r = await withTimeout(client.dlq.deleteMany({ dlqIds: [b, c] }), CALL_TIMEOUT_MS, "dlq.deleteMany");
    expectEqual(r?.deleted, 2, "deleted");
    await poll("the entries to go", async () => {
      const l = await client.dlq.listMessages({ filter: { url: delDest } });
      return l.messages.length === 0 ? true : undefined;
    });
  });
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------
async function logsChecks() {
  const path = `/ts/${runId}/logged`;
  const dest = `${RECEIVER}${path}`;
  let id;
  const delivered = await check("logs: a message to log is published and delivered", async () => {
    const res = await withTimeout(client.publish({ url: dest, body: "log me" }), CALL_TIMEOUT_MS, "publish");
    id = res?.messageId;
    await waitForDelivery(path);
  });
  if (!delivered || !id) return;
  let logs;
  await check("logs({filter: {messageId}}) has CREATED, ACTIVE and DELIVERED entries", async () => {
    logs = await poll("CREATED, ACTIVE and DELIVERED in the logs", async () => {
      const r = await client.logs({ filter: { messageId: id } });
      const states = new Set(r.logs.map((l) => l.state));
      return ["CREATED", "ACTIVE", "DELIVERED"].every((s) => states.has(s)) ? r.logs : undefined;
    });
  });
  if (!logs) return;
  await check("logs: every entry has the messageId, url, a known state and a ms time, newest first", () => {
    for (const l of logs) {
      expectEqual(l.messageId, id, "messageId");
      expectEqual(l.url, dest, "url");
      if (!STATES.includes(l.state)) throw new Error(`unknown state ${l.state}`);
      if (typeof l.time !== "number" || Math.abs(l.time - Date.now()) > 600_000) throw new Error(`time ${l.time} is not a recent ms timestamp`);
    }
    const times = logs.map((l) => l.time);
    if (times.some((t, i) => i > 0 && t > times[i - 1])) throw new Error(`times not newest first: ${times.join(", ")}`);
    expectEqual(logs[0].state, "DELIVERED", "newest state");
  });
  await check("events({filter: {messageId}}) (deprecated alias) returns the same entries", async () => {
    const r = await withTimeout(client.events({ filter: { messageId: id } }), CALL_TIMEOUT_MS, "events");
    expectEqual(r.events.map((l) => l.state).join(","), logs.map((l) => l.state).join(","), "states");
  });
  await check("logs({messageIds: [id]}) returns the same entries", async () => {
    const r = await withTimeout(client.logs({ messageIds: [id] }), CALL_TIMEOUT_MS, "logs(messageIds)");
    expectEqual(r.logs.map((l) => l.state).join(","), logs.map((l) => l.state).join(","), "states");
  });
  await check("logs paging: count: 1 gives one entry and a cursor; following cursors walks all entries", async () => {
    const pages = [];
    let cursor;
    do {
      const r = await withTimeout(client.logs({ filter: { messageId: id }, count: 1, cursor }), CALL_TIMEOUT_MS, "logs(count: 1)");
      expectEqual(r.logs.length, 1, `entries on page ${pages.length + 1}`);
      pages.push(r.logs[0]);
      cursor = r.cursor;
      if (pages.length < logs.length && !cursor) throw new Error(`no cursor after page ${pages.length} of ${logs.length}`);
      if (pages.length > logs.length) throw new Error(`more pages than the ${logs.length} entries`);
    } while (cursor);
    expectEqual(pages.map((l) => `${l.state}@${l.time}`).join(","), logs.map((l) => `${l.state}@${l.time}`).join(","), "paged entries");
  });
}

// ---------------------------------------------------------------------------------------
// Queues (FIFO): upsert, get, list, enqueue/enqueueJSON in order, pause/resume, a retry that
// holds the queue, client errors, delete.
// ---------------------------------------------------------------------------------------
/** Polls queue.get() until pred(queue) holds; returns that queue. */
function pollQueue(what, queue, pred) {
  return poll(what, async () => {
    const q = await queue.get();
    return pred(q) ? q : undefined;
  });
}
/** "body/status/upstash-retried" of each request to pathname, in arrival order. */
function arrivals(pathname) {
  return deliveriesTo(pathname).map((d) => `${d.body.toString("utf8")}/${d.status}/${d.headers["upstash-retried"]}`);
}

async function queueChecks() {
  const QUEUE_KEYS = ["name", "parallelism", "createdAt", "updatedAt", "lag", "paused"];
  const name = `ts-${runId}-fifo`;
  const queue = client.queue({ queueName: name });
  let upserted;
  const before = Date.now();
  await check("queue.upsert({parallelism: 1}) then queue.get() returns all six keys with their values", async () => {
    await withTimeout(queue.upsert({ parallelism: 1 }), CALL_TIMEOUT_MS, "queue.upsert");
    const q = await poll("queue.get", () => queue.get());
    const missing = QUEUE_KEYS.filter((k) => !(k in q));
    if (missing.length) throw new Error(`missing ${missing.join(", ")} in ${JSON.stringify(q)}`);
    expectEqual(q.name, name, "name");
    expectEqual(q.parallelism, 1, "parallelism");
    expectEqual(q.lag, 0, "lag");
    expectEqual(q.paused, false, "paused");
    if (typeof q.createdAt !== "number" || Math.abs(q.createdAt - before) > 5_000) throw new Error(`createdAt ${q.createdAt}, upserted at ${before} (ms)`);
    if (typeof q.updatedAt !== "number" || q.updatedAt < q.createdAt) throw new Error(`updatedAt ${q.updatedAt} before createdAt ${q.createdAt}`);
    upserted = q;
  });
  if (!upserted) return;
  await check("queue.list() contains the queue", async () => {
    const list = await withTimeout(queue.list(), CALL_TIMEOUT_MS, "queue.list");
    if (!Array.isArray(list)) throw new Error(`list() returned ${JSON.stringify(list)}`);
    const mine = list.filter((q) => q.name === name);
    expectEqual(mine.length, 1, `entries named ${name} in ${oneLine(JSON.stringify(list))}`);
    expectEqual(mine[0].parallelism, 1, "parallelism");
  });

  // FIFO: five messages (enqueue and enqueueJSON alternating) to a slow destination, so that
  // four of them wait in the queue while the one before is being delivered.
  const path = `/ts/${runId}/fifo`;
  const dest = `${RECEIVER}${path}`;
  planDelay(path, 150);
  const bodies = [];
  const ids = [];
  const enqueued = await check("queue.enqueue / queue.enqueueJSON: 5 messages (alternating) return messageIds", async () => {
    for (let i = 0; i < 5; i++) {
      const res = i % 2 === 0
        ? await withTimeout(queue.enqueue({ url: dest, body: `fifo ${i}` }), CALL_TIMEOUT_MS, "queue.enqueue")
        : await withTimeout(queue.enqueueJSON({ url: dest, body: { fifo: i } }), CALL_TIMEOUT_MS, "queue.enqueueJSON");
      if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
      bodies.push(i % 2 === 0 ? `fifo ${i}` : JSON.stringify({ fifo: i }));
      ids.push(res.messageId);
    }
  });
  if (enqueued) {
    await check("queue (parallelism 1): the 5 messages arrive in enqueue order, one at a time", async () => {
      const got = await waitForDeliveries(path, 5);
      expectEqual(got.map((d) => d.body.toString("utf8")).join(" | "), bodies.join(" | "), "bodies in arrival order");
      expectEqual(got.map((d) => d.headers["upstash-message-id"]).join(","), ids.join(","), "upstash-message-id in arrival order");
      expectEqual(maxInFlight(path), 1, "most requests in flight at once");
      await expectNoMoreDeliveries(path, 5);
    });
  }
  if (enqueued) {
    await check("logs({filter: {queueName}}) returns only entries of the queue, each with queueName", async () => {
      const logs = await poll("DELIVERED of the first queued message in the queue's logs", async () => {
        const r = await client.logs({ filter: { queueName: name } });
        return r.logs.some((l) => l.messageId === ids[0] && l.state === "DELIVERED") ? r.logs : undefined;
      });
      const others = logs.filter((l) => l.queueName !== name || !ids.includes(l.messageId));
      if (others.length) throw new Error(`entries of another queue or message: ${oneLine(JSON.stringify(others[0]))}`);
    });
  }

  // Pause: the queue accepts but delivers nothing; resume delivers, oldest first.
  const pausedPath = `/ts/${runId}/fifo-paused`;
  const pausedDest = `${RECEIVER}${pausedPath}`;
  const fcKey = `ts-${runId}-queued-fc`;
  const paused = await check("queue.pause(): queue.get() shows paused: true", async () => {
    await withTimeout(queue.pause(), CALL_TIMEOUT_MS, "queue.pause");
    await pollQueue("paused: true", queue, (q) => q.paused === true);
  });
  let pausedIds;
  if (paused) {
    await check("paused queue: enqueued messages (one with flowControl) are accepted, not delivered, and counted in lag", async () => {
      const a = await withTimeout(queue.enqueue({ url: pausedDest, body: "paused 0", flowControl: { key: fcKey, parallelism: 1 } }), CALL_TIMEOUT_MS, "queue.enqueue(flowControl)");
      const b = await withTimeout(queue.enqueueJSON({ url: pausedDest, body: { paused: 1 } }), CALL_TIMEOUT_MS, "queue.enqueueJSON");
      pausedIds = [a?.messageId, b?.messageId];
      if (!pausedIds.every((m) => m?.startsWith("msg_"))) throw new Error(`responses ${JSON.stringify([a, b])}`);
      await expectNoMoreDeliveries(pausedPath, 0);
      await pollQueue("lag >= 2", queue, (q) => q.lag >= 2);
    });
  }
  if (pausedIds) {
    await check("messages.get of a message waiting in the paused queue has queueName, flowControlKey and parallelism", async () => {
      const m = await poll("messages.get(queued)", () => client.messages.get(pausedIds[0]));
      expectEqual(m.messageId, pausedIds[0], "messageId");
      expectEqual(m.queueName, name, "queueName");
      expectEqual(m.flowControlKey, fcKey, "flowControlKey");
      expectEqual(m.parallelism, 1, "parallelism");
      expectEqual(m.url, pausedDest, "url");
    });
  }
  if (paused) {
    await check("queue.resume(): queue.get() shows paused: false and the waiting messages arrive, oldest first", async () => {
      await withTimeout(queue.resume(), CALL_TIMEOUT_MS, "queue.resume");
      const got = await waitForDeliveries(pausedPath, 2);
      expectEqual(got.map((d) => d.body.toString("utf8")).join(" | "), `paused 0 | ${JSON.stringify({ paused: 1 })}`, "bodies in arrival order");
      await pollQueue("paused: false, lag 0", queue, (q) => q.paused === false && q.lag === 0);
    });
  }

  // A retry holds the queue: A fails once (500), B waits until A's retry is delivered.
  const retryPath = `/ts/${runId}/fifo-retry`;
  const retryDest = `${RECEIVER}${retryPath}`;
  planStatuses(retryPath, [500]);
  await check("queue: a retried message holds its place (A 500, A retry 200, then B)", async () => {
    await withTimeout(queue.enqueue({ url: retryDest, body: "A", retries: 1, retryDelay: "500" }), CALL_TIMEOUT_MS, "queue.enqueue(A)");
    await withTimeout(queue.enqueue({ url: retryDest, body: "B", retries: 1, retryDelay: "500" }), CALL_TIMEOUT_MS, "queue.enqueue(B)");
    await waitForDeliveries(retryPath, 3);
    expectEqual(arrivals(retryPath).join(", "), "A/500/0, A/200/1, B/200/0", "requests (body/status/upstash-retried)");
    await expectNoMoreDeliveries(retryPath, 3);
  });

  // Client mistakes surface as the SDK's error with the server's status.
  // TS 2.12 still sends Upstash-Delay on enqueue (Python 3.4.0 dropped the parameter).
  await check("queue.enqueue with a delay (not allowed on enqueue) throws QstashError status 400", () =>
    expectStatus(queue.enqueue({ url: `${RECEIVER}/ts/${runId}/fifo-delay`, body: "x", delay: 5 }), 400, "queue.enqueue(delay: 5)"),
  );
  await check("queue.upsert with an invalid name throws QstashError status 400", () =>
    expectStatus(client.queue({ queueName: "not a valid name!" }).upsert({ parallelism: 1 }), 400, "queue.upsert(bad name)"),
  );
  await check("queue.upsert with parallelism 101 throws QstashError status 412 and creates nothing", async () => {
    const big = client.queue({ queueName: `${name}-big` });
    await expectStatus(big.upsert({ parallelism: 101 }), 412, "queue.upsert(parallelism: 101)");
    await expectStatus(big.get(), 404, "queue.get(not created)");
  });

  await check("queue.delete(): queue.get() then throws QstashError status 404 and list() lacks it", async () => {
    await withTimeout(queue.delete(), CALL_TIMEOUT_MS, "queue.delete");
    await pollUntil404("queue.get(deleted)", () => queue.get());
    const list = await withTimeout(queue.list(), CALL_TIMEOUT_MS, "queue.list");
    if (list.some((q) => q.name === name)) throw new Error(`list() still has ${name}`);
  });
}

// ---------------------------------------------------------------------------------------
// Flow control: parallelism and rate limits at the receiver; flowControl.get/pause/resume/
// pin/unpin/resetRate/getGlobalParallelism.
// ---------------------------------------------------------------------------------------
/** Polls flowControl.get(key) until pred(info) holds; returns that info. */
function pollFlowControl(what, key, pred) {
  let last;
  return poll(what, async () => {
    last = await client.flowControl.get(key);
    return pred(last) ? last : undefined;
  }).catch((error) => {
    throw new Error(`${error.message}; last flowControl.get: ${JSON.stringify(last)}`);
  });
}
function nowS() {
  return Math.floor(Date.now() / 1000);
}

async function flowControlChecks() {
  const FLOW_CONTROL_FIELDS = {
    flowControlKey: "string", waitListSize: "number", parallelismMax: "number", parallelismCount: "number",
    rateMax: "number", rateCount: "number", ratePeriod: "number", ratePeriodStart: "number",
    isPaused: "boolean", isPinnedParallelism: "boolean", isPinnedRate: "boolean",
  };
  // Parallelism 1: three messages to a destination that answers after 400 ms.
  const key = `ts-${runId}-parallel`;
  const path = `/ts/${runId}/fc-slow`;
  const dest = `${RECEIVER}${path}`;
  planDelay(path, 400);
  const published = await check("publish ×3 with flowControl {key, parallelism: 1} returns messageIds", async () => {
    for (let i = 0; i < 3; i++) {
      const res = await withTimeout(client.publish({ url: dest, body: `fc ${i}`, flowControl: { key, parallelism: 1 } }), CALL_TIMEOUT_MS, "publish(flowControl)");
      if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
    }
  });
  if (!published) return;
  await check("flowControl.get(key) while one is in flight: parallelismCount 1, waitListSize >= 1", () =>
    pollFlowControl("parallelismCount 1 with a waitlist", key, (i) => i.parallelismCount === 1 && i.waitListSize >= 1),
  );
  await check("flowControl (parallelism 1): all 3 arrive, never more than 1 in flight, each after the previous was answered", async () => {
    const got = await waitForDeliveries(path, 3);
    expectEqual(maxInFlight(path), 1, "most requests in flight at once");
    for (let i = 1; i < got.length; i++) {
      if (got[i - 1].answeredAt === undefined || got[i].receivedAt < got[i - 1].answeredAt) {
        throw new Error(`request ${i + 1} arrived at ${got[i].receivedAt}, before request ${i} was answered (${got[i - 1].answeredAt})`);
      }
    }
    await expectNoMoreDeliveries(path, 3);
  });
  let info;
  await check("flowControl.get(key) afterwards: every FlowControlInfo field, parallelismMax 1, nothing in flight or waiting", async () => {
    info = await pollFlowControl("parallelismCount 0 and waitListSize 0", key, (i) => i.parallelismCount === 0 && i.waitListSize === 0);
    for (const [field, type] of Object.entries(FLOW_CONTROL_FIELDS)) {
      if (typeof info[field] !== type) throw new Error(`${field}: ${JSON.stringify(info[field])} is not a ${type} in ${JSON.stringify(info)}`);
    }
    expectEqual(info.flowControlKey, key, "flowControlKey");
    expectEqual(info.parallelismMax, 1, "parallelismMax");
    expectEqual(info.isPaused, false, "isPaused");
    expectEqual(info.isPinnedParallelism, false, "isPinnedParallelism");
    expectEqual(info.isPinnedRate, false, "isPinnedRate");
    if (Math.abs(info.ratePeriodStart - nowS()) > 3_600) throw new Error(`ratePeriodStart ${info.ratePeriodStart} is not a recent unix time in seconds`);
  });

  // Pause: a new message for the key waits; pin/unpin meanwhile; resume delivers it.
  const pausedPath = `/ts/${runId}/fc-paused`;
  const pausedDest = `${RECEIVER}${pausedPath}`;
  const paused = await check("flowControl.pause(key): get shows isPaused: true", async () => {
    await withTimeout(client.flowControl.pause(key), CALL_TIMEOUT_MS, "flowControl.pause");
    await pollFlowControl("isPaused: true", key, (i) => i.isPaused === true);
  });
  let waitingId;
  if (paused) {
    await check("paused key: a message published with it is not delivered and is on the waitlist", async () => {
      const res = await withTimeout(client.publish({ url: pausedDest, body: "fc paused", flowControl: { key, parallelism: 1 } }), CALL_TIMEOUT_MS, "publish(flowControl)");
      waitingId = res?.messageId;
      if (!waitingId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
      await expectNoMoreDeliveries(pausedPath, 0);
      await pollFlowControl("waitListSize 1", key, (i) => i.waitListSize === 1);
    });
  }
  if (waitingId) {
    await check("messages.get of the waiting flow-controlled message has flowControlKey and parallelism 1", async () => {
      const m = await poll("messages.get(waiting)", () => client.messages.get(waitingId));
      expectEqual(m.flowControlKey, key, "flowControlKey");
      expectEqual(m.parallelism, 1, "parallelism");
      expectEqual(m.queueName, undefined, "queueName");
    });
  }
  await check("flowControl.pin(key, {parallelism: 2, rate: 10, period: 30}): get shows both pinned with those values", async () => {
    await withTimeout(client.flowControl.pin(key, { parallelism: 2, rate: 10, period: 30 }), CALL_TIMEOUT_MS, "flowControl.pin");
    await pollFlowControl("pinned 2 / 10 per 30 s", key, (i) =>
      i.isPinnedParallelism === true && i.isPinnedRate === true && i.parallelismMax === 2 && i.rateMax === 10 && i.ratePeriod === 30);
  });
  await check("flowControl.unpin(key, {parallelism: true, rate: true}): get shows both unpinned", async () => {
    await withTimeout(client.flowControl.unpin(key, { parallelism: true, rate: true }), CALL_TIMEOUT_MS, "flowControl.unpin");
    await pollFlowControl("unpinned", key, (i) => i.isPinnedParallelism === false && i.isPinnedRate === false);
  });
  if (paused) {
    await check("flowControl.resume(key): get shows isPaused: false and the waiting message arrives", async () => {
      await withTimeout(client.flowControl.resume(key), CALL_TIMEOUT_MS, "flowControl.resume");
      const d = await waitForDelivery(pausedPath);
      expectEqual(d.headers["upstash-message-id"], waitingId, "upstash-message-id");
      await pollFlowControl("isPaused: false, waitListSize 0", key, (i) => i.isPaused === false && i.waitListSize === 0);
    });
  }
  await check("logs({filter: {flowControlKey}}) returns only entries of that key, each with flowControlKey", async () => {
    const logs = await poll("the key's DELIVERED entries in the logs", async () => {
      const r = await client.logs({ filter: { flowControlKey: key } });
      return r.logs.filter((l) => l.state === "DELIVERED").length >= 4 ? r.logs : undefined;
    });
    const others = logs.filter((l) => l.flowControlKey !== key);
    if (others.length) throw new Error(`entries without the key: ${oneLine(JSON.stringify(others[0]))}`);
  });

  await check("flowControl.getGlobalParallelism() returns parallelismMax > 0 and a numeric parallelismCount", async () => {
    const g = await withTimeout(client.flowControl.getGlobalParallelism(), CALL_TIMEOUT_MS, "flowControl.getGlobalParallelism");
    if (typeof g?.parallelismMax !== "number" || g.parallelismMax <= 0) throw new Error(`parallelismMax in ${JSON.stringify(g)}`);
    if (typeof g.parallelismCount !== "number" || g.parallelismCount < 0) throw new Error(`parallelismCount in ${JSON.stringify(g)}`);
  });
  await check("flowControl.get of an unknown key throws QstashError status 404", () =>
    expectStatus(client.flowControl.get(`ts-${runId}-never-used`), 404, "flowControl.get(unknown)"),
  );

  // Rate: at most 1 start per 60 s period; resetRate starts a new period at once.
  const rateKey = `ts-${runId}-rate`;
  const ratePath = `/ts/${runId}/fc-rate`;
  const rateDest = `${RECEIVER}${ratePath}`;
  const publishRated = async (i) => {
    const res = await withTimeout(client.publish({ url: rateDest, body: `rate ${i}`, flowControl: { key: rateKey, rate: 1, period: 60 } }), CALL_TIMEOUT_MS, "publish(flowControl rate)");
    if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
  };
  const rated = await check("flowControl {rate: 1, period: 60}: a message arrives; get shows rateMax 1, ratePeriod 60, rateCount 1", async () => {
    await publishRated(0);
    await waitForDelivery(ratePath);
    await pollFlowControl("rateCount 1", rateKey, (i) => i.rateMax === 1 && i.ratePeriod === 60 && i.rateCount === 1);
  });
  if (!rated) return;
  await check("flowControl.resetRate(key): get shows rateCount 0 and a new ratePeriodStart", async () => {
    const resetAt = nowS();
    await withTimeout(client.flowControl.resetRate(rateKey), CALL_TIMEOUT_MS, "flowControl.resetRate");
    const i = await pollFlowControl("rateCount 0", rateKey, (x) => x.rateCount === 0);
    if (i.ratePeriodStart < resetAt || i.ratePeriodStart > nowS() + 1) throw new Error(`ratePeriodStart ${i.ratePeriodStart}, reset at ${resetAt} (unix s)`);
  });
  const limited = await check("flowControl rate: of 2 more messages in the new period 1 arrives, the other waits (rateCount 1, waitListSize 1)", async () => {
    await publishRated(1);
    await publishRated(2);
    await waitForDeliveries(ratePath, 2);
    await expectNoMoreDeliveries(ratePath, 2);
    await pollFlowControl("rateCount 1, waitListSize 1", rateKey, (i) => i.rateCount === 1 && i.waitListSize === 1);
  });
  if (limited) {
    await check("flowControl.resetRate(key) lets the message waiting for the rate start (rateCount 1, waitListSize 0)", async () => {
      await withTimeout(client.flowControl.resetRate(rateKey), CALL_TIMEOUT_MS, "flowControl.resetRate");
      await waitForDeliveries(ratePath, 3);
      await pollFlowControl("rateCount 1, waitListSize 0", rateKey, (i) => i.rateCount === 1 && i.waitListSize === 0);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Messages: get, cancel, bulk cancel, cancel all
// ---------------------------------------------------------------------------------------
async function publishPending(label) {
  const path = `/ts/${runId}/pending-${label}`;
  const notBefore = Math.ceil((Date.now() + PENDING_DUE_MS) / 1000);
  const res = await withTimeout(client.publish({ url: `${RECEIVER}${path}`, body: `pending ${label}`, notBefore }), CALL_TIMEOUT_MS, "publish");
  if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
  cancelledPaths.push({ path, notBefore: notBefore * 1000 });
  // Wait until the message view has it, so that the cancel calls see it.
  await poll(`messages.get(${label})`, () => client.messages.get(res.messageId));
  return res.messageId;
}

async function messagesChecks() {
  const path = `/ts/${runId}/pending-get`;
  const dest = `${RECEIVER}${path}?q=1`;
  let id;
  let sentAt;
  await check("messages: publish with delay: 30 (PUT, retries: 2, header) returns messageId", async () => {
    sentAt = Date.now();
    const res = await withTimeout(
      client.publish({ url: dest, body: `pending body ${runId}`, method: "PUT", retries: 2, delay: 30, headers: { "X-Pending": "yes" } }),
      CALL_TIMEOUT_MS,
      "publish(delay: 30)",
    );
    id = res?.messageId;
    if (!id?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
  });
  if (id) {
    let m;
    await check("messages.get(id) returns url, method, body, maxRetries, notBefore, createdAt", async () => {
      m = await poll("messages.get", () => client.messages.get(id));
      expectEqual(m.messageId, id, "messageId");
      expectEqual(m.url, dest, "url");
      expectEqual(m.method, "PUT", "method");
      expectEqual(m.body, `pending body ${runId}`, "body");
      expectEqual(m.maxRetries, 2, "maxRetries");
      if (typeof m.createdAt !== "number" || Math.abs(m.createdAt - sentAt) > 5_000) throw new Error(`createdAt ${m.createdAt}, sent at ${sentAt} (ms)`);
      const delay = m.notBefore - m.createdAt;
      if (typeof m.notBefore !== "number" || delay < 29_000 || delay > 31_000) throw new Error(`notBefore ${m.notBefore} is ${delay} ms after createdAt, want ~30000`);
    });
    if (m) {
      await check("messages.get(id): header holds the forwarded header without its prefix", () => {
        const entry = Object.entries(m.header ?? {}).find(([k]) => k.toLowerCase() === "x-pending");
        if (!entry) throw new Error(`header ${JSON.stringify(m.header)}`);
        expectEqual(JSON.stringify(entry[1]), JSON.stringify(["yes"]), "X-Pending");
        if (Object.keys(m.header).some((k) => k.toLowerCase().startsWith("upstash-forward-"))) throw new Error(`header ${JSON.stringify(m.header)}`);
      });
    }
    await check("messages.cancel(id) returns {cancelled: 1}", async () => {
      const r = await withTimeout(client.messages.cancel(id), CALL_TIMEOUT_MS, "messages.cancel");
      expectEqual(JSON.stringify(r), JSON.stringify({ cancelled: 1 }), "result");
    });
    await check("messages.get(id) after cancel throws QstashError status 404", () => pollUntil404("messages.get(cancelled)", () => client.messages.get(id)));
    await check("messages.cancel(id) of a cancelled message throws QstashError status 404", () =>
      expectStatus(client.messages.cancel(id), 404, "messages.cancel(cancelled)"),
    );
  }

  // Bulk: cancel([ids]) and the deprecated deleteMany([ids]).
  let bulk;
  await check("messages.cancel([id, id]) returns {cancelled: 2}", async () => {
    bulk = [await publishPending("bulk-a"), await publishPending("bulk-b")];
    const r = await withTimeout(client.messages.cancel(bulk), CALL_TIMEOUT_MS, "messages.cancel([…])");
    expectEqual(r?.cancelled, 2, "cancelled");
  });
  if (bulk) {
    await check("messages.get of each bulk-cancelled id throws status 404", async () => {
      for (const m of bulk) await pollUntil404(`messages.get(${m})`, () => client.messages.get(m));
    });
  }
  await check("messages.deleteMany([id]) (deprecated) returns 1", async () => {
    const m = await publishPending("delete-many");
    const n = await withTimeout(client.messages.deleteMany([m]), CALL_TIMEOUT_MS, "messages.deleteMany");
    expectEqual(n, 1, "deleted");
    await pollUntil404("messages.get(deleted)", () => client.messages.get(m));
  });

  // All: nothing else of this suite is pending here (these checks run before the others).
  await check("messages.cancel({all: true}) returns a count >= 2 and the messages are gone", async () => {
    const ids = [await publishPending("all-a"), await publishPending("all-b")];
    const r = await withTimeout(client.messages.cancel({ all: true }), CALL_TIMEOUT_MS, "messages.cancel({all: true})");
    if (typeof r?.cancelled !== "number" || r.cancelled < 2) throw new Error(`result ${JSON.stringify(r)}, want cancelled >= 2`);
    for (const m of ids) await pollUntil404(`messages.get(${m})`, () => client.messages.get(m));
  });
}

async function cancelledNeverDelivered() {
  if (!cancelledPaths.length) return;
  await check("cancelled messages are not delivered (watched until 1.5 s past their notBefore)", async () => {
    const until = Math.max(...cancelledPaths.map((c) => c.notBefore)) + 1_500;
    if (until > Date.now()) await sleep(until - Date.now());
    const arrived = cancelledPaths.filter((c) => deliveriesTo(c.path).length > 0).map((c) => c.path);
    if (arrived.length) throw new Error(`delivered anyway: ${arrived.join(", ")}`);
  });
}

// ---------------------------------------------------------------------------------------
// URL groups: addEndpoints/get/list, fan-out (publish {urlGroup}, publishJSON {topic},
// queue.enqueueJSON {urlGroup}), logs by urlGroup, an unknown group, removeEndpoints, delete.
// ---------------------------------------------------------------------------------------
/** Polls urlGroups.get(name) until pred(group) holds; returns that group. */
function pollUrlGroup(what, name, pred) {
  let last;
  return poll(what, async () => {
    last = await client.urlGroups.get(name);
    return pred(last) ? last : undefined;
  }).catch((error) => {
    throw new Error(`${error.message}; last urlGroups.get: ${JSON.stringify(last)}`);
  });
}
/** "name|url" of each endpoint, sorted: endpoints compared regardless of order. */
function endpointKeys(endpoints) {
  return (endpoints ?? []).map((e) => `${e.name ?? ""}|${e.url}`).sort().join(", ");
}
/**
 * A fan-out answer: an array with one {messageId, url} per endpoint URL (in any order), with
 * distinct msg_ ids. Returns a Map url -> messageId.
 */
function expectFanOut(res, urls, what) {
  if (!Array.isArray(res)) throw new Error(`${what}: answer ${JSON.stringify(res)} is not an array`);
  expectEqual(res.length, urls.length, `${what}: entries in ${oneLine(JSON.stringify(res))}`);
  const byUrl = new Map();
  for (const r of res) {
    if (typeof r?.messageId !== "string" || !r.messageId.startsWith("msg_")) throw new Error(`${what}: entry ${JSON.stringify(r)}`);
    byUrl.set(r.url, r.messageId);
  }
  expectEqual([...byUrl.keys()].sort().join(", "), [...urls].sort().join(", "), `${what}: urls`);
  if (new Set(byUrl.values()).size !== urls.length) throw new Error(`${what}: message ids are not distinct: ${JSON.stringify(res)}`);
  return byUrl;
}
function pathOf(url) {
  return new URL(url).pathname;
}

async function urlGroupChecks(keys) {
  const name = `ts-${runId}-group`;
  const urlA = `${RECEIVER}/ts/${runId}/group-a`;
  const urlB = `${RECEIVER}/ts/${runId}/group-b?endpoint=b`;
  const urls = [urlA, urlB];
  const endpoints = [{ name: "first", url: urlA }, { url: urlB }];
  const before = Date.now();
  const added = await check("urlGroups.addEndpoints (one named, one not) then get() returns name, createdAt, updatedAt and both endpoints", async () => {
    await withTimeout(client.urlGroups.addEndpoints({ name, endpoints }), CALL_TIMEOUT_MS, "urlGroups.addEndpoints");
    const g = await pollUrlGroup("both endpoints", name, (x) => x.endpoints?.length === 2);
    expectEqual(g.name, name, "name");
    expectEqual(endpointKeys(g.endpoints), endpointKeys(endpoints), "endpoints (name|url)");
    if (typeof g.createdAt !== "number" || Math.abs(g.createdAt - before) > 5_000) throw new Error(`createdAt ${g.createdAt}, added at ${before} (ms)`);
    if (typeof g.updatedAt !== "number" || g.updatedAt < g.createdAt) throw new Error(`updatedAt ${g.updatedAt} before createdAt ${g.createdAt}`);
  });
  if (!added) return;
  await check("urlGroups.list() contains the group once, with both endpoints", async () => {
    const list = await withTimeout(client.urlGroups.list(), CALL_TIMEOUT_MS, "urlGroups.list");
    if (!Array.isArray(list)) throw new Error(`list() returned ${JSON.stringify(list)}`);
    const mine = list.filter((g) => g.name === name);
    expectEqual(mine.length, 1, `entries named ${name} in ${oneLine(JSON.stringify(list))}`);
    expectEqual(endpointKeys(mine[0].endpoints), endpointKeys(endpoints), "endpoints (name|url)");
  });

  // publish({urlGroup}): one message per endpoint, each signed for its own URL.
  const body = `fan-out ${runId}`;
  const allIds = []; // delivered fan-out messages
  const cancelledIds = []; // fan-out messages cancelled before their delivery
  let ids; // url -> messageId
  await check("publish({urlGroup}) answers an array of 2 {messageId, url}, one per endpoint", async () => {
    const res = await withTimeout(
      client.publish({ urlGroup: name, body, headers: { "Content-Type": "text/plain", "X-Group-Test": runId } }),
      CALL_TIMEOUT_MS,
      "publish(urlGroup)",
    );
    ids = expectFanOut(res, urls, "publish(urlGroup)");
    allIds.push(...ids.values());
  });
  if (ids) {
    for (const [label, url, other] of [["named endpoint", urlA, urlB], ["unnamed endpoint", urlB, urlA]]) {
      let d;
      await check(`publish({urlGroup}), ${label}: receives the body and header with its messageId and upstash-topic-name`, async () => {
        d = await waitForMessage(pathOf(url), ids.get(url));
        expectEqual(d.body.toString("utf8"), body, "body");
        expectEqual(d.url, url.slice(RECEIVER.length), "path+query");
        expectEqual(d.headers["x-group-test"], runId, "x-group-test");
        expectEqual(d.headers["upstash-topic-name"], name, "upstash-topic-name");
      });
      if (!d || !keys) continue;
      await check(`publish({urlGroup}), ${label}: Receiver.verify accepts the signature for its own url and rejects the other endpoint's`, async () => {
        const receiver = new Receiver({ currentSigningKey: keys.current, nextSigningKey: keys.next });
        const signature = d.headers["upstash-signature"] ?? "";
        const text = d.body.toString("utf8");
        expectEqual(await receiver.verify({ signature, body: text, url }), true, "verify(own url)");
        const error = await expectReject(receiver.verify({ signature, body: text, url: other }), "verify(the other endpoint's url)");
        if (!/invalid subject/.test(error?.message)) throw new Error(`rejected for another reason: ${error?.message}`);
      });
    }
  }

  // The deprecated `topic` form, with publishJSON.
  const jsonPayload = { fanOut: "json", runId };
  await check("publishJSON({topic}) (deprecated form) answers 2 results; both endpoints receive the JSON body with upstash-topic-name", async () => {
    const res = await withTimeout(client.publishJSON({ topic: name, body: jsonPayload }), CALL_TIMEOUT_MS, "publishJSON(topic)");
    const jsonIds = expectFanOut(res, urls, "publishJSON(topic)");
    allIds.push(...jsonIds.values());
    for (const url of urls) {
      const d = await waitForMessage(pathOf(url), jsonIds.get(url));
      expectEqual(d.body.toString("utf8"), JSON.stringify(jsonPayload), `body at ${url}`);
      expectEqual(d.headers["content-type"], "application/json", `content-type at ${url}`);
      expectEqual(d.headers["upstash-topic-name"], name, `upstash-topic-name at ${url}`);
    }
  });

  // Enqueueing to a group fans out too.
  await check("queue.enqueueJSON({urlGroup}) answers 2 results; both endpoints receive it with upstash-topic-name", async () => {
    const queue = client.queue({ queueName: `ts-${runId}-group-q` });
    const res = await withTimeout(queue.enqueueJSON({ urlGroup: name, body: { enqueued: runId } }), CALL_TIMEOUT_MS, "queue.enqueueJSON(urlGroup)");
    const queuedIds = expectFanOut(res, urls, "queue.enqueueJSON(urlGroup)");
    allIds.push(...queuedIds.values());
    for (const url of urls) {
      const d = await waitForMessage(pathOf(url), queuedIds.get(url));
      expectEqual(d.body.toString("utf8"), JSON.stringify({ enqueued: runId }), `body at ${url}`);
      expectEqual(d.headers["upstash-topic-name"], name, `upstash-topic-name at ${url}`);
    }
    await withTimeout(queue.delete(), CALL_TIMEOUT_MS, "queue.delete");
  });
  // A pending fan-out message: messages.get shows its group (and endpoint name); cancelled.
  await check("messages.get of a pending fan-out message has topicName / urlGroup and endpointName; messages.cancel([both]) cancels 2", async () => {
    const notBefore = Math.ceil((Date.now() + 30_000) / 1000);
    const res = await withTimeout(client.publish({ urlGroup: name, body: "pending fan-out", notBefore }), CALL_TIMEOUT_MS, "publish(urlGroup, notBefore)");
    const pending = expectFanOut(res, urls, "publish(urlGroup, notBefore)");
    cancelledIds.push(...pending.values());
    const a = await poll("messages.get(named endpoint's message)", () => client.messages.get(pending.get(urlA)));
    const b = await poll("messages.get(unnamed endpoint's message)", () => client.messages.get(pending.get(urlB)));
    expectEqual(a.url, urlA, "url (named)");
    expectEqual(a.topicName, name, "topicName (named)");
    expectEqual(a.urlGroup, name, "urlGroup (named)");
    expectEqual(a.endpointName, "first", "endpointName (named)");
    expectEqual(b.url, urlB, "url (unnamed)");
    expectEqual(b.topicName, name, "topicName (unnamed)");
    expectEqual(b.endpointName, undefined, "endpointName (unnamed)");
    const r = await withTimeout(client.messages.cancel([...pending.values()]), CALL_TIMEOUT_MS, "messages.cancel([…])");
    expectEqual(r?.cancelled, 2, "cancelled");
  });
  await check("URL group: each endpoint got exactly one request per fan-out message, nothing else", async () => {
    await expectNoMoreDeliveries(pathOf(urlA), allIds.length / 2);
    await expectNoMoreDeliveries(pathOf(urlB), allIds.length / 2, 0);
    const got = [...deliveriesTo(pathOf(urlA)), ...deliveriesTo(pathOf(urlB))].map((d) => d.headers["upstash-message-id"]);
    expectEqual([...got].sort().join(","), [...allIds].sort().join(","), "upstash-message-id of the requests");
  });

  if (ids) {
    await check("logs({filter: {urlGroup}}) returns only the group's messages, each with topicName / urlGroup", async () => {
      const logs = await poll("DELIVERED of both publish({urlGroup}) messages in the group's logs", async () => {
        const r = await client.logs({ filter: { urlGroup: name } });
        const delivered = new Set(r.logs.filter((l) => l.state === "DELIVERED").map((l) => l.messageId));
        return [...ids.values()].every((m) => delivered.has(m)) ? r.logs : undefined;
      });
      const known = [...allIds, ...cancelledIds];
      const others = logs.filter((l) => l.topicName !== name || l.urlGroup !== name || !known.includes(l.messageId));
      if (others.length) throw new Error(`entries of another group or message: ${oneLine(JSON.stringify(others[0]))}`);
    });
  }

  // A fan-out message that fails (retries: 0) lands in the DLQ with its group.
  await check("DLQ: a failed fan-out message is listed by dlq.listMessages({filter: {urlGroup}}) with topicName / urlGroup", async () => {
    const failing = `ts-${runId}-failing-group`;
    const failPath = `/ts/${runId}/group-fails`;
    planStatuses(failPath, [], 500);
    await withTimeout(client.urlGroups.addEndpoints({ name: failing, endpoints: [{ name: "failing", url: `${RECEIVER}${failPath}` }] }), CALL_TIMEOUT_MS, "urlGroups.addEndpoints");
    await pollUrlGroup("the failing group", failing, (g) => g.endpoints?.length === 1);
    const res = await withTimeout(client.publish({ urlGroup: failing, body: "fails", retries: 0 }), CALL_TIMEOUT_MS, "publish(urlGroup, retries: 0)");
    const [failedId] = expectFanOut(res, [`${RECEIVER}${failPath}`], "publish(failing group)").values();
    await waitForMessage(failPath, failedId);
    const entries = await poll("the group's DLQ entry", async () => {
      const r = await client.dlq.listMessages({ filter: { urlGroup: failing } });
      return r.messages.length ? r.messages : undefined;
    });
    expectEqual(entries.map((e) => e.messageId).join(","), failedId, "messageIds");
    expectEqual(entries[0].topicName, failing, "topicName");
    expectEqual(entries[0].urlGroup, failing, "urlGroup");
    expectEqual(entries[0].endpointName, "failing", "endpointName");
    expectEqual(entries[0].responseStatus, 500, "responseStatus");
    await withTimeout(client.dlq.delete(entries[0].dlqId), CALL_TIMEOUT_MS, "dlq.delete");
    await withTimeout(client.urlGroups.delete(failing), CALL_TIMEOUT_MS, "urlGroups.delete");
  });

  await check('urlGroups.removeEndpoints({endpoints: [{name: "first"}]}): get() shows only the other endpoint', async () => {
    await withTimeout(client.urlGroups.removeEndpoints({ name, endpoints: [{ name: "first" }] }), CALL_TIMEOUT_MS, "urlGroups.removeEndpoints");
    await pollUrlGroup("only the unnamed endpoint left", name, (g) => endpointKeys(g.endpoints) === endpointKeys([{ url: urlB }]));
  });
  await check("urlGroups.delete(name): get() then throws QstashError status 404 and list() lacks it", async () => {
    await withTimeout(client.urlGroups.delete(name), CALL_TIMEOUT_MS, "urlGroups.delete");
    await pollUntil404("urlGroups.get(deleted)", () => client.urlGroups.get(name));
    const list = await withTimeout(client.urlGroups.list(), CALL_TIMEOUT_MS, "urlGroups.list");
    if (list.some((g) => g.name === name)) throw new Error(`list() still has ${name}`);
  });
  await check("publish({urlGroup}) to the deleted group, and to one that never existed, throws QstashError status 404", async () => {
    await expectStatus(client.publish({ urlGroup: name, body: "x" }), 404, "publish(deleted group)");
    await expectStatus(client.publish({ urlGroup: `ts-${runId}-no-such-group`, body: "x" }), 404, "publish(unknown group)");
  });
  await check("urlGroups.removeEndpoints of the last endpoint (by url) deletes the group: get() throws status 404", async () => {
    const solo = `ts-${runId}-solo`;
    await withTimeout(client.urlGroups.addEndpoints({ name: solo, endpoints: [{ url: urlA }] }), CALL_TIMEOUT_MS, "urlGroups.addEndpoints");
    await pollUrlGroup("the solo group", solo, (g) => g.endpoints?.length === 1);
    await withTimeout(client.urlGroups.removeEndpoints({ name: solo, endpoints: [{ url: urlA }] }), CALL_TIMEOUT_MS, "urlGroups.removeEndpoints");
    await pollUntil404("urlGroups.get(emptied)", () => client.urlGroups.get(solo));
  });
}

// ---------------------------------------------------------------------------------------
// Batch: batch / batchJSON with a URL item, a URL-group item and a queue item; a refused item.
// ---------------------------------------------------------------------------------------
async function batchChecks() {
  const group = `ts-${runId}-batch-group`;
  const queueName = `ts-${runId}-batch-q`;
  const urlPath = `/ts/${runId}/batch-url`;
  const queuedPath = `/ts/${runId}/batch-queued`;
  const groupUrls = [`${RECEIVER}/ts/${runId}/batch-g1`, `${RECEIVER}/ts/${runId}/batch-g2`];
  const created = await check("batch: urlGroups.addEndpoints creates the batch's URL group with two endpoints", async () => {
    await withTimeout(client.urlGroups.addEndpoints({ name: group, endpoints: groupUrls.map((url) => ({ url })) }), CALL_TIMEOUT_MS, "urlGroups.addEndpoints");
    await pollUrlGroup("both endpoints", group, (g) => g.endpoints?.length === 2);
  });
  if (!created) return;
  for (const variant of ["batch", "batchJSON"]) {
    const json = variant === "batchJSON";
    const bodies = json
      ? [{ item: "url", runId }, { item: "group", runId }, { item: "queue", runId }]
      : [`${variant} url ${runId}`, `${variant} group ${runId}`, `${variant} queue ${runId}`];
    const wire = (b) => (json ? JSON.stringify(b) : b);
    const headers = json ? { "X-Batch": variant } : { "Content-Type": "text/plain", "X-Batch": variant };
    const items = [
      { url: `${RECEIVER}${urlPath}`, body: bodies[0], headers },
      { urlGroup: group, body: bodies[1], headers },
      { url: `${RECEIVER}${queuedPath}`, body: bodies[2], headers, queueName },
    ];
    let res;
    let groupIds;
    await check(`${variant}([url, urlGroup, queue item]) answers in request order: {messageId}, a nested array of 2, {messageId}`, async () => {
      res = await withTimeout(json ? client.batchJSON(items) : client.batch(items), CALL_TIMEOUT_MS, variant);
      if (!Array.isArray(res)) throw new Error(`answer ${JSON.stringify(res)} is not an array`);
      expectEqual(res.length, 3, `entries in ${oneLine(JSON.stringify(res))}`);
      if (!res[0]?.messageId?.startsWith("msg_")) throw new Error(`slot 1 ${JSON.stringify(res[0])}`);
      groupIds = expectFanOut(res[1], groupUrls, "slot 2");
      if (!res[2]?.messageId?.startsWith("msg_")) throw new Error(`slot 3 ${JSON.stringify(res[2])}`);
    });
    if (!groupIds) continue;
    await check(`${variant}: all four deliveries arrive with their bodies and header (group ones with upstash-topic-name)`, async () => {
      const d0 = await waitForMessage(urlPath, res[0].messageId);
      expectEqual(d0.body.toString("utf8"), wire(bodies[0]), "URL item body");
      expectEqual(d0.headers["x-batch"], variant, "URL item x-batch");
      expectEqual(d0.headers["content-type"], json ? "application/json" : "text/plain", "URL item content-type");
      for (const url of groupUrls) {
        const d = await waitForMessage(pathOf(url), groupIds.get(url));
        expectEqual(d.body.toString("utf8"), wire(bodies[1]), `group item body at ${url}`);
        expectEqual(d.headers["upstash-topic-name"], group, `upstash-topic-name at ${url}`);
        expectEqual(d.headers["x-batch"], variant, `x-batch at ${url}`);
      }
      const dq = await waitForMessage(queuedPath, res[2].messageId);
      expectEqual(dq.body.toString("utf8"), wire(bodies[2]), "queue item body");
    });
    await check(`${variant}: the queue item went through its queue (logs of it carry queueName)`, async () => {
      const logs = await poll("DELIVERED of the queue item in the logs", async () => {
        const r = await client.logs({ filter: { messageId: res[2].messageId } });
        return r.logs.some((l) => l.state === "DELIVERED") ? r.logs : undefined;
      });
      const without = logs.filter((l) => l.queueName !== queueName);
      if (without.length) throw new Error(`entries without queueName ${queueName}: ${oneLine(JSON.stringify(without[0]))}`);
    });
  }

  // A refused item answers {error} in its slot; the others still go through (the TS SDK
  // returns the answer array as is).
  const okPath = `/ts/${runId}/batch-ok`;
  const refusedPath = `/ts/${runId}/batch-refused`;
  await check("batch with a refused item (malformed flowControl period): its slot is {error}, the other two are published and delivered", async () => {
    const res = await withTimeout(
      client.batch([
        { url: `${RECEIVER}${okPath}`, body: "ok 1" },
        { url: `${RECEIVER}${refusedPath}`, body: "refused", flowControl: { key: `ts-${runId}-batch-bad`, parallelism: 1, period: "banana" } },
        { url: `${RECEIVER}${okPath}`, body: "ok 3" },
      ]),
      CALL_TIMEOUT_MS,
      "batch(refused item)",
    );
    if (!Array.isArray(res) || res.length !== 3) throw new Error(`answer ${oneLine(JSON.stringify(res))}`);
    if (typeof res[1]?.error !== "string" || !res[1].error || "messageId" in res[1]) throw new Error(`slot 2 ${JSON.stringify(res[1])}, want {error}`);
    for (const [slot, want] of [[0, "ok 1"], [2, "ok 3"]]) {
      if (!res[slot]?.messageId?.startsWith("msg_")) throw new Error(`slot ${slot + 1} ${JSON.stringify(res[slot])}`);
      const d = await waitForMessage(okPath, res[slot].messageId);
      expectEqual(d.body.toString("utf8"), want, `body of slot ${slot + 1}`);
    }
    await expectNoMoreDeliveries(refusedPath, 0);
  });

  // Clean-up (best effort; a failure here is not a finding of this section).
  await Promise.allSettled([client.urlGroups.delete(group), client.queue({ queueName }).delete()]);
}

// ---------------------------------------------------------------------------------------
// Schedules: create (cron, id, retries, method, header, body), get, list, pause/resume,
// upsert by id (CRON_TZ), invalid cron, delete; one firing (see startScheduleFiring).
// ---------------------------------------------------------------------------------------
/** Polls schedules.get(id) until pred(schedule) holds; returns that schedule. */
function pollSchedule(what, id, pred) {
  let last;
  return poll(what, async () => {
    last = await client.schedules.get(id);
    return pred(last) ? last : undefined;
  }).catch((error) => {
    throw new Error(`${error.message}; last schedules.get: ${JSON.stringify(last)}`);
  });
}
/** "HH:MM" of a ms timestamp in an IANA time zone. */
function clockIn(ms, timeZone) {
  return new Intl.DateTimeFormat("en-GB", { timeZone, hour: "2-digit", minute: "2-digit", hourCycle: "h23" }).format(new Date(ms));
}

async function scheduleChecks() {
  const id = `ts-${runId}-sched`;
  const dest = `${RECEIVER}/ts/${runId}/scheduled?s=1`;
  const body = `scheduled body ${runId}`;
  const request = {
    destination: dest,
    cron: "0 4 * * *",
    scheduleId: id,
    retries: 2,
    method: "PUT",
    headers: { "Content-Type": "text/plain", "X-Sched": `value ${runId}` },
    body,
  };
  const before = Date.now();
  const created = await check('schedules.create({cron: "0 4 * * *", scheduleId, retries: 2, PUT, header, body}) returns that scheduleId', async () => {
    const res = await withTimeout(client.schedules.create(request), CALL_TIMEOUT_MS, "schedules.create");
    expectEqual(res?.scheduleId, id, "scheduleId");
  });
  if (!created) return;
  let first;
  await check("schedules.get(id): cron, destination, method, retries, body, header, isPaused false, createdAt, nextScheduleTime (next 04:00 UTC)", async () => {
    const s = (first = await poll("schedules.get", () => client.schedules.get(id)));
    expectEqual(s.scheduleId, id, "scheduleId");
    expectEqual(s.cron, "0 4 * * *", "cron");
    expectEqual(s.destination, dest, "destination");
    expectEqual(s.method, "PUT", "method");
    expectEqual(s.retries, 2, "retries");
    expectEqual(s.body, body, "body");
    expectEqual(s.isPaused, false, "isPaused");
    const entry = Object.entries(s.header ?? {}).find(([k]) => k.toLowerCase() === "x-sched");
    expectEqual(JSON.stringify(entry?.[1]), JSON.stringify([`value ${runId}`]), `header X-Sched in ${JSON.stringify(s.header)}`);
    if (typeof s.createdAt !== "number" || Math.abs(s.createdAt - before) > 5_000) throw new Error(`createdAt ${s.createdAt}, created at ${before} (ms)`);
    const now = Date.now();
    const next = s.nextScheduleTime;
    if (typeof next !== "number" || next <= now || next > now + 24 * 3_600_000) throw new Error(`nextScheduleTime ${next} is not within the next 24 h (now ${now})`);
    expectEqual(clockIn(next, "UTC"), "04:00", "nextScheduleTime (UTC clock)");
  });
  await check("schedules.list() contains the schedule once, with its cron and destination", async () => {
    const list = await withTimeout(client.schedules.list(), CALL_TIMEOUT_MS, "schedules.list");
    if (!Array.isArray(list)) throw new Error(`list() returned ${JSON.stringify(list)}`);
    const mine = list.filter((s) => s.scheduleId === id);
    expectEqual(mine.length, 1, `entries with scheduleId ${id}`);
    expectEqual(mine[0].cron, "0 4 * * *", "cron");
    expectEqual(mine[0].destination, dest, "destination");
  });
  await check("schedules.pause({schedule}): get shows isPaused: true", async () => {
    await withTimeout(client.schedules.pause({ schedule: id }), CALL_TIMEOUT_MS, "schedules.pause");
    await pollSchedule("isPaused: true", id, (s) => s.isPaused === true);
  });
  await check("schedules.resume({schedule}): get shows isPaused: false", async () => {
    await withTimeout(client.schedules.resume({ schedule: id }), CALL_TIMEOUT_MS, "schedules.resume");
    await pollSchedule("isPaused: false", id, (s) => s.isPaused === false);
  });
  const tzCron = "CRON_TZ=America/New_York 30 12 * * *";
  await check(`schedules.create with the same scheduleId and cron "${tzCron}" updates it: new cron, same createdAt, nextScheduleTime at 12:30 New York time`, async () => {
    const res = await withTimeout(client.schedules.create({ ...request, cron: tzCron }), CALL_TIMEOUT_MS, "schedules.create(upsert)");
    expectEqual(res?.scheduleId, id, "scheduleId");
    const s = await pollSchedule("the new cron", id, (x) => x.cron === tzCron);
    if (first) expectEqual(s.createdAt, first.createdAt, "createdAt");
    expectEqual(s.retries, 2, "retries");
    if (typeof s.nextScheduleTime !== "number" || s.nextScheduleTime <= Date.now()) throw new Error(`nextScheduleTime ${s.nextScheduleTime} is not in the future`);
    expectEqual(clockIn(s.nextScheduleTime, "America/New_York"), "12:30", "nextScheduleTime (New York clock)");
    const list = await withTimeout(client.schedules.list(), CALL_TIMEOUT_MS, "schedules.list");
    expectEqual(list.filter((x) => x.scheduleId === id).length, 1, "entries with the id after the update");
  });
  await check('schedules.create with an invalid cron ("61 * * * *", "* * * *") throws QstashError status 400 and creates nothing', async () => {
    const bad = `${id}-bad`;
    for (const cron of ["61 * * * *", "* * * *"]) {
      await expectStatus(client.schedules.create({ destination: dest, cron, scheduleId: bad }), 400, `schedules.create(cron "${cron}")`);
    }
    await expectStatus(client.schedules.get(bad), 404, "schedules.get(not created)");
  });
  await check("schedules.delete(id): get() then throws QstashError status 404, list() lacks it, a second delete is a 404", async () => {
    await withTimeout(client.schedules.delete(id), CALL_TIMEOUT_MS, "schedules.delete");
    await pollUntil404("schedules.get(deleted)", () => client.schedules.get(id));
    const list = await withTimeout(client.schedules.list(), CALL_TIMEOUT_MS, "schedules.list");
    if (list.some((s) => s.scheduleId === id)) throw new Error(`list() still has ${id}`);
    await expectStatus(client.schedules.delete(id), 404, "schedules.delete(deleted)");
  });
}

/** Creates a `* * * * *` schedule; scheduleFiringChecks awaits its first delivery. */
async function startScheduleFiring() {
  const firing = { id: `ts-${runId}-every-minute`, path: `/ts/${runId}/schedule-fired`, body: `fired ${runId}` };
  firing.dest = `${RECEIVER}${firing.path}`;
  const created = await check('schedules.create({cron: "* * * * *"}) for the firing check returns its scheduleId', async () => {
    firing.createdAt = Date.now();
    const res = await withTimeout(
      client.schedules.create({ destination: firing.dest, cron: "* * * * *", scheduleId: firing.id, body: firing.body, headers: { "Content-Type": "text/plain" } }),
      CALL_TIMEOUT_MS,
      "schedules.create(* * * * *)",
    );
    expectEqual(res?.scheduleId, firing.id, "scheduleId");
  });
  return created ? firing : undefined;
}

async function scheduleFiringChecks(firing, keys) {
  if (!firing) return;
  let d;
  await check(`schedule "* * * * *": its first delivery arrives within ${SCHEDULE_FIRE_TIMEOUT_MS / 1000} s of its creation, with upstash-schedule-id = its id`, async () => {
    d = await waitForDelivery(firing.path, Math.max(0, firing.createdAt + SCHEDULE_FIRE_TIMEOUT_MS - Date.now()));
    expectEqual(d.headers["upstash-schedule-id"], firing.id, "upstash-schedule-id");
    expectEqual(d.body.toString("utf8"), firing.body, "body");
    if (!d.headers["upstash-message-id"]?.startsWith("msg_")) throw new Error(`upstash-message-id ${d.headers["upstash-message-id"]}`);
  });
  if (d) {
    const messageId = d.headers["upstash-message-id"];
    if (keys) {
      await check('schedule "* * * * *": Receiver.verify accepts the fired delivery\'s signature', async () => {
        const receiver = new Receiver({ currentSigningKey: keys.current, nextSigningKey: keys.next });
        expectEqual(await receiver.verify({ signature: d.headers["upstash-signature"] ?? "", body: d.body.toString("utf8"), url: firing.dest }), true, "verify()");
      });
    }
    await check('schedule "* * * * *": schedules.get shows lastScheduleTime and lastScheduleStates {<messageId>: "SUCCESS"}', async () => {
      const s = await pollSchedule("lastScheduleStates with the fired message SUCCESS", firing.id, (x) => x.lastScheduleStates?.[messageId] === "SUCCESS");
      if (typeof s.lastScheduleTime !== "number" || s.lastScheduleTime < firing.createdAt || s.lastScheduleTime > d.receivedAt) {
        throw new Error(`lastScheduleTime ${s.lastScheduleTime}, created at ${firing.createdAt}, delivered at ${d.receivedAt} (ms)`);
      }
      if (typeof s.nextScheduleTime !== "number" || s.nextScheduleTime <= s.lastScheduleTime) throw new Error(`nextScheduleTime ${s.nextScheduleTime} not after lastScheduleTime ${s.lastScheduleTime}`);
    });
    await check('logs({filter: {scheduleId}}) has the fired message, every entry with that scheduleId', async () => {
      const logs = await poll("DELIVERED of the fired message in the schedule's logs", async () => {
        const r = await client.logs({ filter: { scheduleId: firing.id } });
        return r.logs.some((l) => l.messageId === messageId && l.state === "DELIVERED") ? r.logs : undefined;
      });
      const others = logs.filter((l) => l.scheduleId !== firing.id);
      if (others.length) throw new Error(`entries of another schedule: ${oneLine(JSON.stringify(others[0]))}`);
    });
  }
  await check('schedules.delete of the "* * * * *" schedule: get() then throws status 404', async () => {
    await withTimeout(client.schedules.delete(firing.id), CALL_TIMEOUT_MS, "schedules.delete");
    await pollUntil404("schedules.get(deleted)", () => client.schedules.get(firing.id));
  });
}

// =======================================================================================
// Methods not covered above: deprecated aliases and the bulk forms of messages / DLQ.
// =======================================================================================
/** Case-insensitive header lookup in an API header map; the values as an array. */
function headerValues(map, name) {
  const entry = Object.entries(map ?? {}).find(([k]) => k.toLowerCase() === name.toLowerCase());
  if (!entry) return undefined;
  return Array.isArray(entry[1]) ? entry[1] : [entry[1]];
}
/** Publishes a message due PENDING_DUE_MS from now to a fresh path; returns {id, path, dest}. */
async function publishPendingTo(name, extra = {}) {
  const p = `/ts/${runId}/${name}`;
  const dest = `${RECEIVER}${p}`;
  const notBefore = Math.ceil((Date.now() + PENDING_DUE_MS) / 1000);
  const res = await withTimeout(client.publish({ url: dest, body: `${name} body`, notBefore, ...extra }), CALL_TIMEOUT_MS, `publish(${name})`);
  if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
  cancelledPaths.push({ path: p, notBefore: notBefore * 1000 });
  return { id: res.messageId, path: p, dest };
}

async function deprecatedMessagesChecks() {
  await check("messages.delete(id) (deprecated): the pending message is cancelled (get → 404)", async () => {
    const { id } = await publishPendingTo("msg-delete");
    await poll("messages.get", () => client.messages.get(id));
    const r = await withTimeout(client.messages.delete(id), CALL_TIMEOUT_MS, "messages.delete");
    expectEqual(r, undefined, "messages.delete() result");
    await pollUntil404("messages.get(deleted)", () => client.messages.get(id));
  });
  await check("messages.cancel({filter: {url}}) cancels exactly the pending messages to that url", async () => {
    const a = await publishPendingTo("msg-cancel-filter");
    const b = await withTimeout(client.publish({ url: a.dest, body: "second", notBefore: Math.ceil((Date.now() + PENDING_DUE_MS) / 1000) }), CALL_TIMEOUT_MS, "publish");
    const other = await publishPendingTo("msg-cancel-filter-other");
    for (const id of [a.id, b.messageId, other.id]) await poll("messages.get", () => client.messages.get(id));
    const r = await withTimeout(client.messages.cancel({ filter: { url: a.dest } }), CALL_TIMEOUT_MS, "messages.cancel(filter)");
    expectEqual(r?.cancelled, 2, `cancelled (${JSON.stringify(r)})`);
    for (const id of [a.id, b.messageId]) await pollUntil404("messages.get(cancelled)", () => client.messages.get(id));
    const m = await withTimeout(client.messages.get(other.id), CALL_TIMEOUT_MS, "messages.get(other)");
    expectEqual(m.messageId, other.id, "the message to another url is still pending");
  });
  await check("messages.deleteAll() (deprecated cancel-all) returns a count covering the pending messages, which then answer 404", async () => {
    const ids = [];
    // the message of the previous check that is still pending, and two more
    const left = cancelledPaths.find((c) => c.path.endsWith("/msg-cancel-filter-other"));
    for (const n of ["msg-delete-all-1", "msg-delete-all-2"]) ids.push((await publishPendingTo(n)).id);
    for (const id of ids) await poll("messages.get", () => client.messages.get(id));
    const n = await withTimeout(client.messages.deleteAll(), CALL_TIMEOUT_MS, "messages.deleteAll");
    if (typeof n !== "number" || n < ids.length + (left ? 1 : 0)) throw new Error(`deleteAll() returned ${JSON.stringify(n)}, want >= ${ids.length + (left ? 1 : 0)}`);
    for (const id of ids) await pollUntil404("messages.get(cancelled)", () => client.messages.get(id));
  });
}

async function dlqBulkChecks() {
  const path = `/ts/${runId}/dlq-bulk`;
  const dest = `${RECEIVER}${path}`;
  planStatuses(path, [500, 500, 500, 500], 200);
  let entries;
  const ok4 = await check("DLQ bulk: four failed messages (retries: 0) are listed", async () => {
    const ids = [];
    for (let i = 0; i < 4; i++) {
      const res = await withTimeout(client.publish({ url: dest, body: `bulk ${i}`, retries: 0 }), CALL_TIMEOUT_MS, "publish");
      ids.push(res.messageId);
    }
    await waitForDeliveries(path, 4);
    entries = await poll("four DLQ entries", async () => {
      const r = await client.dlq.listMessages({ filter: { url: dest } });
      return r.messages.length >= 4 ? r.messages : undefined;
    });
    expectEqual(entries.map((e) => e.messageId).sort().join(","), [...ids].sort().join(","), "messageIds");
  });
  if (!ok4) return;
  const byId = (e) => e.dlqId;
  const [a, b, c, d] = entries;
  const remaining = async (want) =>
    poll(`DLQ entries ${want.map((e) => e.messageId).join(",") || "none"} left`, async () => {
      const r = await client.dlq.listMessages({ filter: { url: dest } });
      return r.messages.map(byId).sort().join(",") === want.map(byId).sort().join(",") ? true : undefined;
    });
  await check("DLQ bulk: dlq.delete([dlqId]) returns {deleted: 1} and removes that entry", async () => {
    const r = await withTimeout(client.dlq.delete([a.dlqId]), CALL_TIMEOUT_MS, "dlq.delete([id])");
    expectEqual(r?.deleted, 1, `deleted (${JSON.stringify(r)})`);
    await remaining([b, c, d]);
  });
  await check("DLQ bulk: dlq.retry([dlqId]) returns one new messageId, delivered with the original body", async () => {
    const r = await withTimeout(client.dlq.retry([b.dlqId]), CALL_TIMEOUT_MS, "dlq.retry([id])");
    expectEqual(r?.responses?.length, 1, `responses (${JSON.stringify(r)})`);
    const delivery = await waitForMessage(path, r.responses[0].messageId);
    expectEqual(delivery.body.toString("utf8"), b.body, "body");
    await remaining([c, d]);
  });
  await check("DLQ bulk: dlq.retry({dlqIds}) retries that entry (new messageId, original body)", async () => {
    const r = await withTimeout(client.dlq.retry({ dlqIds: [c.dlqId] }), CALL_TIMEOUT_MS, "dlq.retry({dlqIds})");
    expectEqual(r?.responses?.length, 1, `responses (${JSON.stringify(r)})`);
    const delivery = await waitForMessage(path, r.responses[0].messageId);
    expectEqual(delivery.body.toString("utf8"), c.body, "body");
    await remaining([d]);
  });
  await check("DLQ bulk: dlq.delete({filter: {url}}) deletes the remaining entry ({deleted: 1})", async () => {
    const r = await withTimeout(client.dlq.delete({ filter: { url: dest } }), CALL_TIMEOUT_MS, "dlq.delete(filter)");
    expectEqual(r?.deleted, 1, `deleted (${JSON.stringify(r)})`);
    await remaining([]);
  });
  // retry({filter}) and delete({all: true}) on two fresh failures
  const path2 = `/ts/${runId}/dlq-bulk-filter`;
  const dest2 = `${RECEIVER}${path2}`;
  planStatuses(path2, [500, 500], 200);
  await check("DLQ bulk: dlq.retry({filter: {url}}) retries every matching entry; the retries arrive", async () => {
    const ids = [];
    for (let i = 0; i < 2; i++) ids.push((await withTimeout(client.publish({ url: dest2, body: `filter ${i}`, retries: 0 }), CALL_TIMEOUT_MS, "publish")).messageId);
    await waitForDeliveries(path2, 2);
    await poll("two DLQ entries", async () => {
      const r = await client.dlq.listMessages({ filter: { url: dest2 } });
      return r.messages.length >= 2 ? true : undefined;
    });
    const r = await withTimeout(client.dlq.retry({ filter: { url: dest2 } }), CALL_TIMEOUT_MS, "dlq.retry(filter)");
    expectEqual(r?.responses?.length, 2, `responses (${JSON.stringify(r)})`);
    for (const { messageId } of r.responses) await waitForMessage(path2, messageId);
    await poll("the entries to leave the DLQ", async () => {
      const l = await client.dlq.listMessages({ filter: { url: dest2 } });
      return l.messages.length === 0 ? true : undefined;
    });
  });
  const path3 = `/ts/${runId}/dlq-bulk-all`;
  planStatuses(path3, [], 500);
  await check("DLQ bulk: dlq.delete({all: true}) empties the DLQ (listMessages() then returns nothing)", async () => {
    await withTimeout(client.publish({ url: `${RECEIVER}${path3}`, body: "all", retries: 0 }), CALL_TIMEOUT_MS, "publish");
    await poll("a DLQ entry", async () => {
      const r = await client.dlq.listMessages({ filter: { url: `${RECEIVER}${path3}` } });
      return r.messages.length ? true : undefined;
    });
    const r = await withTimeout(client.dlq.delete({ all: true }), CALL_TIMEOUT_MS, "dlq.delete({all: true})");
    if (typeof r?.deleted !== "number" || r.deleted < 1) throw new Error(`result ${JSON.stringify(r)}`);
    await poll("an empty DLQ", async () => {
      const l = await client.dlq.listMessages();
      return l.messages.length === 0 ? true : undefined;
    });
  });
}

async function topicsAliasChecks() {
  const name = `ts-${runId}-topic-alias`;
  const url = `${RECEIVER}/ts/${runId}/topic-alias`;
  await check("topics (deprecated alias of urlGroups): addEndpoints, get, list, removeEndpoints, delete", async () => {
    await withTimeout(client.topics.addEndpoints({ name, endpoints: [{ name: "one", url }, { url: `${url}?two=2` }] }), CALL_TIMEOUT_MS, "topics.addEndpoints");
    const g = await poll("topics.get", () => client.topics.get(name));
    expectEqual(g.name, name, "name");
    expectEqual(endpointKeys(g.endpoints), endpointKeys([{ name: "one", url }, { url: `${url}?two=2` }]), "endpoints");
    const all = await withTimeout(client.topics.list(), CALL_TIMEOUT_MS, "topics.list");
    expectEqual(all.filter((x) => x.name === name).length, 1, "entries in topics.list()");
    await withTimeout(client.topics.removeEndpoints({ name, endpoints: [{ name: "one" }] }), CALL_TIMEOUT_MS, "topics.removeEndpoints");
    await poll("one endpoint left", async () => {
      const x = await client.topics.get(name);
      return x.endpoints.length === 1 && x.endpoints[0].url === `${url}?two=2` ? true : undefined;
    });
    await withTimeout(client.topics.delete(name), CALL_TIMEOUT_MS, "topics.delete");
    await pollUntil404("topics.get(deleted)", () => client.topics.get(name));
  });
}

// =======================================================================================
// Redaction (Upstash-Redact-Fields): every API view shows REDACTED:<sha256 hex> instead of
// the value; the delivery (and a DLQ retry) carries the real values.
// =======================================================================================
function redactedOf(value) {
  return `REDACTED:${createHash("sha256").update(Buffer.from(value, "utf8")).digest("hex")}`;
}
/** A header map of an API answer: name -> the value(s) as an array, for the given names. */
function expectHeader(map, name, want, what) {
  const got = headerValues(map, name);
  expectEqual(JSON.stringify(got), JSON.stringify([want]), `${what} header ${name} (all: ${JSON.stringify(map)})`);
}

async function redactChecks() {
  const secret = `s3cret ${runId}`;
  const plain = `plain ${runId}`;
  const notBefore = () => Math.ceil((Date.now() + 3_600_000) / 1000); // never due during the run
  const pending = [];
  /** Publishes a far-future message with the given redact/headers; returns messages.get of it. */
  async function publishAndGet(name, body, extra) {
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}/ts/${runId}/${name}`, body, notBefore: notBefore(), ...extra }),
      CALL_TIMEOUT_MS,
      `publish(${name})`,
    );
    pending.push(res.messageId);
    return poll("messages.get", () => client.messages.get(res.messageId));
  }

  await check('redact {body: true, header: ["X-Secret"]}: messages.get shows REDACTED:<sha256> for the body and that header only', async () => {
    const body = `redacted body ${runId}`;
    const m = await publishAndGet("redact-get", body, { redact: { body: true, header: ["X-Secret"] }, headers: { "X-Secret": secret, "X-Plain": plain } });
    expectEqual(m.body, redactedOf(body), "body");
    expectHeader(m.header, "X-Secret", redactedOf(secret), "messages.get");
    expectHeader(m.header, "X-Plain", plain, "messages.get");
  });
  await check("redact {header: true}: every header value is redacted, the body is not", async () => {
    const m = await publishAndGet("redact-all-headers", "kept body", { redact: { header: true }, headers: { "X-Secret": secret, "X-Plain": plain } });
    expectEqual(m.body, "kept body", "body");
    expectHeader(m.header, "X-Secret", redactedOf(secret), "messages.get");
    expectHeader(m.header, "X-Plain", redactedOf(plain), "messages.get");
  });
  await check('Upstash-Redact-Fields "body, headers[x-secret]" (plural form, spaces, lower-case name) redacts the body and X-Secret', async () => {
    const body = `plural ${runId}`;
    const m = await publishAndGet("redact-plural", body, { headers: { "Upstash-Redact-Fields": "body, headers[x-secret]", "X-Secret": secret, "X-Plain": plain } });
    expectEqual(m.body, redactedOf(body), "body");
    expectHeader(m.header, "X-Secret", redactedOf(secret), "messages.get");
    expectHeader(m.header, "X-Plain", plain, "messages.get");
  });
  await check('Upstash-Redact-Fields "headers" (all headers, plural) redacts every header value', async () => {
    const m = await publishAndGet("redact-headers", "kept", { headers: { "Upstash-Redact-Fields": "headers", "X-Plain": plain } });
    expectEqual(m.body, "kept", "body");
    expectHeader(m.header, "X-Plain", redactedOf(plain), "messages.get");
  });
  await check('Upstash-Redact-Fields "bodyy" (unknown token) throws QstashError status 400, while "body" is accepted', async () => {
    await publishAndGet("redact-token-ok", "x", { headers: { "Upstash-Redact-Fields": "body" } });
    await expectStatus(client.publish({ url: `${RECEIVER}/ts/${runId}/redact-bad`, body: "x", headers: { "Upstash-Redact-Fields": "bodyy" } }), 400, "publish(redact bodyy)");
  });
  if (pending.length) {
    await check("redact: the far-future redacted messages are cancelled", async () => {
      const r = await withTimeout(client.messages.cancel(pending), CALL_TIMEOUT_MS, "messages.cancel");
      expectEqual(r?.cancelled, pending.length, "cancelled");
    });
  }

  // Delivery unchanged; logs redacted.
  const path = `/ts/${runId}/redact-delivered`;
  const body = `delivered secret body ${runId}`;
  let id;
  await check("redact: the delivery carries the real body and header", async () => {
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}${path}`, body, redact: { body: true, header: ["X-Secret"] }, headers: { "X-Secret": secret } }),
      CALL_TIMEOUT_MS,
      "publish(redact)",
    );
    id = res.messageId;
    const d = await waitForMessage(path, id);
    expectEqual(d.body.toString("utf8"), body, "delivered body");
    expectEqual(d.headers["x-secret"], secret, "delivered X-Secret");
  });
  if (id) {
    await check("redact: logs entries carry body = base64(REDACTED:<sha256>) and the redacted header, never the values", async () => {
      const logs = await poll("DELIVERED in the logs", async () => {
        const r = await client.logs({ filter: { messageId: id } });
        return r.logs.some((l) => l.state === "DELIVERED") ? r.logs : undefined;
      });
      const want = Buffer.from(redactedOf(body), "utf8").toString("base64");
      const withBody = logs.filter((l) => l.body !== undefined && l.body !== null);
      if (!withBody.length) throw new Error(`no entry has a body: ${JSON.stringify(logs)}`);
      for (const l of withBody) expectEqual(l.body, want, `body of the ${l.state} entry`);
      const withHeader = logs.filter((l) => headerValues(l.header, "X-Secret"));
      if (!withHeader.length) throw new Error(`no entry has the X-Secret header: ${JSON.stringify(logs)}`);
      for (const l of withHeader) expectHeader(l.header, "X-Secret", redactedOf(secret), `${l.state} entry`);
      const text = JSON.stringify(logs);
      if (text.includes(secret) || text.includes(Buffer.from(body).toString("base64"))) throw new Error(`a log entry holds the real value: ${text}`);
    });
  }

  // DLQ: listed redacted; a retry delivers the original values.
  const dlqPath = `/ts/${runId}/redact-dlq`;
  const dlqBody = `dlq secret body ${runId}`;
  planStatuses(dlqPath, [500]);
  let entry;
  await check("redact: the DLQ entry (dlq.listMessages) shows the redacted body and header", async () => {
    const res = await withTimeout(
      client.publish({ url: `${RECEIVER}${dlqPath}`, body: dlqBody, retries: 0, redact: { body: true, header: ["X-Secret"] }, headers: { "X-Secret": secret } }),
      CALL_TIMEOUT_MS,
      "publish(redact, retries: 0)",
    );
    entry = await poll("the DLQ entry", async () => (await client.dlq.listMessages({ filter: { messageId: res.messageId } })).messages[0]);
    expectEqual(entry.body, redactedOf(dlqBody), "body");
    expectHeader(entry.header, "X-Secret", redactedOf(secret), "DLQ entry");
  });
  if (entry) {
    await check("redact: dlq.retry of the redacted entry delivers the original body and header", async () => {
      const r = await withTimeout(client.dlq.retry(entry.dlqId), CALL_TIMEOUT_MS, "dlq.retry");
      const d = await waitForMessage(dlqPath, r.responses[0].messageId);
      expectEqual(d.body.toString("utf8"), dlqBody, "delivered body");
      expectEqual(d.headers["x-secret"], secret, "delivered X-Secret");
    });
  }

  // Schedules: get and list redacted.
  const scheduleId = `ts-${runId}-redact`;
  await check("redact: schedules.create with redact → schedules.get and list show the redacted body and header", async () => {
    const sBody = `schedule secret ${runId}`;
    await withTimeout(
      client.schedules.create({ destination: `${RECEIVER}/ts/${runId}/redact-schedule`, cron: "0 4 * * *", scheduleId, body: sBody, headers: { "X-Secret": secret, "X-Plain": plain }, redact: { body: true, header: ["X-Secret"] } }),
      CALL_TIMEOUT_MS,
      "schedules.create(redact)",
    );
    const s = await poll("schedules.get", () => client.schedules.get(scheduleId));
    expectEqual(s.body, redactedOf(sBody), "get: body");
    expectHeader(s.header, "X-Secret", redactedOf(secret), "get");
    expectHeader(s.header, "X-Plain", plain, "get");
    const listed = (await withTimeout(client.schedules.list(), CALL_TIMEOUT_MS, "schedules.list")).find((x) => x.scheduleId === scheduleId);
    if (!listed) throw new Error("list() lacks the schedule");
    expectEqual(listed.body, redactedOf(sBody), "list: body");
    expectHeader(listed.header, "X-Secret", redactedOf(secret), "list");
  });
  try {
    await client.schedules.delete(scheduleId);
  } catch {
    // best effort
  }
}

// =======================================================================================
// api: {name: "llm"}: a local OpenAI-compatible stub answers POST /v1/chat/completions.
// =======================================================================================
/** Starts the stub on `port` (0: any); resolves {base, requests, waitFor(tag), close()}. */
async function startLlmStub(port) {
  const requests = [];
  let stubWaiters = [];
  const srv = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      let json;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      const tag = json?.messages?.at(-1)?.content ?? "";
      const completion = JSON.stringify({
        id: `chatcmpl-${tag.replace(/[^A-Za-z0-9-]/g, "")}`,
        object: "chat.completion",
        created: Math.floor(Date.now() / 1000),
        model: json?.model ?? "unknown",
        choices: [{ index: 0, message: { role: "assistant", content: `stub reply to ${tag}` }, finish_reason: "stop" }],
        usage: { prompt_tokens: 1, completion_tokens: 4, total_tokens: 5 },
      });
      const ok = req.method === "POST" && req.url.split("?")[0] === "/v1/chat/completions";
      const stream = ok && json?.stream === true;
      // stream: true -> an OpenAI-style SSE answer: two chunks whose deltas make up the reply.
      const chunk = (delta, finish) =>
        `data: ${JSON.stringify({ id: `chatcmpl-${tag.replace(/[^A-Za-z0-9-]/g, "")}`, object: "chat.completion.chunk", created: 0, model: json?.model ?? "unknown", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
      const sse = `${chunk({ role: "assistant", content: "stub reply " }, null)}${chunk({ content: `to ${tag}` }, "stop")}data: [DONE]\n\n`;
      const record = { method: req.method, url: req.url, headers: req.headers, body: text, json, tag, response: !ok ? "not found" : stream ? sse : completion };
      requests.push(record);
      res.writeHead(ok ? 200 : 404, { "content-type": !ok ? "text/plain" : stream ? "text/event-stream" : "application/json" });
      res.end(record.response);
      stubWaiters = stubWaiters.filter((w) => (w.tag === tag ? (w.resolve(record), false) : true));
    });
  });
  await new Promise((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(port, "127.0.0.1", resolve);
  });
  return {
    base: `http://127.0.0.1:${srv.address().port}`,
    requests,
    waitFor(tag, ms = DELIVERY_TIMEOUT_MS) {
      const found = requests.find((r) => r.tag === tag);
      if (found) return Promise.resolve(found);
      let w;
      return withTimeout(new Promise((resolve) => stubWaiters.push((w = { tag, resolve }))), ms, `LLM stub request ${tag}`).catch((e) => {
        stubWaiters = stubWaiters.filter((x) => x !== w);
        throw new Error(`${e.message} (stub requests: ${requests.map((r) => `${r.method} ${r.url} ${r.tag}`).join(", ") || "none"})`);
      });
    },
    close() {
      srv.close();
      srv.closeAllConnections?.();
    },
  };
}

async function llmChecks() {
  const stubPort = Number(process.env.SDK_LLM_STUB_PORT || 0);
  let stub;
  const started = await check(`LLM stub listens on 127.0.0.1:${stubPort || "<any port>"}`, async () => {
    stub = await startLlmStub(stubPort);
  });
  if (!started) return;
  try {
    /** Publishes with `api` and a callback; checks the stub request and the callback. */
    async function roundTrip(label, api, wantAuth) {
      const slug = label.replace(/[^A-Za-z0-9]+/g, "-").replace(/^-|-$/g, "");
      const tag = `ts-${runId}-${slug}`;
      const callbackPath = `/ts/${runId}/llm-callback-${slug}`;
      const body = { model: "stub-model", messages: [{ role: "user", content: tag }] };
      let res;
      let request;
      const sent = await check(`${label}: publishJSON({api}) reaches the stub's POST /v1/chat/completions with the body and Authorization ${wantAuth}`, async () => {
        res = await withTimeout(client.publishJSON({ api, body, callback: `${RECEIVER}${callbackPath}` }), CALL_TIMEOUT_MS, "publishJSON(api)");
        if (!res?.messageId?.startsWith("msg_")) throw new Error(`response ${JSON.stringify(res)}`);
        request = await stub.waitFor(tag);
        expectEqual(request.method, "POST", "method");
        expectEqual(request.url, "/v1/chat/completions", "path");
        expectEqual(JSON.stringify(request.json), JSON.stringify(body), "body");
        expectEqual(request.headers.authorization, wantAuth, "authorization");
        expectEqual(request.headers["content-type"], "application/json", "content-type");
      });
      if (!sent) return;
      await check(`${label}: the callback arrives with status 200 and body = base64 of the stub's completion`, async () => {
        const d = await waitForDelivery(callbackPath);
        const payload = JSON.parse(d.body.toString("utf8"));
        expectEqual(payload.status, 200, "status");
        expectEqual(payload.sourceMessageId, res.messageId, "sourceMessageId");
        expectEqual(Buffer.from(payload.body ?? "", "base64").toString("utf8"), request.response, "decoded body");
      });
    }
    await roundTrip("api llm custom()", { name: "llm", provider: custom({ baseUrl: stub.base, token: "custom-token" }) }, "Bearer custom-token");
    await roundTrip("api llm custom() (baseUrl ending /v1/chat/completions)", { name: "llm", provider: custom({ baseUrl: `${stub.base}/v1/chat/completions`, token: "custom-token-2" }) }, "Bearer custom-token-2");
    if (!stubPort) {
      notOk('api: {name: "llm"} (deprecated, publishes to api/llm)', "SDK_LLM_STUB_PORT is not set (scripts/sdk-tests.sh sets it and starts kstash with KSTASH_LLM_BASE_URL pointing at it)");
    } else {
      await roundTrip('api {name: "llm"} (deprecated: api/llm → KSTASH_LLM_BASE_URL)', { name: "llm" }, "Bearer stub-token");
      await roundTrip('api {name: "llm", provider: upstash()} (deprecated: api/llm)', { name: "llm", provider: upstash() }, "Bearer stub-token");
      await chatChecks(stub);
    }
  } finally {
    stub.close();
  }
}

// client.chat() (deprecated): POST /llm/v1/chat/completions, which kstash proxies to
// KSTASH_LLM_BASE_URL + /v1/chat/completions (the stub) with KSTASH_LLM_TOKEN, dropping the
// SDK-only fields provider / system / analytics. (A third-party provider makes the SDK call
// the provider directly, without kstash, so only upstash() is checked.)
async function chatChecks(stub) {
  const sdkOnly = (json) => ["provider", "system", "analytics"].filter((k) => json && k in json);
  // kstash re-serialises the JSON it forwards, so the messages are compared by value.
  const roles = (messages) => (messages ?? []).map((m) => `${m.role}: ${m.content}`).join(" | ");
  await check("chat().create({provider: upstash(), model, messages}) returns the stub's chat.completion; the stub gets the request with Bearer stub-token and without provider/system/analytics", async () => {
    const tag = `ts-${runId}-chat-create`;
    const messages = [{ role: "user", content: tag }];
    const res = await withTimeout(client.chat().create({ provider: upstash(), model: "stub-model", messages }), CALL_TIMEOUT_MS, "chat().create");
    const request = await stub.waitFor(tag);
    expectEqual(JSON.stringify(res), request.response, "answer");
    expectEqual(request.url, "/v1/chat/completions", "path");
    expectEqual(request.headers.authorization, "Bearer stub-token", "authorization at the stub");
    expectEqual(roles(request.json.messages), roles(messages), "messages (role: content)");
    expectEqual(request.json.model, "stub-model", "model");
    if (sdkOnly(request.json).length) throw new Error(`forwarded SDK-only fields ${sdkOnly(request.json).join(", ")}: ${request.body}`);
  });
  await check("chat().prompt({provider: upstash(), model, system, user}) sends [system, user] messages and returns the completion", async () => {
    const tag = `ts-${runId}-chat-prompt`;
    const res = await withTimeout(client.chat().prompt({ provider: upstash(), model: "stub-model", system: "be brief", user: tag }), CALL_TIMEOUT_MS, "chat().prompt");
    const request = await stub.waitFor(tag);
    expectEqual(JSON.stringify(res), request.response, "answer");
    expectEqual(roles(request.json.messages), roles([{ role: "system", content: "be brief" }, { role: "user", content: tag }]), "messages (role: content)");
    if (sdkOnly(request.json).length) throw new Error(`forwarded SDK-only fields ${sdkOnly(request.json).join(", ")}: ${request.body}`);
  });
  await check("chat().create({…, stream: true}) yields the stub's SSE chunks (deltas make up the reply)", async () => {
    const tag = `ts-${runId}-chat-stream`;
    const stream = await withTimeout(client.chat().create({ provider: upstash(), model: "stub-model", messages: [{ role: "user", content: tag }], stream: true }), CALL_TIMEOUT_MS, "chat().create(stream)");
    const chunks = [];
    await withTimeout((async () => {
      for await (const c of stream) chunks.push(c);
    })(), CALL_TIMEOUT_MS, "reading the stream");
    const request = await stub.waitFor(tag);
    expectEqual(request.json.stream, true, "stream at the stub");
    expectEqual(chunks.length, 2, `chunks (${JSON.stringify(chunks)})`);
    expectEqual(chunks.map((c) => c.choices[0].delta.content).join(""), `stub reply to ${tag}`, "reply");
    expectEqual(chunks.every((c) => c.object === "chat.completion.chunk"), true, "chunk objects");
  });
}

// openai / anthropic / resend publish to the internet: checked at the wire level only (a
// far-future notBefore, messages.get shows the provider URL and forwarded auth, cancel).
async function providerWireChecks() {
  const notBefore = Math.ceil((Date.now() + 3_600_000) / 1000);
  const cases = [
    ["openai({token, organization})", { name: "llm", provider: openai({ token: "sk-openai-test", organization: "org-test" }) }, "https://api.openai.com/v1/chat/completions", { Authorization: "Bearer sk-openai-test", "OpenAI-Organization": "org-test" }],
    ["anthropic({token})", { name: "llm", provider: anthropic({ token: "sk-ant-test" }) }, "https://api.anthropic.com/v1/messages", { "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01" }],
    ["openai({token}) with analytics: {name: \"helicone\"}", { name: "llm", provider: openai({ token: "sk-openai-test" }), analytics: { name: "helicone", token: "hk-test" } }, "https://gateway.helicone.ai/v1/chat/completions", { Authorization: "Bearer sk-openai-test", "Helicone-Auth": "Bearer hk-test", "Helicone-Target-Url": "https://api.openai.com" }],
    ["resend({token}) (api email)", { name: "email", provider: resend({ token: "re_test" }) }, "https://api.resend.com/emails", { Authorization: "Bearer re_test" }],
  ];
  for (const [label, api, url, headers] of cases) {
    await check(`${label}: publishJSON({api}) → messages.get shows ${url} and the forwarded ${Object.keys(headers).join(", ")}; cancelled`, async () => {
      const body = api.name === "email" ? { from: "a@example.com", to: ["b@example.com"], subject: "s", html: "<p>x</p>" } : { model: "m", messages: [{ role: "user", content: "hi" }] };
      const res = await withTimeout(client.publishJSON({ api, body, notBefore, callback: `${RECEIVER}/ts/${runId}/provider-callback` }), CALL_TIMEOUT_MS, "publishJSON(api)");
      try {
        const m = await poll("messages.get", () => client.messages.get(res.messageId));
        expectEqual(m.url, url, "url");
        expectEqual(m.method, "POST", "method");
        for (const [name, value] of Object.entries(headers)) expectHeader(m.header, name, value, "messages.get");
        expectEqual(JSON.stringify(JSON.parse(m.body)), JSON.stringify(body), "body");
      } finally {
        await withTimeout(client.messages.cancel(res.messageId), CALL_TIMEOUT_MS, "messages.cancel");
      }
    });
  }
}

// =======================================================================================
// Key rotation (POST /v2/keys/rotate; the TS SDK has no call for it). Runs LAST: the dev-mode
// check needs /v2/keys to still be the QStash dev keys.
// =======================================================================================
async function keysRequest(method, pathname) {
  const res = await withTimeout(fetch(`${BASE_URL}${pathname}`, { method, headers: { Authorization: `Bearer ${TOKEN}` } }), CALL_TIMEOUT_MS, `${method} ${pathname}`);
  const text = await res.text();
  expectEqual(res.status, 200, `${method} ${pathname} status (body ${text})`);
  return JSON.parse(text);
}

async function rotationChecks() {
  let before;
  const fetched = await check("rotation: GET /v2/keys before the rotation", async () => {
    before = await keysRequest("GET", "/v2/keys");
  });
  if (!fetched) return;
  const path = `/ts/${runId}/rotation`;
  const dest = `${RECEIVER}${path}`;
  const ids = [];
  const late = [];
  let rotated;
  let rotatedAt;
  let rotationError;
  const loaded = await check("rotation: 40 publishes over ~2 s with POST /v2/keys/rotate in the middle, then 5 more ≥ 1.5 s after it", async () => {
    const t0 = Date.now();
    let rotation;
    for (let i = 0; i < 40; i++) {
      const due = t0 + i * 50;
      if (due > Date.now()) await sleep(due - Date.now());
      if (i === 20) {
        rotatedAt = Date.now();
        rotation = keysRequest("POST", "/v2/keys/rotate").then((r) => (rotated = r), (e) => (rotationError = e));
      }
      const res = await withTimeout(client.publish({ url: dest, body: `rotation ${i}` }), CALL_TIMEOUT_MS, "publish");
      ids.push(res.messageId);
    }
    await rotation;
    if (rotationError) throw rotationError;
    const wait = rotatedAt + 1_500 - Date.now();
    if (wait > 0) await sleep(wait);
    for (let i = 0; i < 5; i++) {
      const res = await withTimeout(client.publish({ url: dest, body: `after rotation ${i}` }), CALL_TIMEOUT_MS, "publish");
      late.push(res.messageId);
    }
  });
  if (rotated) {
    await check("rotation: POST /v2/keys/rotate answers {current: the previous next, next: a fresh sig_ key}", () => {
      if (!rotated) throw new Error("no answer");
      expectEqual(rotated.current, before.next, "current");
      if (!/^sig_/.test(rotated.next ?? "") || rotated.next === before.next || rotated.next === before.current) throw new Error(`next ${JSON.stringify(rotated.next)} (before: ${JSON.stringify(before)})`);
    });
    await check("rotation: GET /v2/keys then returns the rotated keys", async () => {
      const now = await keysRequest("GET", "/v2/keys");
      expectEqual(JSON.stringify({ current: now.current, next: now.next }), JSON.stringify({ current: rotated?.current, next: rotated?.next }), "keys");
    });
  }
  if (!loaded) return;
  const received = new Map();
  await check("rotation: all 45 messages are delivered", async () => {
    for (const id of [...ids, ...late]) received.set(id, await waitForMessage(path, id));
  });
  await check("rotation: every delivery verifies with a Receiver built from the keys fetched before the rotation (0 rejected)", async () => {
    const receiver = new Receiver({ currentSigningKey: before.current, nextSigningKey: before.next });
    const rejected = [];
    for (const [id, d] of received) {
      try {
        await receiver.verify({ signature: d.headers["upstash-signature"] ?? "", body: d.body.toString("utf8"), url: dest });
      } catch (e) {
        rejected.push(`${id}: ${e.message}`);
      }
    }
    if (received.size !== ids.length + late.length) throw new Error(`only ${received.size} deliveries to verify`);
    if (rejected.length) throw new Error(`${rejected.length} rejected: ${rejected.slice(0, 3).join("; ")}`);
  });
  if (rotated) {
    await check("rotation: deliveries published ≥ 1.5 s after the rotation are signed with the new current key", async () => {
      const receiver = new Receiver({ currentSigningKey: rotated.current, nextSigningKey: "sig_unrelatedunrelatedunrelated1" });
      for (const id of late) {
        const d = received.get(id) ?? (await waitForMessage(path, id));
        await receiver.verify({ signature: d.headers["upstash-signature"] ?? "", body: d.body.toString("utf8"), url: dest });
      }
    });
  }
}
