#!/usr/bin/env python3
"""A JSON-RPC 2.0 over WebSocket upstream written with Python's `websockets`.

The interop tests run the gateway against this server because we did not write it:
its WebSocket stack (framing, ping/pong, the close handshake) is independent of
tungstenite, so bugs that our own echo backend shares with the
gateway cannot hide here.

Usage:
    python3 tests/interop/upstream.py [--name NAME]

Binds 127.0.0.1 on a free port, prints exactly one line `LISTENING <port>` to stdout,
then serves until it is killed (SIGTERM/SIGINT) or its stdin reaches EOF. Watching
stdin is what makes it exit when the test that spawned it dies without cleaning up:
the pipe's write end closes with the test process. Run by hand from a terminal it
serves until Ctrl-D or Ctrl-C; with stdin from /dev/null it exits at once.

Methods (same as src/echo.rs, plus `close`):
    echo    result is params (null if absent)
    sum     params: array of numbers; integer result if all are integers and the sum
            fits i64, else a float
    sleep   params: [ms]; replies ms (clamped to 60000) after that long, without
            holding up other requests
    whoami  result is the --name string
    fail    error {"code": -32000, "message": "requested failure", "data": params}
    notify  first sends {"jsonrpc":"2.0","method":"notification","params":params},
            then replies true
    close   replies true, then closes the connection with code 1000

Methods that push (same formats as the Rust demo backend). Whatever a method sends
besides its reply goes out after the reply (after the whole batch's reply array when
it came in a batch), and also when the call was a notification:
    notify_me          params: [value]; replies true, then sends
                       {"jsonrpc":"2.0","method":"notice","params":[value]}
    ticks_subscribe    params: [interval_ms], an integer 1..=60000; replies a new
                       subscription id (a string unique on this connection: "ticks-1",
                       "ticks-2", ...), then every interval_ms sends
                       {"jsonrpc":"2.0","method":"ticks","params":{"subscription":id,"result":n}}
                       with n = 1, 2, 3, ... until unsubscribed or the connection closes
    ticks_unsubscribe  params: [id]; replies true if that subscription was running on
                       this connection (no tick for it follows the reply), else false
    ask                params: [question]; sends the client a request of its own,
                       {"jsonrpc":"2.0","id":"ask-N","method":"confirm","params":[question]}
                       (N = 1, 2, ... per connection), waits as long as it takes for the
                       client's response with that id, then replies
                       {"question":question,"answer":<the client's result>}, or, if the
                       client answered with an error, the error
                       {"code":-32001,"message":"the client refused to confirm","data":<the
                       client's error object>}
A response from the client (an object with an id, a result or an error and no method)
whose id is an outstanding "ask-N" answers that ask and gets no reply; any other such
object is an invalid request, as before.

Requires websockets >= 13 (the `websockets.asyncio` API); tested with 15 and 17.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from typing import Any, Awaitable, Callable

try:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
except ImportError:  # pragma: no cover - depends on the environment
    sys.stderr.write("upstream.py needs websockets >= 13: pip install 'websockets>=13'\n")
    sys.exit(2)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
REQUESTED_FAILURE = -32000
CLIENT_REFUSED = -32001

MAX_SLEEP_MS = 60_000
MAX_TICK_INTERVAL_MS = 60_000
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
# tungstenite's default; websockets' own 1 MiB default would reject large calls the
# gateway is allowed to forward, and the interop tests should fail on the gateway,
# not on this script.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# Stands for "member not present", which differs from a present `null`: a request
# with `"id": null` is a call and gets a reply, one without `id` is a notification.
MISSING: Any = object()


def encode(message: dict[str, Any]) -> str:
    # allow_nan=False: Python would otherwise write `Infinity`, which is not JSON.
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def result(id_: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": value}


def error(id_: Any, code: int, message: str, data: Any = MISSING) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not MISSING:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id_, "error": err}


def reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and could not be echoed.
    raise ValueError(f"{name} is not JSON")


def is_number(value: Any) -> bool:
    # bool is a subclass of int in Python, but `true` is not a number in JSON.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or is_number(value)


def sum_params(params: Any) -> int | float | None:
    """The sum, or None when params are not an array of numbers or the sum is not finite."""
    if not isinstance(params, list) or not all(is_number(p) for p in params):
        return None
    if all(isinstance(p, int) for p in params):
        total = sum(params)
        if I64_MIN <= total <= I64_MAX:
            return total
    # Added one by one as f64, like src/echo.rs, so both backends give the same float.
    acc = 0.0
    try:
        for p in params:
            acc += float(p)
    except OverflowError:
        return None
    return acc if acc - acc == 0.0 else None  # rejects inf and nan


def sleep_ms(params: Any) -> int | None:
    if not isinstance(params, list) or len(params) != 1:
        return None
    (ms,) = params
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms < 2**64:
        return None
    return min(ms, MAX_SLEEP_MS)


def single_param(params: Any) -> Any:
    """The one element of a one-element params array, else MISSING."""
    if not isinstance(params, list) or len(params) != 1:
        return MISSING
    return params[0]


def tick_interval_ms(params: Any) -> int | None:
    ms = single_param(params)
    if not isinstance(ms, int) or isinstance(ms, bool) or not 1 <= ms <= MAX_TICK_INTERVAL_MS:
        return None
    return ms


def is_response(request: dict[str, Any]) -> bool:
    """A response object (what a client sends back for our `confirm`), not a request."""
    has_outcome = "result" in request or "error" in request
    return "method" not in request and "id" in request and has_outcome


class Effects:
    """What the calls in one WebSocket message asked for besides their replies."""

    def __init__(self) -> None:
        # Set by `close`. Per message, not per connection: the connection must close
        # after *this* message's reply, not after whichever reply happens to come next.
        self.close = False
        # What pushes after this message's reply, in call order (notify_me's notice,
        # the start of a ticks subscription).
        self.after_reply: list[Callable[[], Awaitable[None]]] = []


class Connection:
    def __init__(self, ws: ServerConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        # ticks subscription id -> the task sending its ticks (None until it starts)
        self.subscriptions: dict[str, asyncio.Task[None] | None] = {}
        self.subscription_count = 0
        # "ask-N" -> the future the client's response resolves
        self.asks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ask_count = 0

    def close_pushes(self) -> None:
        """Stops every subscription and outstanding ask (the connection is gone)."""
        for task in self.subscriptions.values():
            if task is not None:
                task.cancel()
        self.subscriptions.clear()
        for future in self.asks.values():
            future.cancel()
        self.asks.clear()

    async def ticks(self, sub_id: str, interval_ms: int) -> None:
        n = 0
        try:
            while True:
                await asyncio.sleep(interval_ms / 1000)
                n += 1
                await self.ws.send(
                    encode(
                        {
                            "jsonrpc": "2.0",
                            "method": "ticks",
                            "params": {"subscription": sub_id, "result": n},
                        }
                    )
                )
        except ConnectionClosed:
            pass
        finally:
            if self.subscriptions.get(sub_id) is asyncio.current_task():
                del self.subscriptions[sub_id]

    def start_ticks(self, sub_id: str, interval_ms: int) -> Callable[[], Awaitable[None]]:
        async def start() -> None:
            # Not there if it was unsubscribed (or the connection closed) before it started.
            if sub_id in self.subscriptions:
                self.subscriptions[sub_id] = asyncio.create_task(self.ticks(sub_id, interval_ms))

        return start

    async def ask(self, question: Any) -> dict[str, Any]:
        """Sends the client `confirm` and waits for its response object."""
        self.ask_count += 1
        ask_id = f"ask-{self.ask_count}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.asks[ask_id] = future
        try:
            await self.ws.send(
                encode({"jsonrpc": "2.0", "id": ask_id, "method": "confirm", "params": [question]})
            )
            return await future
        finally:
            self.asks.pop(ask_id, None)

    async def call(self, request: Any, effects: Effects) -> dict[str, Any] | None:
        """Runs one request object; returns its reply, or None for a notification."""
        if not isinstance(request, dict):
            return error(None, INVALID_REQUEST, "invalid request: expected an object")
        if is_response(request) and isinstance(request["id"], str):
            future = self.asks.get(request["id"])
            if future is not None:
                if not future.done():
                    future.set_result(request)
                return None
        id_ = request.get("id", MISSING)
        if id_ is not MISSING and not valid_id(id_):
            return error(None, INVALID_REQUEST, "invalid request: bad id")
        reply_id = None if id_ is MISSING else id_
        method = request.get("method")
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return error(
                reply_id, INVALID_REQUEST, "invalid request: needs jsonrpc 2.0 and a method"
            )
        params = request.get("params", MISSING)

        reply: dict[str, Any]
        if method == "echo":
            reply = result(reply_id, None if params is MISSING else params)
        elif method == "sum":
            total = sum_params(params)
            reply = (
                error(reply_id, INVALID_PARAMS, "invalid params: sum expects an array of numbers")
                if total is None
                else result(reply_id, total)
            )
        elif method == "sleep":
            ms = sleep_ms(params)
            if ms is None:
                reply = error(
                    reply_id, INVALID_PARAMS, "invalid params: sleep expects [milliseconds]"
                )
            else:
                # Only a call waits; a notification has no reply to hold back.
                if id_ is not MISSING:
                    await asyncio.sleep(ms / 1000)
                reply = result(reply_id, ms)
        elif method == "whoami":
            reply = result(reply_id, self.name)
        elif method == "fail":
            reply = error(reply_id, REQUESTED_FAILURE, "requested failure", params)
        elif method == "notify":
            notification = {"jsonrpc": "2.0", "method": "notification"}
            notification["params"] = None if params is MISSING else params
            await self.ws.send(encode(notification))
            reply = result(reply_id, True)
        elif method == "close":
            effects.close = True
            reply = result(reply_id, True)
        elif method == "notify_me":
            value = single_param(params)
            if value is MISSING:
                reply = error(reply_id, INVALID_PARAMS, "invalid params: notify_me expects [value]")
            else:
                notice = encode({"jsonrpc": "2.0", "method": "notice", "params": [value]})
                effects.after_reply.append(lambda: self.ws.send(notice))
                reply = result(reply_id, True)
        elif method == "ticks_subscribe":
            interval = tick_interval_ms(params)
            if interval is None:
                reply = error(
                    reply_id,
                    INVALID_PARAMS,
                    "invalid params: ticks_subscribe expects [interval_ms], 1 to 60000",
                )
            else:
                self.subscription_count += 1
                sub_id = f"ticks-{self.subscription_count}"
                # Reserved now so an unsubscribe in the same batch finds it; the task
                # starts only once the reply carrying the id has been sent.
                self.subscriptions[sub_id] = None
                effects.after_reply.append(self.start_ticks(sub_id, interval))
                reply = result(reply_id, sub_id)
        elif method == "ticks_unsubscribe":
            sub_id = single_param(params)
            if sub_id is MISSING:
                reply = error(
                    reply_id, INVALID_PARAMS, "invalid params: ticks_unsubscribe expects [id]"
                )
            else:
                running = isinstance(sub_id, str) and sub_id in self.subscriptions
                task = self.subscriptions.pop(sub_id) if running else None
                if task is not None:
                    task.cancel()
                reply = result(reply_id, running)
        elif method == "ask":
            question = single_param(params)
            if question is MISSING:
                reply = error(reply_id, INVALID_PARAMS, "invalid params: ask expects [question]")
            else:
                response = await self.ask(question)
                if "error" in response:
                    reply = error(
                        reply_id, CLIENT_REFUSED, "the client refused to confirm", response["error"]
                    )
                else:
                    reply = result(reply_id, {"question": question, "answer": response["result"]})
        else:
            reply = error(reply_id, METHOD_NOT_FOUND, "method not found")
        return None if id_ is MISSING else reply

    async def handle(self, message: str | bytes) -> None:
        """Answers one WebSocket message: a request or a batch."""
        reply: Any
        effects = Effects()
        try:
            text = message.decode("utf-8") if isinstance(message, bytes) else message
            parsed = json.loads(text, parse_constant=reject_constant)
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError are ValueErrors
            reply = error(None, PARSE_ERROR, "parse error")
        else:
            if isinstance(parsed, list):
                if not parsed:
                    reply = error(None, INVALID_REQUEST, "invalid request: empty batch")
                else:
                    # Side by side, so a batch takes as long as its longest sleep.
                    replies = await asyncio.gather(*(self.call(r, effects) for r in parsed))
                    reply = [r for r in replies if r is not None] or None
            else:
                reply = await self.call(parsed, effects)
        if reply is not None:
            await self.ws.send(encode(reply))
        for push in effects.after_reply:
            await push()
        if effects.close:
            await self.ws.close(1000, "closed on request")


async def handler(ws: ServerConnection, name: str) -> None:
    conn = Connection(ws, name)
    pending: set[asyncio.Task[None]] = set()

    async def guarded(message: str | bytes) -> None:
        try:
            await conn.handle(message)
        except ConnectionClosed:
            pass  # the peer left while we were answering; nothing to tell it
        except Exception as exc:  # noqa: BLE001 - one bad message must not end the server
            sys.stderr.write(f"upstream.py: error handling a message: {exc!r}\n")

    try:
        async for message in ws:
            # One task per message so a `sleep` does not hold up what comes after it.
            task = asyncio.create_task(guarded(message))
            pending.add(task)
            task.add_done_callback(pending.discard)
    except ConnectionClosed:
        pass
    finally:
        # Replies to a closed connection have nowhere to go. A task inside `close`
        # may be among them; websockets shields the handshake from cancellation.
        for task in pending:
            task.cancel()
        conn.close_pushes()


def watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Sets `stop` when stdin reaches EOF (the spawning process went away)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return  # no stdin at all: nothing to watch

    def read_until_eof() -> None:
        # os.read, not sys.stdin.buffer: the buffered reader holds a lock while it
        # blocks, and a daemon thread holding it aborts interpreter shutdown.
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass  # the loop is already closed: we are exiting anyway

    # A daemon thread: a blocking read cannot be cancelled, and it must not keep the
    # interpreter alive after a signal has asked us to stop. (`connect_read_pipe`
    # would avoid the thread but rejects stdin redirected from a regular file.)
    threading.Thread(target=read_until_eof, name="stdin-watch", daemon=True).start()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", default="python-upstream", help="what `whoami` returns")
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with serve(
        lambda ws: handler(ws, args.name),
        "127.0.0.1",
        0,
        max_size=MAX_MESSAGE_SIZE,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        watch_stdin(loop, stop)
        await stop.wait()
    # Leaving the `async with` closes open connections with 1001 (going away).


if __name__ == "__main__":
    asyncio.run(main())
