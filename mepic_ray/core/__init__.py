"""The scheduling core, free of torch: requests and their slot layout, the per-mode
reuse policies, the block pool, the chunk coordinator, the KV cache manager and the
scheduler. It decides what every step computes, loads, copies and demotes; the
worker and the tier carry that out."""
