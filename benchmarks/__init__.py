"""expbus benchmarks: what logging costs the training step, side by side with Lightning's own loggers.

Run from the repository root (or ``expbus bench`` from a source checkout)::

    python -m benchmarks            # full run (~12 min on 2 cores), writes benchmarks/results/<date>-<host>.md
    python -m benchmarks --quick    # smoke run (<1 min), small sizes, writes nothing unless --out is given
    python -m benchmarks.readme_table   # copy the latest results' summary into README.md

Each benchmark runs in a fresh subprocess and can also be run alone:

* :mod:`benchmarks.step_overhead`: real ``Trainer.fit`` runs, a GIL-releasing ~2 ms step and
  a Python-bound tiny step, K in {1, 10, 100} metrics per step; no logging, Lightning's CSV,
  TensorBoard, MLflow and W&B loggers, and expbus with the same backends, each configuration
  in a fresh process; per-step median and p99 overhead, close time, other threads' CPU.
* :mod:`benchmarks.publish_overhead`: ns per ``bus.publish(event)`` against a bare
  ``deque.append`` of the same event, interleaved in the same process while the bus drains.
* :mod:`benchmarks.drain_throughput`: events/s and metric values/s from the first publish
  until ``flush()`` returns, into the journal, jsonl, tensorboard, csv, dllogger, mlflow and an
  in-memory sink.
* :mod:`benchmarks.memory_growth`: peak RSS growth over 1M events with a stalled sink, against
  what the sink's policy lets it hold (its queue plus one batch).
* :mod:`benchmarks.import_time`: ``import expbus`` and the bridge on top of Lightning.

Not part of the default run: :mod:`benchmarks.gpu_overhead` (CUDA machines: the step overhead
with CUDA tensors and a sync-debug-mode proof of which thread syncs) and
:mod:`benchmarks.whatif` (changes to the bus and bridge tried at run time, behind the
recommendations of the report).

Every benchmark reads its data back (CSV rows, TensorBoard scalars, MLflow metric history, W&B
offline run records, jsonl and DLLogger lines, journal records, sink counters) and fails
loudly (exit status 1, ``FAILED`` in the report) when anything logged did not arrive.
Times are measured and reported, never asserted.
"""
