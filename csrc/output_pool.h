// A small cache of the native kernel's large output buffers (the gradients).
//
// A fresh [N, V] or [V, H] gradient from the system allocator is fresh memory from the
// kernel: its first touch faults in every 4 KiB page, which on the development VM costs
// more than computing the gradient (about 45 ms of a 134 ms forward+backward at N = 512,
// V = 50257, H = 768). The same sizes come back every training step, so a buffer freed by
// the caller (autograd dropping a gradient) is kept here, up to a byte limit, and handed out
// again for the next request of exactly its size: already faulted in, as the CUDA caching
// allocator does for GPU memory. Buffers under kMinPooledBytes go to at::empty as usual.
//
// The limit is FUSED_COSLOSS_NATIVE_POOL_MB (default 1024; 0 turns the cache off), read once.
// release_cached_buffers() frees what is cached (fused_cosloss.native.empty_cache()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fcl {

// An uninitialised tensor of these sizes and options, from the cache when it is large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the bytes released.
int64_t release_cached_buffers();

// Bytes now cached (not in use by any tensor).
int64_t cached_bytes();

}  // namespace fcl
