"""The frames of many channels bound for one switch, sent to the controller in few requests.

The controller runs each request's commands for a switch as one job (one bundle, one
barrier), and a request costs it far more than a command does: with one request per
frame, 32 busy channels made 32 jobs where one would do.  So every worker forwards its
frame through its switch's ``Lane``, which has at most ``IN_FLIGHT`` requests in flight.
A frame that finds fewer is sent at once, by itself (a lone command waits for nothing);
frames that come meanwhile wait, and when a request ends, the worker that sent it takes
all that waited (up to ``MAX_BATCH_COMMANDS``) as the next request and hands it to the
worker of the oldest of them to send.  Under load one request carries the frames of many
channels; idle, nothing changes.  Two in flight rather than one: while the controller
works on one request, the answers of the other are handed out and the next one is on its
way, so the controller does not wait for the agent (measured with one: the controller
idle about 60 % of the 32-channel benchmark; two did about a third better, four no
better than two).

What each channel is promised holds per frame, not per request:

* each command keeps its own idempotency key, and each frame gets back exactly its own
  answers: the controller answers a batch in order, one answer per command (the count is
  checked), and a frame's are the slice at its place;
* a worker waits for its frame's answers before taking the next frame, so a channel has
  at most one frame in flight and its order holds;
* a batch of several frames that fails as a whole (no answer, a refused request, an
  answer UNAVAILABLE: the controller says that of the whole job, whoever caused it) says
  nothing about any one frame: each of them gets ``Alone`` and is asked again by itself,
  so one channel's trouble is never another channel's answer.  The keys make asking
  again safe: what was applied is answered again, not applied twice.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

IN_FLIGHT = 2              # requests per switch at once
MAX_BATCH_COMMANDS = 4096  # commands per request (the controller takes 200,000): a job stays short


class Alone(Exception):
    """The batch this frame was in failed as a whole: ask for this frame's answers alone."""


@dataclass
class _Ticket:
    """One frame's place in a lane: its requests, then its answers or its error."""

    requests: list[dict]
    woken: threading.Event = field(default_factory=threading.Event)
    batch: list[_Ticket] | None = None  # handed to this frame's worker to send (its own first)
    answers: list[dict] | None = None
    error: BaseException | None = None

    @property
    def settled(self) -> bool:
        return self.answers is not None or self.error is not None


class Lane:
    """One switch's way to the controller.  ``send`` posts commands and returns one
    answer each, or raises.  Invariant: frames wait only while ``IN_FLIGHT`` requests are
    in flight, so a request that ends always finds a next batch or leaves a free place."""

    def __init__(self, send: Callable[[list[dict]], list[dict]], limit: int = MAX_BATCH_COMMANDS):
        self._send = send
        self._limit = limit
        self._lock = threading.Lock()
        self._waiting: deque[_Ticket] = deque()
        self._in_flight = 0
        self.requests = self.frames = self.commands = self.split = 0  # for the status (split: Alone)

    @property
    def waiting(self) -> int:
        """Frames waiting for a request in flight to end."""
        return len(self._waiting)

    def status(self) -> dict:
        return {"requests": self.requests, "frames": self.frames, "commands": self.commands, "split": self.split,
                "waiting": self.waiting}

    def forward(self, requests: list[dict]) -> list[dict]:
        """This frame's answers, in order; raises what ``send`` raised when the frame went
        alone, or ``Alone`` when a batch of several frames failed as a whole."""
        ticket = _Ticket(requests)
        with self._lock:
            if self._in_flight < IN_FLIGHT:
                self._in_flight += 1
                ticket.batch = [ticket]
            else:
                self._waiting.append(ticket)
        while not ticket.settled:
            if ticket.batch:
                batch, ticket.batch = ticket.batch, None
                self._send_batch(batch)
            else:
                ticket.woken.wait()
                ticket.woken.clear()
        if ticket.error is not None:
            raise ticket.error
        return ticket.answers

    def _send_batch(self, batch: list[_Ticket]) -> None:
        """Send ``batch`` as one request and settle each of its frames; then hand the
        frames that waited meanwhile, as the next batch, to the worker of the oldest."""
        requests = [request for ticket in batch for request in ticket.requests]
        self._count(batch, requests)
        try:
            answers = self._send(requests)
            if len(answers) != len(requests):
                raise ValueError(f"{len(answers)} answers to {len(requests)} commands")
        except BaseException as error:  # whatever happens, no worker of the batch waits forever
            if len(batch) > 1:
                self._count_split()
            for ticket in batch:
                ticket.error = error if len(batch) == 1 else Alone(f"the batch failed as a whole: {error}")
        else:
            start = 0
            for ticket in batch:
                ticket.answers = answers[start:start + len(ticket.requests)]
                start += len(ticket.requests)
        finally:
            with self._lock:
                if self._waiting:
                    following = self._take()
                    following[0].batch = following
                    following[0].woken.set()
                else:
                    self._in_flight -= 1
            for ticket in batch:
                ticket.woken.set()

    def _count(self, batch: list[_Ticket], requests: list[dict]) -> None:
        with self._lock:  # two senders at once
            self.requests += 1
            self.frames += len(batch)
            self.commands += len(requests)

    def _count_split(self) -> None:
        with self._lock:
            self.split += 1

    def _take(self) -> list[_Ticket]:
        """The oldest waiting frames up to ``limit`` commands (at least one frame)."""
        batch = [self._waiting.popleft()]
        count = len(batch[0].requests)
        while self._waiting and count + len(self._waiting[0].requests) <= self._limit:
            count += len(self._waiting[0].requests)
            batch.append(self._waiting.popleft())
        return batch
