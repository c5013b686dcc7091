"""expbus benchmarks: what logging costs the training thread, and how fast the bus drains.

Run from the repository root::

    python -m benchmarks            # full run (~1 min on 2 cores), writes benchmarks/results/<date>-<host>.md
    python -m benchmarks --quick    # smoke run, tiny sizes, writes nothing unless --out is given

Each benchmark runs in a fresh subprocess and can also be run alone:

* :mod:`benchmarks.publish_overhead`: ns per ``bus.publish(event)`` against a bare
  ``deque.append`` of the same event, interleaved in the same process while the bus drains.
* :mod:`benchmarks.drain_throughput`: events/s and metric values/s from the first publish
  until ``flush()`` returns, into the journal, the jsonl sink and an in-memory sink.

Every benchmark reads its data back (jsonl lines, journal records, sink counters) and fails
loudly (exit status 1, ``FAILED`` in the report) when anything published did not arrive.
Times are measured and reported, never asserted.
"""
