"""Benchmark support: the shared harness (inputs, eager baseline, interleaved timing, memory,
result files) used by benchmarks/ and the short `smskd-fast bench` table (quick)."""
