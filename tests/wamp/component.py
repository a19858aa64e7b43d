"""The WAMP callee and publisher the WAMP upstream tests run against a Crossbar router.

Autobahn|Python on asyncio. Joins REALM at URL (anonymously), then registers:

- com.example.add2(a, b) -> a + b                       one positional result
- com.example.pair()     -> CallResult(1, 2)            several positional results
- com.example.kw(a, b)   -> CallResult(sum=.., diff=..) keyword results only
- com.example.echo(*args, **kwargs) -> the same args and kwargs back
- com.example.fail(*args) raises ApplicationError("com.example.error.fail", *args)
- com.example.slow(seconds) prints "slow <seconds>", sleeps, then returns "done"; a
  CANCEL that reaches the callee (mode kill/killnowait) cancels the sleep and prints
  "canceled <seconds>"

and publishes a counter to com.example.tick every 100 ms (`[n]`, `{"n": n}`).

Prints "ready" once every procedure is registered and publishing has begun, and exits
when its stdin closes, so that a test's dropped child takes it along.
"""

import argparse
import asyncio
import os
import sys
import threading

from autobahn.asyncio.wamp import ApplicationRunner, ApplicationSession
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult


class Component(ApplicationSession):
    async def onJoin(self, details):
        async def add2(a, b):
            return a + b

        async def pair():
            return CallResult(1, 2)

        async def kw(a, b):
            return CallResult(sum=a + b, diff=a - b)

        async def echo(*args, **kwargs):
            return CallResult(*args, **kwargs)

        async def fail(*args):
            raise ApplicationError("com.example.error.fail", *args)

        async def slow(seconds):
            # Tells a test that the call has reached the callee, so that what it does next
            # (a client leaving, say) happens while the call is running.
            print(f"slow {seconds}", flush=True)
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                print(f"canceled {seconds}", flush=True)
                raise
            return "done"

        for name, fn in [
            ("add2", add2),
            ("pair", pair),
            ("kw", kw),
            ("echo", echo),
            ("fail", fail),
            ("slow", slow),
        ]:
            await self.register(fn, f"com.example.{name}")

        async def tick():
            n = 0
            while True:
                n += 1
                self.publish("com.example.tick", n, n=n)
                await asyncio.sleep(0.1)

        asyncio.ensure_future(tick())
        print("ready", flush=True)

    def onDisconnect(self):
        # The router went away: a test restarting it starts this component again.
        os._exit(0)


def exit_when_stdin_closes():
    sys.stdin.read()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="e.g. ws://127.0.0.1:8080/ws")
    parser.add_argument("--realm", default="realm1")
    args = parser.parse_args()
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    ApplicationRunner(args.url, args.realm).run(Component)


if __name__ == "__main__":
    main()
