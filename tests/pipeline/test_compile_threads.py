"""TVM's compiler called from two threads of one process at once, as a lab compiles for its devices."""

from __future__ import annotations

import threading


def test_an_op_tag_scope_held_by_one_thread_is_not_seen_by_another():
    """Regression: TVM keeps the TE tag scope, which TOPI's computes enter while Relax legalizes an op, in one
    attribute for the whole process. A scheduled two-device lab failed now and then: the Pi's compile said "nested
    op_tag is not allowed for now" while the x86 server's compile, in another thread, was inside a scope."""
    from tvm import te, topi

    import pipeline.compiler.frontend  # noqa: F401  (every build goes through it; it makes the scope per thread)

    inside, leave = threading.Event(), threading.Event()
    seen = []

    def hold_a_scope():
        with te.tag_scope("the other thread's"):
            inside.set()
            leave.wait(30)
            seen.append(te.compute((2,), lambda i: i, name="b").op.tag)

    other = threading.Thread(target=hold_a_scope)
    other.start()
    try:
        assert inside.wait(30)
        relu = topi.nn.relu(te.placeholder((4,), name="x"))  # enters its own "elemwise" scope
        plain = te.compute((2,), lambda i: i, name="a")
    finally:
        leave.set()
        other.join(30)
    assert relu.op.tag == "elemwise" and plain.op.tag == ""
    assert seen == ["the other thread's"]
