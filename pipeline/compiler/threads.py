"""TVM's compiler, safe to call from several threads of one process: a lab compiles for its devices at once.

TVM 0.27 keeps the TE tag scope (``te.tag_scope``: TOPI's computes enter one while Relax legalizes an op and
read it back to tag what they create) in a single class attribute for the whole process. Two threads
legalizing at once see each other's scope: the second one's ``__enter__`` fails with "nested op_tag is not
allowed for now", or a compute takes the other thread's tag. A scheduled two-device lab lost its Pi's job to
it now and then. TVM's other current-contexts (PassContext, Target) are per thread in C++ already; this makes
the tag scope per thread too, with the same checks and warning as TVM's own methods.
"""

from __future__ import annotations

import threading
import warnings

from tvm.te import tag as te_tag

__all__ = ["tag_scope_per_thread"]

_this_thread = threading.local()


def _get_current(cls):
    scope = getattr(_this_thread, "scope", None)
    if scope is not None:
        scope.accessed = True
    return scope


def _enter(self):
    if getattr(_this_thread, "scope", None) is not None:
        raise ValueError("nested op_tag is not allowed for now")
    _this_thread.scope = self
    return self


def _exit(self, ptype, value, trace):
    if not self.accessed:
        warnings.warn(f"Tag '{self.tag}' declared via TagScope was not used.", stacklevel=2)
    _this_thread.scope = None


def tag_scope_per_thread() -> None:
    """Replace TagScope's process-wide current scope by one per thread (idempotent)."""
    scope = te_tag.TagScope
    scope.get_current = classmethod(_get_current)
    scope.__enter__ = _enter
    scope.__exit__ = _exit
