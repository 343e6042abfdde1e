"""CEL conditions that may be slow, run in a child process with a time limit.

The load-time cost budget (``relay.policy.expr``) bounds the *steps* of a condition, not
the work of each step: ``dnsbl_listed.exists(d, d.matches("(x+x+)+y"))`` is 4,001 steps
but 11 ms on 1,000 long strings, and the binding holds the GIL throughout (a thread
would not free the loop; measured: a helper thread got 1 tick of 1 ms in 106 ms). So a
condition with a comprehension is evaluated here, in a child fed over pipes
(``relay.proc.pipes``), and the child is killed when a message's conditions overrun their
time limit. Conditions without comprehensions stay on the loop: with literal regular
expressions only (the loader refuses patterns built from message data) their worst case
is a few milliseconds (docs/policy.md, "Cost budget").

Started as ``python -m relay.proc.celsandbox PARENT_PID``. Requests and answers are JSON,
never pickle:

- request: ``{"when": SOURCE, "values": {fact: value}}`` (fact values are JSON already:
  the Verdict reports them);
- answer: ``{"result": true|false}``, ``{"other": "TypeName"}`` for a result that is
  not a bool, or ``{"error": "TypeName: text"}``.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import Any

from relay.celext import cel
from relay.errors import ConditionTimeout, WorkerDied, WorkerError, WorkerTimeout
from relay.proc.pipes import PipeWorkers, serve

MODULE = "relay.proc.celsandbox"
_PROGRAMS = 256  # compiled conditions kept per child (a policy's worth, across reloads)


class ConditionSandbox:
    """The parent side: one child process, started on first use (policies without
    comprehensions never start it). Loop-affine, like ``PipeWorkers``."""

    def __init__(self, time_limit: float, *, processes: int = 1) -> None:
        if time_limit <= 0:
            raise ValueError("time_limit must be positive")
        self.time_limit = time_limit
        self._workers = PipeWorkers(MODULE, processes, name="relay-cel")

    async def run(self, source: str, values: dict[str, Any], budget: float) -> bool:
        """The condition's result. Raises ConditionTimeout when no answer came within
        ``budget`` seconds (the child is killed and replaced), ValueError with the
        evaluation error's text (or the type of a result that is not a bool) otherwise."""
        if budget <= 0:
            raise ConditionTimeout(f"time limit of {self.time_limit:g} s used up")
        request = json.dumps({"when": source, "values": values}).encode()
        try:
            # retry: a child killed by an earlier overrun, or crashed, gets one more try.
            reply = await self._workers.call(request, kill_after=budget, retry=True)
            answer = json.loads(reply)
        except WorkerTimeout:
            raise ConditionTimeout(f"no result within {self.time_limit:g} s") from None
        except WorkerDied as exc:
            raise ConditionTimeout(f"no result: {exc}") from None
        except WorkerError as exc:
            raise ValueError(str(exc)) from None
        if "error" in answer:
            raise ValueError(str(answer["error"]))
        if "other" in answer:
            raise ValueError(f"condition gave {answer['other']}, not a bool")
        return bool(answer["result"])

    @property
    def pids(self) -> list[int]:
        return self._workers.pids

    async def close(self) -> None:
        await self._workers.close()


class _Evaluator:
    """The child side: compiled programs cached by source (bounded, least recent out)."""

    def __init__(self) -> None:
        self._programs: OrderedDict[str, Any] = OrderedDict()

    def program(self, source: str) -> Any:
        program = self._programs.pop(source, None)
        if program is None:
            program = cel.compile(source)
            if len(self._programs) >= _PROGRAMS:
                self._programs.popitem(last=False)
        self._programs[source] = program
        return program

    def handle(self, payload: bytes) -> bytes:
        request = json.loads(payload)
        values: dict[str, Any] = request["values"]
        context = cel.Context()
        context.set_variable_resolver(values.get)
        for name, value in values.items():
            if value is None:  # the resolver's None means "unknown": bind null itself
                context.add_variable(name, None)
        try:
            result = self.program(str(request["when"])).execute(context)
        except Exception as exc:  # the condition's own failure, reported as the loop's would be
            text = (str(exc).strip().splitlines() or [""])[0][:160]
            return json.dumps({"error": f"{type(exc).__name__}: {text}"}).encode()
        if result is True or result is False:
            return json.dumps({"result": result}).encode()
        return json.dumps({"other": type(result).__name__}).encode()


if __name__ == "__main__":
    sys.exit(serve(_Evaluator().handle))
