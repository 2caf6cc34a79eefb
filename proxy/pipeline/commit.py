"""The commit rule of a streamed request, in one object with explicit states.

Three threads decide together what the client's status line will be: the server thread
(which must answer within `commit_delay` so keepalives can flow), the stream thread
(whose deployments answer or fail) and the heartbeat (a client that hangs up, a shutdown).
Every transition happens under one lock here:

    WAITING ──answer_with()─────> ANSWERING   a deployment answered: its headers go out
       │  └──refuse(outcome)────> REFUSED     no answer before any header: its own status
       └─────wait() times out───> COMMITTED   200 text/event-stream before any answer
             (or commit_if_waiting)

Once ANSWERING or COMMITTED the response is a stream: every later failure is one
terminal event in the client's protocol.  REFUSED is an ordinary error response.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from ..flag import Flag
from ..upstream import UpstreamResponse
from .attempt import Outcome


class Phase(enum.Enum):
    WAITING = "waiting"
    ANSWERING = "answering"
    COMMITTED = "committed"
    REFUSED = "refused"


@dataclass(frozen=True)
class Answer:
    """The deployment whose answer the server thread sends (its status and headers; only
    the proxy's own headers for an answer translated from another format)."""

    response: UpstreamResponse
    deployment: str
    translated: bool = False


class CommitRule:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided = Flag()
        self.phase = Phase.WAITING
        self.answer: Answer | None = None
        self.refusal: Outcome | None = None
        self._on_settled: list = []  # called once the phase leaves WAITING

    def when_settled(self, callback) -> None:
        """Call `callback()` once the phase is no longer WAITING (now, if it is not):
        clients that share this request's answer wait for that."""
        with self._lock:
            if self.phase is Phase.WAITING:
                self._on_settled.append(callback)
                return
        callback()

    def _settled(self) -> None:
        """Under the lock, as the phase leaves WAITING: the callbacks, to run after it."""
        callbacks, self._on_settled = self._on_settled, []
        return callbacks

    # -- server thread (or, for a stream the server thread reads itself, the heartbeat) --
    def wait(self, delay: float) -> Phase:
        """The phase the response starts in: decided by the stream thread within `delay`,
        or COMMITTED (so keepalives can flow while the deployments take their time)."""
        self._decided.wait(delay)
        self.commit_if_waiting()
        return self.phase

    def commit_if_waiting(self) -> bool:
        """WAITING becomes COMMITTED: True when this call made it so."""
        with self._lock:
            if self.phase is not Phase.WAITING:
                return False
            self.phase = Phase.COMMITTED
            callbacks = self._settled()
        for callback in callbacks:
            callback()
        return True

    # -- stream thread ---------------------------------------------------------------
    def answer_with(self, response: UpstreamResponse, deployment: str,
                    translated: bool = False) -> bool:
        """This deployment answers.  False when its answer cannot be the response: a JSON
        body after `200 text/event-stream` went out, or the request already ended."""
        callbacks = []
        with self._lock:
            if self.phase is Phase.REFUSED:
                return False
            if self.phase is not Phase.WAITING and not response.is_event_stream:
                return False  # the response is (or will be) an event stream already
            if self.phase is Phase.WAITING:
                self.phase = Phase.ANSWERING
                self.answer = Answer(response, deployment, translated)
                self._decided.set()
                callbacks = self._settled()
        for callback in callbacks:
            callback()
        return True

    def refuse(self, outcome: Outcome) -> bool:
        """No answer: True when the server thread will send it as an error response;
        False when the response is already a stream (the caller ends it with an event)."""
        with self._lock:
            if self.phase is not Phase.WAITING:
                return self.phase is Phase.REFUSED
            self.phase = Phase.REFUSED
            self.refusal = outcome
            self._decided.set()
            callbacks = self._settled()
        for callback in callbacks:
            callback()
        return True

    @property
    def streaming(self) -> bool:
        """Has a 200 gone (or is it going) to the client?"""
        with self._lock:
            return self.phase in (Phase.ANSWERING, Phase.COMMITTED)
