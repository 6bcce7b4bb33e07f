"""Typed errors of the runtime.

Every error edge_slm raises on purpose derives from :class:`EdgeSlmError`, so a caller
can catch them all in one place. Messages name the bad value and what is allowed.
"""

from __future__ import annotations


class EdgeSlmError(Exception):
    """Base class of every error raised on purpose by edge_slm."""


class BundleError(EdgeSlmError):
    """A bundle folder is missing, malformed or inconsistent with its graph."""


class BundleVersionError(BundleError):
    """The manifest's format version is not one this runtime can read."""


class ChecksumError(BundleError):
    """A bundle file's sha256 differs from the one recorded in its manifest."""


class InvalidArgumentError(EdgeSlmError, ValueError):
    """A caller passed a value outside the allowed range or set."""


class ContextLengthError(InvalidArgumentError):
    """A prompt does not fit in the model's context window."""


class ChatTemplateError(EdgeSlmError):
    """A chat template cannot be rendered with what this runtime has."""


class CapacityError(EdgeSlmError):
    """A model has no room for another generating conversation or its KV memory.

    Raised when ``max_sessions`` conversations are generating at once (after waiting
    ``wait_s``), or when the KV memory would pass ``max_kv_bytes``
    (:class:`~edge_slm.engine.session.LoadOptions`). Nothing is lost: retry later.
    """


class BusyError(InvalidArgumentError):
    """A conversation was asked to generate while its previous call is still running.

    One conversation serves one call at a time (finish or close its stream first);
    separate conversations, or the model's own calls, may run at once.
    """


class DeadlineError(EdgeSlmError):
    """The call's ``deadline_s`` passed before a first token could be sampled.

    The prompt is computed in chunks and the deadline is checked between them (and
    between the options of :meth:`~edge_slm.TextGenerator.choose`); once tokens are
    being generated, a deadline ends the generation with ``FinishReason.DEADLINE``
    instead, keeping what was generated.
    """


class ConstraintError(InvalidArgumentError):
    """A generation constraint (JSON schema, regex, grammar) is invalid or unavailable.

    Raised for a schema, regex or grammar llguidance cannot compile (the message says
    where), and when llguidance is not installed (the message names the extra:
    ``pip install 'edge-slm[structured]'``).
    """
