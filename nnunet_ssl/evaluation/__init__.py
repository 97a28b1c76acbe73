"""Honest evaluation: metrics in millimetres, label-budget benchmarks, CPU plans and throughput.

Engines only; their command lines are in :mod:`nnunet_ssl.cli`. ``metrics`` (definitions, on arrays) with
``metrics_files`` and ``metrics_folders``; ``benchmark`` with ``benchmark_layout``, ``benchmark_records``,
``leakage``, ``report`` and ``report_plots``; ``stages`` (nnU-Net's commands as logged subprocesses, shared with the
demo); ``cpu_plans``; ``throughput`` with ``throughput_measure``, ``throughput_worker`` and ``throughput_table``.
"""
