"""Honest evaluation: metrics in millimetres, label-budget benchmarks, CPU plans and throughput."""
