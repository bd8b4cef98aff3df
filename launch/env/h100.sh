# shellcheck shell=bash
# XLA and NCCL settings for H100 nodes (source it, or set JCLIP_ENV=launch/env/h100.sh for launch/slurm.sbatch).
# Every XLA flag here parses in jax 0.10.2: XLA rejects unknown flags at start-up, even on CPU, and a test
# checks these.
export JAX_OPTIMIZATION_LEVEL=${JAX_OPTIMIZATION_LEVEL:-O1}  # latency-hiding scheduler, pipelined collectives
# Combine collectives up to 128 MiB, at least one ViT layer's parameters.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Hopper only
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
