"""Forwards: the GEMM kernel, paddle-scorer's decoder and its runner, the library's forward, packed labels, prefix
reuse, layer-streamed execution, and the choice between them. Token ids in, float32 log-probs out."""
