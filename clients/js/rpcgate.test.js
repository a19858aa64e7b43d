// Tests for rpcgate.js with fake transports and a fake clock: `node --test clients/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, RpcError, ErrorCode, backoffDelay, randomSessionKey } from "./rpcgate.js";

const tick = () => new Promise((r) => setImmediate(r));
async function settle(n = 5) { for (let i = 0; i < n; i++) await tick(); }

/** A manual clock: timers run only when the test advances time. */
function fakeClock() {
  let now = 0, seq = 0;
  const timers = new Map();
  const clock = {
    now: () => now,
    setTimeout: (fn, ms) => { const id = ++seq; timers.set(id, { at: now + (ms ?? 0), fn, ms }); return id; },
    clearTimeout: (id) => { timers.delete(id); },
    timers,
    async advance(ms) {
      const target = now + ms;
      for (;;) {
        let next = null;
        for (const [id, t] of timers) if (t.at <= target && (!next || t.at < next[1].at || (t.at === next[1].at && id < next[0]))) next = [id, t];
        if (!next) break;
        timers.delete(next[0]);
        now = next[1].at;
        next[1].fn();
        await settle();
      }
      now = target;
      await settle();
    },
  };
  return clock;
}

/** A fake WebSocket class; `FakeWS.instances` holds every socket made. */
function fakeWebSocket({ autoOpen = true, refuse = false } = {}) {
  class FakeWS {
    static instances = [];
    static autoOpen = autoOpen;
    static refuse = refuse;
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedByClient = false;
      FakeWS.instances.push(this);
      queueMicrotask(() => {
        if (FakeWS.refuse) { this.onerror?.({}); this.readyState = 3; this.onclose?.({ code: 1006 }); }
        else if (FakeWS.autoOpen) this.open();
      });
    }
    open() { this.readyState = 1; this.onopen?.({}); }
    send(s) { if (this.readyState !== 1) throw new Error("not open"); this.sent.push(JSON.parse(s)); }
    close() { this.closedByClient = true; this.readyState = 3; }
    // test side
    receive(obj) { this.onmessage?.({ data: JSON.stringify(obj) }); }
    drop() { this.readyState = 3; this.onclose?.({ code: 1006 }); }
    static get last() { return FakeWS.instances[FakeWS.instances.length - 1]; }
  }
  return FakeWS;
}

/** A fake fetch: `respond(req)` returns {status, body, headers} or a promise of it; throws = network error. */
function fakeFetch(respond) {
  const requests = [];
  const fetch = async (url, init = {}) => {
    const req = { url, method: init.method ?? "GET", headers: init.headers ?? {}, body: init.body ? JSON.parse(init.body) : undefined };
    requests.push(req);
    const r = await respond(req);
    const body = r.body === undefined || r.status === 204 || r.status === 202 ? null : typeof r.body === "string" ? r.body : JSON.stringify(r.body);
    return new Response(body, { status: r.status ?? 200, headers: r.headers ?? {} });
  };
  fetch.requests = requests;
  return fetch;
}

/** Echo server for fake fetch: answers every call with {echo: method, params}. */
const echoHttp = (req) => {
  if (req.method !== "POST") return new Promise(() => {});
  const answer = (m) => ({ jsonrpc: "2.0", id: m.id, result: { echo: m.method, params: m.params } });
  if (Array.isArray(req.body)) return { status: 200, body: req.body.map(answer) };
  if (req.body.id === undefined || !req.body.method) return { status: req.body.method ? 204 : 202 };
  return { status: 200, body: answer(req.body) };
};

function fakeEventSource({ silent = false } = {}) {
  class FakeES {
    static instances = [];
    constructor(url, opts) {
      this.url = url; this.opts = opts; this.listeners = {}; this.closed = false; FakeES.instances.push(this);
      // Like rpcgate, which opens every stream with this event; a buffering proxy is silent.
      if (!silent) queueMicrotask(() => this.emitEvent("rpcgate.open", { session: "s" }));
    }
    addEventListener(type, fn) { (this.listeners[type] ??= []).push(fn); }
    close() { this.closed = true; }
    emit(obj) { this.onmessage?.({ data: JSON.stringify(obj) }); }
    emitEvent(type, obj) { for (const fn of this.listeners[type] ?? []) fn({ data: JSON.stringify(obj) }); }
  }
  return FakeES;
}

function wsOptions(extra = {}) {
  const clock = fakeClock();
  const WS = fakeWebSocket();
  return { clock, WS, opts: { WebSocket: WS, fetch: null, EventSource: null, now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, random: () => 0.5, session: "k1", ...extra } };
}

test("ids increment and out-of-order replies are matched by id", async () => {
  const { WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test:8080/", opts);
  assert.equal(rpc.transport, "websocket");
  const a = rpc.call("echo", ["a"]);
  const b = rpc.call("echo", ["b"]);
  const c = rpc.call("sum", [1, 2]);
  const sock = WS.last;
  assert.deepEqual(sock.sent.map((m) => m.id), [1, 2, 3]);
  assert.deepEqual(sock.sent[0], { jsonrpc: "2.0", id: 1, method: "echo", params: ["a"] });
  sock.receive({ jsonrpc: "2.0", id: 3, result: 3 });
  sock.receive({ jsonrpc: "2.0", id: 1, result: "a" });
  sock.receive({ jsonrpc: "2.0", id: 2, error: { code: -32000, message: "nope", data: { source: "rpcgate", kind: "x" } } });
  assert.equal(await c, 3);
  assert.equal(await a, "a");
  const err = await b.catch((e) => e);
  assert.ok(err instanceof RpcError);
  assert.equal(err.code, -32000);
  assert.equal(err.message, "nope");
  assert.equal(err.fromGateway, true);
  rpc.close();
});

test("ws url carries the session; http url and events url derived from the base", async () => {
  const { WS, opts } = wsOptions({ session: "abc" });
  const rpc = await connect("https://gw.test/rpc", opts);
  assert.equal(WS.last.url, "wss://gw.test/rpc?session=abc");
  assert.equal(rpc.httpUrl, "https://gw.test/rpc");
  assert.equal(rpc.eventsUrl, "https://gw.test/events?session=abc");
  assert.equal(rpc.session, "abc");
  rpc.close();
});

test("batch resolves in call order with RpcError items, whatever the reply order", async () => {
  const { WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  const p = rpc.batch([["sum", [1, 2]], ["whoami"], ["fail"]]);
  const sent = WS.last.sent[0];
  assert.ok(Array.isArray(sent));
  assert.deepEqual(sent.map((m) => m.method), ["sum", "whoami", "fail"]);
  assert.equal("params" in sent[1], false);
  WS.last.receive([
    { jsonrpc: "2.0", id: sent[2].id, error: { code: -32601, message: "Method not found" } },
    { jsonrpc: "2.0", id: sent[1].id, result: "me" },
    { jsonrpc: "2.0", id: sent[0].id, result: 3 },
  ]);
  const out = await p;
  assert.equal(out[0], 3);
  assert.equal(out[1], "me");
  assert.ok(out[2] instanceof RpcError);
  assert.equal(out[2].code, -32601);
  assert.deepEqual(await rpc.batch([]), []);
  rpc.close();
});

test("batch over HTTP keeps order; a single error for the whole batch rejects it", async () => {
  let mode = "ok";
  const fetch = fakeFetch((req) => {
    if (req.method !== "POST") return new Promise(() => {});
    if (mode === "503") return { status: 503, headers: { "Retry-After": "2" }, body: { jsonrpc: "2.0", id: null, error: { code: -32090, message: "overloaded", data: { source: "rpcgate" } } } };
    return { status: 200, body: req.body.slice().reverse().map((m) => ({ jsonrpc: "2.0", id: m.id, result: m.method })) };
  });
  const rpc = await connect("http://gw.test/", { transports: ["http"], fetch, EventSource: fakeEventSource(), session: "s" });
  assert.equal(rpc.transport, "http");
  assert.deepEqual(await rpc.batch([["a"], ["b"], ["c"]]), ["a", "b", "c"]);
  mode = "503";
  const err = await rpc.batch([["a"], ["b"]]).then(() => null, (e) => e);
  assert.ok(err instanceof RpcError);
  assert.equal(err.code, -32090);
  assert.equal(err.status, 503);
  assert.equal(err.retryAfter, 2);
  assert.equal(err.fromGateway, true);
  rpc.close();
});

test("notifications and gaps are emitted as events (WebSocket)", async () => {
  const { WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  const notes = [], gaps = [];
  rpc.on("notification", (m) => notes.push(m));
  const off = rpc.on("gap", (g) => gaps.push(g));
  WS.last.receive({ jsonrpc: "2.0", method: "ticks", params: { subscription: "s1", result: 1 } });
  WS.last.receive({ jsonrpc: "2.0", method: "rpcgate.gap", params: { reason: "buffer_overflow", missed: 4 } });
  off();
  WS.last.receive({ jsonrpc: "2.0", method: "rpcgate.gap", params: { reason: "memory", missed: null } });
  assert.deepEqual(notes, [{ jsonrpc: "2.0", method: "ticks", params: { subscription: "s1", result: 1 } }]);
  assert.deepEqual(gaps, [{ reason: "buffer_overflow", missed: 4 }]);
  rpc.notify("update", [1]);
  assert.deepEqual(WS.last.sent.at(-1), { jsonrpc: "2.0", method: "update", params: [1] });
  rpc.close();
});

test("server→client requests are answered on the socket; no handler gives -32601; a throw gives an error", async () => {
  const { WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  rpc.handle("confirm", async (params) => `yes to ${params[0]}`);
  rpc.handle("explode", () => { throw Object.assign(new Error("boom"), { code: 42 }); });
  rpc.handle("crash", async () => { throw new Error("bad"); });
  WS.last.receive({ jsonrpc: "2.0", id: "ask-1", method: "confirm", params: ["pay"] });
  WS.last.receive({ jsonrpc: "2.0", id: 1, method: "unknown_thing" }); // same id as one of ours would be: still a request
  WS.last.receive({ jsonrpc: "2.0", id: "e", method: "explode" });
  WS.last.receive({ jsonrpc: "2.0", id: "c", method: "crash" });
  await settle();
  const byId = Object.fromEntries(WS.last.sent.map((m) => [m.id, m]));
  assert.deepEqual(byId["ask-1"], { jsonrpc: "2.0", id: "ask-1", result: "yes to pay" });
  assert.equal(byId[1].error.code, -32601);
  assert.equal("result" in byId[1], false);
  assert.deepEqual(byId.e.error, { code: 42, message: "boom" });
  assert.deepEqual(byId.c.error, { code: -32603, message: "bad" });
  rpc.close();
});

test("over HTTP, pushed messages come by EventSource and requests are answered by POST", async () => {
  const fetch = fakeFetch((req) => (req.body && req.body.result !== undefined ? { status: 202 } : echoHttp(req)));
  const ES = fakeEventSource();
  const rpc = await connect("http://gw.test:9/", { transports: ["http"], fetch, EventSource: ES, session: "sess" });
  const es = ES.instances[0];
  assert.equal(es.url, "http://gw.test:9/events?session=sess&after=delivered");
  const notes = [], gaps = [];
  rpc.on("notification", (m) => notes.push(m));
  rpc.on("gap", (g) => gaps.push(g));
  rpc.handle("confirm", (p) => p.q === "ok?");
  es.emit({ jsonrpc: "2.0", method: "tick", params: [1] });
  es.emitEvent("rpcgate.gap", { reason: "buffer_overflow", missed: 2 });
  es.emit({ jsonrpc: "2.0", id: "ask-7", method: "confirm", params: { q: "ok?" } });
  await settle();
  assert.deepEqual(notes, [{ jsonrpc: "2.0", method: "tick", params: [1] }]);
  assert.deepEqual(gaps, [{ reason: "buffer_overflow", missed: 2 }]);
  const post = fetch.requests.find((r) => r.body?.id === "ask-7");
  assert.deepEqual(post.body, { jsonrpc: "2.0", id: "ask-7", result: true });
  assert.equal(post.headers["rpcgate-session"], "sess");
  assert.equal(post.headers["Content-Type"], "application/json");
  assert.deepEqual(await rpc.call("echo", ["hi"]), { echo: "echo", params: ["hi"] });
  rpc.close();
  assert.equal(es.closed, true);
});

test("a call without a reply rejects with code timeout (default and per call)", async () => {
  const { clock, WS, opts } = wsOptions({ timeout: 1000 });
  const rpc = await connect("http://gw.test/", opts);
  const slow = rpc.call("slow", [], { timeout: 50 });
  const dflt = rpc.call("slow");
  let slowErr, dfltErr;
  slow.catch((e) => (slowErr = e));
  dflt.catch((e) => (dfltErr = e));
  await clock.advance(49);
  assert.equal(slowErr, undefined);
  await clock.advance(1);
  assert.ok(slowErr instanceof RpcError);
  assert.equal(slowErr.code, ErrorCode.TIMEOUT);
  assert.equal(slowErr.code, "timeout");
  assert.equal(dfltErr, undefined);
  await clock.advance(950);
  assert.equal(dfltErr.code, "timeout");
  const errors = [];
  rpc.on("error", (e) => errors.push(e));
  WS.last.receive({ jsonrpc: "2.0", id: WS.last.sent[0].id, result: "late" });
  assert.deepEqual(errors, [], "a late reply to a timed-out call is dropped silently");
  rpc.close();
});

test("WebSocket refused → falls back to HTTP, emits transport, same session key on both", async () => {
  const clock = fakeClock();
  const WS = fakeWebSocket({ refuse: true });
  const fetch = fakeFetch(echoHttp);
  const ES = fakeEventSource();
  const events = [];
  const rpc = await connect("http://gw.test/", {
    WebSocket: WS, fetch, EventSource: ES, crypto: { getRandomValues: (a) => a.fill(0xab) },
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
    on: { transport: (name, info) => events.push([name, info.reason]) },
  });
  const key = "ab".repeat(16);
  assert.equal(rpc.session, key);
  assert.equal(WS.instances[0].url, `ws://gw.test/?session=${key}`);
  assert.equal(rpc.transport, "http");
  assert.deepEqual(events, [["http", "websocket_failed"]]);
  // From what the socket had not delivered: nothing comes twice after a fallback.
  assert.equal(ES.instances[0].url, `http://gw.test/events?session=${key}&after=delivered`);
  await rpc.call("echo", [1]);
  assert.equal(fetch.requests[0].headers["rpcgate-session"], key);
  rpc.close();
});

test("a WebSocket that keeps closing (3 within 30 s) falls back to HTTP; queued calls go over HTTP", async () => {
  const { clock, WS, opts } = wsOptions({ random: () => 0 });
  const fetch = fakeFetch(echoHttp);
  const ES = fakeEventSource();
  const rpc = await connect("http://gw.test/", { ...opts, fetch, EventSource: ES });
  const transports = [];
  rpc.on("transport", (n, info) => transports.push([n, info.from, info.reason]));
  WS.last.drop(); // 1
  await clock.advance(0);
  assert.equal(WS.instances.length, 2);
  WS.last.drop(); // 2
  await clock.advance(0);
  assert.equal(WS.instances.length, 3);
  const p = rpc.call("echo", ["late"], { retry: true });
  WS.last.sent.length = 0;
  WS.last.drop(); // 3: fall back
  await settle();
  assert.equal(rpc.transport, "http");
  assert.deepEqual(transports, [["http", "websocket", "websocket_closing"]]);
  assert.deepEqual(await p, { echo: "echo", params: ["late"] });
  assert.equal(ES.instances.length, 1);
  rpc.close();
});

test("closes spread over more than the window keep reconnecting the WebSocket", async () => {
  const { clock, WS, opts } = wsOptions({ random: () => 0, fetch: fakeFetch(echoHttp), EventSource: fakeEventSource() });
  const rpc = await connect("http://gw.test/", opts);
  for (let i = 0; i < 5; i++) { WS.last.drop(); await clock.advance(20000); }
  assert.equal(rpc.transport, "websocket");
  assert.equal(WS.instances.length, 6);
  rpc.close();
});

test("pending calls reject with disconnected when the socket drops; retry:true ones are resent after reconnect", async () => {
  const { clock, WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  const plain = rpc.call("transfer", [1]);
  const safe = rpc.call("balance", [], { retry: true });
  let plainErr;
  plain.catch((e) => (plainErr = e));
  const first = WS.last;
  first.drop();
  await settle();
  assert.ok(plainErr instanceof RpcError);
  assert.equal(plainErr.code, ErrorCode.DISCONNECTED);
  // a call made while reconnecting waits in the queue
  const queued = rpc.call("later");
  await clock.advance(10000);
  const second = WS.last;
  assert.notEqual(second, first);
  assert.equal(second.url, first.url);
  const sent = second.sent.map((m) => m.method);
  assert.deepEqual(sent, ["balance", "later"]);
  const balanceId = second.sent[0].id;
  assert.equal(balanceId, 2, "the resent call keeps its id");
  second.receive({ jsonrpc: "2.0", id: balanceId, result: 100 });
  second.receive({ jsonrpc: "2.0", id: second.sent[1].id, result: "ok" });
  assert.equal(await safe, 100);
  assert.equal(await queued, "ok");
  rpc.close();
});

test("backoffDelay: exponential ceiling, capped, full jitter", () => {
  const o = (r) => ({ base: 100, cap: 1000, random: () => r });
  assert.equal(backoffDelay(0, o(0)), 0);
  assert.equal(backoffDelay(0, o(0.5)), 50);
  assert.equal(backoffDelay(1, o(0.5)), 100);
  assert.equal(backoffDelay(2, o(0.5)), 200);
  assert.equal(backoffDelay(10, o(0.5)), 500);
  assert.equal(backoffDelay(100, o(0.999999)), 999);
  let seed = 7;
  const rnd = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
  const seen = new Set();
  for (let a = 0; a < 50; a++) {
    const d = backoffDelay(a, { base: 100, cap: 1000, random: rnd });
    assert.ok(d >= 0 && d < Math.min(1000, 100 * 2 ** a), `attempt ${a}: ${d}`);
    seen.add(d);
  }
  assert.ok(seen.size > 30, "jittered, not constant");
});

test("reconnect delays follow the injected random source and stay under the cap", async () => {
  const randoms = [0.9, 0.1, 0.99, 0.5, 0.99, 0.99, 0.99];
  let i = 0;
  const { clock, WS, opts } = wsOptions({ random: () => randoms[i++ % randoms.length], reconnect: { base: 100, cap: 1000, maxCloses: 100 } });
  const rpc = await connect("http://gw.test/", opts);
  const delays = [];
  rpc.on("reconnecting", ({ delay }) => delays.push(delay));
  WS.FakeRefuse = true;
  WS.refuse = true; // every reconnect attempt fails before opening
  WS.last.drop();
  for (let k = 0; k < 6; k++) await clock.advance(1000);
  assert.deepEqual(delays.slice(0, 7), [90, 20, 396, 400, 990, 990, 990]);
  for (const d of delays) assert.ok(d < 1000);
  WS.refuse = false;
  await clock.advance(1000);
  assert.equal(WS.last.readyState, 1);
  assert.equal(rpc.transport, "websocket");
  rpc.close();
});

test("random session key: 128 bits of crypto.getRandomValues as hex", () => {
  const k = randomSessionKey({ getRandomValues: (a) => { a.forEach((_, i) => (a[i] = i)); return a; } });
  assert.equal(k, "000102030405060708090a0b0c0d0e0f");
  assert.match(randomSessionKey(), /^[0-9a-f]{32}$/);
  assert.notEqual(randomSessionKey(), randomSessionKey());
});

test("HTTP errors: gateway error bodies, non-JSON answers, network failures", async () => {
  let mode;
  const fetch = fakeFetch((req) => {
    if (req.method !== "POST") return new Promise(() => {});
    if (mode === "502") return { status: 502, body: { jsonrpc: "2.0", id: req.body.id, error: { code: -32091, message: "upstream down", data: { source: "rpcgate", kind: "upstream" } } } };
    if (mode === "html") return { status: 500, body: "<html>oops</html>" };
    throw new TypeError("connection refused");
  });
  const rpc = await connect("http://gw.test/", { transports: ["http"], fetch, EventSource: fakeEventSource() });
  mode = "502";
  let e = await rpc.call("x").catch((x) => x);
  assert.equal(e.code, -32091);
  assert.equal(e.data.kind, "upstream");
  assert.ok(e.fromGateway);
  mode = "html";
  e = await rpc.call("x").catch((x) => x);
  assert.equal(e.code, ErrorCode.BAD_RESPONSE);
  assert.equal(e.status, 500);
  mode = "net";
  e = await rpc.call("x").catch((x) => x);
  assert.equal(e.code, ErrorCode.NETWORK);
  rpc.close();
});

test("retry:true over HTTP waits Retry-After after a 503 and sends again", async () => {
  const clock = fakeClock();
  let n = 0;
  const fetch = fakeFetch((req) => {
    if (req.method !== "POST") return new Promise(() => {});
    if (n++ === 0) return { status: 503, headers: { "Retry-After": "3" }, body: { jsonrpc: "2.0", id: null, error: { code: -32090, message: "busy", data: { source: "rpcgate" } } } };
    return { status: 200, body: { jsonrpc: "2.0", id: req.body.id, result: "done" } };
  });
  const rpc = await connect("http://gw.test/", { transports: ["http"], fetch, EventSource: fakeEventSource(), now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout });
  const p = rpc.call("idem", [], { retry: true });
  await settle();
  assert.equal(fetch.requests.length, 1);
  await clock.advance(2999);
  assert.equal(fetch.requests.length, 1);
  await clock.advance(1);
  assert.equal(fetch.requests.length, 2);
  assert.equal(await p, "done");
  rpc.close();
});

test("long-poll when EventSource is unavailable: after= the last id, messages and gaps", async () => {
  const polls = [];
  const fetch = fakeFetch((req) => {
    if (req.method === "POST") return echoHttp(req);
    return new Promise((resolve) => polls.push({ req, resolve }));
  });
  const rpc = await connect("http://gw.test/", { transports: ["http"], fetch, EventSource: null, session: "lp", pollWait: 20 });
  const notes = [], gaps = [];
  rpc.on("notification", (m) => notes.push(m.params));
  rpc.on("gap", (g) => gaps.push(g));
  await settle();
  assert.equal(polls.length, 1);
  const u1 = new URL(polls[0].req.url);
  assert.equal(u1.pathname, "/events");
  assert.equal(u1.searchParams.get("session"), "lp");
  assert.equal(u1.searchParams.get("after"), "delivered", "nothing a socket already delivered");
  assert.equal(u1.searchParams.get("wait"), "20");
  assert.equal(polls[0].req.headers.Accept, "application/json");
  polls[0].resolve({ status: 200, body: [{ id: 4, message: { jsonrpc: "2.0", method: "n", params: [4] } }, { id: 5, gap: { reason: "memory", missed: 1 } }, { id: 6, message: { jsonrpc: "2.0", method: "n", params: [6] } }] });
  await settle();
  assert.deepEqual(notes, [[4], [6]]);
  assert.deepEqual(gaps, [{ reason: "memory", missed: 1 }]);
  assert.equal(polls.length, 2);
  assert.equal(new URL(polls[1].req.url).searchParams.get("after"), "6");
  polls[1].resolve({ status: 200, body: [] });
  await settle();
  assert.equal(new URL(polls[2].req.url).searchParams.get("after"), "6");
  rpc.close();
  polls[2].resolve({ status: 200, body: [{ id: 7, message: { jsonrpc: "2.0", method: "n", params: [7] } }] });
  await settle();
  assert.deepEqual(notes, [[4], [6]], "nothing after close");
  assert.equal(polls.length, 3);
});

test("subscriptions are remembered and re-made after a reconnect that outlived the session", async () => {
  const { clock, WS, opts } = wsOptions({ random: () => 0.5, sessionTtl: 5000 });
  const rpc = await connect("http://gw.test/", opts);
  const s = rpc.call("ticks_subscribe", [10]);
  WS.last.receive({ jsonrpc: "2.0", id: WS.last.sent[0].id, result: "sub-1" });
  assert.equal(await s, "sub-1");
  const other = rpc.call("eth_subscribe", ["newHeads"]);
  WS.last.receive({ jsonrpc: "2.0", id: WS.last.sent[1].id, result: "0xaa" });
  await other;
  const un = rpc.call("eth_unsubscribe", ["0xaa"]);
  WS.last.receive({ jsonrpc: "2.0", id: WS.last.sent[2].id, result: true });
  await un;
  assert.deepEqual(rpc.subscriptions, [{ method: "ticks_subscribe", params: [10], id: "sub-1" }]);

  // short outage: the gateway kept the session; nothing is re-made
  const before = WS.instances.length;
  WS.last.drop();
  await clock.advance(1000);
  assert.equal(WS.instances.length, before + 1);
  assert.equal(WS.last.sent.length, 0);

  // long outage: re-made with the same call
  const resubs = [];
  rpc.on("resubscribe", (r) => resubs.push(r));
  WS.refuse = true;
  WS.last.drop();
  await clock.advance(6000);
  WS.refuse = false;
  await clock.advance(10000);
  const sock = WS.last;
  assert.equal(sock.readyState, 1);
  assert.deepEqual(sock.sent.map((m) => [m.method, m.params]), [["ticks_subscribe", [10]]]);
  sock.receive({ jsonrpc: "2.0", id: sock.sent[0].id, result: "sub-2" });
  await settle();
  assert.deepEqual(resubs, [{ method: "ticks_subscribe", params: [10], previous: "sub-1", current: "sub-2" }]);
  assert.deepEqual(rpc.subscriptions, [{ method: "ticks_subscribe", params: [10], id: "sub-2" }]);
  rpc.close();
});

test("subscribeMethods option", async () => {
  const { WS, opts } = wsOptions({ subscribeMethods: ["watch"] });
  const rpc = await connect("http://gw.test/", opts);
  const a = rpc.call("watch", ["x"]);
  const b = rpc.call("ticks_subscribe");
  WS.last.receive({ jsonrpc: "2.0", id: 1, result: 1 });
  WS.last.receive({ jsonrpc: "2.0", id: 2, result: 2 });
  await a; await b;
  assert.deepEqual(rpc.subscriptions.map((s) => s.method), ["watch"]);
  rpc.close();
});

test("upgradeInterval: back to the WebSocket after a fallback", async () => {
  const clock = fakeClock();
  const WS = fakeWebSocket({ refuse: true });
  const ES = fakeEventSource();
  const rpc = await connect("http://gw.test/", {
    WebSocket: WS, fetch: fakeFetch(echoHttp), EventSource: ES, session: "u", upgradeInterval: 60000,
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  const seen = [];
  rpc.on("transport", (n, i) => seen.push([n, i.reason]));
  assert.equal(rpc.transport, "http");
  await clock.advance(60000); // still refused
  assert.equal(rpc.transport, "http");
  WS.refuse = false;
  await clock.advance(60000);
  assert.equal(rpc.transport, "websocket");
  assert.deepEqual(seen, [["websocket", "upgrade"]]);
  assert.equal(ES.instances[0].closed, true);
  const p = rpc.call("echo", [1]);
  WS.last.receive({ jsonrpc: "2.0", id: WS.last.sent[0].id, result: 1 });
  assert.equal(await p, 1);
  rpc.close();
});

test("close rejects pending calls with closed and stops reconnecting", async () => {
  const { clock, WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  const closes = [];
  rpc.on("close", () => closes.push(1));
  const p = rpc.call("x");
  rpc.close();
  const e = await p.catch((x) => x);
  assert.equal(e.code, ErrorCode.CLOSED);
  assert.equal(WS.last.closedByClient, true);
  assert.equal((await rpc.call("y").catch((x) => x)).code, "closed");
  await clock.advance(60000);
  assert.equal(WS.instances.length, 1);
  assert.deepEqual(closes, [1]);
});

test("connect rejects with unavailable when no transport opens", async () => {
  const WS = fakeWebSocket({ refuse: true });
  const e = await connect("http://gw.test/", { transports: ["websocket"], WebSocket: WS }).catch((x) => x);
  assert.ok(e instanceof RpcError);
  assert.equal(e.code, ErrorCode.UNAVAILABLE);
});

test("unmatched replies and bad frames are reported as error events", async () => {
  const { WS, opts } = wsOptions();
  const rpc = await connect("http://gw.test/", opts);
  const errors = [];
  rpc.on("error", (e) => errors.push(e));
  WS.last.receive({ jsonrpc: "2.0", id: 999, result: 1 });
  WS.last.onmessage({ data: "not json" });
  WS.last.receive({ jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } });
  assert.equal(errors.length, 3);
  assert.equal(errors[2].code, -32700);
  rpc.close();
});

test("an event stream that never delivers (a buffering proxy) is replaced by long-poll", async () => {
  const clock = fakeClock();
  const polls = [];
  const fetch = fakeFetch((req) => {
    if (req.method === "POST") return echoHttp(req);
    return new Promise((resolve) => polls.push({ req, resolve }));
  });
  const ES = fakeEventSource({ silent: true });
  const errors = [];
  const rpc = await connect("http://gw.test/", {
    transports: ["http"], fetch, EventSource: ES, session: "b",
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  rpc.on("error", (e) => errors.push(e.code));
  await settle();
  assert.equal(ES.instances.length, 1);
  assert.equal(polls.length, 0, "no long-poll while the stream may still deliver");
  await clock.advance(5000);
  await settle();
  assert.equal(ES.instances[0].closed, true, "the silent stream is closed");
  assert.equal(polls.length, 1, "and long-poll takes over");
  assert.deepEqual(errors, ["unavailable"]);
  rpc.close();
});

test("a stream that opens normally is kept", async () => {
  const clock = fakeClock();
  const fetch = fakeFetch(echoHttp);
  const ES = fakeEventSource();
  const rpc = await connect("http://gw.test/", {
    transports: ["http"], fetch, EventSource: ES, session: "ok",
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  await settle();
  await clock.advance(60000);
  await settle();
  assert.equal(ES.instances[0].closed, false);
  assert.equal(fetch.requests.filter((r) => r.method === "GET").length, 0);
  rpc.close();
});

test("token: a Bearer header on POSTs and long-polls, the query parameter on sockets and streams, asked again each time", async () => {
  let current = "t1";
  const { WS, opts } = wsOptions({ session: "s", token: () => current });
  const rpc = await connect("https://gw.test/", opts);
  assert.equal(new URL(WS.last.url).searchParams.get("access_token"), "t1");
  rpc.close();

  const polls = [];
  const fetch = fakeFetch((req) => {
    if (req.method === "POST") return echoHttp(req);
    return new Promise((resolve) => polls.push({ req, resolve }));
  });
  const lp = await connect("http://gw.test/", { transports: ["http"], fetch, EventSource: null, session: "lp", token: () => current, tokenParam: "key" });
  await settle();
  assert.equal(polls[0].req.headers.Authorization, "Bearer t1");
  assert.equal(new URL(polls[0].req.url).searchParams.get("key"), null, "a fetch carries the header, not the query");
  current = "t2";
  await lp.call("echo", [1]);
  const post = fetch.requests.find((r) => r.method === "POST");
  assert.equal(post.headers.Authorization, "Bearer t2", "a refreshed token is used at once");
  lp.close();
  polls[0].resolve({ status: 200, body: [] });

  const ES = fakeEventSource();
  const es = await connect("http://gw.test/", { transports: ["http"], fetch: fakeFetch(echoHttp), EventSource: ES, session: "e", token: "fixed" });
  assert.equal(new URL(ES.instances[0].url).searchParams.get("access_token"), "fixed");
  es.close();

  // No token: no header and no parameter.
  const plain = fakeFetch(echoHttp);
  const none = await connect("http://gw.test/", { transports: ["http"], fetch: plain, EventSource: null, session: "n" });
  await none.call("echo", [1]);
  assert.equal(plain.requests.find((r) => r.method === "POST").headers.Authorization, undefined);
  none.close();
});
