"""What runs in a Ray Train worker (or a one-worker Tune trial): the loop, its Ray session, the
checkpointer, reporting, the start-up line, preemption, and compile (the cache and the compile workers)."""
