"""Two kinds of failure, decided here and nowhere else.

- A **content** failure is the input's own fault: bytes that do not decode, a clip a filter rejects,
  an answer that fails the caption schema from an endpoint that DID answer. It is a source's or a
  clip's fate, recorded in the manifests, and a rerun gives the same fate.
- An **infrastructure** failure is the fault of something the work needs: an endpoint that refuses
  connections, times out or answers 5xx/429 after the configured retries, an out-of-memory error, a
  model or engine that fails to load or dies, object storage that throttles or fails, a lost actor
  or node, a full disk. It is NEVER a fate: the work is retried, and if it still fails the source is
  left undone (no completion record, in no published version), the run exits non-zero naming why,
  and the same command completes it later.

Every stage, engine and the latent-cache builder asks `is_infrastructure(err)`; the pipeline marks
work it could not do with `defer` (curation) or re-raises (training/cache.py). Classification is by
exception type and, where libraries only give a message (pyarrow's S3 errors, CUDA's OOM), by the
message; types are matched by NAME so that the kernel imports none of openai, vllm, ray or torch.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from typing import Callable, TypeVar

from spacetime.errors import describe

log = logging.getLogger(__name__)
T = TypeVar("T")

# Exit status of a run that left work for the rerun (2 is a user error; 1 a bug).
EXIT_INCOMPLETE = 3


class InfrastructureError(RuntimeError):
    """Work that could not be done for a reason outside its input (`reason` says which part failed)."""


class RunIncomplete(RuntimeError):
    """A run that finished what it could and left sources for the rerun (exit EXIT_INCOMPLETE)."""

    def __init__(self, message: str, left: dict[str, str]):
        super().__init__(message)
        self.left = left  # source URI -> why it was left


# By type name (any module): the transport/engine/cluster errors of the libraries we run on.
_INFRA_TYPES = {
    # openai client: connection refused/reset, timeouts, 429 and 5xx
    "APIConnectionError", "APITimeoutError", "RateLimitError", "InternalServerError",
    # vLLM: the engine core process died
    "EngineDeadError", "EngineGenerateError",
    # torch: CUDA / accelerator out of memory
    "OutOfMemoryError",
    # Ray: a lost worker, actor, node or object
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError",
    "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError", "ObjectReconstructionFailedError",
    "RaySystemError", "LocalRayletDiedError", "OutOfDiskError", "ObjectStoreFullError", "GetTimeoutError",
    "TaskUnschedulableError", "RuntimeEnvSetupError",
    # botocore / urllib3 transport
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProtocolError", "NewConnectionError",
}
_INFRA_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                 errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT}
# Messages of errors that only carry their cause as text (pyarrow's S3 filesystem raises OSError with
# the AWS error in the message; CUDA OOM used to be a RuntimeError). Lower case.
_INFRA_MESSAGES = (
    "out of memory", "cannot allocate memory",
    "http response code: 5", "http status 5", "response code 5", "slowdown", "slow down", "throttl",
    "service unavailable", "service_unavailable", "internal_failure", "network_connection", "slow_down",
    "serviceunavailable", "requesttimeout", "request timeout",
    "curlcode: 7", "curlcode: 28", "couldn't connect", "could not connect", "connection refused",
    "connection reset", "connection aborted", "timed out", "network is unreachable", "broken pipe",
    "no space left on device",
)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_infrastructure(err: BaseException) -> bool:
    """True if `err` (or anything in its cause chain) is an infrastructure failure (module docstring)."""
    for e in _chain(err):
        if isinstance(e, (InfrastructureError, MemoryError, ConnectionError, TimeoutError)):
            return True
        if any(t.__name__ in _INFRA_TYPES for t in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _INFRA_ERRNOS:
            return True
        if isinstance(e, (OSError, RuntimeError)):
            text = str(e).lower()
            if any(m in text for m in _INFRA_MESSAGES):
                return True
    return False


def retry(fn: Callable[[], T], what: str, attempts: int = 3, backoff: float = 1.0,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on infrastructure failures (up to `attempts` calls, exponential backoff with
    jitter); a content failure raises at once. The last infrastructure failure is raised as it is."""
    for attempt in range(attempts - 1):
        try:
            return fn()
        except Exception as err:
            if not is_infrastructure(err):
                raise
            delay = backoff * 2**attempt * (1 + 0.25 * random.random())
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", what, describe(err).splitlines()[0][:300], delay,
                        attempt + 1, attempts - 1)
            sleep(delay)
    return fn()
