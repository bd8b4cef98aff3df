"""jclip.tools: benchmarks and experiment drivers (bench_step, loss_bench, data_bench, compare).

They use the library and the library never uses them (shared/ARCHITECTURE.md, layers).
"""
