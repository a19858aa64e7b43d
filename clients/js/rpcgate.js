// rpcgate.js: a JSON-RPC client for rpcgate. WebSocket first, HTTP (fetch + EventSource,
// or long-poll) as the fallback, one API for both. ES module, no dependencies, no build step.
// Browsers, and Node 22+ (built-in WebSocket and fetch). Every global it uses can be
// injected through the options (see ConnectOptions), which is how the tests run on Node 20.

/**
 * Client-side error codes (strings, so they never collide with JSON-RPC's integer codes).
 * Errors that come from the server or the gateway keep their integer JSON-RPC code.
 * @readonly
 * @enum {string}
 */
export const ErrorCode = Object.freeze({
  /** The call got no reply within its timeout. */
  TIMEOUT: "timeout",
  /** The WebSocket carrying the call closed before the reply came (call made without `retry`). */
  DISCONNECTED: "disconnected",
  /** `close()` was called, or the call was made after it. */
  CLOSED: "closed",
  /** fetch failed (no HTTP answer at all). */
  NETWORK: "network",
  /** The HTTP answer was not a JSON-RPC reply (not JSON, or no reply for the call's id). */
  BAD_RESPONSE: "bad_response",
  /** No transport could be opened by `connect()`. */
  UNAVAILABLE: "unavailable",
});

/** An error from a call: a JSON-RPC error object (integer `code`), or a client-side one (`ErrorCode`). */
export class RpcError extends Error {
  /**
   * @param {number|string} code JSON-RPC error code, or one of `ErrorCode`
   * @param {string} message
   * @param {unknown} [data] the error object's `data` (`data.source == "rpcgate"` for gateway errors)
   * @param {{status?: number, retryAfter?: number}} [extra] HTTP status; `Retry-After` in seconds
   */
  constructor(code, message, data, extra = {}) {
    super(message);
    this.name = "RpcError";
    /** @type {number|string} */
    this.code = code;
    /** @type {unknown} */
    this.data = data;
    /** @type {number|undefined} HTTP status, when the error came in an HTTP answer */
    this.status = extra.status;
    /** @type {number|undefined} seconds, from a 503's `Retry-After` */
    this.retryAfter = extra.retryAfter;
  }

  /** @param {any} obj a JSON-RPC error object */
  static from(obj, extra) {
    if (!obj || typeof obj !== "object") return new RpcError(ErrorCode.BAD_RESPONSE, "malformed error object", obj, extra);
    return new RpcError(obj.code, String(obj.message ?? "error"), obj.data, extra);
  }

  /** True when the gateway itself (not the service behind it) produced the error. */
  get fromGateway() {
    return !!(this.data && typeof this.data === "object" && /** @type {any} */ (this.data).source === "rpcgate");
  }
}

/**
 * Exponential backoff with full jitter: a uniformly random delay in [0, min(cap, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {{base?: number, cap?: number, random?: () => number}} [o]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, o = {}) {
  const base = o.base ?? 250, cap = o.cap ?? 10000, random = o.random ?? Math.random;
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * 128 random bits as 32 hex digits.
 * @param {{getRandomValues(a: Uint8Array): Uint8Array}} [cryptoImpl]
 */
export function randomSessionKey(cryptoImpl = globalThis.crypto) {
  const bytes = cryptoImpl.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * @typedef {"websocket"|"http"} TransportName
 *
 * @typedef {object} ConnectOptions
 * @property {TransportName[]} [transports] tried in order; default `["websocket", "http"]`
 * @property {string} [session] session key; default a random 128-bit hex key
 * @property {number} [timeout] default per-call timeout in ms (30000); 0 = none
 * @property {RegExp|string[]|((method: string) => boolean)} [subscribeMethods] calls that open a
 *   subscription, remembered to be re-made; default `/_subscribe|subscribe$/i` (unsubscribes excluded)
 * @property {RegExp|string[]|((method: string) => boolean)} [unsubscribeMethods] default `/unsubscribe/i`
 * @property {"auto"|"always"|"never"} [resubscribe] re-make subscriptions after the client's own
 *   WebSocket reconnect: "auto" (default) only when the socket was down longer than `sessionTtl`
 * @property {number} [sessionTtl] ms the gateway keeps an unread session (its `push.idle_timeout`); 60000
 * @property {{base?: number, cap?: number, maxCloses?: number, window?: number, stableAfter?: number}} [reconnect]
 *   backoff base (250 ms) and cap (10000 ms); fall back to HTTP after `maxCloses` (3) closes within
 *   `window` (30000 ms); a socket open `stableAfter` (10000 ms) resets the backoff
 * @property {number} [openTimeout] ms for a WebSocket handshake (10000)
 * @property {number} [upgradeInterval] after a fallback, try the WebSocket again every so many ms; 0 (default) = never
 * @property {string} [eventsPath] path of the events endpoint on the gateway's origin; "/events"
 * @property {number} [pollWait] long-poll `wait` in seconds (25)
 * @property {number} [streamOpenTimeout] ms to wait for an event stream's `rpcgate.open` event before long-polling instead (5000; 0: never)
 * @property {string} [sessionHeader] "rpcgate-session"
 * @property {Record<string,string>} [headers] extra headers for HTTP POSTs
 * @property {string | (() => string)} [token] an API key or JWT for `[auth]`: sent as
 *   `Authorization: Bearer` on POSTs and long-polls, and as the `tokenParam` query parameter on
 *   the WebSocket and the EventSource, which cannot set headers. A function is asked again for
 *   every request and connection, so a refreshed JWT is picked up.
 * @property {string} [tokenParam] "access_token" (the gateway's `auth.query_param`)
 * @property {RequestCredentials} [credentials] fetch credentials; "include" also sets EventSource withCredentials
 * @property {Record<string, Function>} [on] listeners registered before connecting (e.g. `{transport: fn}`)
 * @property {any} [WebSocket] injectable globals; default the global ones (`null` = unavailable)
 * @property {any} [fetch]
 * @property {any} [EventSource]
 * @property {any} [crypto]
 * @property {() => number} [random] in [0, 1), for backoff jitter
 * @property {() => number} [now] ms clock
 * @property {(fn: () => void, ms: number) => any} [setTimeout]
 * @property {(t: any) => void} [clearTimeout]
 *
 * @typedef {object} CallOptions
 * @property {number} [timeout] ms; overrides the client's default
 * @property {boolean} [retry] resend after a WebSocket reconnect (or an HTTP 503 / network failure)
 *   instead of rejecting with "disconnected"; only for calls that are safe to run twice
 */

const DEFAULT_SUBSCRIBE = /_subscribe|subscribe$/i;
const DEFAULT_UNSUBSCRIBE = /unsubscribe/i;

function matcher(m) {
  if (typeof m === "function") return m;
  if (m instanceof RegExp) return (s) => { m.lastIndex = 0; return m.test(s); };
  if (Array.isArray(m)) return (s) => m.includes(s);
  return () => false;
}

function pick(options, name) {
  return name in options ? options[name] : globalThis[name];
}

/**
 * Connect to a gateway.
 * @param {string} url the gateway's JSON-RPC URL, e.g. "https://rpc.example.com/"
 * @param {ConnectOptions} [options]
 * @returns {Promise<RpcClient>}
 */
export async function connect(url, options = {}) {
  const client = new RpcClient(url, options);
  await client._start();
  return client;
}

/** A connected client. Make it with `connect()`. */
export class RpcClient {
  /** @param {string} url @param {ConnectOptions} options */
  constructor(url, options = {}) {
    this.options = options;
    this._WS = pick(options, "WebSocket");
    // Browsers refuse `fetch` called on anything but the window ("Illegal invocation"),
    // so the global one is bound to it; an injected one is used as given.
    const fetchFn = pick(options, "fetch");
    this._fetch = fetchFn && !("fetch" in options) ? fetchFn.bind(globalThis) : fetchFn;
    this._ES = pick(options, "EventSource");
    const st = options.setTimeout ?? globalThis.setTimeout;
    const ct = options.clearTimeout ?? globalThis.clearTimeout;
    this._setTimeout = (fn, ms) => st(fn, ms);
    this._clearTimeout = (t) => ct(t);
    this._now = options.now ?? (() => Date.now());
    this._random = options.random ?? Math.random;
    this._transports = options.transports ?? ["websocket", "http"];
    this._timeout = options.timeout ?? 30000;
    this._isSubscribe = matcher(options.subscribeMethods ?? DEFAULT_SUBSCRIBE);
    this._isUnsubscribe = matcher(options.unsubscribeMethods ?? DEFAULT_UNSUBSCRIBE);
    const rc = options.reconnect ?? {};
    this._rc = { base: rc.base ?? 250, cap: rc.cap ?? 10000, maxCloses: rc.maxCloses ?? 3, window: rc.window ?? 30000, stableAfter: rc.stableAfter ?? 10000 };

    /** The session key, sent on both transports. @type {string} */
    this.session = options.session ?? randomSessionKey(pick(options, "crypto"));
    /** The transport in use. @type {TransportName|null} */
    this.transport = null;

    const http = new URL(url);
    if (http.protocol === "ws:") http.protocol = "http:";
    if (http.protocol === "wss:") http.protocol = "https:";
    /** @type {string} */ this.httpUrl = http.href;
    const ws = new URL(http.href);
    ws.protocol = http.protocol === "https:" ? "wss:" : "ws:";
    ws.searchParams.set("session", this.session);
    /** @type {string} */ this.wsUrl = ws.href;
    const ev = new URL(options.eventsPath ?? "/events", http.origin);
    ev.searchParams.set("session", this.session);
    /** @type {string} */ this.eventsUrl = ev.href;

    this._nextId = 1;
    /** @type {Map<number, any>} */ this._pending = new Map();
    this._expired = new Set();
    this._listeners = new Map();
    this._handlers = new Map();
    this._subs = [];
    this._outbox = [];
    this._sock = null;
    this._closes = [];
    this._attempt = 0;
    this._droppedAt = null;
    this._reconnectTimer = null;
    this._upgradeTimer = null;
    this._es = null;
    this._pollGen = 0;
    this._pollAbort = null;
    this._lastEventId = null;
    this._closed = false;
    for (const [ev2, fn] of Object.entries(options.on ?? {})) this.on(ev2, fn);
  }

  // ---- public API -------------------------------------------------------------------

  /**
   * Call a method. Resolves to its `result`; rejects with an RpcError.
   * @param {string} method
   * @param {unknown[]|Record<string, unknown>} [params]
   * @param {CallOptions} [opts]
   * @returns {Promise<any>}
   */
  call(method, params, opts = {}) {
    if (this._closed) return Promise.reject(new RpcError(ErrorCode.CLOSED, "client closed"));
    const e = this._entry(method, params, opts);
    this._send(e.msg, [e.id]);
    return e.promise;
  }

  /**
   * Several calls in one JSON-RPC batch. Resolves to an array in the order of `calls`: each
   * item is the call's result, or an RpcError instance for a call the server answered with an
   * error. Rejects (with an RpcError) only when the batch as a whole failed: a client-side
   * error (timeout, disconnected, network...) or one error answering the whole batch (e.g. 503).
   * @param {Array<[string, (unknown[]|Record<string, unknown>)?]>} calls
   * @param {CallOptions} [opts]
   * @returns {Promise<Array<any|RpcError>>}
   */
  batch(calls, opts = {}) {
    if (this._closed) return Promise.reject(new RpcError(ErrorCode.CLOSED, "client closed"));
    if (calls.length === 0) return Promise.resolve([]);
    const entries = calls.map(([method, params]) => this._entry(method, params, opts));
    this._send(entries.map((e) => e.msg), entries.map((e) => e.id));
    return Promise.allSettled(entries.map((e) => e.promise)).then((rs) => {
      const fatal = rs.find((r) => r.status === "rejected" && typeof r.reason?.code === "string");
      if (fatal) throw /** @type {PromiseRejectedResult} */ (fatal).reason;
      const first = rs[0];
      if (rs.length > 1 && rs.every((r) => r.status === "rejected" && r.reason === /** @type {any} */ (first).reason)) throw /** @type {any} */ (first).reason;
      return rs.map((r) => (r.status === "fulfilled" ? r.value : r.reason));
    });
  }

  /**
   * Send a notification (no reply). Failures are emitted as "error" events.
   * @param {string} method
   * @param {unknown[]|Record<string, unknown>} [params]
   */
  notify(method, params) {
    if (this._closed) return;
    const msg = { jsonrpc: "2.0", method };
    if (params !== undefined) msg.params = params;
    this._send(msg, []);
  }

  /**
   * Answer server→client requests for `method`. `fn(params, request)` returns the result (or a
   * promise of it); a throw/rejection answers an error (its integer `code` if it has one, else
   * -32603, and its message). Requests for methods without a handler are answered -32601.
   * @param {string} method
   * @param {((params: any, request: object) => any) | null} fn null removes the handler
   */
  handle(method, fn) {
    if (fn) this._handlers.set(method, fn);
    else this._handlers.delete(method);
    return this;
  }

  /**
   * Listen to an event; returns a function that removes the listener.
   * Events: "notification" (msg: the JSON-RPC notification object), "gap" ({reason, missed}),
   * "transport" (name, {from, reason}), "reconnecting" ({attempt, delay}),
   * "reconnected" ({downtime, resubscribe}), "resubscribe" ({method, params, previous, current}),
   * "error" (Error: things with no caller to reject, e.g. an unmatched reply), "close".
   * @param {string} event
   * @param {(...args: any[]) => void} fn
   * @returns {() => void}
   */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** @param {string} event @param {Function} fn */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /** Subscriptions made through this client and not unsubscribed: {method, params, id}. */
  get subscriptions() {
    return this._subs.map((s) => ({ ...s }));
  }

  /**
   * Re-make every remembered subscription (the same call again). Each success updates the
   * remembered id and emits "resubscribe" with the previous and current ids.
   * @returns {Promise<Array<any|RpcError>>}
   */
  resubscribe() {
    const subs = this._subs.slice();
    return Promise.all(subs.map((s) => this.call(s.method, s.params, { retry: true, _resub: s }).then(
      (current) => current,
      (err) => { this._emit("error", err); return err; },
    )));
  }

  /** Close everything; pending calls reject with code "closed". */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._clearTimeout(this._reconnectTimer);
    this._clearTimeout(this._upgradeTimer);
    this._stopPush();
    const sock = this._sock;
    this._sock = null;
    if (sock) { this._detach(sock); try { sock.close(1000); } catch { /* already closed */ } }
    for (const id of [...this._pending.keys()]) this._settle(id, new RpcError(ErrorCode.CLOSED, "client closed"));
    this._outbox = [];
    this._emit("close");
  }

  // ---- internals --------------------------------------------------------------------

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try { fn(...args); } catch (e) { if (event !== "error") this._emit("error", e); }
    }
  }

  _entry(method, params, opts) {
    const id = this._nextId++;
    const msg = { jsonrpc: "2.0", id, method };
    if (params !== undefined) msg.params = params;
    let resolve, reject;
    const promise = new Promise((a, b) => { resolve = a; reject = b; });
    const e = { id, msg, method, params, resolve, reject, promise, retry: !!opts.retry, resub: opts._resub, via: null, tries: 0, timer: null };
    const timeout = opts.timeout ?? this._timeout;
    if (timeout > 0 && Number.isFinite(timeout)) {
      e.timer = this._setTimeout(() => {
        // a late reply to it is then dropped silently (remember the last 1000 such ids)
        this._expired.add(id);
        if (this._expired.size > 1000) this._expired.delete(this._expired.values().next().value);
        this._settle(id, new RpcError(ErrorCode.TIMEOUT, `no reply to ${method} within ${timeout} ms`));
      }, timeout);
    }
    this._pending.set(id, e);
    return e;
  }

  _settle(id, err, result) {
    const e = this._pending.get(id);
    if (!e) return false;
    this._pending.delete(id);
    this._clearTimeout(e.timer);
    if (err) { e.reject(err); return true; }
    this._track(e, result);
    e.resolve(result);
    return true;
  }

  _track(e, result) {
    if (e.resub) {
      const previous = e.resub.id;
      e.resub.id = result;
      this._emit("resubscribe", { method: e.method, params: e.params, previous, current: result });
    } else if (this._isUnsubscribe(e.method)) {
      const ids = Array.isArray(e.params) ? e.params : e.params && typeof e.params === "object" ? Object.values(e.params) : [];
      this._subs = this._subs.filter((s) => !ids.some((v) => v === s.id));
    } else if (this._isSubscribe(e.method)) {
      this._subs.push({ method: e.method, params: e.params, id: result });
    }
  }

  _send(payload, ids) {
    if (this.transport === "http") return this._post(payload, ids);
    if (this._sock) {
      try {
        this._sock.send(JSON.stringify(payload));
        for (const id of ids) { const e = this._pending.get(id); if (e) e.via = "websocket"; }
        return;
      } catch { /* socket going down: queue it */ }
    }
    this._outbox.push({ payload, ids });
  }

  _flush() {
    const out = this._outbox;
    this._outbox = [];
    for (const { payload, ids } of out) {
      // skip calls settled (e.g. timed out) while queued
      if (ids.length && !ids.some((id) => this._pending.has(id))) continue;
      if (Array.isArray(payload) && ids.length) {
        const live = payload.filter((m) => this._pending.has(m.id));
        this._send(live.length === 1 ? live[0] : live, live.map((m) => m.id));
      } else this._send(payload, ids);
    }
  }

  _setTransport(name, reason) {
    if (this.transport === name) return;
    const from = this.transport;
    this.transport = name;
    this._emit("transport", name, { from, reason });
  }

  async _start() {
    let lastErr;
    for (const t of this._transports) {
      if (t === "websocket" && this._WS) {
        try {
          const sock = await this._openSocket();
          this._attach(sock);
          this._setTransport("websocket", "connect");
          return;
        } catch (e) { lastErr = e; }
      } else if (t === "http" && this._fetch) {
        this._startHttp(lastErr ? "websocket_failed" : "connect");
        return;
      }
    }
    throw new RpcError(ErrorCode.UNAVAILABLE, `no transport could be opened (${this._transports.join(", ")})${lastErr ? ": " + lastErr.message : ""}`);
  }

  // ---- WebSocket --------------------------------------------------------------------

  _openSocket() {
    return new Promise((resolve, reject) => {
      let sock;
      try { sock = new this._WS(this._authUrl(this.wsUrl)); } catch (e) { reject(new RpcError(ErrorCode.UNAVAILABLE, String(e?.message ?? e))); return; }
      let done = false;
      const fail = (why) => {
        if (done) return;
        done = true;
        this._clearTimeout(timer);
        this._detach(sock);
        try { sock.close(); } catch { /* ignore */ }
        reject(new RpcError(ErrorCode.UNAVAILABLE, `WebSocket ${why}`));
      };
      const timer = this._setTimeout(() => fail("handshake timed out"), this.options.openTimeout ?? 10000);
      sock.onopen = () => {
        if (done) return;
        done = true;
        this._clearTimeout(timer);
        if (this._closed) { this._detach(sock); try { sock.close(1000); } catch { /* ignore */ } reject(new RpcError(ErrorCode.CLOSED, "client closed")); return; }
        resolve(sock);
      };
      sock.onerror = () => fail("failed to open");
      sock.onclose = () => fail("closed before it opened");
    });
  }

  _attach(sock) {
    this._sock = sock;
    sock._openedAt = this._now();
    sock.onmessage = (ev) => {
      if (sock !== this._sock) return;
      let msg;
      try { msg = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data)); } catch {
        this._emit("error", new RpcError(ErrorCode.BAD_RESPONSE, "WebSocket frame is not JSON", ev.data));
        return;
      }
      this._handle(msg);
    };
    sock.onerror = () => {};
    sock.onclose = () => { if (sock === this._sock) this._onDrop(sock); };
    this._flush();
  }

  _detach(sock) {
    sock.onopen = sock.onmessage = sock.onerror = sock.onclose = null;
  }

  _onDrop(sock) {
    this._sock = null;
    if (this._closed) return;
    const now = this._now();
    if (sock && now - sock._openedAt >= this._rc.stableAfter) this._attempt = 0;
    if (this._droppedAt == null) this._droppedAt = now;
    // calls sent on the dropped socket: reject, or queue again with {retry: true}
    const again = [];
    for (const e of [...this._pending.values()]) {
      if (e.via !== "websocket") continue;
      e.via = null;
      if (e.retry) again.push({ payload: e.msg, ids: [e.id] });
      else this._settle(e.id, new RpcError(ErrorCode.DISCONNECTED, `WebSocket closed before ${e.method} was answered`));
    }
    this._outbox = again.concat(this._outbox);
    this._failed(now);
  }

  // one close (or failed reopen): back off, or fall back to HTTP after too many
  _failed(now) {
    this._closes = this._closes.filter((t) => now - t < this._rc.window);
    this._closes.push(now);
    if (this._closes.length >= this._rc.maxCloses && this._transports.includes("http") && this._fetch) {
      this._closes = [];
      this._startHttp("websocket_closing");
      return;
    }
    const delay = backoffDelay(this._attempt, { base: this._rc.base, cap: this._rc.cap, random: this._random });
    this._attempt++;
    this._emit("reconnecting", { attempt: this._attempt, delay });
    this._reconnectTimer = this._setTimeout(() => this._reconnect(), delay);
  }

  _reconnect() {
    if (this._closed || this.transport !== "websocket") return;
    this._openSocket().then((sock) => {
      if (this._closed || this.transport !== "websocket") { this._detach(sock); try { sock.close(1000); } catch { /* ignore */ } return; }
      const downtime = this._now() - (this._droppedAt ?? this._now());
      this._droppedAt = null;
      const mode = this.options.resubscribe ?? "auto";
      const resub = this._subs.length > 0 && (mode === "always" || (mode === "auto" && downtime > (this.options.sessionTtl ?? 60000)));
      this._attach(sock);
      this._emit("reconnected", { downtime, resubscribe: resub });
      if (resub) this.resubscribe();
    }, () => { if (!this._closed) this._failed(this._now()); });
  }

  // ---- HTTP -------------------------------------------------------------------------

  _startHttp(reason) {
    this._droppedAt = null;
    this._setTransport("http", reason);
    this._startPush();
    this._flush();
    if (reason !== "connect") this._scheduleUpgrade();
  }

  _scheduleUpgrade() {
    const every = this.options.upgradeInterval ?? 0;
    if (!(every > 0) || !this._WS || !this._transports.includes("websocket")) return;
    this._upgradeTimer = this._setTimeout(() => {
      if (this._closed || this.transport !== "http") return;
      this._openSocket().then((sock) => {
        if (this._closed || this.transport !== "http") { this._detach(sock); try { sock.close(1000); } catch { /* ignore */ } return; }
        this._stopPush(); // the socket becomes the session's reader
        this._attempt = 0;
        this._closes = [];
        this._setTransport("websocket", "upgrade");
        this._attach(sock);
      }, () => this._scheduleUpgrade());
    }, every);
  }

  /** The credential, if any: the `token` option, or what its function gives now. */
  _token() {
    const t = this.options.token;
    return (typeof t === "function" ? t() : t) || null;
  }

  _auth(headers) {
    const token = this._token();
    return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
  }

  /** `href` with the credential as a query parameter, for the WebSocket and EventSource. */
  _authUrl(href) {
    const token = this._token();
    if (!token) return href;
    const u = new URL(href);
    u.searchParams.set(this.options.tokenParam ?? "access_token", token);
    return u.href;
  }

  _headers(extra) {
    return this._auth({ "Content-Type": "application/json", [this.options.sessionHeader ?? "rpcgate-session"]: this.session, ...(this.options.headers ?? {}), ...extra });
  }

  _post(payload, ids) {
    for (const id of ids) { const e = this._pending.get(id); if (e) { e.via = "http"; e.tries++; } }
    const init = { method: "POST", headers: this._headers(), body: JSON.stringify(payload) };
    if (this.options.credentials) init.credentials = this.options.credentials;
    Promise.resolve().then(() => this._fetch(this.httpUrl, init)).then(async (res) => {
      const status = res.status;
      const ra = Number.parseFloat(res.headers?.get?.("retry-after") ?? "");
      const extra = { status, retryAfter: Number.isFinite(ra) ? ra : undefined };
      const text = status === 204 || status === 202 ? "" : await res.text();
      let body;
      if (text) { try { body = JSON.parse(text); } catch { body = undefined; } }
      if (body === undefined) {
        if (status >= 200 && status < 300 && ids.length === 0) return; // notification or answer accepted
        this._failHttp(ids, new RpcError(ErrorCode.BAD_RESPONSE, `HTTP ${status} without a JSON-RPC reply`, text ? text.slice(0, 200) : undefined, extra));
        return;
      }
      const single = !Array.isArray(body) && body && typeof body === "object";
      if (single && body.error && (status === 503 || body.id == null || !ids.includes(body.id))) {
        this._failHttp(ids, RpcError.from(body.error, extra));
        return;
      }
      this._handle(body);
      const left = ids.filter((id) => this._pending.get(id)?.via === "http");
      if (left.length) this._failHttp(left, new RpcError(ErrorCode.BAD_RESPONSE, `HTTP ${status}: no reply for id ${left.join(", ")}`, undefined, extra));
    }).catch((err) => {
      this._failHttp(ids, err instanceof RpcError ? err : new RpcError(ErrorCode.NETWORK, `fetch failed: ${err?.message ?? err}`));
    });
  }

  _failHttp(ids, err) {
    if (ids.length === 0) { this._emit("error", err); return; }
    for (const id of ids) {
      const e = this._pending.get(id);
      if (!e) continue;
      if (e.retry && (err.code === ErrorCode.NETWORK || err.status === 503)) {
        e.via = null;
        const delay = err.retryAfter != null ? err.retryAfter * 1000 : backoffDelay(e.tries - 1, { base: this._rc.base, cap: this._rc.cap, random: this._random });
        this._setTimeout(() => { if (this._pending.has(id) && !this._closed) this._send(e.msg, [id]); }, delay);
      } else this._settle(id, err);
    }
  }

  _startPush() {
    this._stopPush();
    if (this._ES) {
      const es = new this._ES(this._authUrl(this._resumeUrl()), { withCredentials: this.options.credentials === "include" });
      // rpcgate starts every stream with an `rpcgate.open` event. A proxy that buffers
      // the stream holds that back too: without it in time, long-poll instead.
      let delivered = false;
      es.addEventListener("rpcgate.open", () => { delivered = true; });
      const waitOpen = this.options.streamOpenTimeout ?? 5000;
      if (waitOpen > 0) {
        this._setTimeout(() => {
          if (delivered || this._es !== es || this._closed) return;
          try { es.close(); } catch { /* ignore */ }
          this._es = null;
          this._ES = null; // this stream never delivered; later ones would not either
          this._emit("error", new RpcError(ErrorCode.UNAVAILABLE, "the event stream delivered nothing: long-polling instead"));
          this._poll(++this._pollGen);
        }, waitOpen);
      }
      es.onmessage = (ev) => {
        delivered = true;
        if (ev.lastEventId) this._lastEventId = Number(ev.lastEventId);
        let msg;
        try { msg = JSON.parse(ev.data); } catch { this._emit("error", new RpcError(ErrorCode.BAD_RESPONSE, "event is not JSON", ev.data)); return; }
        this._handle(msg);
      };
      es.addEventListener("rpcgate.gap", (ev) => {
        let gap;
        try { gap = JSON.parse(ev.data); } catch { gap = { reason: "unknown", missed: null }; }
        this._emit("gap", gap);
      });
      es.onerror = () => {}; // EventSource reconnects by itself, with Last-Event-ID
      this._es = es;
    } else {
      this._poll(++this._pollGen);
    }
  }

  /** The events URL from where this client got to: the last event id it saw, or, before
   * any (a fresh start, or a fallback from the WebSocket, whose frames carry no ids),
   * `after=delivered`: what no reader of the session has been given yet, so nothing the
   * socket already delivered comes twice. EventSource's own reconnects send
   * Last-Event-ID, which the gateway prefers. */
  _resumeUrl() {
    const u = new URL(this.eventsUrl);
    u.searchParams.set("after", this._lastEventId != null ? String(this._lastEventId) : "delivered");
    return u.href;
  }

  _stopPush() {
    if (this._es) { try { this._es.close(); } catch { /* ignore */ } this._es = null; }
    this._pollGen++;
    if (this._pollAbort) { try { this._pollAbort.abort(); } catch { /* ignore */ } this._pollAbort = null; }
  }

  async _poll(gen) {
    let attempt = 0;
    const live = () => !this._closed && this._pollGen === gen;
    while (live()) {
      const u = new URL(this._resumeUrl());
      u.searchParams.set("wait", String(this.options.pollWait ?? 25));
      const init = { headers: this._auth({ Accept: "application/json" }) };
      if (this.options.credentials) init.credentials = this.options.credentials;
      if (typeof AbortController !== "undefined") { this._pollAbort = new AbortController(); init.signal = this._pollAbort.signal; }
      try {
        const res = await this._fetch(u.href, init);
        if (!live()) return;
        if (!res.ok) throw new RpcError(ErrorCode.BAD_RESPONSE, `long-poll answered HTTP ${res.status}`, undefined, { status: res.status });
        const items = await res.json();
        if (!live()) return;
        for (const it of Array.isArray(items) ? items : []) {
          if (typeof it?.id === "number") this._lastEventId = it.id;
          if (it?.gap) this._emit("gap", it.gap);
          else if (it?.message) this._handle(it.message);
        }
        attempt = 0;
      } catch (err) {
        if (!live()) return;
        this._emit("error", err);
        const delay = backoffDelay(attempt++, { base: this._rc.base, cap: this._rc.cap, random: this._random });
        await new Promise((r) => this._setTimeout(r, delay));
      }
    }
  }

  // ---- incoming messages ------------------------------------------------------------

  _handle(msg) {
    if (this._closed) return;
    if (Array.isArray(msg)) { for (const m of msg) this._handle(m); return; }
    if (!msg || typeof msg !== "object") { this._emit("error", new RpcError(ErrorCode.BAD_RESPONSE, "message is not an object", msg)); return; }
    if (typeof msg.method === "string") {
      if (msg.id !== undefined && msg.id !== null) this._serverRequest(msg);
      else if (msg.method === "rpcgate.gap") this._emit("gap", msg.params ?? {});
      else this._emit("notification", msg);
      return;
    }
    if (!("id" in msg)) { this._emit("error", new RpcError(ErrorCode.BAD_RESPONSE, "message is neither reply nor request", msg)); return; }
    const e = this._pending.get(msg.id);
    if (!e) {
      if (this._expired.delete(msg.id)) return;
      const err = msg.error ? RpcError.from(msg.error) : new RpcError(ErrorCode.BAD_RESPONSE, `reply for unknown id ${JSON.stringify(msg.id)}`, msg);
      this._emit("error", err);
      return;
    }
    if (msg.error) this._settle(msg.id, RpcError.from(msg.error));
    else this._settle(msg.id, null, msg.result);
  }

  async _serverRequest(req) {
    const fn = this._handlers.get(req.method);
    let answer;
    if (!fn) {
      answer = { jsonrpc: "2.0", id: req.id, error: { code: -32601, message: `no handler for ${req.method} in this client` } };
    } else {
      try {
        const result = await fn(req.params, req);
        answer = { jsonrpc: "2.0", id: req.id, result: result === undefined ? null : result };
      } catch (err) {
        const error = { code: Number.isInteger(err?.code) ? err.code : -32603, message: String(err?.message ?? err) };
        if (err?.data !== undefined) error.data = err.data;
        answer = { jsonrpc: "2.0", id: req.id, error };
      }
    }
    if (!this._closed) this._send(answer, []);
  }
}

export default connect;
