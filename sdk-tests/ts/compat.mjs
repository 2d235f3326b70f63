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
// Internal: `node compat.mjs --dev-mode-child <url>` is the child process of the
// dev-mode check (a fresh process, so the SDK sees QSTASH_DEV from its environment).

import http from "node:http";
import os from "node:os";
import fs from "node:fs";
import path from "node:path";
import { spawn } from "node:child_process";
import { Client, Receiver, QstashError } from "@upstash/qstash";

const DEV_TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0=";
const DELIVERY_TIMEOUT_MS = 15_000;
const CALL_TIMEOUT_MS = 15_000;
const CHILD_TIMEOUT_MS = 30_000;

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
// Recording receiver: every request is stored; waiters are woken by pathname.
// ---------------------------------------------------------------------------------------
const deliveries = []; // {method, url, pathname, headers, rawHeaders, body: Buffer}
const waiters = new Map(); // pathname -> [resolve]
const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const pathname = req.url.split("?")[0];
    const record = {
      method: req.method,
      url: req.url,
      pathname,
      headers: req.headers,
      rawHeaders: req.rawHeaders,
      body: Buffer.concat(chunks),
      receivedAt: Date.now(),
    };
    deliveries.push(record);
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("received");
    for (const resolve of waiters.get(pathname) ?? []) resolve(record);
    waiters.delete(pathname);
  });
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const RECEIVER = `http://127.0.0.1:${server.address().port}`;

function waitForDelivery(pathname, ms = DELIVERY_TIMEOUT_MS) {
  const seen = deliveries.find((d) => d.pathname === pathname);
  if (seen) return Promise.resolve(seen);
  return withTimeout(
    new Promise((resolve) => {
      waiters.set(pathname, [...(waiters.get(pathname) ?? []), resolve]);
    }),
    ms,
    `delivery to ${pathname}`,
  ).catch((error) => {
    const others = deliveries.map((d) => `${d.method} ${d.url}`).join(", ") || "none";
    throw new Error(`${error.message} (deliveries seen so far: ${others})`);
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

  // 4. Unsupported feature -> a client error (400), not a 5xx and not a hang.
  await check("publish with flowControl (not supported yet) throws QstashError status 400", async () => {
    const error = await expectReject(
      withTimeout(
        client.publish({ url: `${RECEIVER}/ts/${runId}/fc`, body: "x", flowControl: { key: "k", parallelism: 1 } }),
        CALL_TIMEOUT_MS,
        "publish(flowControl)",
      ),
      "publish(flowControl)",
    );
    if (!(error instanceof QstashError)) throw new Error(`got ${error?.name}: ${error?.message}, want QstashError`);
    expectEqual(error.status, 400, `status (message ${error.message})`);
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

  // 6. Dev-mode hook: QSTASH_DEV=true + QSTASH_DEV_PORT, no baseUrl/token.
  await devModeChecks();
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
