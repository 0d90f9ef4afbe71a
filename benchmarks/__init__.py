"""benchmarks: the zoo's measurement harness (`benchmarks.harness`), the generation and training-throughput
benchmarks against the same-size Llama baseline, and one script per experiment."""
